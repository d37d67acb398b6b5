"""rename (overlay-semantics §7): copy-up + whiteout at the old name, EXDEV for lower/merged dirs,
renameat2 flags, and the usual errnos."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from overlay_harness import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    Dir,
    Fifo,
    File,
    Symlink,
    Whiteout,
    ls_op,
    renameat2,
    tree_of,
)


def _rename(a: str, b: str, flags: int = 0):
    def op(m: Path) -> None:
        if flags:
            renameat2(m / a, m / b, flags)
        else:
            os.rename(m / a, m / b)

    op.__name__ = f"rename({a!r}, {b!r}, flags={flags})"
    return op



def test_rename_lower_file_leaves_whiteout(make_pair):
    pair = make_pair(lowers=[{"d/f": File("data", mode=0o600, uid=7, mtime=1_400_000_000),
                              "e/x": File()}])
    pair.same(_rename("d/f", "e/g"), expect="ok")
    assert pair.same(lambda m: (m / "e/g").read_text()) == "data"
    pair.same(lambda m: os.lstat(m / "d/f"), expect="ENOENT")
    snap = pair.assert_same_upper(mtimes=True)
    assert snap.nodes["d/f"].type == "whiteout"
    assert snap.nodes["e/g"].mtime_ns == 1_400_000_000 * 10**9 and snap.nodes["e/g"].uid == 7
    pair.check_all(mtimes=True)


def test_rename_upper_only_file_no_whiteout(make_pair):
    pair = make_pair(upper={"u": File("u")}, lowers=[{"l": File()}])
    pair.same(_rename("u", "v"), expect="ok")
    for side in pair.sides:
        assert tree_of(side.upper) == {".": "dir", "v": "file"}, side.impl
    pair.check_all()


def test_editor_save_by_rename(make_pair):
    pair = make_pair(lowers=[{"etc/conf": File("old=1\n", mode=0o640, gid=5),
                              "etc/other": File()}])

    def save(m: Path) -> str:
        tmp = m / "etc/.conf.swp"
        with open(tmp, "w") as f:
            f.write("new=2\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        os.chown(tmp, 0, 5)
        os.rename(tmp, m / "etc/conf")
        return (m / "etc/conf").read_text()

    assert pair.same(save) == "new=2\n"
    assert pair.same(ls_op("etc")) == ["conf", "other"]
    snap = pair.assert_same_upper()
    assert snap.nodes["etc/conf"].type == "file" and ".conf.swp" not in str(list(snap.nodes))
    pair.check_all()


def test_rename_over_lower_file(make_pair):
    pair = make_pair(lowers=[{"a": File("A"), "b": File("B")}])
    pair.same(_rename("a", "b"), expect="ok")
    assert pair.same(lambda m: (m / "b").read_text()) == "A"
    assert pair.same(ls_op()) == ["b"]
    snap = pair.assert_same_upper()
    assert snap.nodes["a"].type == "whiteout" and snap.nodes["b"].type == "file"
    pair.check_all()


def test_rename_to_whited_out_name(make_pair):
    pair = make_pair(upper={"gone": Whiteout(), "u": File("u")}, lowers=[{"gone": File("old")}])
    pair.same(_rename("u", "gone", RENAME_NOREPLACE), expect="ok")  # a whiteout is not a name
    assert pair.same(lambda m: (m / "gone").read_text()) == "u"
    pair.same(lambda m: os.unlink(m / "gone"), expect="ok")
    assert pair.assert_same_upper().nodes["gone"].type == "whiteout"
    pair.check_all()


def test_rename_special_files_from_lower(make_pair):
    pair = make_pair(lowers=[{"s": Symlink("target", uid=3), "p": Fifo(mode=0o604)}])
    pair.same(_rename("s", "s2"), expect="ok")
    pair.same(_rename("p", "p2"), expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["s2"].type == "symlink" and snap.nodes["s2"].uid == 3
    assert snap.nodes["p2"].type == "fifo" and snap.nodes["s"].type == "whiteout"
    pair.check_all()


def test_rename_to_same_name_and_between_hardlinks(make_pair):
    pair = make_pair(lowers=[{"f": File("x")}])
    pair.same(_rename("f", "f"), expect="ok")
    pair.same(lambda m: os.link(m / "f", m / "g"), expect="ok")
    pair.same(_rename("f", "g"), expect="ok")  # same inode: a no-op, both names stay
    assert pair.same(ls_op()) == ["f", "g"]
    pair.check_all()


def test_noreplace(make_pair):
    pair = make_pair(upper={"u": File("u")}, lowers=[{"a": File("a"), "b": File("b")}])
    pair.same(_rename("a", "b", RENAME_NOREPLACE), expect="EEXIST")
    pair.same(_rename("u", "a", RENAME_NOREPLACE), expect="EEXIST")
    pair.same(_rename("a", "c", RENAME_NOREPLACE), expect="ok")
    assert pair.same(ls_op()) == ["b", "c", "u"]
    pair.check_all()


def test_exchange_files(make_pair):
    pair = make_pair(upper={"u": File("U")}, lowers=[{"a": File("A"), "b": File("B")}])
    pair.same(_rename("a", "b", RENAME_EXCHANGE), expect="ok")
    assert pair.same(lambda m: ((m / "a").read_text(), (m / "b").read_text())) == ("B", "A")
    pair.same(_rename("u", "a", RENAME_EXCHANGE), expect="ok")
    assert pair.same(lambda m: ((m / "a").read_text(), (m / "u").read_text())) == ("U", "B")
    pair.same(_rename("a", "missing", RENAME_EXCHANGE), expect="ENOENT")
    pair.check_all()


def test_exchange_pure_upper_dirs(make_pair):
    pair = make_pair(upper={"x/1": File(), "y/2": File()}, lowers=[{"l": File()}])
    pair.same(_rename("x", "y", RENAME_EXCHANGE), expect="ok")
    assert pair.same(lambda m: (sorted(os.listdir(m / "x")), sorted(os.listdir(m / "y")))) == (
        ["2"], ["1"])
    pair.check_all()


def test_exchange_with_merged_dir_is_exdev(make_pair):
    pair = make_pair(upper={"u/1": File()}, lowers=[{"d/a": File(), "f": File()}])
    pair.same(_rename("u", "d", RENAME_EXCHANGE), expect="EXDEV")
    pair.same(_rename("f", "d", RENAME_EXCHANGE), expect="EXDEV")
    pair.check_all()


def test_rename_whiteout_flag_from_userspace(make_pair):
    pair = make_pair(upper={"u": File()}, lowers=[{"a": File()}])
    pair.same(_rename("a", "b", RENAME_WHITEOUT), expect="EINVAL")
    pair.same(_rename("u", "v", RENAME_WHITEOUT), expect="EINVAL")
    pair.same(_rename("a", "b", RENAME_NOREPLACE | RENAME_EXCHANGE), expect="EINVAL")
    for side in pair.sides:
        assert tree_of(side.upper) == {".": "dir", "u": "file"}, side.impl
    pair.check_all()


@pytest.mark.parametrize("src", ["lowerdir", "mergeddir", "copiedup"])
def test_lower_or_merged_dir_rename_is_exdev(make_pair, src):
    pair = make_pair(upper={"mergeddir/u": File()},
                     lowers=[{"lowerdir/a": File(), "mergeddir/b": File(), "copiedup/c": File()}])
    if src == "copiedup":  # a lower dir that got copied up (by a create inside) is still merged
        pair.same(lambda m: (m / "copiedup/new").write_text("n"), expect="ok")
    pair.same(_rename(src, "elsewhere"), expect="EXDEV")
    pair.same(_rename(src, "lowerdir/inside" if src != "lowerdir" else "mergeddir/x"),
              expect="EXDEV")
    pair.check_all()


def test_pure_upper_dir_renames(make_pair):
    pair = make_pair(lowers=[{"low/x": File(), "file": File()}])
    pair.same(lambda m: os.makedirs(m / "new/sub"), expect="ok")
    pair.same(lambda m: (m / "new/sub/f").write_text("f"), expect="ok")
    pair.same(_rename("new", "renamed"), expect="ok")
    pair.same(_rename("renamed", "low/moved"), expect="ok")  # into a lower dir
    assert pair.same(lambda m: (m / "low/moved/sub/f").read_text()) == "f"
    for side in pair.sides:
        assert "new" not in tree_of(side.upper)  # nothing below had "new": no whiteout
    pair.check_all()


def test_opaque_upper_dir_rename_leaves_whiteout(make_pair):
    # a dir created over a whiteout is pure upper (opaque): it renames, and the old name needs a
    # whiteout because the lower still has it
    pair = make_pair(lowers=[{"d/old": File()}])
    pair.same(lambda m: os.unlink(m / "d/old"), expect="ok")
    pair.same(lambda m: os.rmdir(m / "d"), expect="ok")
    pair.same(lambda m: os.mkdir(m / "d"), expect="ok")
    pair.same(lambda m: (m / "d/new").write_text("n"), expect="ok")
    pair.same(_rename("d", "e"), expect="ok")
    assert pair.same(ls_op()) == ["e"]
    snap = pair.assert_same_upper()
    assert snap.nodes["d"].type == "whiteout" and snap.nodes["e"].opaque is True
    pair.check_all()


def test_pure_upper_dir_over_name_with_lower_file(make_pair):
    # "A directory that exists only in upper renames freely even when a lower has a file or
    # whiteout of that name"
    pair = make_pair(upper={"gone": Whiteout(), "updir/x": File("x")},
                     lowers=[{"gone": File("lowerfile"), "f": File()}])
    pair.same(_rename("updir", "gone"), expect="ok")
    assert pair.same(ls_op("gone")) == ["x"]
    pair.same(_rename("gone", "updir"), expect="ok")
    assert pair.same(ls_op()) == ["f", "updir"]
    pair.check_all()


def test_rename_errnos(make_pair):
    pair = make_pair(
        upper={"ud/x": File(), "ue": Dir(), "uf": File(), "uf2": File()},
        lowers=[{"lf": File(), "ld/a": File(), "lempty": Dir()}],
    )
    pair.same(_rename("ue", "uf"), expect="ENOTDIR", what="dir onto file")
    pair.same(_rename("ue", "lf"), expect="ENOTDIR", what="dir onto lower file")
    pair.same(_rename("uf", "ue"), expect="EISDIR", what="file onto dir")
    pair.same(_rename("lf", "ld"), expect="EISDIR", what="lower file onto merged dir")
    pair.same(_rename("ue", "ue/inside"), expect="EINVAL", what="dir into itself")
    pair.same(_rename("ue", "ud"), expect="ENOTEMPTY", what="dir onto non-empty upper dir")
    pair.same(_rename("ue", "ld"), expect="ENOTEMPTY", what="dir onto non-empty lower dir")
    pair.same(_rename("missing", "x"), expect="ENOENT", what="missing source")
    pair.same(_rename("uf", "nodir/x"), expect="ENOENT", what="missing target parent")
    pair.same(_rename("uf", "lf/x"), expect="ENOTDIR", what="target parent is a file")
    pair.check_all()


def test_rename_dir_onto_empty_dirs(make_pair):
    pair = make_pair(upper={"ue": Dir(), "ue2/c": File(), "target": Dir()},
                     lowers=[{"lempty": Dir()}])
    pair.same(_rename("ue2", "target"), expect="ok", what="onto empty upper dir")
    assert pair.same(ls_op("target")) == ["c"]
    pair.same(_rename("ue", "lempty"), expect="ok", what="onto empty lower dir")
    # the moved dir now covers a lower dir of that name: it must be opaque
    assert pair.assert_same_upper().nodes["lempty"].opaque is True
    pair.check_all()


def test_rename_keeps_open_fd_working(make_pair):
    pair = make_pair(lowers=[{"f": File("content")}])

    def op(m: Path) -> tuple[bytes, bytes]:
        fd = os.open(m / "f", os.O_RDONLY)
        try:
            os.rename(m / "f", m / "g")
            with open(m / "g", "ab") as w:
                w.write(b"+")
            return os.pread(fd, 100, 0), (m / "g").read_bytes()
        finally:
            os.close(fd)

    assert pair.same(op) == (b"content+", b"content+")
    pair.check_all()


def test_rename_into_lower_subdir_copies_parents(make_pair):
    pair = make_pair(lowers=[{"a/b/c": Dir(mode=0o750, uid=4, mtime=1_300_000_000), "f": File("f")}])
    pair.same(_rename("f", "a/b/c/f"), expect="ok")
    for side in pair.sides:
        st = os.stat(side.upper / "a/b/c")
        assert (st.st_mode & 0o7777, st.st_uid) == (0o750, 4)
    snap = pair.assert_same_upper()
    assert snap.nodes["f"].type == "whiteout"
    pair.check_all()
