"""The rootless dialect as root of a user namespace (UNIONFS_TEST_USERNS=1 only): the kernel mounts
with ``-o userxattr`` and pyunionfs must pick the same ``user.overlay.*`` dialect by itself.

These are the userns counterparts of tests that the differential suite skips in that mode because
they spell private names ``trusted.overlay.*`` in their operations (test_interop's workload,
test_xattr's escaping tests). Outside userns mode they skip; tests/test_rootless.py runs them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_interop as interop
from overlay_harness import (
    IMPL,
    PRIVATE_PREFIX,
    USER_PREFIX,
    USERNS,
    File,
    dialect_xattr,
    mount_stack,
    read_xattrs,
    snapshot_merged,
    tree_of,
)

if not USERNS:
    pytest.skip("userns mode only (UNIONFS_TEST_USERNS=1, run by "
                "tests/test_rootless.py::test_differential_suite_in_userns)", allow_module_level=True)


@contextlib.contextmanager
def _private_names_in_dialect() -> Iterator[None]:
    """While active, ``os.setxattr`` writes ``trusted.overlay.X`` as ``user.overlay.X``: so
    test_interop's workload (one private name) runs unchanged in the user.overlay. dialect."""
    real = os.setxattr

    def setxattr(path: object, name: str, value: bytes, *args: object, **kw: object) -> None:
        real(path, dialect_xattr(name), value, *args, **kw)  # type: ignore[arg-type]

    os.setxattr = setxattr  # type: ignore[assignment]
    try:
        yield
    finally:
        os.setxattr = real


def workload(m: Path) -> None:
    """test_interop.workload, its private name in this dialect."""
    with _private_names_in_dialect():
        interop.workload(m)


def _fresh_work(base: Path, name: str) -> Path:
    w = base / name
    w.mkdir()
    return w


def test_in_user_namespace_premise(tmp_path: Path) -> None:
    # root here, uids 0..65535 mapped, but no capability outside: trusted.* can't be stored
    assert PRIVATE_PREFIX == USER_PREFIX and os.geteuid() == 0
    with open("/proc/self/uid_map") as f:
        assert f.read().split() == ["0", "0", "65536"]
    f = tmp_path / "probe"
    f.write_text("")
    with pytest.raises(PermissionError):
        os.setxattr(f, "trusted.overlay.opaque", b"y")
    os.setxattr(f, "user.overlay.opaque", b"y")


def test_upper_format_after_workload(make_pair) -> None:
    pair = make_pair(**interop.IMAGE)
    pair.same(workload, expect="ok")
    snap = pair.assert_same_upper()
    pair.check_all()
    assert snap.nodes["etc/drop"].type == "whiteout"
    assert snap.nodes["old"].opaque is True  # user.overlay.opaque=y
    assert snap.nodes["hidden"].opaque is False
    assert dict(snap.nodes["base-only"].xattrs) == {"user.overlay.overlay.esc": b"escaped"}
    for side in pair.sides:
        st = os.lstat(side.upper / "etc/drop")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, side.impl
        assert os.getxattr(side.upper / "old", "user.overlay.opaque") == b"y", side.impl


def test_pyunionfs_upper_read_by_kernel(make_pair) -> None:
    pair = make_pair(**interop.IMAGE)
    pair.same(workload, expect="ok")
    ours = snapshot_merged(pair.o.root, mtimes=True)
    pair.o.stop()
    with mount_stack(pair.o.paths, "kernel", work=_fresh_work(pair.o.paths.base, "work-k")) as m:
        theirs = snapshot_merged(m.root, mtimes=True)
    assert ours == theirs, "kernel (userxattr) reads pyunionfs's upper differently:\n" + ours.diff(
        theirs, ("pyunionfs", "kernel"))


def test_kernel_upper_read_by_pyunionfs(make_pair) -> None:
    pair = make_pair(**interop.IMAGE)
    pair.same(workload, expect="ok")
    kernel_view = snapshot_merged(pair.k.root, mtimes=True)
    pair.k.stop()
    with mount_stack(pair.k.paths, IMPL, work=_fresh_work(pair.k.paths.base, "work-o")) as m:
        ours = snapshot_merged(m.root, mtimes=True)
    assert kernel_view == ours, "pyunionfs reads the kernel's userxattr upper differently:\n" + (
        kernel_view.diff(ours, ("kernel", "pyunionfs")))


def test_kernel_workdir_reused_by_pyunionfs(make_pair) -> None:
    pair = make_pair(**interop.IMAGE)
    pair.same(workload, expect="ok")
    kernel_view = snapshot_merged(pair.k.root)
    pair.k.stop()
    with mount_stack(pair.k.paths, IMPL) as m:
        assert snapshot_merged(m.root) == kernel_view
        (m.root / "after-switch").write_text("ok")


def test_remount_shows_same_tree(make_stack, mounter) -> None:
    paths = make_stack(**interop.IMAGE)
    m = mounter(paths, IMPL)
    workload(m.root)
    before = snapshot_merged(m.root, mtimes=True)
    m.stop()
    m = mounter(paths, IMPL)
    after = snapshot_merged(m.root, mtimes=True)
    m.stop()
    assert before == after, before.diff(after, ("first mount", "remount"))


def test_user_overlay_names_are_private_and_escaped(make_pair) -> None:
    # with userxattr, user.overlay.* is the private namespace: hidden on disk, escaped when set
    pair = make_pair(lowers=[{"f": File("x", xattrs={"user.overlay.overlay.x": "escaped",
                                                      "user.overlay.origin": "",
                                                      "user.keep": "k"})}])
    assert pair.same(lambda m: sorted(os.listxattr(m / "f"))) == ["user.keep", "user.overlay.x"]
    assert pair.same(lambda m: os.getxattr(m / "f", "user.overlay.x")) == b"escaped"
    pair.same(lambda m: os.getxattr(m / "f", "user.overlay.origin"), expect="ENODATA")
    pair.same(lambda m: os.setxattr(m / "f", "user.overlay.foo", b"bar"), expect="ok")
    assert pair.same(lambda m: os.getxattr(m / "f", "user.overlay.foo")) == b"bar"
    for side in pair.sides:
        xs = read_xattrs(str(side.upper / "f"))
        assert xs.get("user.overlay.overlay.foo") == b"bar", side.impl
        assert xs.get("user.overlay.overlay.x") == b"escaped", side.impl  # kept by copy-up
        assert "user.overlay.foo" not in xs, side.impl
    pair.same(lambda m: os.removexattr(m / "f", "user.overlay.foo"), expect="ok")
    pair.check_all()


def test_trusted_overlay_names_are_ordinary_xattrs(make_pair) -> None:
    # with userxattr, trusted.overlay.* means nothing to the overlay: reading it is the upper fs's
    # answer to an unprivileged trusted.* read (ENODATA), setting it is refused (EPERM)
    pair = make_pair(lowers=[{"f": File("x"), "d/a": File()}, {"d/b": File()}])
    pair.same(lambda m: os.getxattr(m / "f", "trusted.overlay.opaque"), expect="ENODATA")
    pair.same(lambda m: os.setxattr(m / "f", "trusted.overlay.foo", b"1"), expect="EPERM")
    pair.same(lambda m: os.setxattr(m / "f", "trusted.any", b"1"), expect="EPERM")
    pair.same(lambda m: os.unlink(m / "d/a"), expect="ok")
    assert pair.same(lambda m: sorted(os.listdir(m / "d"))) == ["b"]
    pair.check_all()
    for side in pair.sides:
        assert tree_of(side.upper).get("d/a") == "chr", side.impl
