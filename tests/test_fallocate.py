"""fallocate(2) and posix_fallocate(3) through the mount (issue 8, item 7), compared with kernel
overlayfs: modes 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE and ZERO_RANGE on a lower file (copied up
by the open for writing), a file already in upper and a new file; size, content, roughly
st_blocks, and the errno where fallocate is refused.

pyfuse3 3.5.0 has no fallocate handler: scripts/install-deps.sh builds it with
scripts/pyfuse3-unionfs.patch. Without that handler these tests fail (``make test`` installs
it), unless PYUNIONFS_STOCK_PYFUSE3=1 says a stock pyfuse3 is meant: then the tests that need
the handler are skipped and ``test_stock_pyfuse3_refuses_and_posix_fallocate_falls_back``
checks the documented limit instead.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import pytest
from overlay_harness import IMPL, File

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

_libc = ctypes.CDLL(None, use_errno=True)
EOPNOTSUPP = errno.errorcode[errno.EOPNOTSUPP]  # the name the harness reports ("ENOTSUP")

HANDLER = hasattr(pyfuse3.Operations, "fallocate")
STOCK = os.environ.get("PYUNIONFS_STOCK_PYFUSE3", "") == "1"
MISSING = ("pyfuse3 has no fallocate handler: run scripts/install-deps.sh (it builds pyfuse3 "
           "with scripts/pyfuse3-unionfs.patch), or set PYUNIONFS_STOCK_PYFUSE3=1 to accept "
           "EOPNOTSUPP")


@pytest.fixture
def handler() -> None:
    """For tests that need pyunionfs to implement fallocate."""
    if IMPL == "kernel" or HANDLER:
        return
    if STOCK:
        pytest.skip("PYUNIONFS_STOCK_PYFUSE3=1: pyfuse3 without a fallocate handler")
    pytest.fail(MISSING)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _digest(fd: int) -> tuple[int, str]:
    data = os.pread(fd, 1 << 24, 0)
    return len(data), hashlib.sha256(data).hexdigest()


def _blocks_close(a: int, b: int) -> bool:
    """st_blocks "roughly": within 64 KiB or 5%."""
    return abs(a - b) <= max(128, a // 20)


LOWER_DATA = random.Random(8).randbytes(300_000)
UPPER_DATA = random.Random(9).randbytes(200_000)
MIB = 1 << 20

# (name, mode, offset, length): inside the data, across its end, wholly past it
CASES = [
    ("alloc", 0, 4096, 64 * 1024),
    ("alloc-extend", 0, 100_000, 2 * MIB),
    ("alloc-past-eof", 0, 3 * MIB, MIB),
    ("keep", FALLOC_FL_KEEP_SIZE, 0, 4 * MIB),
    ("keep-unaligned", FALLOC_FL_KEEP_SIZE, 12_345, 99_999),
    ("punch", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8192, 128 * 1024),
    ("punch-unaligned", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 1000, 70_001),
    ("punch-past-eof", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 150_000, 4 * MIB),
    ("zero", FALLOC_FL_ZERO_RANGE, 4096, 64 * 1024),
    ("zero-extend", FALLOC_FL_ZERO_RANGE, 150_000, MIB),
    ("zero-keep", FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 150_000, MIB),
]


def _stack(make_pair):
    return make_pair(lowers=[{"l": File(LOWER_DATA)}], upper={"u": File(UPPER_DATA)})


def _apply(m: Path, name: str, mode: int, offset: int, length: int) -> list:
    """Open for writing (the lower file is copied up), read it all (so the page cache holds the
    old data), fallocate, then report what a reader sees and st_blocks (compared roughly)."""
    out = []
    for f in (name, "n"):
        fd = os.open(m / f, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if f == "n":
                os.pwrite(fd, b"new file data " * 1000, 0)
            before = _digest(fd)
            try:
                fallocate(fd, mode, offset, length)
                res = "ok"
            except OSError as e:
                res = errno.errorcode[e.errno]
            st = os.fstat(fd)
            out.append((f, before, res, st.st_size, _digest(fd), st.st_blocks))
        finally:
            os.close(fd)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("name", ["l", "u"])
def test_fallocate_modes(make_pair, handler, case, name):
    _, mode, offset, length = case
    pair = _stack(make_pair)
    # ZERO_RANGE needs an upper filesystem that has it (ext4, xfs; not tmpfs): the kernel's
    # overlay tells us, and pyunionfs must then give the same answer.
    (kst, kval), (ost, oval) = pair.both(lambda m: _apply(m, name, mode, offset, length))
    assert kst == "ok", f"kernel: {kval}"
    assert ost == "ok", f"ours: {oval}"
    without_blocks = lambda rows: [r[:-1] for r in rows]  # noqa: E731
    assert without_blocks(kval) == without_blocks(oval)
    if mode & FALLOC_FL_ZERO_RANGE == 0:
        assert all(r[2] == "ok" for r in kval), f"test premise: kernel refused {case}: {kval}"
    for k, o in zip(kval, oval):
        assert _blocks_close(k[-1], o[-1]), f"st_blocks: kernel {k[-1]}, ours {o[-1]} ({k[0]})"
    pair.check_all()


def test_sizes_and_holes(make_pair, handler):
    # the kernel's own bookkeeping of i_size (FUSE updates it after mode 0) and of the page
    # cache (dropped for a punched range) must agree with what the daemon did
    pair = make_pair(lowers=[{"f": File(b"x" * 200_000)}])

    def op(m: Path) -> list:
        fd = os.open(m / "f", os.O_RDWR)
        try:
            out = [os.pread(fd, 10, 100_000)]
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 200_000)
            out += [os.fstat(fd).st_size, os.pread(fd, 10, 100_000), os.pread(fd, 10, 199_995)]
            fallocate(fd, 0, 0, 1_000_000)
            out += [os.fstat(fd).st_size, os.lseek(fd, 0, os.SEEK_END)]
            os.pwrite(fd, b"end", os.fstat(fd).st_size)
            out += [os.fstat(fd).st_size, os.pread(fd, 10, 999_998)]
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 2_000_000, 1_000_000)
            out += [os.fstat(fd).st_size, os.stat(m / "f").st_size]
            os.ftruncate(fd, 10)
            out += [os.fstat(fd).st_size]
        finally:
            os.close(fd)
        return out

    out = pair.same(op, expect="ok")
    assert out[1:4] == [200_000, b"\0" * 10, b"\0" * 5]
    pair.check_all()


def _refused(path: str, flags: int, mode: int = 0) -> Callable[[Path], str]:
    def op(m: Path) -> str:
        fd = os.open(m / path, flags)
        try:
            fallocate(fd, mode, 0, 4096)
        finally:
            os.close(fd)
        return "ok"

    op.__name__ = f"fallocate({path}, {flags:#o}, mode={mode:#x})"
    return op



def test_read_only_fds_and_directories(make_pair, handler):
    # EBADF for a file not open for writing (checked by the VFS before the filesystem: the lower
    # file is not copied up), and for a directory (which can't be opened for writing)
    pair = make_pair(lowers=[{"l": File("lower"), "d/x": File("x")}],
                     upper={"u": File("upper"), "ud/y": File("y")})
    for path in ("l", "u", "d", "ud", "."):
        pair.same(_refused(path, os.O_RDONLY), expect="EBADF")
        pair.same(_refused(path, os.O_RDONLY, FALLOC_FL_KEEP_SIZE), expect="EBADF")
    pair.check_all()
    assert not (pair.o.upper / "l").exists()


def test_refused_modes(make_pair, handler):
    # rejected by the VFS for every filesystem: punch without keep-size, unknown bits, a
    # negative or empty range
    pair = make_pair(lowers=[{"l": File("lower data")}])
    for mode, off, length, err in [(FALLOC_FL_PUNCH_HOLE, 0, 4096, EOPNOTSUPP),
                                   (0x4000, 0, 4096, EOPNOTSUPP),
                                   (0, -1, 4096, "EINVAL"),
                                   (0, 0, 0, "EINVAL")]:
        def op(m: Path, mode=mode, off=off, length=length) -> str:
            fd = os.open(m / "l", os.O_RDWR)
            try:
                fallocate(fd, mode, off, length)
            finally:
                os.close(fd)
            return "ok"

        pair.same(op, expect=err, what=f"mode {mode:#x} [{off}, +{length})")
    pair.check_all()


def test_collapse_and_insert_range_are_not_passed_by_fuse(make_pair, handler):
    # The kernel's overlay passes every mode to the upper filesystem (ext4 does both); the
    # kernel's FUSE client refuses these two itself (docs/differences.md, "fallocate").
    pair = make_pair(lowers=[{"l": File(b"a" * 65536)}])

    def op(mode: int):
        def run(m: Path) -> tuple[int, str]:
            fd = os.open(m / "l", os.O_RDWR)
            try:
                fallocate(fd, mode, 0, 4096)
                return _digest(fd)
            finally:
                os.close(fd)
        return run

    for mode in (FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE):
        k, o = pair.both(op(mode))
        if IMPL == "kernel":
            assert k == o
            continue
        assert o == ("err", EOPNOTSUPP), o
        if k[0] == "err":
            assert k == ("err", EOPNOTSUPP)  # an upper fs without the mode


@pytest.mark.parametrize("name", ["l", "u", "new"])
def test_posix_fallocate(make_pair, name):
    # Python's os.posix_fallocate is glibc's: fallocate(2) mode 0, or where that gives
    # EOPNOTSUPP (a stock pyfuse3) a zero byte written into every block. Either way the same
    # size and content as on the kernel's overlay.
    pair = _stack(make_pair)

    def op(m: Path) -> list:
        fd = os.open(m / name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            out = [_digest(fd)]
            for off, length in ((0, 1000), (50_000, 500_000), (2 * MIB, 4096)):
                os.posix_fallocate(fd, off, length)
                out.append((os.fstat(fd).st_size, _digest(fd)))
            return out
        finally:
            os.close(fd)

    pair.same(op, expect="ok")
    pair.check_all()


def test_stock_pyfuse3_refuses_and_posix_fallocate_falls_back(make_pair):
    """PYUNIONFS_STOCK_PYFUSE3=1: the limit as documented, EOPNOTSUPP for every mode (FUSE
    answers it once pyfuse3 said ENOSYS), while posix_fallocate still works."""
    if IMPL == "kernel" or HANDLER:
        pytest.skip("pyfuse3 has the fallocate handler")
    if not STOCK:
        pytest.fail(MISSING)
    pair = make_pair(lowers=[{"l": File(b"lower " * 1000)}])
    for mode in (0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                 FALLOC_FL_ZERO_RANGE):
        fd = os.open(pair.o.root / "l", os.O_RDWR)
        try:
            with pytest.raises(OSError) as e:
                fallocate(fd, mode, 0, 4096)
            assert e.value.errno == errno.EOPNOTSUPP
            os.posix_fallocate(fd, 0, 100_000)
            assert os.fstat(fd).st_size == 100_000
            assert os.pread(fd, 12, 0) == b"lower lower "
        finally:
            os.close(fd)


def test_fallocate_drops_set_id_bits_as_a_write_does(make_pair, handler):
    # A change of the data by a caller without CAP_FSETID: the kernel's FUSE client clears
    # set-uid (and set-gid with g+x) itself, with a setattr, as the overlay does.
    user = 1000
    pair = make_pair(lowers=[{"own": File(b"x" * 5000, mode=0o6755, uid=user, gid=user),
                              "root": File(b"x" * 5000, mode=0o6777)}],
                     upper={"up": File(b"y", mode=0o4777)})

    def op(m: Path) -> list:
        out = []
        for name, mode in (("own", 0), ("root", FALLOC_FL_KEEP_SIZE),
                           ("up", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)):
            fd = os.open(m / name, os.O_RDWR)
            try:
                fallocate(fd, mode, 0, 65536)
                out.append((name, oct(os.fstat(fd).st_mode), os.fstat(fd).st_size))
            finally:
                os.close(fd)
        return out

    assert pair.same_as(user, user, op, expect="ok") == [
        ("own", "0o100755", 65536), ("root", "0o100777", 5000), ("up", "0o100777", 1)]
    pair.check_all()
