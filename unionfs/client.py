"""The client side of the warm mount server (server.py), the start-up timeline, and the
light ``pyunionfs umount``.

A daemonizing ``pyunionfs mount`` (command.py) and ``unionfs.Overlay`` first ask a server
that has everything imported for a worker that becomes the daemon; when there is none, or it is stale or
refuses, they mount by themselves (a cold start) and leave a server for the next mount.
This runs before anything else, so it imports only what the interpreter has loaded already
(no typing, no socket module, no argparse): the warm path costs an interpreter start and
one round trip.
"""

from __future__ import annotations

import _socket
import os
import sys
import time

PROTOCOL = "pyunionfs-server 1"
# The world a server was started in and can't change for a caller: its user, its
# namespaces, its code, and the environment its interpreter read at start.
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")
_START_ENV = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES")
# the caller waits this long for the server's yes or no, then mounts by itself
ANSWER_TIMEOUT = 5.0
# and this long for the worker's answer once the mount serves (a cold start waits 30 s for
# its daemon)
MOUNT_TIMEOUT = 120.0
# (step, time.perf_counter()) of this start-up, logged by the daemon once it serves
MARKS: list[tuple[str, float]] = []


def mark(step: str) -> None:
    MARKS.append((step, time.perf_counter()))


def timeline() -> str:
    """'step +ms' for each mark since the first: where a start-up spent its time."""
    if not MARKS:
        return ""
    t0 = MARKS[0][1]
    return ", ".join(f"{s} +{(t - t0) * 1000:.1f} ms" for s, t in MARKS)


