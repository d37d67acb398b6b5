"""Self-tests of the harness: if these are wrong, every differential test is meaningless."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import time
from pathlib import Path

import pytest
from overlay_harness import (
    IMPL,
    RENAME_EXCHANGE,
    Device,
    Dir,
    DirStream,
    Fifo,
    File,
    Hardlink,
    MountError,
    PyUnionMount,
    Symlink,
    Whiteout,
    is_mounted,
    make_traversable,
    materialise,
    mounts_under,
    outcome,
    renameat2,
    run_as,
    snapshot_raw,
    snapshot_upper,
)

# root only (chown, trusted.* xattrs, mknod): the same environment check as the mount tests
pytestmark = pytest.mark.usefixtures("_environment")

SPEC = {
    "d": Dir(mode=0o2750, uid=3, gid=4, mtime=1_000_000_000.5, xattrs={"user.d": "1"}),
    "d/f": File("content", mode=0o4711, uid=5, gid=6, mtime=1_100_000_000,
                xattrs={"user.x": b"\x00", "trusted.y": "t"}),
    "d/h": Hardlink("d/f"),
    "sparse": File(b"z", offset=1 << 20),
    "s": Symlink("d/f", uid=7, xattrs={"trusted.s": "s"}),
    "p": Fifo(mode=0o640),
    "dev": Device("b", 8, 1),
    "wh": Whiteout(),
    "op": Dir(opaque=True),
    "implicit/parent/leaf": File(),
}


def _comparable(raw: dict) -> dict:
    # drop inode numbers and ctimes, which can't be equal between two copies
    return {k: (v[0], v[2], v[3]) for k, v in raw.items()}


def test_materialise_is_identical_twice(tmp_path):
    materialise(SPEC, tmp_path / "a")
    materialise(SPEC, tmp_path / "b")
    a, b = snapshot_raw(tmp_path / "a"), snapshot_raw(tmp_path / "b")
    assert _comparable(a) == _comparable(b)
    node = a["d/f"][0]
    assert (node.mode, node.uid, node.gid, node.nlink) == (0o4711, 5, 6, 2)
    assert a["d"][0].mode == 0o2750 and a["d"][3] == 1_000_000_000_500_000_000
    assert a["d/f"][1] == a["d/h"][1]  # hard link really shares the inode
    assert os.stat(tmp_path / "a/sparse").st_blocks * 512 < 1 << 20
    st = os.lstat(tmp_path / "a/wh")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(tmp_path / "a/op", "trusted.overlay.opaque") == b"y"


def test_upper_normaliser(tmp_path):
    materialise(SPEC, tmp_path / "u")
    os.setxattr(tmp_path / "u/d/f", "trusted.overlay.origin", b"\x00\xfb")
    os.setxattr(tmp_path / "u/d", "trusted.overlay.impure", b"y")
    os.setxattr(tmp_path / "u", "trusted.overlay.uuid", os.urandom(16))
    os.setxattr(tmp_path / "u/d/f", "trusted.overlay.overlay.esc", b"e")
    snap = snapshot_upper(tmp_path / "u")
    assert snap.nodes["wh"].type == "whiteout"
    assert snap.nodes["op"].opaque is True and snap.nodes["d"].opaque is False
    assert dict(snap.nodes["d/f"].xattrs) == {"user.x": b"\x00", "trusted.y": b"t",
                                              "trusted.overlay.overlay.esc": b"e"}
    assert dict(snap.nodes["d"].xattrs) == {"user.d": b"1"}
    assert snap.nodes["."].xattrs == ()
    assert frozenset({"d/f", "d/h"}) in snap.links


def test_outcome_normalisation(tmp_path):
    assert outcome(lambda m: os.lstat(m / "missing"), tmp_path) == ("err", "ENOENT")
    assert outcome(lambda m: str(m / "x"), tmp_path) == ("ok", "<MERGED>/x")
    with pytest.raises(TypeError):
        outcome(lambda m: os.lstat(m), tmp_path)


def test_run_as_uses_credentials_and_umask(tmp_path):
    make_traversable(tmp_path)
    os.chmod(tmp_path, 0o777)

    def op(m: Path) -> tuple[int, int, str]:
        os.mkdir(m / "made", 0o777)
        st = os.stat(m / "made")
        return os.getuid(), st.st_gid, oct(st.st_mode & 0o777)

    assert run_as(1000, 1001, op, tmp_path, umask=0o027) == ("ok", (1000, 1001, "0o750"))


def test_dirstream_seek_and_renameat2(tmp_path):
    for i in range(50):
        (tmp_path / f"f{i}").write_text(str(i))
    with DirStream(tmp_path) as d:
        first = d.read()
        pos = d.tell()
        second = d.read()
        d.read_all()
        d.seek(pos)
        assert d.read() == second and first is not None
    renameat2(tmp_path / "f1", tmp_path / "f2", RENAME_EXCHANGE)
    assert (tmp_path / "f1").read_text() == "2"
    with pytest.raises(FileExistsError):
        renameat2(tmp_path / "f1", tmp_path / "f2", 1)


def test_mount_table_sees_mounts(tmpfs):
    t = tmpfs()
    assert is_mounted(t)
    assert str(t) in mounts_under(t.parent)


@pytest.mark.skipif(IMPL == "kernel", reason="pyunionfs daemon lifecycle")
def test_dead_daemon_is_cleaned_up_without_hanging(make_stack):
    # a crashed daemon leaves "Transport endpoint is not connected": stop() must still remove the
    # mount (lazily), never block, and report the crash
    paths = make_stack(lowers=[{"f": File("x")}])
    m = PyUnionMount(paths, server=False)  # its exit status is checked
    try:
        assert (paths.merged / "f").read_text() == "x"
        os.kill(m.proc.pid, signal.SIGKILL)
        m.proc.wait(timeout=10)
        with pytest.raises(MountError):
            m.stop()
        assert not is_mounted(paths.merged)
    finally:
        with contextlib.suppress(MountError):
            m.stop()


@pytest.mark.skipif(IMPL == "kernel", reason="pyunionfs daemon lifecycle")
@pytest.mark.watchdog(2)
def test_watchdog_unblocks_a_hung_request(make_stack, mounter, _registry):
    # a daemon that never answers (here: stopped) must not hang the suite
    paths = make_stack(lowers=[{"f": File("x")}])
    m = mounter(paths, IMPL)
    os.kill(m.pid, signal.SIGSTOP)  # type: ignore[attr-defined]
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        os.stat(paths.merged / "f")
    # ECONNABORTED for the request in flight, ENOTCONN for any later one
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED) and time.monotonic() - t0 < 30
    assert _registry.watchdog_fired
    _registry.watchdog_fired = False  # expected here; don't fail the teardown for it
    with contextlib.suppress(MountError):  # the killed daemon's exit status is reported
        m.stop()
    assert not is_mounted(paths.merged)
