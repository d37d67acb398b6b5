"""The warm mount server (unionfs/server.py, unionfs/client.py): a mount it forks acts in the
caller's world, it refuses callers it can't act for (another user, another namespace), and
the command falls back to a cold start when it is absent, stale or refuses."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlay_harness import IMPL, PYTHON, REPO, UMOUNT_TIMEOUT, force_unmount, is_mounted

from unionfs import client, mounttable

pytestmark = [
    pytest.mark.skipif(IMPL == "kernel", reason="pyunionfs's own mount server"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts as root, and checks other users"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
]


@pytest.fixture
def server_env() -> Iterator[dict[str, str]]:
    """An environment whose servers live in a directory of this test's own (under /tmp, where
    another user can reach it if a test opens it), exit after 20 s idle, and are ended at
    teardown (only those: found by their sockets here)."""
    base = Path(tempfile.mkdtemp(prefix="pyunionfs-server-test-", dir="/tmp"))
    run = base / "run"
    run.mkdir(mode=0o700)
    env = {**os.environ, "PYUNIONFS_SERVER_DIR": str(run), "PYUNIONFS_SERVER_IDLE": "20"}
    env.pop("PYUNIONFS_SERVER", None)
    try:
        yield env
    finally:
        for sock in run.glob("s-*"):
            pid = _server_pid(sock)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        shutil.rmtree(base, ignore_errors=True)


def _server_pid(path: Path) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return None
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(raw[:4], "little")


def _stack(base: Path, name: str = "s") -> list[Path]:
    d = base / name
    dirs = [d / x for x in ("lower", "upper", "work", "merged")]
    for p in dirs:
        p.mkdir(parents=True)
    (dirs[0] / "f").write_text("lower\n")
    return dirs


def _wait_for_server(env: dict[str, str]) -> Path:
    run = Path(env["PYUNIONFS_SERVER_DIR"])
    assert mounttable.wait_until(lambda: any(_server_pid(s) for s in run.glob("s-*")), 30), \
        "no server came up"
    return next(s for s in run.glob("s-*") if _server_pid(s))


def _mount(env: dict[str, str], stack: list[Path], log: Path, cwd: Path | None = None,
           **kw: object) -> subprocess.CompletedProcess[str]:
    lower, upper, work, merged = (str(p) for p in stack)
    return subprocess.run([PYTHON, "-m", "unionfs", "mount", "-d", "--log", str(log), lower,
                           upper, work, merged], env=env, cwd=cwd or REPO, text=True,
                          capture_output=True, timeout=60, stdin=subprocess.DEVNULL, **kw)


def _umount(env: dict[str, str], merged: Path) -> None:
    try:
        r = subprocess.run([PYTHON, "-m", "unionfs", "umount", str(merged)], env=env,
                           capture_output=True, text=True, timeout=UMOUNT_TIMEOUT)
        assert r.returncode == 0, r.stderr
    finally:
        force_unmount(str(merged))


def _started(log: Path) -> str:
    """'warm' or 'cold': how the last start-up in ``log`` began (its timeline)."""
    lines = [ln for ln in log.read_text().splitlines() if "start-up: " in ln]
    assert lines, log.read_text()
    return "warm" if "start-up: request " in lines[-1] else "cold"


def _mount_started(env: dict[str, str], stack: list[Path], log: Path, want: str) -> None:
    """Mount, check how the start-up began ('cold' or 'warm'), unmount."""
    r = _mount(env, stack, log)
    assert r.returncode == 0, r.stderr
    try:
        assert _started(log) == want
    finally:
        _umount(env, stack[3])


def test_cold_start_leaves_a_server_and_the_next_mount_is_warm_in_the_callers_world(
        tmp_path: Path, server_env: dict[str, str]) -> None:
    _mount_started(server_env, _stack(tmp_path), tmp_path / "mount.log", "cold")
    _wait_for_server(server_env)

    # relative paths from the caller's cwd; its umask, open-files limit and environment
    rel = _stack(tmp_path, "rel")
    here = tmp_path / "rel"

    def world() -> None:
        os.umask(0o027)
        resource.setrlimit(resource.RLIMIT_NOFILE, (500, 777))

    env = {**server_env, "PYUNIONFS_TEST_MARK": "caller"}
    r = subprocess.run([PYTHON, "-m", "unionfs", "mount", "--log", "rel.log", "-d",
                        "lower", "upper", "work", "merged"], env=env, cwd=here, text=True,
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
                       preexec_fn=world)
    assert r.returncode == 0, r.stderr
    try:
        assert (rel[3] / "f").read_text() == "lower\n"
        assert _started(here / "rel.log") == "warm"
        assert (os.stat(here / "rel.log").st_mode & 0o777) == 0o640  # made with umask 027
        found = mounttable.daemon_pid(str(rel[3]))
        assert found is not None
        pid = found[0]
        assert os.readlink(f"/proc/{pid}/cwd") == str(here)
        with open(f"/proc/{pid}/limits") as f:
            nofile = next(ln for ln in f if ln.startswith("Max open files")).split()
        assert nofile[4] == "777", nofile  # the hard limit (the daemon raises the soft one)
        # ps shows the command the caller ran, as for a cold start
        argv = mounttable.process(pid)
        assert argv is not None and str(rel[3]) not in argv[1] and "merged" in argv[1] \
            and "mount" in argv[1]
        # no stdio of the caller's: run() above returned, so its pipes reached their end
    finally:
        _umount(server_env, rel[3])


def test_errors_are_the_cold_starts(tmp_path: Path, server_env: dict[str, str]) -> None:
    """The same one line and exit status from a worker as from a cold start."""
    stack = _stack(tmp_path)
    log = tmp_path / "m.log"
    assert _mount(server_env, stack, log).returncode == 0
    _umount(server_env, stack[3])
    _wait_for_server(server_env)
    bad = [str(tmp_path / "nowhere"), *(str(p) for p in stack[1:])]
    cmd = [PYTHON, "-m", "unionfs", "mount", "--log", str(log), *bad]
    warm = subprocess.run(cmd, env=server_env, capture_output=True, text=True, timeout=60)
    cold = subprocess.run(cmd, env={**server_env, "PYUNIONFS_SERVER": "0"},
                          capture_output=True, text=True, timeout=60)
    assert warm.returncode == cold.returncode != 0
    assert warm.stderr == cold.stderr and len(warm.stderr.splitlines()) == 1, warm.stderr
    assert not is_mounted(stack[3])


def test_no_server_with_pyunionfs_server_0(tmp_path: Path, server_env: dict[str, str]) -> None:
    env = {**server_env, "PYUNIONFS_SERVER": "0"}
    stack = _stack(tmp_path)
    for _ in range(2):
        r = _mount(env, stack, tmp_path / "m.log")
        assert r.returncode == 0, r.stderr
        _umount(env, stack[3])
        assert _started(tmp_path / "m.log") == "cold"
    time.sleep(0.5)
    assert list(Path(env["PYUNIONFS_SERVER_DIR"]).iterdir()) == []


def test_a_stale_socket_means_a_cold_start_and_a_new_server(
        tmp_path: Path, server_env: dict[str, str]) -> None:
    path, _ = client.socket_path(server_env)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)  # and closed: a server killed without cleaning up leaves this
    stack = _stack(tmp_path)
    log = tmp_path / "m.log"
    for want in ("cold", "warm"):
        if want == "warm":
            _wait_for_server(server_env)
        r = _mount(server_env, stack, log)
        assert r.returncode == 0, r.stderr
        _umount(server_env, stack[3])
        assert _started(log) == want


def _raw_request(path: str, ident: str, argv: list[str]) -> str:
    """What the server answers a request sent past the client's own checks."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        proc = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fields = [ident, str(len(argv)), *argv, "0"]
            socket.send_fds(s, [client.encode(fields)], [proc, 0, 1, 2])
        finally:
            os.close(proc)
        return s.recv(4096).decode()