def enabled(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    return (os.environ if env is None else env).get("PYUNIONFS_SERVER", "1") != "0"


def _code_stamp() -> str:
    """Where our code and pyfuse3 are and when they last changed: an edit or a reinstall
    starts a new server instead of mounting with the old code.  pyfuse3 is looked for
    beside this interpreter (a venv's site-packages), not on sys.path or sys.prefix, which
    differ between the launcher (python -S) and the server (python -m): both must name one
    server."""
    here = os.path.dirname(os.path.abspath(__file__))
    newest = 0
    for d in (here, os.path.join(here, "oci")):
        with os.scandir(d) as it:
            for e in it:
                if e.name.endswith(".py"):
                    newest = max(newest, e.stat().st_mtime_ns)
    v = sys.version_info
    try:
        newest = max(newest, os.stat(os.path.join(
            os.path.dirname(os.path.dirname(sys.executable)), "lib", f"python{v[0]}.{v[1]}",
            "site-packages", "pyfuse3")).st_mtime_ns)
    except OSError:
        pass
    return f"{here}|{sys.executable}|{newest}"


def identity(env: dict[str, str] | os._Environ[str]) -> str:
    """Everything a server must share with its caller that it can't take on per request."""
    ns = []
    for n in NAMESPACES:
        try:
            ns.append(os.readlink(f"/proc/self/ns/{n}"))
        except OSError:
            ns.append(f"{n}:?")
    start = sorted(f"{k}={v}" for k, v in env.items() if k.startswith(_START_ENV))
    return "\n".join([PROTOCOL, f"euid={os.geteuid()}", *ns, _code_stamp(), *start])


def _digest(text: str) -> str:
    try:
        from _blake2 import blake2b  # builtin: hashlib would load OpenSSL (3 ms)

        return blake2b(text.encode(errors="surrogateescape"), digest_size=10).hexdigest()
    except ImportError:  # pragma: no cover - a Python built without it
        import zlib

        data = text.encode(errors="surrogateescape")
        return f"{zlib.crc32(data):08x}{zlib.adler32(data):08x}"


class Unsafe(Exception):
    """The socket directory is not private to this user: no server, a cold start."""


def socket_dir(env: dict[str, str] | os._Environ[str]) -> str:
    """A directory only this user can enter: $XDG_RUNTIME_DIR (or /run/user/UID)/pyunionfs,
    else /run/pyunionfs for root and /tmp/pyunionfs-UID for others; created 0700, and
    refused (Unsafe) when it is a symlink, someone else's, or open to others."""
    uid = os.geteuid()
    base = env.get("PYUNIONFS_SERVER_DIR")
    if not base:
        base = "/run/pyunionfs" if uid == 0 else f"/tmp/pyunionfs-{uid}"
        for cand in (env.get("XDG_RUNTIME_DIR") or "", f"/run/user/{uid}"):
            try:
                st = os.lstat(cand)
            except OSError:
                continue
            if os.path.isabs(cand) and st.st_uid == uid and not st.st_mode & 0o7077:
                base = os.path.join(cand, "pyunionfs")
                break
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise Unsafe(f"cannot create {base}: {e.strerror}") from None
    st = os.lstat(base)
    if (st.st_mode & 0o170000) != 0o040000 or st.st_uid != uid or (st.st_mode & 0o077):
        raise Unsafe(f"{base} is not a private directory of uid {uid}")
    return base


def socket_path(env: dict[str, str] | os._Environ[str]) -> tuple[str, str]:
    """(the socket of the server for this caller's world, that world's description)."""
    ident = identity(env)
    return os.path.join(socket_dir(env), f"s-{_digest(ident)}"), ident


# -- the wire format: a length and NUL-separated strings, no json (it imports re) -------


def encode(fields: list[str]) -> bytes:
    body = "\0".join(fields).encode(errors="surrogateescape")
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> list[str]:
    return body.decode(errors="surrogateescape").split("\0") if body else []


def read_line(sock: _socket.socket, timeout: float | None) -> str:
    """One newline-ended answer ('' at end of stream)."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(256)
        if not chunk:
            return ""
        data += chunk
    return data[:-1].decode(errors="replace")


def peer_uid(sock: _socket.socket) -> int:
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[4:8], sys.byteorder)


class Refused(Exception):
    """The server can't act for this caller (said why): the caller mounts by itself."""


def request(argv: list[str], env: dict[str, str] | os._Environ[str],
            stdio: tuple[int, int, int] = (0, 1, 2), cwd: int | None = None,
            title: list[str] | None = None,
            timeout: float = MOUNT_TIMEOUT) -> tuple[int, int]:
    """Have the server run ``pyunionfs ARGV`` for us: (exit status, the daemon's pid or 0).
    The worker works in ``cwd`` (a directory fd; default: ours) and shows ``title`` as its
    command line (default: ours).
    Raises Refused (or OSError, Unsafe) before anything was done, so that a cold start is
    safe; RuntimeError once the server took the mount over and then failed to report."""
    path, ident = socket_path(env)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(ANSWER_TIMEOUT)
        sock.connect(path)
        if peer_uid(sock) != os.geteuid():
            raise Refused("the server is another user's")
        proc = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            title = title or []
            fields = [ident, str(len(argv)), *argv, str(len(title)), *title,
                      *(f"{k}={v}" for k, v in env.items())]
            fds = (proc, *stdio) if cwd is None else (proc, *stdio, cwd)
            data = encode(fields)
            sent = sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, _fds(*fds))])
            sock.sendall(data[sent:])  # what didn't fit the socket's buffer at once
        finally:
            os.close(proc)
        answer = read_line(sock, ANSWER_TIMEOUT)
        if answer != "ok":
            raise Refused(answer[3:] if answer.startswith("no ") else "no answer")
        # Only now may the server act: had we given up (a timeout above), its worker would
        # read the end of the stream here and do nothing.
        sock.sendall(b"go\n")
        try:
            answer = read_line(sock, timeout)
        except OSError as e:
            raise RuntimeError(f"the mount server did not report: {e}") from None
        words = answer.split()
        if len(words) != 3 or words[0] != "rc":
            raise RuntimeError("the mount server's worker ended without reporting")
        return int(words[1]), int(words[2])
    finally:
        sock.close()


def _fds(*fds: int) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)


