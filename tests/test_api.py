"""The public API (``unionfs.Overlay``) and the pytest plugin (``unionfs.pytest_plugin``), as
another project uses them: on both backends, as root and in the user-namespace suite; the plugin
through pytester, in a pytest of its own that finds it by its entry point."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from overlay_harness import USERNS, environment_problem

import unionfs
from unionfs import Overlay, OverlayError, client, mounttable
from unionfs.api import mounted

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.skipif(environment_problem() is not None,
                                reason=str(environment_problem()))

KERNEL_OPTS = {"userxattr": True} if USERNS else {}


def _backends() -> list[str]:
    return ["pyunionfs", "kernel"]


@pytest.mark.parametrize("backend", _backends())
def test_the_readme_example(tmp_path, backend):
    app, base = tmp_path / "app", tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/issue").write_text("base\n")
    app.mkdir()
    (app / "run").write_text("app")
    u, w, m = (tmp_path / n for n in ("u", "w", "m"))
    for d in (u, w, m):
        d.mkdir()
    opts = KERNEL_OPTS if backend == "kernel" else {}
    with Overlay(lowers=[app, base], upper=u, work=w, mountpoint=m, options=opts,
                 backend=backend) as ov:
        assert ov.is_mounted and mounted(m)
        (m / "etc/motd").write_text("hi")
        os.unlink(m / "etc/issue")
        got = ov.changes()
    assert got[0] == ("C", "/etc") and set(got[1:]) == {("A", "/etc/motd"), ("D", "/etc/issue")}
    assert not mounted(m) and not ov.is_mounted
    assert (u / "etc/motd").read_text() == "hi"  # the upper stays: it was given


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None,
                    reason="fuse-overlayfs is not installed (make deps installs it)")
def test_three_backends_side_by_side(tmp_path):
    """The same layers and the same change on pyunionfs, the kernel (root) and fuse-overlayfs,
    as the benchmark and the tests compare them: one view of the merged tree; an error in
    fuse-overlayfs's own words, one line."""
    backends = ["pyunionfs", "fuse-overlayfs"] + ([] if os.geteuid() else ["kernel"])
    seen = {}
    for backend in backends:
        base = tmp_path / backend
        (base / "l/etc").mkdir(parents=True)
        (base / "l/etc/issue").write_text("base\n")
        (base / "m").mkdir()
        opts = KERNEL_OPTS if backend == "kernel" else {}
        with Overlay(lowers=[base / "l"], mountpoint=base / "m", options=opts,
                     backend=backend) as ov:
            (base / "m/etc/motd").write_text("hi")
            os.unlink(base / "m/etc/issue")
            seen[backend] = sorted(str(p.relative_to(base / "m")) for p in (base / "m").rglob("*"))
            assert ov.changes()[0] == ("C", "/etc"), backend
    assert all(v == ["etc", "etc/motd"] for v in seen.values()), seen
    with pytest.raises(OverlayError) as e:
        Overlay(lowers=[tmp_path / "missing"], mountpoint=tmp_path / "pyunionfs/m",
                backend="fuse-overlayfs").mount()
    assert len(str(e.value).splitlines()) == 1 and str(e.value), e.value


def test_temporary_layers_and_a_failing_body(tmp_path):
    with pytest.raises(RuntimeError, match="body"):
        with Overlay() as ov:
            where = ov.mountpoint
            (where / "f").write_text("x")
            assert ov.upper is not None and (ov.upper / "f").exists()
            raise RuntimeError("the body failed")
    assert not mounted(where) and not where.exists()  # unmounted, temporary dirs gone
    assert "Overlay" in repr(ov) and "not mounted" in repr(ov)


def test_errors_are_one_line_overlay_errors(tmp_path):
    with pytest.raises(OverlayError) as e:
        Overlay(lowers=[tmp_path / "missing"]).mount()
    assert "missing" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "l").mkdir()
    (tmp_path / "m").mkdir()
    with Overlay(lowers=[tmp_path / "l"], mountpoint=tmp_path / "m"):
        with pytest.raises(OverlayError, match="mount point already"):
            Overlay(lowers=[tmp_path / "l"], mountpoint=tmp_path / "m").mount()
    with pytest.raises(ValueError, match="backend"):
        Overlay(backend="nfs")


