"""Copy-up (overlay-semantics §6): what triggers it, what it preserves, what it must not touch."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from overlay_harness import Device, Dir, Fifo, File, Hardlink, Symlink, stat_summary, tree_of

T_MTIME = 1_500_000_000.25  # explicit times, compared exactly
T_ATIME = 1_500_000_500.75
XATTRS = {"user.color": "blue", "user.empty": b"", "trusted.secret": b"\x00\x01binary"}


def _lower_file(**kw) -> File:
    args = dict(data="hello lower", mode=0o640, uid=1234, gid=2345, mtime=T_MTIME, atime=T_ATIME,
                xattrs=XATTRS)
    args.update(kw)
    return File(**args)


def _upper_tree(side) -> dict[str, str]:
    return tree_of(side.upper)


def test_open_for_write_copies_up(make_pair):
    pair = make_pair(lowers=[{"d/f": _lower_file(), "d/other": File("o")}])

    def op(m: Path) -> bytes:
        fd = os.open(m / "d/f", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b" + more")
        finally:
            os.close(fd)
        return (m / "d/f").read_bytes()

    assert pair.same(op) == b"hello lower + more"
    for side in pair.sides:  # only the file and its parent went up, not the sibling
        assert _upper_tree(side) == {".": "dir", "d": "dir", "d/f": "file"}
    snap = pair.assert_same_upper()
    node = snap.nodes["d/f"]
    assert (node.mode, node.uid, node.gid) == (0o640, 1234, 2345)
    assert dict(node.xattrs) == {k: (v.encode() if isinstance(v, str) else v) for k, v in XATTRS.items()}
    pair.check_all()


def test_open_rdwr_without_writing_copies_up(make_pair):
    pair = make_pair(lowers=[{"f": _lower_file()}])
    pair.same(lambda m: os.close(os.open(m / "f", os.O_RDWR)), expect="ok", what="open O_RDWR")
    for side in pair.sides:
        assert "f" in _upper_tree(side)
    pair.check_all(mtimes=True)  # nothing written: mtime still the lower one


def test_open_readonly_does_not_copy_up(make_pair):
    pair = make_pair(lowers=[{"d/f": _lower_file()}])
    assert pair.same(lambda m: (m / "d/f").read_bytes()) == b"hello lower"
    for side in pair.sides:
        assert _upper_tree(side) == {".": "dir"}
    pair.check_all()


def test_o_trunc_copies_up_without_data(make_pair):
    pair = make_pair(lowers=[{"f": _lower_file(data="x" * 100_000)}])
    pair.same(lambda m: os.close(os.open(m / "f", os.O_WRONLY | os.O_TRUNC)), expect="ok")
    snap = pair.assert_same_upper()
    node = snap.nodes["f"]
    assert (node.size, node.mode, node.uid, node.gid) == (0, 0o640, 1234, 2345)
    assert dict(node.xattrs)["user.color"] == b"blue"
    pair.check_all()


def test_truncate_copies_up(make_pair):
    pair = make_pair(lowers=[{"f": _lower_file(data="0123456789")}])
    pair.same(lambda m: os.truncate(m / "f", 4), expect="ok")
    assert pair.same(lambda m: (m / "f").read_bytes()) == b"0123"
    pair.same(lambda m: os.truncate(m / "f", 8), expect="ok")
    assert pair.same(lambda m: (m / "f").read_bytes()) == b"0123\0\0\0\0"
    pair.check_all()


# Each metadata operation triggers a copy-up that must keep everything it doesn't change,
# including the explicit mtime (so these compare file mtimes too).
META_OPS: dict[str, Callable[[Path], object]] = {
    "chmod": lambda m: os.chmod(m / "d/f", 0o604),
    "chown": lambda m: os.chown(m / "d/f", 77, 88),
    "utime": lambda m: os.utime(m / "d/f", ns=(1_000_000_000_111, 1_100_000_000_222)),
    "setxattr": lambda m: os.setxattr(m / "d/f", "user.new", b"value"),
    "replace-xattr": lambda m: os.setxattr(m / "d/f", "user.color", b"red"),
    "removexattr": lambda m: os.removexattr(m / "d/f", "user.color"),
    "remove-trusted-xattr": lambda m: os.removexattr(m / "d/f", "trusted.secret"),
    "link": lambda m: os.link(m / "d/f", m / "d/f2"),
}


@pytest.mark.parametrize("opname", list(META_OPS))
def test_metadata_ops_copy_up_and_preserve(make_pair, opname):
    pair = make_pair(lowers=[{"d": Dir(mode=0o751, uid=3, gid=4, mtime=T_MTIME), "d/f": _lower_file(),
                              "d/sibling": File("s")}])
    pair.same(META_OPS[opname], expect="ok", what=opname)
    for side in pair.sides:
        assert "d/f" in _upper_tree(side) and "d/sibling" not in _upper_tree(side)
        # atime preserved by the copy-up (checked on the upper file before anything reads it)
        if opname != "utime":
            assert os.stat(side.upper / "d/f").st_atime_ns == int(T_ATIME * 10**9), side.impl
        assert (side.upper / "d/f").read_bytes() == b"hello lower"
    snap = pair.assert_same_upper(mtimes=True)
    if opname != "utime":
        assert snap.nodes["d/f"].mtime_ns == int(T_MTIME * 10**9)
    pair.check_all(mtimes=True)


def test_copy_up_keeps_content_of_big_file(make_pair):
    data = random.Random(42).randbytes(5 * 1024 * 1024 + 123)
    pair = make_pair(lowers=[{"big": File(data)}])
    pair.same(lambda m: os.chmod(m / "big", 0o600), expect="ok")
    pair.check_all()
    for side in pair.sides:
        assert (side.upper / "big").read_bytes() == data


def test_sparse_file_stays_sparse(make_pair):
    size = 64 * 1024 * 1024
    pair = make_pair(lowers=[{"sparse": File(b"!", offset=size - 1)}])
    pair.same(lambda m: os.chmod(m / "sparse", 0o600), expect="ok", what="chmod copy-up")
    for side in pair.sides:
        st = os.stat(side.upper / "sparse")
        assert st.st_size == size
        # one byte of data: a few blocks at most, never the 64 MiB a dense copy would take
        assert st.st_blocks * 512 < 1024 * 1024, f"{side.impl}: upper copy is not sparse"
    pair.check_all()


def test_parent_chain_copied_with_metadata(make_pair):
    chain = {
        "a": Dir(mode=0o751, uid=1, gid=11, mtime=1_400_000_001, xattrs={"user.level": "a"}),
        "a/b": Dir(mode=0o700, uid=2, gid=12, mtime=1_400_000_002),
        "a/b/c": Dir(mode=0o2775, uid=3, gid=13, mtime=1_400_000_003,
                     xattrs={"trusted.t": "c"}),
        "a/b/c/d": Dir(mode=0o1777, uid=4, gid=14, mtime=1_400_000_004),
        "a/b/c/d/f": _lower_file(),
    }
    pair = make_pair(lowers=[chain, {"a/b/lowest": File()}])
    pair.same(lambda m: os.chmod(m / "a/b/c/d/f", 0o600), expect="ok")
    for side in pair.sides:
        for rel in ("a", "a/b", "a/b/c", "a/b/c/d"):
            st = os.stat(side.upper / rel)
            want = chain[rel]
            assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (want.mode, want.uid, want.gid), \
                f"{side.impl}: {rel}"
            # the parent's mtime is restored after the child is inserted
            assert st.st_mtime_ns == int(want.mtime * 10**9), f"{side.impl}: mtime of {rel}"
    snap = pair.assert_same_upper()
    assert dict(snap.nodes["a"].xattrs) == {"user.level": b"a"}
    assert dict(snap.nodes["a/b/c"].xattrs) == {"trusted.t": b"c"}
    pair.check_all()


def test_create_in_lower_dir_copies_only_parents(make_pair):
    pair = make_pair(lowers=[{"x/y/old": File("o"), "x/y/old2": File(), "x/z": File()}])
    pair.same(lambda m: (m / "x/y/new").write_text("n"), expect="ok")
    for side in pair.sides:
        assert _upper_tree(side) == {".": "dir", "x": "dir", "x/y": "dir", "x/y/new": "file"}
    snap = pair.assert_same_upper()
    assert snap.nodes["x/y"].opaque is False
    pair.check_all()


def test_fd_opened_before_copy_up_sees_new_data(make_pair):
    pair = make_pair(lowers=[{"f": File("old data")}])

    def op(m: Path) -> tuple[bytes, bytes]:
        rfd = os.open(m / "f", os.O_RDONLY)
        try:
            before = os.pread(rfd, 100, 0)
            wfd = os.open(m / "f", os.O_WRONLY | os.O_TRUNC)
            os.write(wfd, b"NEW DATA!")
            os.close(wfd)
            return before, os.pread(rfd, 100, 0)
        finally:
            os.close(rfd)

    assert pair.same(op) == (b"old data", b"NEW DATA!")
    pair.check_all()


def test_fd_opened_before_copy_up_sees_appends_and_fstat(make_pair):
    pair = make_pair(lowers=[{"f": File("abc")}])

    def op(m: Path) -> tuple[bytes, int]:
        rfd = os.open(m / "f", os.O_RDONLY)
        try:
            with open(m / "f", "ab") as w:
                w.write(b"def")
            return os.pread(rfd, 100, 0), os.fstat(rfd).st_size
        finally:
            os.close(rfd)

    assert pair.same(op) == (b"abcdef", 6)
    pair.check_all()


def test_failing_removexattr_copies_nothing(make_pair):
    pair = make_pair(lowers=[{"d/f": _lower_file()}])
    pair.same(lambda m: os.removexattr(m / "d/f", "user.missing"), expect="ENODATA")
    for side in pair.sides:
        assert _upper_tree(side) == {".": "dir"}, f"{side.impl} copied up on a failing removexattr"
    pair.check_all()


def test_truncate_to_same_size_updates_mtime(make_pair):
    pair = make_pair(lowers=[{"f": File("12345", mtime=1_000_000_000)}])

    def op(m: Path) -> tuple[bool, int]:
        os.truncate(m / "f", 5)
        st = os.stat(m / "f")
        return st.st_mtime > 1_000_000_000, st.st_size

    assert pair.same(op) == (True, 5)
    pair.check_all()


def test_ftruncate_of_open_lower_file(make_pair):
    pair = make_pair(lowers=[{"f": File("abcdef")}])

    def op(m: Path) -> bytes:
        fd = os.open(m / "f", os.O_RDWR)
        try:
            os.ftruncate(fd, 2)
            os.pwrite(fd, b"Z", 4)
        finally:
            os.close(fd)
        return (m / "f").read_bytes()

    assert pair.same(op) == b"ab\0\0Z"
    pair.check_all()


def test_copy_up_of_fifo_stays_fifo(make_pair):
    pair = make_pair(lowers=[{"p": Fifo(mode=0o640, uid=5, gid=6, mtime=T_MTIME)}])
    pair.same(lambda m: os.chmod(m / "p", 0o600), expect="ok", what="chmod fifo")
    pair.same(lambda m: os.chown(m / "p", 9, 9), expect="ok", what="chown fifo")
    pair.same(lambda m: os.link(m / "p", m / "p2"), expect="ok", what="link fifo")
    snap = pair.assert_same_upper(mtimes=True)
    assert snap.nodes["p"].type == "fifo" and snap.nodes["p"].nlink == 2
    pair.check_all(mtimes=True)


def test_open_fifo_for_write_does_not_copy_up(make_pair):
    pair = make_pair(lowers=[{"p": Fifo(mode=0o666)}])
    # O_RDWR on a fifo never blocks; special files are not copied up on open
    pair.same(lambda m: os.close(os.open(m / "p", os.O_RDWR | os.O_NONBLOCK)), expect="ok")
    for side in pair.sides:
        assert _upper_tree(side) == {".": "dir"}
    pair.check_all()


def test_copy_up_of_symlink_keeps_owner_and_mtime(make_pair):
    pair = make_pair(lowers=[{"s": Symlink("target/path", uid=5, gid=6, mtime=T_MTIME,
                                           xattrs={"trusted.s": "v"})}])
    pair.same(lambda m: os.setxattr(m / "s", "trusted.new", b"1", follow_symlinks=False),
              expect="ok", what="lsetxattr on lower symlink")
    snap = pair.assert_same_upper(mtimes=True)
    node = snap.nodes["s"]
    assert (node.type, node.uid, node.gid, node.mtime_ns) == ("symlink", 5, 6, int(T_MTIME * 1e9))
    for side in pair.sides:
        assert os.readlink(side.upper / "s") == "target/path"
    pair.check_all(mtimes=True)


def test_copy_up_of_device_node(make_pair):
    pair = make_pair(lowers=[{"dev": Device("c", 1, 5, mode=0o640, uid=2)}])
    pair.same(lambda m: os.chmod(m / "dev", 0o600), expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["dev"].rdev == (1, 5) and snap.nodes["dev"].type == "chr"
    pair.check_all()


def test_setuid_survives_copy_up_and_chown_clears_it(make_pair):
    pair = make_pair(lowers=[{"su": File("#!/bin/sh\n", mode=0o4755, mtime=T_MTIME),
                              "sg": File("x", mode=0o2755, gid=7)}])
    pair.same(lambda m: os.utime(m / "su", ns=(0, 10**18)), expect="ok", what="utime setuid file")
    assert pair.same(lambda m: oct(os.stat(m / "su").st_mode & 0o7777)) == "0o4755"
    pair.same(lambda m: os.chown(m / "sg", 1, 1), expect="ok", what="chown setgid file")
    # chown of a group-executable file clears setgid, for root too
    assert pair.same(lambda m: stat_summary(os.stat(m / "sg")))[1] == "0o755"
    pair.check_all()


def test_mode_000_file_can_be_chmodded_and_written_by_root(make_pair):
    pair = make_pair(lowers=[{"locked": File("secret", mode=0o000), "ro": File("r", mode=0o444)}])
    pair.same(lambda m: os.chmod(m / "locked", 0o600), expect="ok")
    pair.same(lambda m: (m / "ro").write_text("written by root"), expect="ok")
    assert pair.same(lambda m: (m / "ro").read_text()) == "written by root"
    pair.check_all()


def test_hardlinked_lower_copy_up_breaks_link(make_pair):
    # index=off: copying up one name makes it a separate inode; the other name keeps old data/inode
    pair = make_pair(lowers=[{"a": File("shared"), "b": Hardlink("a")}])
    pair.same(lambda m: (m / "a").write_text("changed"), expect="ok")
    assert pair.same(lambda m: ((m / "a").read_text(), (m / "b").read_text())) == ("changed", "shared")

    def inos(m: Path) -> tuple[bool, int]:
        return os.lstat(m / "a").st_ino == os.lstat(m / "b").st_ino, os.lstat(m / "a").st_nlink

    assert pair.same(inos) == (False, 1)
    pair.check_all()


def test_reading_lower_file_does_not_touch_lower_atime(make_pair):
    # overlayfs opens the real lower file with O_NOATIME: reads through the mount leave no trace
    pair = make_pair(lowers=[{"f": File("data", mtime=T_MTIME, atime=T_MTIME)}])
    before = [os.stat(s.paths.lowers[0] / "f").st_atime_ns for s in pair.sides]
    assert pair.same(lambda m: (m / "f").read_bytes()) == b"data"
    after = [os.stat(s.paths.lowers[0] / "f").st_atime_ns for s in pair.sides]
    assert after[0] == before[0], "kernel premise: lower atime unchanged"
    assert after[1] == before[1], "pyunionfs updated the lower file's atime"


def test_concurrent_copy_up_of_one_file(make_pair):
    # many writers open the same lower file at once: exactly one copy-up, every write lands in it
    import threading

    pair = make_pair(lowers=[{"f": File(b"." * 64 * 16)}])

    def op(m: Path) -> bytes:
        barrier = threading.Barrier(16)
        errors: list[BaseException] = []

        def writer(i: int) -> None:
            try:
                barrier.wait(timeout=10)
                fd = os.open(m / "f", os.O_WRONLY)
                try:
                    os.pwrite(fd, bytes([65 + i]) * 64, i * 64)
                finally:
                    os.close(fd)
            except BaseException as e:  # noqa: BLE001 - re-raised below in the main thread
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return (m / "f").read_bytes()

    assert pair.same(op) == b"".join(bytes([65 + i]) * 64 for i in range(16))
    pair.check_all()


def test_mmap_shared_write_to_lower_file(make_pair):
    import mmap

    pair = make_pair(lowers=[{"f": File(b"0123456789" * 500)}])

    def op(m: Path) -> bytes:
        fd = os.open(m / "f", os.O_RDWR)
        try:
            with mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                mm[10:15] = b"HELLO"
                mm.flush()
        finally:
            os.close(fd)
        return (m / "f").read_bytes()[:20]

    assert pair.same(op) == b"0123456789HELLO56789"
    pair.check_all()


def test_copy_file_range_into_lower_file(make_pair):
    pair = make_pair(lowers=[{"src": File(b"S" * 10000), "dst": File(b"D" * 100)}])

    def op(m: Path) -> tuple[int, bytes, int]:
        s = os.open(m / "src", os.O_RDONLY)
        d = os.open(m / "dst", os.O_WRONLY)
        try:
            n = os.copy_file_range(s, d, 5000, 0, 50)
        finally:
            os.close(s)
            os.close(d)
        data = (m / "dst").read_bytes()
        return n, data[:60], len(data)

    assert pair.same(op) == (5000, b"D" * 50 + b"S" * 10, 5050)
    pair.check_all()


def test_posix_fallocate_on_lower_file(make_pair):
    pair = make_pair(lowers=[{"f": File(b"F" * 100)}])

    def op(m: Path) -> tuple[bytes, int]:
        fd = os.open(m / "f", os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)
        finally:
            os.close(fd)
        data = (m / "f").read_bytes()
        return data[:101], len(data)

    assert pair.same(op) == (b"F" * 100 + b"\0", 1 << 20)
    pair.check_all()


def test_unprivileged_write_clears_setuid(make_pair):
    pair = make_pair(lowers=[{"pub": Dir(mode=0o777),
                              "pub/tool": File("#!", mode=0o6777, uid=1000, gid=1000)}])

    def op(m: Path) -> str:
        with open(m / "pub/tool", "a") as f:
            f.write("more")
        return oct(os.stat(m / "pub/tool").st_mode & 0o7777)

    assert pair.same_as(1000, 1000, op) == "0o777"
    pair.check_all()
