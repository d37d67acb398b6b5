"""Lookup rules (overlay-semantics §2, §3, §4): top-down resolution, whiteouts, opaque dirs, where
the merge stops, whose metadata a merged dir shows."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from overlay_harness import (
    USERNS,
    Device,
    Dir,
    Fifo,
    File,
    Hardlink,
    Symlink,
    Whiteout,
    ls_op,
    stat_summary,
)


def _read(rel: str):
    def op(m: Path) -> bytes:
        return (m / rel).read_bytes()

    op.__name__ = f"read {rel}"
    return op


def _lstat(rel: str):
    def op(m: Path) -> tuple:
        return stat_summary(os.lstat(m / rel))

    op.__name__ = f"lstat {rel}"
    return op



def test_topmost_layer_wins(make_pair):
    pair = make_pair(
        upper={"u": File("upper")},
        lowers=[
            {"f": File("top", mode=0o600, uid=5, gid=6), "u": File("L0-u")},
            {"f": File("middle"), "g": File("only-middle"), "u": File("L1-u")},
            {"f": File("bottom"), "g": File("bottom-g"), "h": File("only-bottom")},
        ],
    )
    assert pair.same(_read("f")) == b"top"
    assert pair.same(_read("g")) == b"only-middle"
    assert pair.same(_read("h")) == b"only-bottom"
    assert pair.same(_read("u")) == b"upper"
    assert pair.same(_lstat("f")) == ("file", "0o600", 5, 6, 3, 1)
    pair.check_all()


def test_whiteout_in_lower_hides_name(make_pair):
    pair = make_pair(lowers=[{"x": Whiteout(), "d/y": Whiteout()},
                             {"x": File("hidden"), "d/y": File("hidden"), "d/z": File("z")}])
    pair.same(_lstat("x"), expect="ENOENT")
    pair.same(_lstat("d/y"), expect="ENOENT")
    pair.same(lambda m: open(m / "x").close(), expect="ENOENT", what="open whited-out")
    assert pair.same(ls_op("d")) == ["z"]
    assert "x" not in pair.same(ls_op())
    pair.check_all()


def test_whiteout_in_upper_hides_all_lowers(make_pair):
    pair = make_pair(upper={"x": Whiteout(), "d": Whiteout()},
                     lowers=[{"x": File("a")}, {"x": File("b"), "d/inner": File("c")}])
    pair.same(_lstat("x"), expect="ENOENT")
    pair.same(_lstat("d/inner"), expect="ENOENT")
    assert pair.same(ls_op()) == []
    pair.check_all()


def test_whiteout_in_middle_layer_stops_lookup(make_pair):
    # L0 dir / L1 whiteout / L2 dir: only L0's entries; the whiteout ends the scan
    pair = make_pair(lowers=[{"d/a": File("a")}, {"d": Whiteout()}, {"d/c": File("c")}])
    assert pair.same(ls_op("d")) == ["a"]
    pair.same(_lstat("d/c"), expect="ENOENT")
    pair.check_all()


def test_opaque_dir_hides_lower_dirs(make_pair):
    pair = make_pair(lowers=[
        {"d": Dir(opaque=True), "d/a": File("a"), "d/sub": Dir(opaque=True)},
        {"d/b": File("b"), "d/sub/s": File("s"), "e/x": File("x")},
    ])
    assert pair.same(ls_op("d")) == ["a", "sub"]
    pair.same(_lstat("d/b"), expect="ENOENT")
    pair.same(_lstat("d/sub/s"), expect="ENOENT")
    assert pair.same(ls_op("e")) == ["x"]
    pair.check_all()


def test_opaque_upper_dir_hides_lowers(make_pair):
    pair = make_pair(upper={"d": Dir(opaque=True), "d/new": File("n")},
                     lowers=[{"d/old": File("o")}, {"d/older": File("o2")}])
    assert pair.same(ls_op("d")) == ["new"]
    pair.same(_lstat("d/old"), expect="ENOENT")
    pair.check_all()


def test_opaque_xattr_value_other_than_y_is_not_opaque(make_pair):
    # only "y" means opaque; "x" merely marks "contains xattr whiteouts"
    pair = make_pair(lowers=[{"d": Dir(xattrs={"trusted.overlay.opaque": "x"}), "d/a": File("a")},
                             {"d/b": File("b")}])
    assert pair.same(ls_op("d")) == ["a", "b"]
    pair.check_all()


def test_non_directory_stops_the_merge(make_pair):
    # L1 dir / L2 file / L3 dir => only L1's entries
    pair = make_pair(lowers=[{"d/a": File("a")}, {"d": File("i am a file")}, {"d/c": File("c")}])
    assert pair.same(ls_op("d")) == ["a"]
    pair.same(_lstat("d/c"), expect="ENOENT")
    assert pair.same(_lstat("d"))[0] == "dir"
    pair.check_all()


def test_file_on_top_shadows_lower_dir(make_pair):
    pair = make_pair(lowers=[{"d": File("file")}, {"d/x": File("x")}])
    assert pair.same(_lstat("d"))[0] == "file"
    pair.same(_lstat("d/x"), expect="ENOTDIR")
    pair.same(ls_op("d"), expect="ENOTDIR")
    pair.check_all()


def test_symlink_on_top_shadows_lower_dir(make_pair):
    pair = make_pair(lowers=[{"d": Symlink("elsewhere"), "elsewhere/e": File("e")},
                             {"d/x": File("x")}])
    assert pair.same(lambda m: os.readlink(m / "d")) == "elsewhere"
    assert pair.same(ls_op("d")) == ["e"]  # follows the symlink, lower dir d is invisible
    pair.same(_lstat("d/x"), expect="ENOENT")
    pair.check_all()


def test_merged_dir_metadata_comes_from_topmost(make_pair):
    pair = make_pair(lowers=[
        {"d": Dir(mode=0o750, uid=11, gid=12, xattrs={"user.who": "top"}), "d/a": File("a")},
        {"d": Dir(mode=0o700, uid=21, gid=22, xattrs={"user.who": "bottom", "user.only": "b"}),
         "d/b": File("b")},
    ])
    assert pair.same(_lstat("d"))[:4] == ("dir", "0o750", 11, 12)
    assert pair.same(lambda m: os.getxattr(m / "d", "user.who")) == b"top"
    pair.same(lambda m: os.getxattr(m / "d", "user.only"), expect="ENODATA")
    pair.check_all()


def test_merged_dir_metadata_from_upper_over_lowers(make_pair):
    pair = make_pair(upper={"d": Dir(mode=0o711, uid=7, gid=8)},
                     lowers=[{"d": Dir(mode=0o755), "d/a": File("a")}])
    assert pair.same(_lstat("d"))[:4] == ("dir", "0o711", 7, 8)
    assert pair.same(ls_op("d")) == ["a"]
    pair.check_all()


def test_root_metadata_from_upper_root(make_pair):
    pair = make_pair(upper={".": Dir(mode=0o751, uid=3, gid=4)},
                     lowers=[{".": Dir(mode=0o700, uid=9, gid=9), "a": File()}])
    assert pair.same(_lstat("."))[:4] == ("dir", "0o751", 3, 4)
    pair.check_all()


def test_wh_prefixed_names_are_ordinary_files(make_pair):
    # the kernel has no AUFS/OCI whiteout semantics: .wh.NAME is just a file
    pair = make_pair(lowers=[{".wh.foo": File(""), "d/.wh..wh..opq": File("")},
                             {"foo": File("still here"), "d/b": File("b")}])
    assert pair.same(_read("foo")) == b"still here"
    assert pair.same(ls_op()) == [".wh.foo", "d", "foo"]
    assert pair.same(ls_op("d")) == [".wh..wh..opq", "b"]
    pair.check_all()


def test_deep_merge_across_three_layers(make_pair):
    pair = make_pair(upper={"a/b/c/u": File("u")},
                     lowers=[{"a/b/c/x": File("x")}, {"a/b/y": File("y")}, {"a/b/c/z": File("z")}])
    assert pair.same(ls_op("a/b/c")) == ["u", "x", "z"]
    assert pair.same(ls_op("a/b")) == ["c", "y"]
    assert pair.same(_read("a/b/c/z")) == b"z"
    pair.check_all()


def test_special_files_in_lowers(make_pair):
    pair = make_pair(lowers=[{"fifo": Fifo(mode=0o640, uid=3), "null": Device("c", 1, 3, mode=0o666),
                              "blk": Device("b", 7, 99), "link": Symlink("/nowhere/at/all", uid=4)}])
    snap = pair.assert_same_tree()
    assert snap.nodes["fifo"].type == "fifo"
    assert snap.nodes["null"].rdev == (1, 3)
    assert snap.nodes["blk"].type == "blk"
    assert snap.nodes["link"].uid == 4
    pair.same(lambda m: os.stat(m / "link"), expect="ENOENT", what="stat dangling symlink")
    pair.check_all()


def test_symlink_loop_in_lower_is_just_data(make_pair):
    pair = make_pair(lowers=[{"d/loop1": Symlink("loop2"), "d/loop2": Symlink("loop1"),
                              "d/self": Symlink("self"), "d/f": File("f")}])
    assert pair.same(ls_op("d")) == ["f", "loop1", "loop2", "self"]
    pair.same(lambda m: os.stat(m / "d/self"), expect="ELOOP", what="stat self-loop")
    assert pair.same(lambda m: os.readlink(m / "d/loop1")) == "loop2"
    pair.check_all()


def test_lower_hardlinks_nlink_right_from_first_lookup(make_pair):
    pair = make_pair(lowers=[{"a": File("shared"), "sub/b": Hardlink("a"), "c": Hardlink("a")}])
    # the very first lookup of any one name must already report all links
    assert pair.same(lambda m: os.lstat(m / "sub/b").st_nlink) == 3
    snap = pair.assert_same_tree()
    assert frozenset({"a", "sub/b", "c"}) in snap.links
    pair.check_all()


def test_xattr_whiteout_hides_name(make_pair):
    # 6.7+ read-only support: a zero-size file with trusted.overlay.whiteout is a whiteout. With the
    # parent marked opaque=x it is hidden from readdir too.
    pair = make_pair(lowers=[
        {"d": Dir(xattrs={"trusted.overlay.opaque": "x"}),
         "d/a": File("", xattrs={"trusted.overlay.whiteout": "y"})},
        {"d/a": File("covered"), "d/b": File("b")},
    ])
    pair.same(_lstat("d/a"), expect="ENOENT")
    assert pair.same(ls_op("d")) == ["b"]
    pair.check_all()


def test_xattr_whiteout_without_parent_marker(make_pair):
    # Without the opaque=x parent marker the kernel (6.18) lists the name, yet lookup says ENOENT;
    # so do we, in the first READDIRPLUS batch and in the plain READDIR batches after it (which
    # list lower entries from the listing alone, as the kernel does).
    # The bottom layer's names come first in a listing: 600 of them put "zz", which only the top
    # layer has, past the first batch.
    pad = {f"d/p{i:04}": File("x") for i in range(600)}
    pair = make_pair(lowers=[{"d/a": File("", xattrs={"trusted.overlay.whiteout": "y"}),
                              "d/zz": File("", xattrs={"trusted.overlay.whiteout": "y"})},
                             {"d/a": File("covered"), "d/b": File("b")} | pad])
    pair.same(_lstat("d/a"), expect="ENOENT")
    pair.same(_lstat("d/zz"), expect="ENOENT")  # (a whiteout of nothing)
    names = pair.same(ls_op("d"))
    assert "a" in names and "zz" in names and "b" in names, "premise: the kernel lists them"
    # (no tree comparison: a walk of either mount fails on the names it can't stat)


def test_lookup_of_missing_and_through_file(make_pair):
    pair = make_pair(lowers=[{"f": File("x")}])
    pair.same(_lstat("nope"), expect="ENOENT")
    pair.same(_lstat("f/child"), expect="ENOTDIR")
    pair.same(_lstat("nope/child"), expect="ENOENT")


def test_file_mode_bits_setuid_sticky_visible(make_pair):
    pair = make_pair(lowers=[{"suid": File("#!", mode=0o4755), "sgid": File("", mode=0o2750, gid=5),
                              "sticky": Dir(mode=0o1777)}])
    snap = pair.assert_same_tree()
    assert snap.nodes["suid"].mode == 0o4755
    assert snap.nodes["sticky"].mode == 0o1777
    assert stat.S_ISDIR(os.lstat(pair.o.root / "sticky").st_mode)


def test_redirect_xattr_is_followed(make_pair):
    # redirect_dir defaults to "follow" here (redirect_always_follow=Y): an upper dir carrying
    # trusted.overlay.redirect continues the lower lookup at that name (relative: same parent) or
    # path (absolute: from the root). Such uppers come from mounts with redirect_dir=on.
    # The old names carry whiteouts, as a kernel rename with redirect_dir=on leaves them (the
    # kernel refuses, ESTALE, to show one lower dir under two names).
    pair = make_pair(
        upper={"new": Dir(xattrs={"trusted.overlay.redirect": "old"}), "new/u": File(),
               "old": Whiteout(), "a/b": Whiteout(),
               "p/abs": Dir(xattrs={"trusted.overlay.redirect": "/a/b"})},
        lowers=[{"old/x": File("x"), "a/b/y": File("y"), "p/keep": File()}],
    )
    if USERNS:
        # userxattr means redirect_dir=nofollow: a redirect in user.* xattrs is refused
        pair.same(ls_op("new"), expect="EPERM")
        pair.same(ls_op("p/abs"), expect="EPERM")
        return
    assert pair.same(ls_op("new")) == ["u", "x"]
    assert pair.same(ls_op("p/abs")) == ["y"]
    assert pair.same(_read("new/x")) == b"x"
    assert pair.same(ls_op()) == ["a", "new", "p"]
    assert pair.same(lambda m: os.listxattr(m / "new")) == []  # redirect is private
    pair.check_all()


def test_redirect_in_lower_layer(make_pair):
    pair = make_pair(lowers=[{"moved": Dir(xattrs={"trusted.overlay.redirect": "orig"}),
                              "moved/top": File()},
                             {"orig/bottom": File(), "moved/shadowed": File()}])
    if USERNS:
        pair.same(ls_op("moved"), expect="EPERM")  # nofollow, as userxattr implies
        return
    assert pair.same(ls_op("moved")) == ["bottom", "top"]
    pair.same(_lstat("moved/shadowed"), expect="ENOENT")
    pair.check_all()