def test_options_and_log(tmp_path):
    with Overlay(options={"noatime": True, "redirect_dir": "nofollow"}) as ov:
        assert ov.options == ["noatime", "redirect_dir=nofollow"]
        assert isinstance(ov.log, str)
    with Overlay(readonly=True) as ov:
        with pytest.raises(OSError):
            (ov.mountpoint / "x").write_text("no")


def _backends_here() -> list[str]:
    return ["pyunionfs"] + (["fuse-overlayfs"] if shutil.which("fuse-overlayfs") else [])


@pytest.mark.parametrize("backend", _backends_here())
def test_detached_daemon_is_found_and_waited_for(tmp_path, backend):
    """detach=True: the command a user types (no -f); the daemon that forked away is found by
    its command line and is gone when unmount() returns."""
    (tmp_path / "l").mkdir()
    (tmp_path / "l/f").write_text("x")
    log = tmp_path / "daemon.log"
    ov = Overlay(lowers=["l"], cwd=tmp_path, backend=backend, detach=True, log_path=log)
    with ov:
        assert ov.process is None and ov.pid is not None
        pid = ov.pid
        assert (ov.mountpoint / "f").read_text() == "x"  # a relative lower, from cwd
        assert ov.mount_seconds is not None and 0 < ov.mount_seconds < 20
    assert not os.path.exists(f"/proc/{pid}") or \
        open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"
    assert ov.pid is None and not mounted(ov.mountpoint)


def _gone(pid: int) -> bool:
    # not gone(), which would reap a child before its Popen learns the status
    return mounttable.wait_until(lambda: mounttable.process(pid) is None, 10, 0.01)


def _warm_server() -> None:
    """A mount that leaves the user's warm server if there is none, and the wait for it."""
    Overlay().mount().unmount()
    path, _ = client.socket_path(os.environ)

    def up() -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            return s.connect_ex(path) == 0

    assert mounttable.wait_until(up, 30), "no warm server came up"


@pytest.mark.parametrize("server", [True, False], ids=["from-the-server", "child"])
def test_killed_daemon_is_cleaned_up_quietly_a_crash_is_reported(tmp_path, server):
    if server:
        _warm_server()
    with Overlay(server=server) as ov:
        assert (ov.process is None) == server and ov.pid is not None
        pid = ov.pid
        ov.kill()
        assert _gone(pid)
        with pytest.raises(OSError):  # ENOTCONN: the connection went with the daemon
            os.listdir(ov.mountpoint)
    assert not mounted(ov.mountpoint)  # and no OverlayError: the kill was ours
    ov = Overlay(server=server).mount()
    assert ov.pid is not None
    pid = ov.pid
    os.kill(pid, 9)  # a crash, not ov.kill(): unmount() must say so
    assert _gone(pid)
    with pytest.raises(OverlayError, match="ended before the unmount" if server
                       else "exited with status -9"):
        ov.unmount()
    assert not mounted(ov.mountpoint)


def test_program_and_env_are_used(tmp_path):
    """program= runs another command for the daemon (here: this interpreter with -X, seen in
    the daemon's command line); env= is its environment."""
    env = dict(os.environ, PYUNIONFS_API_TEST="1")
    with Overlay(program=[sys.executable, "-X", "utf8", "-m", "unionfs"], env=env) as ov:
        assert ov.pid is not None
        argv = open(f"/proc/{ov.pid}/cmdline", "rb").read().split(b"\0")
        environ = open(f"/proc/{ov.pid}/environ", "rb").read().split(b"\0")
        assert b"utf8" in argv and b"PYUNIONFS_API_TEST=1" in environ


def test_public_api_is_listed():
    assert set(unionfs.__all__) == {"Overlay", "OverlayError", "__version__"}
    with pytest.raises(AttributeError):
        unionfs.Nope  # noqa: B018
    assert (Path(unionfs.__file__).parent / "py.typed").exists()


