"""The warm mount server: one per user and world (namespaces, code, start-up environment),
with everything a mount needs imported, a worker per ``pyunionfs mount`` forked ahead (it
waits in accept()), which becomes the mount's daemon.

A worker acts only for a caller that is exactly what this server is (user, groups,
capabilities, namespaces, root, no_new_privs, seccomp, security label) and takes on the rest
of the caller's world before it runs the command: its working directory, umask, environment,
resource limits, cgroup, niceness and OOM score, its stdin/stdout/stderr, and its command line
(what ps shows).  Anything it can't match or take on, it refuses with a reason, and the
caller mounts by itself.  Once the mount serves, the caller gets the cold start's answer and
the worker lets go of its stdio.  Started by the command after a cold mount (client.spawn_server),
``python -m unionfs.server``; exits after PYUNIONFS_SERVER_IDLE seconds (default 60) without
a request, or once its socket is gone or taken by another server.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import resource
import select
import signal
import socket
import sys
import time

# What a mount needs, imported here once, so that a worker pays nothing for it.
from unionfs import cli, client, daemon  # noqa: I001

IDLE = 60.0
# A spawned server gets this much room for a worker's command line (setproctitle's trick:
# the kernel shows the argument area as it is now).  A longer one keeps the server's.
TITLE_ROOM = 16384
_SAME = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
         "NoNewPrivs", "Seccomp", "Seccomp_filters")
_LIMITS = {
    "Max cpu time": resource.RLIMIT_CPU, "Max file size": resource.RLIMIT_FSIZE,
    "Max data size": resource.RLIMIT_DATA, "Max stack size": resource.RLIMIT_STACK,
    "Max core file size": resource.RLIMIT_CORE, "Max resident set": resource.RLIMIT_RSS,
    "Max processes": resource.RLIMIT_NPROC, "Max open files": resource.RLIMIT_NOFILE,
    "Max locked memory": resource.RLIMIT_MEMLOCK, "Max address space": resource.RLIMIT_AS,
    "Max file locks": 10,  # RLIMIT_LOCKS, which Python's resource module leaves out
    "Max pending signals": resource.RLIMIT_SIGPENDING,
    "Max msgqueue size": resource.RLIMIT_MSGQUEUE, "Max nice priority": resource.RLIMIT_NICE,
    "Max realtime priority": resource.RLIMIT_RTPRIO,
    "Max realtime timeout": resource.RLIMIT_RTTIME,
}


class Refuse(Exception):
    pass


# -- the command line ps shows -------------------------------------------------------------


def _arg_area() -> tuple[int, int] | None:
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    except (OSError, IndexError, ValueError):
        return None


def set_title(args: list[str]) -> bool:
    """Write ``args`` over our own argument area, NUL-padded; False if they don't fit."""
    import ctypes

    area = _arg_area()
    data = b"\0".join(a.encode(errors="surrogateescape") for a in args) + b"\0"
    if area is None or len(data) > area[1] - area[0]:
        return False
    ctypes.memmove(area[0], data.ljust(area[1] - area[0], b"\0"), area[1] - area[0])
    return True


# -- the server ----------------------------------------------------------------------------