RAW = """
import sys
sys.path.insert(0, {tests!r})
from test_server import _raw_request
print(_raw_request({path!r}, {ident!r}, ["mount", "/nonexistent", "/nonexistent"]))
"""


def _started_server(tmp_path: Path, env: dict[str, str]) -> tuple[str, str]:
    stack = _stack(tmp_path)
    assert _mount(env, stack, tmp_path / "m.log").returncode == 0
    _umount(env, stack[3])
    sock = _wait_for_server(env)
    return str(sock), client.identity(env)


def test_the_server_refuses_another_user(tmp_path: Path, server_env: dict[str, str]) -> None:
    path, ident = _started_server(tmp_path, server_env)
    # let uid 65534 reach the socket, as a careless setup might: the peer check still holds
    os.chmod(Path(path).parent, 0o711)
    os.chmod(Path(path).parent.parent, 0o711)
    code = RAW.format(tests=str(REPO / "tests"), path=path, ident=ident)
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd="/", env={**server_env, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no uid 65534 is not this server's user"), r.stdout
    # and a client refuses a directory others may enter: a cold start, no connection
    with pytest.raises(client.Unsafe):
        client.socket_dir(server_env)


def test_the_server_refuses_another_mount_namespace(tmp_path: Path,
                                                    server_env: dict[str, str]) -> None:
    path, ident = _started_server(tmp_path, server_env)
    code = RAW.format(tests=str(REPO / "tests"), path=path, ident=ident)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", PYTHON, "-c", code],
                       capture_output=True, text=True, timeout=60, cwd="/",
                       env={**server_env, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("no another mnt namespace"), r.stdout
    # the command there asks a server of its own world (none yet): a cold start that works
    stack = _stack(tmp_path, "ns")
    lower, upper, work, merged = (str(p) for p in stack)
    script = (f"{PYTHON} -m unionfs mount -d --log {tmp_path}/ns.log {lower} {upper} {work} "
              f"{merged} && cat {merged}/f && {PYTHON} -m unionfs umount {merged}")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, env=server_env)
    assert r.returncode == 0 and r.stdout == "lower\n", r.stderr
    assert _started(tmp_path / "ns.log") == "cold"


def test_the_launcher_and_the_server_name_the_same_server(tmp_path: Path,
                                                          server_env: dict[str, str]) -> None:
    """The launcher runs python -S (scripts/install-deps.sh), the server python -m: their
    sys.path and sys.prefix differ, the world they compute must not."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[1]); from unionfs import client; "
            "print(client.identity(os.environ))")
    said = [subprocess.run([PYTHON, *flags, "-c", code, str(REPO)], env=server_env,
                           capture_output=True, text=True, timeout=60).stdout
            for flags in (["-S"], [])]
    assert said[0] == said[1] and "euid=" in said[0], said
    launcher = REPO / ".venv" / "bin" / "pyunionfs"
    if not launcher.exists():
        pytest.skip("no .venv/bin/pyunionfs (make deps)")
    stack = _stack(tmp_path)
    lower, upper, work, merged = (str(p) for p in stack)
    log = tmp_path / "l.log"
    for want in ("cold", "warm"):
        r = subprocess.run([str(launcher), "mount", "-d", "--log", str(log), lower, upper, work,
                            merged], env=server_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        _umount(server_env, stack[3])
        assert _started(log) == want
        if want == "cold":
            _wait_for_server(server_env)


def test_umount_says_where_copies_keep_the_daemon_and_returns(tmp_path: Path,
                                                               server_env: dict[str, str]) -> None:
    """`pyunionfs umount` returns once the daemon has gone; where a mount namespace made
    while it was mounted holds a copy (the kernel keeps serving such copies, and so does the
    daemon), it says so at once instead of waiting, and the daemon ends with that namespace."""
    stack = _stack(tmp_path)
    assert _mount(server_env, stack, tmp_path / "m.log").returncode == 0
    found = mounttable.daemon_pid(str(stack[3]))
    assert found is not None
    sleeper = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                "sleep", "60"])
    try:
        assert mounttable.wait_until(lambda: mounttable.copies(found[1]) != {}, 10, 0.01)
        t0 = time.monotonic()
        r = subprocess.run([PYTHON, "-m", "unionfs", "umount", str(stack[3])], env=server_env,
                           capture_output=True, text=True, timeout=UMOUNT_TIMEOUT)
        assert r.returncode == 0 and time.monotonic() - t0 < 5, r.stderr
        assert "lives on in 1 other mount namespace" in r.stderr and str(sleeper.pid) in \
            r.stderr, r.stderr
        assert len(r.stderr.splitlines()) == 1 and not is_mounted(stack[3])
        assert mounttable.process(found[0]) is not None  # serving the copy
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
        force_unmount(str(stack[3]))
    assert mounttable.wait_until(lambda: mounttable.process(found[0]) is None, 10, 0.01)


def _cgroup_dir(name: str) -> tuple[Path, str] | None:
    """A new cgroup below ours (v2, else the v1 memory hierarchy) and the line of
    /proc/PID/cgroup a process in it shows; None where none can be made."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        hier, ctrl, rel = line.split(":", 2)
        base = Path("/sys/fs/cgroup") if hier == "0" and "memory" not in "".join(lines) \
            else Path("/sys/fs/cgroup/memory") if ctrl == "memory" else None
        if base is None:
            continue
        d = base / rel.lstrip("/") / name
        try:
            d.mkdir()
        except OSError:
            return None
        return d, f"{hier}:{ctrl}:{rel.rstrip('/')}/{name}"
    return None


def test_a_caller_in_another_cgroup_gets_its_daemon_there(tmp_path: Path,
                                                          server_env: dict[str, str]) -> None:
    """The daemon lives in the caller's cgroup, as a cold start's would: the worker joins
    it (cgroup v2) or refuses, and the command mounts cold (v1)."""
    _started_server(tmp_path, server_env)
    made = _cgroup_dir(f"pyunionfs-test-{os.getpid()}")
    if made is None:
        pytest.skip("no cgroup can be made here")
    cg, line = made
    stack = _stack(tmp_path, "cg")
    try:
        def enter() -> None:
            (cg / "cgroup.procs").write_text(str(os.getpid()))

        r = _mount(server_env, stack, tmp_path / "cg.log", preexec_fn=enter)
        assert r.returncode == 0, r.stderr
        try:
            found = mounttable.daemon_pid(str(stack[3]))
            assert found is not None
            with open(f"/proc/{found[0]}/cgroup") as f:
                assert line in f.read().splitlines()
        finally:
            _umount(server_env, stack[3])
    finally:
        mounttable.wait_until(lambda: not (cg / "cgroup.procs").read_text().strip(), 10)
        with contextlib.suppress(OSError):
            cg.rmdir()


def test_a_caller_with_other_capabilities_mounts_cold(tmp_path: Path,
                                                      server_env: dict[str, str]) -> None:
    """A bounding set without CAP_NET_RAW: not what the server is, so a cold start, whose
    daemon has the caller's capabilities."""
    _started_server(tmp_path, server_env)
    stack = _stack(tmp_path, "caps")
    lower, upper, work, merged = (str(p) for p in stack)
    log = tmp_path / "caps.log"
    r = subprocess.run(["setpriv", "--bounding-set", "-net_raw", PYTHON, "-m", "unionfs",
                        "mount", "-d", "--log", str(log), lower, upper, work, merged],
                       env=server_env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert _started(log) == "cold"
        found = mounttable.daemon_pid(merged)
        assert found is not None
        with open(f"/proc/{found[0]}/status") as f:
            bnd = next(ln for ln in f if ln.startswith("CapBnd:")).split()[1]
        assert not int(bnd, 16) & (1 << 13), bnd  # CAP_NET_RAW
    finally:
        _umount(server_env, stack[3])


def test_a_large_request_arrives_whole(tmp_path: Path, server_env: dict[str, str]) -> None:
    """Hundreds of KiB of environment (or of lowerdir=): more than a socket buffer takes at
    once, still one request, and the daemon's environment has all of it."""
    _started_server(tmp_path, server_env)
    env = {**server_env, **{f"PYUNIONFS_TEST_BIG{i}": "x" * 100_000 for i in range(4)}}
    _mount_started(env, _stack(tmp_path, "big"), tmp_path / "big.log", "warm")
