"""Buffered reads after asynchronous direct writes (xfstests generic/451, issue 21 item 2).

A writer opens the file with O_DIRECT, writes it whole through Linux AIO (io_submit), waits
for the completion and closes; then the file is opened again and read through the page cache,
and once more with O_DIRECT. Buffered readers run all the while, so the page cache is filled
while a direct write is in flight: the kernel's FUSE client invalidates the pages before an
asynchronous direct write but not after it, and an open that keeps the cache (keep_cache)
would read the old bytes. Compared with kernel overlayfs on a file copied up from a lower, a
file already in upper and a new one.

That race needs a reader's request to reach the daemon between the kernel's invalidation and
the write, which a test can't arrange: thousands of rounds here never hit it. So
``test_direct_writer_drops_page_cache`` checks the cure itself, deterministically: which pages
of the file the kernel keeps (mincore) across the opens that follow a direct writer.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import pytest
from overlay_harness import IMPL, File

SIZE = 640 * 1024  # generic/451's FSIZE
ROUNDS = 20
READERS = 2

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
_IOCB_CMD_PWRITE = 1


class _Iocb(ctypes.Structure):  # struct iocb, little-endian x86_64
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32),
                ("rw_flags", ctypes.c_int32), ("opcode", ctypes.c_uint16),
                ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64),
                ("offset", ctypes.c_int64), ("reserved2", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _Event(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


def _check(rc: int, what: str) -> int:
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def _aio_pwrite(fd: int, buf: mmap.mmap, offset: int) -> int:
    """One asynchronous write submitted and waited for; the bytes written."""
    ctx = ctypes.c_ulong(0)
    _check(_libc.syscall(_SYS_IO_SETUP, 1, ctypes.byref(ctx)), "io_setup")
    try:
        cb = _Iocb(opcode=_IOCB_CMD_PWRITE, fildes=fd, nbytes=len(buf), offset=offset,
                   buf=ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        cbs = (ctypes.POINTER(_Iocb) * 1)(ctypes.pointer(cb))
        _check(_libc.syscall(_SYS_IO_SUBMIT, ctx, 1, cbs), "io_submit")
        ev = _Event()
        _check(_libc.syscall(_SYS_IO_GETEVENTS, ctx, 1, 1, ctypes.byref(ev), None),
               "io_getevents")
        if ev.res < 0:
            raise OSError(-ev.res, os.strerror(-ev.res))
        return ev.res
    finally:
        _libc.syscall(_SYS_IO_DESTROY, ctx)


def _cycle(root: Path) -> list[tuple[int, str, str]]:
    """generic/451's aio-dio-cycle-write: the rounds whose reads came back wrong."""
    path = root / "f"
    patterns = []
    for byte in (0x55, 0xAA):
        buf = mmap.mmap(-1, SIZE)  # page-aligned, as O_DIRECT wants
        buf.write(bytes([byte]) * SIZE)
        patterns.append(buf)
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.pread(fd, SIZE, 0)
            finally:
                os.close(fd)

    readers = [threading.Thread(target=reader, daemon=True) for _ in range(READERS)]
    for t in readers:
        t.start()
    bad = []
    try:
        for i in range(ROUNDS):
            want = patterns[i % 2]
            fd = os.open(path, os.O_DIRECT | os.O_CREAT | os.O_RDWR, 0o600)
            try:
                assert _aio_pwrite(fd, want, 0) == SIZE
            finally:
                os.close(fd)
            fd = os.open(path, os.O_RDONLY)
            try:
                if os.pread(fd, SIZE, 0) != want[:]:
                    bad.append((i, "buffered", f"{want[0]:#x}"))
            finally:
                os.close(fd)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                got = mmap.mmap(-1, SIZE)
                if os.preadv(fd, [got], 0) != SIZE or got[:] != want[:]:
                    bad.append((i, "direct", f"{want[0]:#x}"))
            finally:
                os.close(fd)
    finally:
        stop.set()
        for t in readers:
            t.join(timeout=30)
    return bad


@pytest.mark.parametrize("where", ["lower", "upper", "new"])
def test_buffered_read_after_aio_direct_write(make_pair, where: str) -> None:
    start = File(b"\x55" * SIZE)
    lowers, upper = [{"f": start} if where == "lower" else {"x": File("x")}], {}
    if where == "upper":
        upper = {"f": start}
    pair = make_pair(lowers=lowers, upper=upper)
    if where == "new":
        pair.same(lambda m: (m / "f").write_bytes(b"\x55" * SIZE) and None, "ok")
    # no stale read on either side; then the two trees agree
    assert pair.same(_cycle, "ok") == []
    pair.check_all()


def _resident(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore on a fresh private mapping; opening it
    is itself an open of the file, whose keep_cache decides what the kernel keeps)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        m = mmap.mmap(fd, SIZE, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        pages = (SIZE + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        view = ctypes.c_char.from_buffer(m)
        _check(_libc.mincore(ctypes.byref(view), ctypes.c_size_t(SIZE), vec), "mincore")
        del view  # the mapping can't close while a ctypes view exports it
        return sum(v & 1 for v in vec)
    finally:
        m.close()


def _read_all(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, SIZE, os.POSIX_FADV_WILLNEED)
        while os.pread(fd, SIZE, 0) == b"":
            pass
    finally:
        os.close(fd)


@pytest.mark.skipif(IMPL == "kernel", reason="the kernel's overlay keeps one coherent page cache")
def test_direct_writer_drops_page_cache(make_stack, mounter) -> None:
    """While a file is open for direct writing, every open drops its page cache; after the
    writer is gone, the first open drops it once more (an asynchronous write may have landed
    under cached pages) and later ones keep it again."""
    m = mounter(make_stack([{"x": File("x")}], upper={"f": File(b"\x55" * SIZE)}))
    f = m.root / "f"
    _read_all(f)
    assert _resident(f) > 0, "premise: a buffered read fills the page cache and an open keeps it"
    writer = os.open(f, os.O_WRONLY | os.O_DIRECT)
    try:
        assert _resident(f) == 0
        _read_all(f)
        assert _resident(f) == 0, "dropped again while the direct writer is open"
    finally:
        os.close(writer)
    _read_all(f)  # the first open after the writer dropped the cache, then the read filled it
    assert _resident(f) > 0