def _bind(path: str) -> socket.socket | None:
    """Listen at ``path``; None when a live server has it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError as e:
        if e.errno != errno.EADDRINUSE:
            sock.close()
            return None
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            sock.close()
            return None  # someone serves it
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(path)  # a stale socket, left by a killed server
            try:
                sock.bind(path)
            except OSError:
                sock.close()
                return None
        finally:
            probe.close()
    sock.listen(64)
    return sock


def main() -> int:
    env = os.environ
    try:
        path, ident = client.socket_path(env)
    except (client.Unsafe, OSError):
        return 1
    try:
        idle = float(env.get("PYUNIONFS_SERVER_IDLE", IDLE))
    except ValueError:
        idle = IDLE
    os.chdir("/")
    sock = _bind(path)
    if sock is None:
        return 0
    set_title([sys.executable, "-m", "unionfs.server"])
    _warm_up()
    mine = os.stat(path).st_ino
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped by the kernel
    last = time.monotonic()
    spare = 0
    try:
        while True:
            # A spare worker, forked ahead: it waits in accept() and has the fork (and the
            # first touch of what a mount uses) behind it when a caller comes.
            news, took = os.pipe()
            server = os.getpid()
            try:
                spare = os.fork()
            except OSError:
                os.close(news)
                os.close(took)
                time.sleep(0.1)
                continue
            if spare == 0:
                try:
                    os.close(news)
                    _spare(sock, took, ident, server)
                finally:
                    os._exit(70)
            os.close(took)
            try:
                while not select.select([news], [], [], min(idle, 5.0))[0]:
                    if time.monotonic() - last >= idle or not _still_ours(path, mine):
                        return 0
                took_one = os.read(news, 1) == b"1"
            finally:
                os.close(news)
            spare = 0  # it took a caller, or died: the next one
            if not took_one:
                time.sleep(0.1)  # no faster than this, should spares keep dying
            last = time.monotonic()
    finally:
        if spare:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spare, signal.SIGKILL)
        if _still_ours(path, mine):
            with contextlib.suppress(OSError):
                os.unlink(path)
        sock.close()


def _spare(sock: socket.socket, took: int, ident: str, server: int) -> None:
    """A worker before its caller: warm what every mount touches first, take a caller, tell
    the server (which forks the next spare), serve it."""
    client.MARKS[:] = []
    # An idle spare ends with the server (killed or not); once it has a caller it doesn't.
    _death_signal(signal.SIGKILL)
    if os.getppid() != server:
        return  # it went before the signal was asked for
    with contextlib.suppress(SystemExit):
        cli.helper_parser().parse_args(["-o", "lowerdir=/l", "/m"])
        cli.build_parser().parse_args(["mount", "-o", "ro", "/l", "/u", "/w", "/m"])
    sock.settimeout(None)
    try:
        conn, _ = sock.accept()
        os.write(took, b"1")
    finally:
        os.close(took)  # the server's cue, also when accept failed
    sock.close()
    _death_signal(0)
    _worker(conn, ident)


def _death_signal(sig: int) -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG


def _still_ours(path: str, ino: int) -> bool:
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False


# -- a worker: one caller ------------------------------------------------------------------


def _receive(conn: socket.socket) -> tuple[list[str], list[int]]:
    conn.settimeout(client.ANSWER_TIMEOUT)
    data, fds, _, _ = socket.recv_fds(conn, 65536, 5)
    if len(data) < 4:
        raise Refuse("a short request")
    size = int.from_bytes(data[:4], "big")
    body = data[4:]
    while len(body) < size:
        chunk = conn.recv(min(size - len(body), 1 << 20))
        if not chunk:
            raise Refuse("a short request")
        body += chunk
    return client.decode(body), fds


@functools.cache
def _own(name: str) -> str:
    """One of our own /proc/self files, read once (at start-up, by _warm_up)."""
    return _read(name, None)


def _warm_up() -> None:
    """What every worker would otherwise do first: our own /proc files, the parsers."""
    for name in ("status", "attr/current", "cgroup", "oom_score_adj"):
        _own(name)
    for n in client.NAMESPACES:
        _own_ns(n)
    cli.build_parser()
    cli.helper_parser()
    # Everything so far to the permanent generation: a worker's collections then never walk
    # (and so copy, page by page) the server's objects after the fork.
    gc.collect()
    gc.freeze()


@functools.cache
def _own_ns(n: str) -> str:
    return os.readlink(f"/proc/self/ns/{n}")


def _status(proc: int | None) -> dict[str, str]:
    text = _own("status") if proc is None else _read("status", proc)
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _read(name: str, proc: int | None) -> str:
    try:
        if proc is None:
            with open(f"/proc/self/{name}") as f:
                return f.read()
        fd = os.open(name, os.O_RDONLY, dir_fd=proc)
        with open(fd) as f:
            return f.read()
    except OSError as e:
        return f"<{e.errno}>"


def _check(conn: socket.socket, proc: int, ident: str, their_ident: str) -> dict[str, str]:
    """The caller is what we are: refuse what a worker couldn't be as well."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    pid, uid = (int.from_bytes(raw[i:i + 4], sys.byteorder) for i in (0, 4))
    if uid != os.geteuid():
        raise Refuse(f"uid {uid} is not this server's user")
    if os.readlink(f"/proc/self/fd/{proc}") != f"/proc/{pid}":
        raise Refuse("the process directory sent is not the caller's")
    if their_ident != ident:
        raise Refuse("another world (namespaces, code or start-up environment)")
    for n in client.NAMESPACES:
        try:
            theirs = os.readlink(f"ns/{n}", dir_fd=proc)
        except OSError:
            theirs = "?"
        if theirs != _own_ns(n):
            raise Refuse(f"another {n} namespace")
    st, ours = _status(proc), _status(None)
    for key in _SAME:
        if st.get(key) != ours.get(key):
            raise Refuse(f"another {key} ({st.get(key)} here {ours.get(key)})")
    if _read("attr/current", proc) != _own("attr/current"):
        raise Refuse("another security label")
    root, my_root = os.stat("root", dir_fd=proc), os.stat("/")
    if (root.st_dev, root.st_ino) != (my_root.st_dev, my_root.st_ino):
        raise Refuse("another root directory")
    return st