def spawn_server(env: dict[str, str] | os._Environ[str]) -> None:
    """Start the server for the next mounts, detached: its own session, cwd /, no stdio
    of ours (a caller that reads our output to its end must not wait for it)."""
    import subprocess

    try:
        # the last argument is room for the command lines its workers show (server.py)
        subprocess.Popen([sys.executable, "-m", "unionfs.server", "#" * 16384], cwd="/",
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, env=dict(env))
    except OSError:
        pass  # only the next mount's time is lost


# -- pyunionfs umount: light too, and it returns once the daemon has gone ----------------

DAEMON_EXIT_TIMEOUT = 10.0
# a daemon still there this long after the unmount is looked into: copies elsewhere?
COPIES_GRACE = 0.5
UMOUNT_TIMEOUT = 60.0


def _which(name: str) -> str | None:
    """shutil.which, without shutil's import."""
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _run(cmd: list[str], timeout: float) -> tuple[int, str]:
    """(status, stdout and stderr) of ``cmd``, without the subprocess module's import."""
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=[
            (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2)])
    finally:
        os.close(w)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        import select

        while (left := deadline - time.monotonic()) > 0 and select.select([r], [], [], left)[0]:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            out += chunk
        else:
            os.kill(pid, 9)
            out += f"timed out after {timeout:g} s".encode()
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def _wait_daemon(merged: str, pidfd: int, dev: str) -> None:
    """Until the daemon has gone; where copies of the mount in other mount namespaces keep
    it serving (a container or unshare made while it was mounted), say so instead."""
    import select

    if select.select([pidfd], [], [], COPIES_GRACE)[0]:
        return
    from unionfs.mounttable import copies

    elsewhere = copies(dev)
    if elsewhere:
        pids = ", ".join(map(str, sorted(elsewhere.values())[:5]))
        print(f"pyunionfs: note: '{merged}' lives on in {len(elsewhere)} other mount "
              f"namespace(s) made while it was mounted (processes {pids}); its daemon serves "
              "them until they end", file=sys.stderr)
    elif not select.select([pidfd], [], [], DAEMON_EXIT_TIMEOUT)[0]:
        print(f"pyunionfs: warning: the daemon of '{merged}' is still running "
              f"{DAEMON_EXIT_TIMEOUT + COPIES_GRACE:g} s after the unmount", file=sys.stderr)


def umount(merged: str, lazy: bool) -> int:
    """Unmount ``merged`` with fusermount3 (umount(8) without it) and wait for its daemon
    to end, so that what it does last (WORK left empty, nfs_export's records) is done when
    the command returns; a lazy unmount leaves the daemon serving whoever still uses it."""
    if not os.path.ismount(merged):
        try:
            os.stat(merged)
        except OSError as e:
            if e.errno != 107:  # ENOTCONN: a dead mount, still ours to remove
                print(f"pyunionfs: error: '{merged}': {e.strerror}", file=sys.stderr)
                return 1
        else:
            print(f"pyunionfs: error: '{merged}' is not mounted", file=sys.stderr)
            return 1
    pidfd = dev = None
    if not lazy:
        from unionfs.mounttable import daemon_pid

        found = daemon_pid(merged)
        if found is not None:
            dev = found[1]
            try:
                pidfd = os.pidfd_open(found[0])
            except OSError:
                pass  # gone already: nothing to wait for
    tool = _which("fusermount3") or _which("fusermount")
    cmd = [tool, "-u"] + (["-z"] if lazy else []) + [merged] if tool else \
        [_which("umount") or "/bin/umount"] + (["-l"] if lazy else []) + [merged]
    try:
        try:
            rc, said = _run(cmd, UMOUNT_TIMEOUT)
        except OSError as e:
            print(f"pyunionfs: error: unmounting '{merged}' failed: {e}", file=sys.stderr)
            return 1
        if rc != 0:
            msg = (said.strip().splitlines() or ["unknown error"])[-1]
            print(f"pyunionfs: error: unmounting '{merged}' failed: {msg}", file=sys.stderr)
            return 1
        if pidfd is not None and dev is not None:
            _wait_daemon(merged, pidfd, dev)
        return 0
    finally:
        if pidfd is not None:
            os.close(pidfd)
