"""The rootless dialect as root of a user namespace (UNIONFS_TEST_USERNS=1 only): the kernel mounts
with ``-o userxattr`` and pyunionfs must pick the same ``user.overlay.*`` dialect by itself.

The differential modules run unchanged in that mode (test_interop's workload spells its private name
in the dialect); here are the premise and the escaping tests, which test_xattr spells in
``trusted.overlay.*``. Outside userns mode they skip; tests/test_rootless.py runs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from overlay_harness import (
    PRIVATE_PREFIX,
    USER_PREFIX,
    USERNS,
    File,
    read_xattrs,
    tree_of,
)

if not USERNS:
    pytest.skip("userns mode only (UNIONFS_TEST_USERNS=1, run by "
                "tests/test_rootless.py::test_differential_suite_in_userns)", allow_module_level=True)


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