def _take_on(proc: int, status: dict[str, str], pid: int) -> None:
    """The caller's cgroup, limits, priority and OOM score, or a refusal."""
    theirs = _read("cgroup", proc)
    if theirs != _own("cgroup"):
        for line in theirs.splitlines():
            hier, _, rel = line.split(":", 2)
            if hier != "0":
                raise Refuse("another cgroup (v1)")
            try:
                with open(f"/sys/fs/cgroup{rel}/cgroup.procs", "w") as f:
                    f.write(str(os.getpid()))
            except OSError as e:
                raise Refuse(f"can't join the caller's cgroup: {e.strerror}") from None
    for line in _read("limits", proc).splitlines()[1:]:
        which = _LIMITS.get(line[:26].strip())
        if which is None:
            continue
        soft, hard = (resource.RLIM_INFINITY if v == "unlimited" else int(v)
                      for v in (line[26:47].strip(), line[47:68].strip()))
        try:
            if resource.getrlimit(which) != (soft, hard):
                resource.setrlimit(which, (soft, hard))
        except (OSError, ValueError) as e:
            raise Refuse(f"can't take on the caller's {line[:26].strip().lower()}: {e}") \
                from None
    try:
        nice = os.getpriority(os.PRIO_PROCESS, pid)
        if nice != os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        score = _read("oom_score_adj", proc)
        if score != _own("oom_score_adj"):
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write(score)
    except OSError as e:
        raise Refuse(f"can't take on the caller's priority or OOM score: {e.strerror}") \
            from None
    os.umask(int(status.get("Umask", "022"), 8))


def _worker(conn: socket.socket, ident: str) -> None:
    client.MARKS[:] = []
    client.mark("request")
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # fusermount3 is waited for
    fds: list[int] = []
    try:
        fields, fds = _receive(conn)
        if len(fds) not in (4, 5):
            raise Refuse("expected the caller's /proc directory and stdio")
        their_ident, nargv = fields[0], int(fields[1])
        argv = fields[2:2 + nargv]
        ntitle = int(fields[2 + nargv])
        title = fields[3 + nargv:3 + nargv + ntitle]
        env = dict(kv.split("=", 1) for kv in fields[3 + nargv + ntitle:] if "=" in kv)
        proc = fds[0]
        status = _check(conn, proc, ident, their_ident)
        pid = int(os.readlink(f"/proc/self/fd/{proc}").rsplit("/", 1)[1])
        _take_on(proc, status, pid)
        if len(fds) == 4:
            fds.append(os.open("cwd", os.O_PATH | os.O_DIRECTORY, dir_fd=proc))
        try:
            os.fchdir(fds[4])
        except OSError as e:
            raise Refuse(f"can't enter the caller's working directory: {e.strerror}") \
                from None
        if not title:
            title = [a for a in _read("cmdline", proc).split("\0") if a]
    except (Refuse, OSError, ValueError, IndexError) as e:
        with contextlib.suppress(OSError):
            conn.sendall(f"no {e}\n".encode())
        return
    conn.sendall(b"ok\n")
    try:
        if client.read_line(conn, client.ANSWER_TIMEOUT) != "go":
            return  # the caller gave up and mounts by itself
    except OSError:
        return
    for i, fd in enumerate(fds[1:4]):
        os.dup2(fd, i)
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    set_title(title)
    client.mark("caller's world taken on")

    def serving() -> None:
        """The mount serves: the caller's answer, as a cold start gives it once its daemon
        serves; then none of the caller's stdio is kept."""
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        with contextlib.suppress(OSError):
            conn.sendall(f"rc 0 {os.getpid()}\n".encode())
        conn.close()
        daemon.release_stdio()

    daemon.SERVE_HERE = serving
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    with contextlib.suppress(OSError):
        conn.sendall(f"rc {rc} 0\n".encode())  # a mount that serves never gets here
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