USER_TEST = '''
import os
import pytest
from unionfs import Overlay
from unionfs.pytest_plugin import Symlink, Whiteout

@pytest.mark.overlay_layers(lowers=[{"etc/motd": "old", "bin/": None, "gone": "x"},
                                    {"etc/base": "b", "gone": "below"}],
                            upper={"etc/new": "n", "gone": Whiteout(), "l": Symlink("etc")},
                            options=OPTS)
def test_fixture(overlay):
    m = overlay.mountpoint
    assert sorted(os.listdir(m)) == ["bin", "etc", "l"]
    assert sorted(os.listdir(m / "etc")) == ["base", "motd", "new"]
    (m / "etc/motd").write_text("hi")
    assert ("C", "/etc/motd") in overlay.changes()

@pytest.mark.overlay_backends("pyunionfs", "kernel")
def test_both(overlay_factory, overlay_backend):
    ov = overlay_factory(lowers=[{"a": "1"}], options=OPTS if overlay_backend == "kernel" else None)
    assert (ov.mountpoint / "a").read_text() == "1"
    assert ov.backend == overlay_backend
'''


def _pytester_env(pytester) -> None:
    pytester.makeconftest("")
    # the plugin is found by its entry point; the repository's tests/conftest.py is not there


def test_plugin_fixtures_pass(pytester):
    _pytester_env(pytester)
    pytester.makepyfile(test_user=f"OPTS = {KERNEL_OPTS!r}\n" + USER_TEST)
    r = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    r.assert_outcomes(passed=3)


def test_plugin_failing_body_still_unmounts_and_leaks_are_errors(pytester):
    _pytester_env(pytester)
    pytester.makepyfile(test_bad='''
import os
from unionfs import Overlay

def test_fails(overlay):
    (overlay.mountpoint / "f").write_text("x")
    open(os.environ["MARK"], "w").write(str(overlay.mountpoint))
    assert False, "the body fails"

def test_leaks(tmp_path):
    ov = Overlay().mount()
    open(os.environ["MARK"] + ".leak", "w").write(str(ov.mountpoint))
''')
    mark = pytester.path / "mark"
    os.environ["MARK"] = str(mark)
    try:
        r = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    finally:
        del os.environ["MARK"]
    r.assert_outcomes(failed=1, passed=1, errors=1)
    r.stdout.fnmatch_lines(["*left overlays mounted*"])
    for m in (mark.read_text(), Path(str(mark) + ".leak").read_text()):
        assert not mounted(m), m


def test_plugin_is_registered():
    out = subprocess.run([sys.executable, "-m", "pytest", "--markers", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert "@pytest.mark.overlay_backends" in out.stdout, out.stdout[-2000:]


def test_a_hundred_mounts_in_a_row_leave_nothing_behind():
    """Overlay enter + exit, 100 times: no daemon, mount, descriptor of ours or temporary
    directory outlives its cycle; after the first (which may start the warm server) each
    daemon comes from the server, not from a new interpreter."""
    if client.enabled():
        _warm_server()
    fds = set(os.listdir("/proc/self/fd"))
    seen = []
    for _ in range(100):
        with Overlay() as ov:
            (ov.mountpoint / "f").write_text("x")
            seen.append((ov.pid, ov.mountpoint, ov.process is None))
        assert not mounted(ov.mountpoint)
    assert set(os.listdir("/proc/self/fd")) == fds
    for pid, point, _ in seen:
        assert pid is not None and mounttable.process(pid) is None, pid
        assert not point.parent.exists(), point.parent
    if client.enabled():
        assert all(warm for _, _, warm in seen), "mounts that were not the server's"


@pytest.mark.parametrize("server", [True, False], ids=["from-the-server", "child"])
def test_unmount_ends_a_daemon_kept_by_a_copy_in_another_namespace(server):
    """A mount namespace made while the overlay is mounted (a container, unshare; here a
    sleeper) holds a copy of the mount, which keeps the FUSE connection and so the daemon
    alive after our unmount: unmount() ends the daemon anyway, at once, not after a timeout
    (the 15 s exits seen under load)."""
    if server:
        _warm_server()
    ov = Overlay(server=server).mount()
    sleeper = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                "sleep", "60"])
    try:
        assert mounttable.wait_until(
            lambda: os.path.exists(f"/proc/{sleeper.pid}/ns/mnt") and os.readlink(
                f"/proc/{sleeper.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"), 10, 0.01)
        pid = ov.pid
        assert pid is not None
        t0 = time.monotonic()
        ov.unmount()
        assert time.monotonic() - t0 < 5
        assert mounttable.process(pid) is None
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)
