"""Namespace operations (overlay-semantics §4, §8, §11): create/mkdir/symlink/mknod/link land in upper
with the caller's credentials and umask, whiteouts and opaque dirs, unlink/rmdir and their errnos."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from overlay_harness import Dir, Fifo, File, Symlink, Whiteout, stat_summary, tree_of

UID, GID = 1000, 1000


def _creates(m: Path) -> None:
    d = m / "pub"
    fd = os.open(d / "file", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.write(fd, b"by user")
    os.close(fd)
    os.mkdir(d / "dir", 0o777)
    os.symlink("file", d / "sym")
    os.mkfifo(d / "fifo", 0o666)
    os.link(d / "file", d / "hard")
    with open(d / "dir/nested", "w") as f:
        f.write("n")


def test_new_objects_owned_by_caller_with_umask(make_pair):
    pair = make_pair(lowers=[{"pub": Dir(mode=0o777), "pub/old": File("o")}])
    pair.same_as(UID, GID, _creates, umask=0o027, expect="ok", what="create as uid 1000")
    snap = pair.assert_same_upper()
    for rel in ("pub/file", "pub/dir", "pub/sym", "pub/fifo", "pub/dir/nested"):
        node = snap.nodes[rel]
        assert (node.uid, node.gid) == (UID, GID), rel
    assert snap.nodes["pub/file"].mode == 0o640
    assert snap.nodes["pub/dir"].mode == 0o750
    assert snap.nodes["pub/fifo"].mode == 0o640
    assert snap.nodes["pub/file"].nlink == 2
    assert snap.nodes["pub"].uid == 0  # the copied-up parent keeps its owner
    pair.check_all()


def test_umask_zero_gives_requested_modes(make_pair):
    pair = make_pair(lowers=[{"pub": Dir(mode=0o777)}])

    def op(m: Path) -> list[tuple]:
        os.close(os.open(m / "pub/f", os.O_CREAT | os.O_WRONLY, 0o666))
        os.mkdir(m / "pub/d", 0o777)
        return [stat_summary(os.lstat(m / "pub" / n)) for n in ("f", "d")]

    assert pair.same_as(UID, GID, op, umask=0) == [("file", "0o666", UID, GID, 0, 1),
                                                   ("dir", "0o777", UID, GID, None, None)]
    pair.check_all()


def test_unprivileged_create_in_root_dir_denied(make_pair):
    pair = make_pair(lowers=[{"priv": Dir(mode=0o755), "priv/f": File("x", mode=0o644)}])
    pair.same_as(UID, GID, lambda m: (m / "priv/new").write_text("x"), expect="EACCES",
                 what="create in 0755 root dir")
    pair.same_as(UID, GID, lambda m: (m / "priv/f").write_text("x"), expect="EACCES",
                 what="write root 0644 file")
    pair.same_as(UID, GID, lambda m: os.chmod(m / "priv/f", 0o666), expect="EPERM",
                 what="chmod someone else's file")
    for side in pair.sides:  # a refused operation copies nothing up
        assert tree_of(side.upper) == {".": "dir"}, side.impl
    pair.check_all()


def test_setgid_dir_inheritance(make_pair):
    pair = make_pair(lowers=[{"sg": Dir(mode=0o2777, gid=2000)}])

    def op(m: Path) -> list[tuple]:
        (m / "sg/f").write_text("x")
        os.mkdir(m / "sg/d", 0o755)
        os.mkdir(m / "sg/d/deeper", 0o700)
        return [stat_summary(os.lstat(m / "sg" / n)) for n in ("f", "d", "d/deeper")]

    got = pair.same_as(UID, GID, op, umask=0o022)
    assert got[0][3] == 2000 and got[1][1] == "0o2755" and got[1][3] == 2000
    assert got[2][1] == "0o2700" and got[2][3] == 2000
    pair.check_all()


def test_mkdir_over_whiteout_is_opaque(make_pair):
    pair = make_pair(upper={"d": Whiteout()}, lowers=[{"d/old": File("o")}])
    pair.same(lambda m: os.mkdir(m / "d", 0o755), expect="ok")
    assert pair.same(lambda m: os.listdir(m / "d")) == []
    pair.same(lambda m: os.lstat(m / "d/old"), expect="ENOENT")
    snap = pair.assert_same_upper()
    assert snap.nodes["d"].opaque is True
    pair.check_all()


def test_mkdir_after_rmdir_of_lower_dir_is_opaque(make_pair):
    pair = make_pair(lowers=[{"d": Dir()}, {"d/x": Whiteout()}])  # L0 d empty, L1 hides x anyway
    pair.same(lambda m: os.rmdir(m / "d"), expect="ok")
    assert pair.assert_same_upper().nodes["d"].type == "whiteout"
    pair.same(lambda m: os.mkdir(m / "d"), expect="ok")
    assert pair.assert_same_upper().nodes["d"].opaque is True
    pair.check_all()


def test_mkdir_with_nothing_below_is_plain(make_pair):
    pair = make_pair(lowers=[{"parent/x": File()}])
    pair.same(lambda m: os.mkdir(m / "parent/new", 0o700), expect="ok")
    pair.same(lambda m: os.mkdir(m / "top", 0o755), expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["parent/new"].opaque is False and snap.nodes["top"].opaque is False
    assert snap.nodes["parent/new"].xattrs == ()
    pair.check_all()


def test_mkdir_mode_0555_over_whiteout(make_pair):
    # a read-only new dir must still get its opaque mark (and be usable by root)
    pair = make_pair(upper={"ro": Whiteout()}, lowers=[{"ro/x": File()}])
    pair.same(lambda m: os.mkdir(m / "ro", 0o555), expect="ok")
    pair.same(lambda m: (m / "ro/inside").write_text("root may"), expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["ro"].opaque is True and snap.nodes["ro"].mode == 0o555
    pair.check_all()


def test_create_over_whiteout_replaces_it(make_pair):
    pair = make_pair(upper={"f": Whiteout(), "s": Whiteout(), "p": Whiteout()},
                     lowers=[{"f": File("old"), "s": File(), "p": File()}])
    pair.same(lambda m: (m / "f").write_text("new"), expect="ok")
    pair.same(lambda m: os.symlink("f", m / "s"), expect="ok")
    pair.same(lambda m: os.mkfifo(m / "p"), expect="ok")
    assert pair.same(lambda m: (m / "f").read_text()) == "new"
    snap = pair.assert_same_upper()
    assert [snap.nodes[n].type for n in ("f", "s", "p")] == ["file", "symlink", "fifo"]
    pair.same(lambda m: os.unlink(m / "f"), expect="ok")
    assert pair.assert_same_upper().nodes["f"].type == "whiteout"
    pair.check_all()


def test_mknod_whiteout_through_mount_is_eperm(make_pair):
    pair = make_pair(lowers=[{"x": File()}])
    pair.same(lambda m: os.mknod(m / "wh", stat.S_IFCHR | 0o600, 0), expect="EPERM")
    for side in pair.sides:
        assert "wh" not in tree_of(side.upper)
    pair.check_all()


def test_mknod_devices_fifo_socket(make_pair):
    pair = make_pair(lowers=[{"dev": Dir()}])
    pair.same(lambda m: os.mknod(m / "dev/null2", stat.S_IFCHR | 0o666, os.makedev(1, 3)),
              expect="ok")
    pair.same(lambda m: os.mknod(m / "dev/blk", stat.S_IFBLK | 0o600, os.makedev(7, 200)),
              expect="ok")
    pair.same(lambda m: os.mknod(m / "dev/fifo", stat.S_IFIFO | 0o640), expect="ok")

    def bind(m: Path) -> None:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.bind(str(m / "dev/sock"))
        finally:
            s.close()

    pair.same(bind, expect="ok", what="bind AF_UNIX socket")
    snap = pair.assert_same_upper()
    assert snap.nodes["dev/null2"].rdev == (1, 3) and snap.nodes["dev/blk"].type == "blk"
    assert snap.nodes["dev/sock"].type == "sock"
    pair.check_all()


def test_unlink_lower_file_leaves_whiteout(make_pair):
    pair = make_pair(lowers=[{"d/f": File("x"), "d/keep": File()}])
    pair.same(lambda m: os.unlink(m / "d/f"), expect="ok")
    pair.same(lambda m: os.lstat(m / "d/f"), expect="ENOENT")
    assert pair.same(lambda m: sorted(os.listdir(m / "d"))) == ["keep"]
    snap = pair.assert_same_upper()
    assert snap.nodes["d/f"].type == "whiteout" and snap.nodes["d"].opaque is False
    pair.check_all()


def test_unlink_upper_only_file_leaves_nothing(make_pair):
    pair = make_pair(upper={"u": File()}, lowers=[{"l": File()}])
    pair.same(lambda m: os.unlink(m / "u"), expect="ok")
    pair.same(lambda m: (m / "new").write_text("n"), expect="ok")
    pair.same(lambda m: os.unlink(m / "new"), expect="ok")
    for side in pair.sides:
        assert tree_of(side.upper) == {".": "dir"}, side.impl
    pair.check_all()


def test_unlink_copied_up_file_leaves_whiteout(make_pair):
    pair = make_pair(lowers=[{"f": File("x")}])
    pair.same(lambda m: (m / "f").write_text("changed"), expect="ok")
    pair.same(lambda m: os.unlink(m / "f"), expect="ok")
    assert pair.assert_same_upper().nodes["f"].type == "whiteout"
    pair.check_all()


def test_unlink_symlink_and_special_files(make_pair):
    pair = make_pair(lowers=[{"s": Symlink("nowhere"), "p": Fifo()}])
    pair.same(lambda m: os.unlink(m / "s"), expect="ok")
    pair.same(lambda m: os.unlink(m / "p"), expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["s"].type == snap.nodes["p"].type == "whiteout"
    pair.check_all()


def test_nlink_after_link_and_unlink(make_pair):
    pair = make_pair(lowers=[{"f": File("x")}])
    pair.same(lambda m: os.link(m / "f", m / "g"), expect="ok")
    assert pair.same(lambda m: (os.lstat(m / "f").st_nlink, os.lstat(m / "g").st_nlink)) == (2, 2)
    pair.same(lambda m: os.link(m / "g", m / "h"), expect="ok")
    assert pair.same(lambda m: os.lstat(m / "f").st_nlink) == 3
    pair.same(lambda m: os.unlink(m / "f"), expect="ok")
    assert pair.same(lambda m: (os.lstat(m / "g").st_nlink, os.lstat(m / "h").st_nlink)) == (2, 2)
    snap = pair.check_all() or pair.assert_same_tree()
    assert frozenset({"g", "h"}) in snap.links


def test_rmdir_lower_dir_leaves_whiteout(make_pair):
    pair = make_pair(lowers=[{"empty": Dir(), "keep": File()}])
    pair.same(lambda m: os.rmdir(m / "empty"), expect="ok")
    assert pair.assert_same_upper().nodes["empty"].type == "whiteout"
    pair.check_all()


def test_rmdir_upper_only_dir_plain(make_pair):
    pair = make_pair(lowers=[{"x": File()}])
    pair.same(lambda m: os.mkdir(m / "new"), expect="ok")
    pair.same(lambda m: os.rmdir(m / "new"), expect="ok")
    for side in pair.sides:
        assert tree_of(side.upper) == {".": "dir"}, side.impl
    pair.check_all()


def test_rmdir_merged_dir_not_empty(make_pair):
    pair = make_pair(upper={"d/u": File()}, lowers=[{"d/a": File()}, {"d/b": File()}])
    pair.same(lambda m: os.rmdir(m / "d"), expect="ENOTEMPTY")
    pair.same(lambda m: os.unlink(m / "d/u"), expect="ok")
    pair.same(lambda m: os.unlink(m / "d/a"), expect="ok")
    pair.same(lambda m: os.rmdir(m / "d"), expect="ENOTEMPTY", what="rmdir with b still below")
    pair.check_all()


def test_rmdir_merged_dir_with_only_whiteouts(make_pair):
    pair = make_pair(upper={"d/x": Whiteout()}, lowers=[{"d/a": File(), "d/x": File()},
                                                        {"d/b": File(), "d/sub": Dir()}])
    for name in ("a", "b"):
        pair.same(lambda m, n=name: os.unlink(m / "d" / n), expect="ok", what=f"unlink d/{name}")
    pair.same(lambda m: os.rmdir(m / "d/sub"), expect="ok")
    pair.same(lambda m: os.rmdir(m / "d"), expect="ok")
    pair.same(lambda m: os.lstat(m / "d"), expect="ENOENT")
    assert pair.assert_same_upper().nodes["d"].type == "whiteout"
    pair.check_all()


def test_rmdir_empty_upper_opaque_dir_over_lower(make_pair):
    pair = make_pair(upper={"d": Dir(opaque=True)}, lowers=[{"d/hidden": File()}])
    pair.same(lambda m: os.rmdir(m / "d"), expect="ok")
    assert pair.assert_same_upper().nodes["d"].type == "whiteout"
    pair.check_all()


def test_errnos(make_pair):
    pair = make_pair(upper={"ud": Dir(), "uf": File()},
                     lowers=[{"f": File("x"), "d/x": File(), "s": Symlink("d"), "e": Dir()}])
    pair.same(lambda m: os.rmdir(m / "f"), expect="ENOTDIR", what="rmdir file")
    pair.same(lambda m: os.rmdir(m / "s"), expect="ENOTDIR", what="rmdir symlink to dir")
    pair.same(lambda m: os.unlink(m / "d"), expect="EISDIR", what="unlink dir")
    pair.same(lambda m: os.unlink(m / "ud"), expect="EISDIR", what="unlink upper dir")
    pair.same(lambda m: os.link(m / "d", m / "d2"), expect="EPERM", what="link dir")
    pair.same(lambda m: os.mkdir(m / "f"), expect="EEXIST", what="mkdir over lower file")
    pair.same(lambda m: os.mkdir(m / "e"), expect="EEXIST", what="mkdir over lower dir")
    pair.same(lambda m: os.symlink("x", m / "d"), expect="EEXIST", what="symlink over lower dir")
    pair.same(lambda m: os.mkfifo(m / "f"), expect="EEXIST", what="mkfifo over lower file")
    pair.same(lambda m: os.link(m / "uf", m / "f"), expect="EEXIST", what="link onto lower file")
    pair.same(lambda m: os.open(m / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY), expect="EEXIST",
              what="O_EXCL on lower file")
    pair.same(lambda m: os.rmdir(m / "nope"), expect="ENOENT", what="rmdir missing")
    pair.same(lambda m: os.unlink(m / "nope"), expect="ENOENT", what="unlink missing")
    # (os.path.join, not pathlib: pathlib would drop the trailing ".")
    pair.same(lambda m: os.rmdir(os.path.join(m, "e", ".")), expect="EINVAL", what="rmdir dot")
    pair.same(lambda m: os.mkdir(m / "f/sub"), expect="ENOTDIR", what="mkdir under file")
    pair.same(lambda m: os.link(m / "nope", m / "x"), expect="ENOENT", what="link missing")
    pair.same(lambda m: os.mkdir(m / ("n" * 256)), expect="ENAMETOOLONG", what="256-byte name")
    for side in pair.sides:  # nothing above may have copied anything up
        assert tree_of(side.upper) == {".": "dir", "ud": "dir", "uf": "file"}, side.impl
    pair.check_all()


def test_long_names_up_to_255(make_pair):
    # overlayfs has the upper fs's limit (unlike fuse-overlayfs's 251)
    name = "x" * 255
    pair = make_pair(lowers=[{"d": Dir()}])
    pair.same(lambda m: (m / "d" / name).write_text("long"), expect="ok")
    pair.same(lambda m: os.rename(m / "d" / name, m / "d" / ("y" * 255)), expect="ok")
    pair.check_all()


def test_sticky_dir_protects_other_users_files(make_pair):
    pair = make_pair(lowers=[{"tmp": Dir(mode=0o1777), "tmp/roots": File("r", mode=0o666),
                              "tmp/mine": File("m", uid=UID, gid=GID)}])
    pair.same_as(UID, GID, lambda m: os.unlink(m / "tmp/roots"), expect="EPERM")
    pair.same_as(UID, GID, lambda m: os.rename(m / "tmp/roots", m / "tmp/x"), expect="EPERM")
    pair.same_as(UID, GID, lambda m: os.unlink(m / "tmp/mine"), expect="ok")
    pair.check_all()


def test_access_checks_for_other_users(make_pair):
    pair = make_pair(lowers=[{"ro": File("x", mode=0o644), "rw": File("x", mode=0o666),
                              "x": File("#!", mode=0o755), "d": Dir(mode=0o700)}])

    def op(m: Path) -> list[bool]:
        return [os.access(m / "ro", os.W_OK), os.access(m / "rw", os.W_OK),
                os.access(m / "x", os.X_OK), os.access(m / "d", os.R_OK),
                os.access(m / "ro", os.R_OK)]

    assert pair.same_as(UID, GID, op) == [False, True, True, False, True]
    pair.same_as(UID, GID, lambda m: os.listdir(m / "d"), expect="EACCES")
    pair.check_all()


OPAQUE_MIDDLE = dict(
    upper={"d/u": File("u")},
    lowers=[{"d": Dir(opaque=True, mode=0o750), "d/a": File("a"), "d/sub/s": File()},
            {"d/a": File("a below"), "d/b": File("b"), "d/sub/t": File(), "d/name": Dir()}],
)


def test_opaque_middle_layer_stops_merge_below(make_pair):
    pair = make_pair(**OPAQUE_MIDDLE)
    assert pair.same(lambda m: sorted(os.listdir(m / "d"))) == ["a", "sub", "u"]
    assert pair.same(lambda m: sorted(os.listdir(m / "d/sub"))) == ["s"]
    pair.check_all()


def test_copy_up_of_opaque_lower_dir_stays_opaque(make_pair):
    pair = make_pair(**OPAQUE_MIDDLE)
    pair.same(lambda m: os.chmod(m / "d/sub", 0o700), expect="ok")
    pair.same(lambda m: (m / "d/sub/new").write_text("n"), expect="ok")
    assert pair.same(lambda m: sorted(os.listdir(m / "d/sub"))) == ["new", "s"]
    assert pair.same(lambda m: sorted(os.listdir(m / "d"))) == ["a", "sub", "u"]
    pair.check_all()


def test_namespace_ops_below_opaque_lower_dir(make_pair):
    pair = make_pair(**OPAQUE_MIDDLE)
    pair.same(lambda m: os.unlink(m / "d/a"), expect="ok")
    pair.same(lambda m: os.mkdir(m / "d/name"), expect="ok")  # only hidden below the opaque dir
    pair.same(lambda m: (m / "d/b").write_text("fresh"), expect="ok")
    assert pair.same(lambda m: sorted(os.listdir(m / "d"))) == ["b", "name", "sub", "u"]
    snap = pair.assert_same_upper()
    assert snap.nodes["d/a"].type == "whiteout"
    pair.check_all()
