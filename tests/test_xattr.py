"""Extended attributes in the merged view (overlay-semantics §10, §6.4)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from overlay_harness import Dir, File, Symlink, read_xattrs, tree_of


def _list(rel: str):
    def op(m: Path) -> list[str]:
        return sorted(os.listxattr(m / rel, follow_symlinks=False))

    op.__name__ = f"listxattr {rel}"
    return op


def _get(rel: str, name: str):
    def op(m: Path) -> bytes:
        return os.getxattr(m / rel, name, follow_symlinks=False)

    op.__name__ = f"getxattr {rel} {name}"
    return op


STACK = dict(
    upper={"uf": File("u", xattrs={"user.u": "1"}), "ud": Dir(xattrs={"trusted.td": "2"})},
    lowers=[{"lf": File("l", xattrs={"user.a": "A", "user.b": "", "trusted.t": b"\xff\x00"}),
             "ld": Dir(xattrs={"user.dir": "D"}),
             "ls": Symlink("lf", xattrs={"trusted.link": "L"})}],
)


def test_get_list_pass_through(make_pair):
    pair = make_pair(**STACK)
    assert pair.same(_list("lf")) == ["trusted.t", "user.a", "user.b"]
    assert pair.same(_list("ls")) == ["trusted.link"]
    assert pair.same(_list("ud")) == ["trusted.td"]
    assert pair.same(_get("lf", "trusted.t")) == b"\xff\x00"
    assert pair.same(_get("lf", "user.b")) == b""
    pair.same(_get("lf", "user.none"), expect="ENODATA")
    pair.same(_get("ls", "trusted.link"))
    pair.check_all()


@pytest.mark.parametrize("target", ["lf", "uf", "ld", "ud"])
def test_set_replace_remove(make_pair, target):
    pair = make_pair(**STACK)
    pair.same(lambda m: os.setxattr(m / target, "user.new", b"v1"), expect="ok")
    pair.same(lambda m: os.setxattr(m / target, "user.new", b"v2"), expect="ok")
    assert pair.same(_get(target, "user.new")) == b"v2"
    pair.same(lambda m: os.setxattr(m / target, "trusted.big", b"x" * 3000), expect="ok")
    pair.same(lambda m: os.removexattr(m / target, "user.new"), expect="ok")
    pair.same(lambda m: os.removexattr(m / target, "user.new"), expect="ENODATA")
    pair.check_all()


def test_create_replace_flags(make_pair):
    pair = make_pair(**STACK)
    pair.same(lambda m: os.setxattr(m / "lf", "user.a", b"x", os.XATTR_CREATE), expect="EEXIST")
    pair.same(lambda m: os.setxattr(m / "lf", "user.zz", b"x", os.XATTR_REPLACE), expect="ENODATA")
    pair.same(lambda m: os.setxattr(m / "lf", "user.zz", b"x", os.XATTR_CREATE), expect="ok")
    pair.same(lambda m: os.setxattr(m / "lf", "user.a", b"y", os.XATTR_REPLACE), expect="ok")
    pair.check_all()


def test_user_xattr_on_symlink_is_eperm(make_pair):
    pair = make_pair(**STACK)
    pair.same(lambda m: os.setxattr(m / "ls", "user.x", b"1", follow_symlinks=False), expect="EPERM")
    for side in pair.sides:
        assert "ls" not in tree_of(side.upper), side.impl
    pair.check_all()


def test_private_overlay_xattrs_hidden(make_pair):
    # opaque markers, origin and any other trusted.overlay.* name on disk are private to overlayfs
    pair = make_pair(lowers=[
        {"od": Dir(opaque=True, xattrs={"user.keep": "k"}), "od/x": File(),
         "f": File(xattrs={"trusted.overlay.something": "s", "trusted.overlay.origin": "",
                           "user.keep": "k"})},
        {"od/hidden": File()},
    ])
    assert pair.same(_list("od")) == ["user.keep"]
    assert pair.same(_list("f")) == ["user.keep"]
    pair.same(_get("od", "trusted.overlay.opaque"), expect="ENODATA")
    pair.same(_get("f", "trusted.overlay.something"), expect="ENODATA")
    # copy-ups and opaque dirs made by the mount itself stay invisible too
    pair.same(lambda m: os.chmod(m / "f", 0o600), expect="ok")
    pair.same(lambda m: os.unlink(m / "od/x"), expect="ok")
    pair.same(lambda m: os.rmdir(m / "od"), expect="ok")
    pair.same(lambda m: os.mkdir(m / "od"), expect="ok")
    assert pair.same(_list("f")) == ["user.keep"]
    assert pair.same(_list("od")) == []
    assert pair.same(_list(".")) == []  # the root's uuid is private as well
    pair.check_all()


def test_setting_overlay_xattr_is_escaped_in_upper(make_pair):
    # 6.7+: trusted.overlay.foo set through the mount is stored as trusted.overlay.overlay.foo
    pair = make_pair(lowers=[{"f": File("x")}])
    pair.same(lambda m: os.setxattr(m / "f", "trusted.overlay.foo", b"bar"), expect="ok")
    assert pair.same(_get("f", "trusted.overlay.foo")) == b"bar"
    assert pair.same(_list("f")) == ["trusted.overlay.foo"]
    for side in pair.sides:
        xs = read_xattrs(str(side.upper / "f"))
        assert xs.get("trusted.overlay.overlay.foo") == b"bar", side.impl
        assert "trusted.overlay.foo" not in xs, side.impl
    pair.check_all()
    pair.same(lambda m: os.removexattr(m / "f", "trusted.overlay.foo"), expect="ok")
    assert pair.same(_list("f")) == []
    pair.check_all()


def test_escaped_xattr_on_disk_appears_unescaped(make_pair):
    pair = make_pair(lowers=[{"f": File(xattrs={"trusted.overlay.overlay.x": "escaped"})}])
    assert pair.same(_list("f")) == ["trusted.overlay.x"]
    assert pair.same(_get("f", "trusted.overlay.x")) == b"escaped"
    pair.same(lambda m: os.chmod(m / "f", 0o600), expect="ok")  # copy-up keeps the escaped name
    for side in pair.sides:
        assert read_xattrs(str(side.upper / "f")).get("trusted.overlay.overlay.x") == b"escaped"
    pair.check_all()


def test_posix_acl_query_without_acl_is_enodata(make_pair):
    # the kernel asks for ACLs on open; EOPNOTSUPP here would make even `cat` fail
    pair = make_pair(lowers=[{"f": File("x"), "d": Dir()}])
    pair.same(_get("f", "system.posix_acl_access"), expect="ENODATA")
    pair.same(_get("d", "system.posix_acl_default"), expect="ENODATA")
    pair.check_all()


def test_security_capability_survives_copy_up(make_pair):
    # vfs_cap_data revision 2, effective, CAP_NET_BIND_SERVICE permitted
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
    pair = make_pair(lowers=[{"bin": File("\x7fELF", mode=0o755,
                                          xattrs={"security.capability": cap})}])
    assert pair.same(_get("bin", "security.capability")) == cap
    pair.same(lambda m: os.chmod(m / "bin", 0o750), expect="ok")
    assert pair.same(_get("bin", "security.capability")) == cap
    for side in pair.sides:
        assert os.getxattr(side.upper / "bin", "security.capability") == cap, side.impl
    pair.check_all()


def test_xattr_value_limits(make_pair):
    pair = make_pair(lowers=[{"f": File()}])
    pair.same(lambda m: os.setxattr(m / "f", "user.huge", b"x" * 70000), expect="E2BIG")
    pair.same(lambda m: os.setxattr(m / "f", "user." + "n" * 251, b"v"), expect="ERANGE")
    pair.same(lambda m: os.setxattr(m / "f", "bogus.name", b"v"), expect="ENOTSUP")
    pair.check_all()


def test_dir_xattr_copy_up_keeps_children_below(make_pair):
    pair = make_pair(lowers=[{"d": Dir(xattrs={"user.a": "1"}), "d/child": File("c")}])
    pair.same(lambda m: os.setxattr(m / "d", "user.b", b"2"), expect="ok")
    for side in pair.sides:
        assert tree_of(side.upper) == {".": "dir", "d": "dir"}, side.impl
    snap = pair.assert_same_upper()
    assert snap.nodes["d"].opaque is False
    assert pair.same(lambda m: os.listdir(m / "d")) == ["child"]
    pair.check_all()


def test_trusted_xattrs_listed_only_to_root(make_pair):
    # the kernel lists trusted.* only to CAP_SYS_ADMIN; through FUSE that filter is ours to apply
    pair = make_pair(lowers=[{"f": File("x", mode=0o644, xattrs={"trusted.t": "1", "user.u": "2"})}])
    assert pair.same_as(1000, 1000, lambda m: sorted(os.listxattr(m / "f"))) == ["user.u"]
    assert pair.same(lambda m: sorted(os.listxattr(m / "f"))) == ["trusted.t", "user.u"]
