#!/usr/bin/env python3
"""A data-integrity tester in the spirit of xfstests' fsx, for one file.

Random operations on FILE — pread, pwrite, append, ftruncate/truncate (grow and shrink), O_TRUNC
reopen, fsync/fdatasync, close + reopen, page-cache drops, O_DIRECT reads and writes and
(optional) fallocate and mmap — each checked against an in-memory model of the file (a
bytearray). Every read, every size and, every ``--check-every`` ops and at the end, the whole file
read through a fresh descriptor must equal the model.

Everything is derived from ``--seed``: the same seed and flags give the same operations and the
same data, so a failure replays exactly::

    python tests/stress/fsx.py --seed 7 --ops 20000 /mnt/merged/f

On a mismatch it prints the seed, the op number, the last ops, the differing byte ranges (with
the op that wrote the expected bytes and, when it can tell, the op whose data showed up instead)
and a replay command, and exits 1. Exit 0 prints one summary line starting ``fsx: ok``.

Start-up: with ``--create`` FILE is created (or truncated) first; otherwise FILE must exist and
the model starts from ``--initial-from`` (a copy of its expected content outside the tested
filesystem, e.g. the lower file of an overlay), or else from FILE's own content as first read.
``--read-first K`` makes the first K ops read-only and opens FILE read-only until then: on an
overlay the first writing op (re)opens it for writing, which copies a lower file up mid-run.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import mmap
import os
import random
import sys
import time
from array import array

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself (never glibc's posix_fallocate emulation, which writes zeros)."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# op kinds: name -> (weight, needs write access)
BASE_OPS = {
    "read": (22, False),
    "read_other": (5, False),   # a second, long-lived O_RDONLY fd (opened before any copy-up)
    "dread": (3, False),        # O_DIRECT read: bypasses the page cache, the daemon answers
    "stat": (3, False),         # fstat and stat sizes
    "dropcache": (2, False),    # POSIX_FADV_DONTNEED: later reads go back to the filesystem
    "reopen": (2, False),       # close + open again (read-only before the first write)
    "write": (22, True),
    "append": (5, True),        # write() on a long-lived O_APPEND fd
    "dwrite": (2, True),        # O_DIRECT write
    "truncate": (8, True),      # ftruncate (two in three) or truncate(path): grow or shrink
    "otrunc": (1, True),        # close, open(O_RDWR | O_TRUNC)
    "fsync": (2, True),
}
FALLOC_OPS = {"falloc": (3, True), "falloc_keep": (2, True), "punch": (3, True)}
MMAP_OPS = {"mapread": (4, False), "mapwrite": (4, True)}

WRITERS = ("write", "append", "dwrite", "mapwrite")  # ops whose data lands in the file


class Failure(Exception):
    pass


class Fsx:
    def __init__(self, args: argparse.Namespace):
        self.a = args
        self.path = args.file
        self.rng = random.Random(args.seed)
        ops = dict(BASE_OPS)
        if args.fallocate:
            ops.update(FALLOC_OPS)
        if args.mmap:
            ops.update(MMAP_OPS)
        self.kinds = list(ops)
        self.weights = [ops[k][0] for k in self.kinds]
        self.read_kinds = [k for k in self.kinds if not ops[k][1]]
        self.read_weights = [ops[k][0] for k in self.read_kinds]
        self.history: list[tuple] = [("start",)]  # op n is history[n]
        self.counts: collections.Counter[str] = collections.Counter()
        self.fd = self.rfd = self.afd = self.dfd = -1
        self.fd_writable = self.dfd_writable = False
        self.copied_up_at: int | None = None
        self.bytes_read = self.bytes_written = 0
        self.pagesize = mmap.PAGESIZE

        if args.create:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.close(fd)
            initial = b""
        elif args.initial_from:
            with open(args.initial_from, "rb") as f:
                initial = f.read()
        else:
            with open(self.path, "rb") as f:
                initial = f.read()
        self.model = bytearray(initial)
        # which op defined each byte: 0 = initial content, n = op n (a write or a zero fill)
        self.writer = array("i", bytes(4 * len(initial)))
        self.rfd = os.open(self.path, os.O_RDONLY)
        self._open_main(writable=args.read_first == 0)
        self._check_size(0, "start")

    # -- descriptors ---------------------------------------------------------------------------
    def _open_main(self, writable: bool, trunc: bool = False) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        flags = os.O_RDWR if writable else os.O_RDONLY
        if trunc:
            flags |= os.O_TRUNC
        self.fd = os.open(self.path, flags)
        self.fd_writable = writable

    def _writable(self, n: int) -> None:
        """Before a writing op: the first one reopens FILE for writing (an overlay copies up)."""
        if not self.fd_writable:
            self._open_main(writable=True)
            if self.copied_up_at is None:
                self.copied_up_at = n

    def _direct_fd(self, write: bool) -> int:
        """The O_DIRECT fd: read-only until the first direct write needs it writable."""
        if self.dfd >= 0 and write and not self.dfd_writable:
            os.close(self.dfd)
            self.dfd = -1
        if self.dfd < 0:
            self.dfd_writable = write or self.fd_writable
            self.dfd = os.open(self.path, (os.O_RDWR if self.dfd_writable else os.O_RDONLY)
                               | os.O_DIRECT)
        return self.dfd

    def close(self) -> None:
        for name in ("fd", "rfd", "afd", "dfd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    # -- the model -----------------------------------------------------------------------------
    def _set(self, off: int, data: bytes, n: int) -> None:
        end = off + len(data)
        if end > len(self.model):
            self._resize(end, n)
        self.model[off:end] = data
        self.writer[off:end] = array("i", [n]) * len(data)

    def _resize(self, size: int, n: int) -> None:
        cur = len(self.model)
        if size < cur:
            del self.model[size:]
            del self.writer[size:]
        elif size > cur:
            self.model.extend(bytes(size - cur))
            self.writer.extend(array("i", [n]) * (size - cur))

    def _zero(self, off: int, length: int, n: int) -> None:
        end = min(off + length, len(self.model))
        if end > off:
            self.model[off:end] = bytes(end - off)
            self.writer[off:end] = array("i", [n]) * (end - off)

    def data_for(self, n: int, length: int) -> bytes:
        """The bytes op ``n`` writes: a function of (seed, n) only, so a diagnosis can regenerate
        any earlier op's data."""
        return random.Random(self.a.seed * 1_000_003 + n).randbytes(length)

    # -- checks --------------------------------------------------------------------------------
    def _compare(self, n: int, what: str, off: int, got: bytes,
                 want_len: int | None = None) -> None:
        expect = bytes(self.model[off:off + (len(got) if want_len is None else want_len)])
        if got != expect:
            raise Failure(self._mismatch(n, what, off, got, expect))

    def _check_size(self, n: int, what: str) -> None:
        want = len(self.model)
        fst = os.fstat(self.fd).st_size
        pst = os.stat(self.path).st_size
        if fst != want or pst != want:
            raise Failure(f"op {n}: {what}: size mismatch: fstat {fst:#x}, stat {pst:#x}, "
                          f"model {want:#x}")

    def full_check(self, n: int, what: str) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        finally:
            os.close(fd)
        got = b"".join(chunks)
        self.bytes_read += len(got)
        if len(got) != len(self.model) or got != self.model:
            raise Failure(self._mismatch(n, what, 0, got, bytes(self.model)))
        self._check_size(n, what)

    # -- one op --------------------------------------------------------------------------------
    def _range(self) -> tuple[int, int]:
        a = self.a
        off = self.rng.randrange(a.maxlen)
        length = self.rng.randrange(1, a.maxop + 1)
        # small I/O and page-boundary I/O now and then, as fsx does by its distribution
        r = self.rng.random()
        if r < 0.15:
            length = self.rng.randrange(1, 64)
        elif r < 0.25:
            off -= off % self.pagesize
            length = max(self.pagesize, length - length % self.pagesize)
        return off, max(1, min(length, a.maxlen - off))

    def step(self, n: int) -> None:
        if n <= self.a.read_first:
            kind = self.rng.choices(self.read_kinds, self.read_weights)[0]
        elif n == self.a.read_first + 1 and self.a.first_op:
            kind = self.a.first_op
        else:
            kind = self.rng.choices(self.kinds, self.weights)[0]
        self.counts[kind] += 1
        if kind == "truncate_path":
            self.counts[kind] -= 1
            self.counts["truncate"] += 1
            self.op_truncate(n, by_path=True)
        else:
            getattr(self, "op_" + kind)(n)

    def _log(self, *entry: object) -> None:
        self.history.append(entry)

    def op_read(self, n: int, other: bool = False) -> None:
        off, length = self._read_range()
        fd = self.rfd if other else self.fd
        self._log("read_other" if other else "read", off, length)
        got = os.pread(fd, length, off)
        self.bytes_read += len(got)
        self._compare(n, "read", off, got, max(0, min(length, len(self.model) - off)))

    def _read_range(self) -> tuple[int, int]:
        size = len(self.model)
        # mostly inside the file, sometimes across or past EOF
        if size and self.rng.random() < 0.9:
            off = self.rng.randrange(size)
        else:
            off = self.rng.randrange(self.a.maxlen)
        length = self.rng.randrange(1, self.a.maxop + 1)
        if self.rng.random() < 0.15:
            length = self.rng.randrange(1, 64)
        return off, length

    def op_read_other(self, n: int) -> None:
        self.op_read(n, other=True)

    def _aligned(self, off: int, length: int, limit: int | None = None) -> tuple[int, int]:
        """O_DIRECT wants block-aligned offsets, lengths and buffers on most filesystems (not
        on FUSE, but fsx must also run on a plain filesystem and on the kernel's overlay).
        ``limit``: the end may not pass it (writes: --maxlen); the length may come out 0."""
        off -= off % 4096
        length = max(4096, length - length % 4096)
        if limit is not None:
            length = min(length, (limit - off) // 4096 * 4096)
        return off, length

    def op_dread(self, n: int) -> None:
        off, length = self._aligned(*self._read_range())
        self._log("dread", off, length)
        with mmap.mmap(-1, length) as buf:  # page-aligned memory
            got = bytes(buf[:os.preadv(self._direct_fd(False), [buf], off)])
        self.bytes_read += len(got)
        self._compare(n, "dread", off, got, max(0, min(length, len(self.model) - off)))

    def op_stat(self, n: int) -> None:
        self._log("stat", len(self.model))
        self._check_size(n, "stat")

    def op_dropcache(self, n: int) -> None:
        self._log("dropcache")
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def op_reopen(self, n: int) -> None:
        self._log("reopen", self.fd_writable)
        self._open_main(self.fd_writable)

    def op_write(self, n: int) -> None:
        off, length = self._range()
        self._writable(n)
        self._log("write", off, length)
        data = self.data_for(n, length)
        done = os.pwrite(self.fd, data, off)
        if done != length:
            raise Failure(f"op {n}: write {off:#x}+{length:#x}: short write {done:#x}")
        self.bytes_written += length
        self._set(off, data, n)

    def op_dwrite(self, n: int) -> None:
        off, length = self._aligned(*self._range(), limit=self.a.maxlen)
        if length == 0:
            self._log("dwrite-skipped", off)
            return
        self._writable(n)
        self._log("dwrite", off, length)
        data = self.data_for(n, length)
        with mmap.mmap(-1, length) as buf:
            buf[:] = data
            done = os.pwritev(self._direct_fd(True), [buf], off)
        if done != length:
            raise Failure(f"op {n}: dwrite {off:#x}+{length:#x}: short write {done:#x}")
        self.bytes_written += length
        self._set(off, data, n)

    def op_append(self, n: int) -> None:
        length = self.rng.randrange(1, self.a.maxop // 4 + 2)
        if len(self.model) + length > self.a.maxlen:
            self._log("append-skipped", len(self.model), length)
            return
        self._writable(n)
        if self.afd < 0:
            self.afd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._log("append", len(self.model), length)
        data = self.data_for(n, length)
        done = os.write(self.afd, data)
        if done != length:
            raise Failure(f"op {n}: append {length:#x}: short write {done:#x}")
        self.bytes_written += length
        self._set(len(self.model), data, n)

    def op_truncate(self, n: int, by_path: bool | None = None) -> None:
        size = self.rng.randrange(self.a.maxlen + 1)
        if self.rng.random() < 0.2:
            size = len(self.model)  # to the current size
        if self.rng.random() < 1 / 3 or by_path:
            by_path = True
        if by_path:
            # needs no fd: a first one copies up by setattr, under the read-only fds still open
            if self.copied_up_at is None:
                self.copied_up_at = n
        else:
            self._writable(n)
        self._log("truncate_path" if by_path else "ftruncate", len(self.model), size)
        if by_path:
            os.truncate(self.path, size)
        else:
            os.ftruncate(self.fd, size)
        self._resize(size, n)

    def op_otrunc(self, n: int) -> None:
        self._log("otrunc", len(self.model))
        if self.copied_up_at is None:
            self.copied_up_at = n
        self._open_main(writable=True, trunc=True)
        self._resize(0, n)

    def op_fsync(self, n: int) -> None:
        self._writable(n)
        data = self.rng.random() < 0.5
        self._log("fdatasync" if data else "fsync")
        (os.fdatasync if data else os.fsync)(self.fd)

    def op_falloc(self, n: int, mode: int = 0, name: str = "falloc") -> None:
        off, length = self._range()
        self._writable(n)
        self._log(name, off, length, len(self.model))
        fallocate(self.fd, mode, off, length)
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._zero(off, length, n)
        elif not mode & FALLOC_FL_KEEP_SIZE and off + length > len(self.model):
            self._resize(off + length, n)

    def op_falloc_keep(self, n: int) -> None:
        self.op_falloc(n, FALLOC_FL_KEEP_SIZE, "falloc_keep")

    def op_punch(self, n: int) -> None:
        self.op_falloc(n, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "punch")

    def op_mapread(self, n: int) -> None:
        size = len(self.model)
        if size == 0:
            self._log("mapread-skipped")
            return
        off = self.rng.randrange(size)
        length = min(self.rng.randrange(1, self.a.maxop + 1), size - off)
        self._log("mapread", off, length)
        start = off - off % self.pagesize  # map only the pages of the range
        with mmap.mmap(self.fd, off + length - start, mmap.MAP_SHARED, mmap.PROT_READ,
                       offset=start) as m:
            got = m[off - start:]
        self.bytes_read += len(got)
        self._compare(n, "mapread", off, got)

    def op_mapwrite(self, n: int) -> None:
        off, length = self._range()
        self._writable(n)
        self._log("mapwrite", off, length, len(self.model))
        if off + length > len(self.model):
            os.ftruncate(self.fd, off + length)  # a mapping can't grow the file
            self._resize(off + length, n)
        data = self.data_for(n, length)
        start = off - off % self.pagesize
        with mmap.mmap(self.fd, off + length - start, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=start) as m:
            m[off - start:] = data
            m.flush()
        self.bytes_written += length
        self._set(off, data, n)

    # -- diagnosis -----------------------------------------------------------------------------
    def describe(self, n: int) -> str:
        e = self.history[n]
        kind, rest = e[0], e[1:]
        if kind in ("read", "read_other", "dread", "write", "dwrite", "mapread", "mapwrite"):
            off, length = rest[0], rest[1]
            return f"{n:7d} {kind:12s} {off:#8x} thru {off + length - 1:#8x} ({length:#x} bytes)"
        if kind in ("falloc", "falloc_keep", "punch"):
            off, length, size = rest
            return (f"{n:7d} {kind:12s} {off:#8x} thru {off + length - 1:#8x} ({length:#x} bytes,"
                    f" size was {size:#x})")
        if kind == "append":
            return f"{n:7d} {'append':12s} at {rest[0]:#8x} ({rest[1]:#x} bytes)"
        if kind in ("ftruncate", "truncate_path"):
            return f"{n:7d} {kind:12s} from {rest[0]:#x} to {rest[1]:#x}"
        if kind == "otrunc":
            return f"{n:7d} {'otrunc':12s} (size was {rest[0]:#x})"
        return f"{n:7d} {kind:12s} {' '.join(map(str, rest))}"

    def _source_of(self, got: bytes, off: int, upto: int) -> str:
        """Which earlier op's data is ``got`` (read at file offset ``off``), if any: regenerate
        the data of the last writing ops and look for it."""
        probe = got[:16]
        if len(probe) < 8 or probe.count(0) == len(probe):
            return "zeros" if probe and probe.count(0) == len(probe) else ""
        searched = 0
        for m in range(upto, 0, -1):
            e = self.history[m]
            if e[0] not in WRITERS:
                continue
            searched += 1
            if searched > 3000:
                break
            woff = e[1]
            data = self.data_for(m, e[2])
            at = data.find(probe)
            if at >= 0:
                return (f"data of op {m} ({e[0]} at {woff:#x}): its byte {at:#x}, meant for "
                        f"{woff + at:#x}, shift {off - (woff + at):+#x}")
        return ""

    def _mismatch(self, n: int, what: str, off: int, got: bytes, expect: bytes) -> str:
        lines = [f"op {n}: {what} at {off:#x}: got {len(got):#x} bytes, expected "
                 f"{len(expect):#x}"]
        ranges = []
        i, end = 0, max(len(got), len(expect))
        while i < end:
            if i < len(got) and i < len(expect) and got[i] == expect[i]:
                i += 1
                continue
            j = i
            while j < end and not (j < len(got) and j < len(expect) and got[j] == expect[j]):
                j += 1
            ranges.append((i, j))
            i = j
        total = sum(j - i for i, j in ranges)
        lines.append(f"differing bytes: {total:#x} in {len(ranges)} range(s)")
        for i, j in ranges[:12]:
            fo = off + i
            g, x = got[i:min(j, i + 16)], expect[i:min(j, i + 16)]
            who = self.writer[fo] if fo < len(self.writer) else None
            src = self._source_of(got[i:j], fo, n) if i < len(got) else "past EOF"
            lines.append(f"  {fo:#x}..{off + j - 1:#x} ({j - i:#x} bytes): expected {x.hex(' ')}"
                         f" (op {who}), got {g.hex(' ')}" + (f" <- {src}" if src else ""))
        if len(ranges) > 12:
            lines.append(f"  ... {len(ranges) - 12} more ranges")
        return "\n".join(lines)

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        a = self.a
        deadline = time.monotonic() + a.seconds if a.seconds else None
        n = 0
        try:
            while n < a.ops:
                n += 1
                try:
                    self.step(n)
                except OSError as e:
                    raise Failure(f"op {n}: {self.describe(n) if len(self.history) > n else '?'}"
                                  f": unexpected {e!r}") from e
                if len(self.history) <= n:  # every op logs exactly once
                    self._log("?")
                if n == a.selftest_flip and self.model:
                    # the checker's own test: the model now disagrees with the file
                    self.model[len(self.model) // 2] ^= 0xFF
                    self.full_check(n, f"self-test check after op {n}")
                if a.verbose:
                    print(self.describe(n), flush=True)
                if a.check_every and n % a.check_every == 0:
                    self.full_check(n, f"full check after op {n}")
                if deadline and n % 64 == 0 and time.monotonic() > deadline:
                    break
            self.full_check(n, "final check")
        except Failure as f:
            self.report_failure(n, str(f))
            return 1
        except Exception as e:  # noqa: BLE001 - a bug of the tester itself: still show the ops
            self.report_failure(n, f"fsx internal error: {e!r}")
            raise
        finally:
            self.close()
        self.done = n
        return 0

    def replay_command(self, n: int) -> str:
        a = self.a
        flags = [f"--seed {a.seed}", f"--ops {n}", f"--maxlen {a.maxlen}", f"--maxop {a.maxop}"]
        if a.read_first:
            flags.append(f"--read-first {a.read_first}")
        if a.first_op:
            flags.append(f"--first-op {a.first_op}")
        if a.check_every != 1000:
            flags.append(f"--check-every {a.check_every}")
        for f in ("fallocate", "mmap", "create"):
            if getattr(a, f):
                flags.append("--" + f)
        if a.initial_from:
            flags.append(f"--initial-from {a.initial_from}")
        if a.selftest_flip:
            flags.append(f"--selftest-flip {a.selftest_flip}")
        return f"python tests/stress/fsx.py {' '.join(flags)} {a.file}"

    def report_failure(self, n: int, msg: str) -> None:
        out = [f"fsx: FAILURE seed={self.a.seed} op={n} file={self.path}", msg,
               f"first writing op (an overlay copies up there): {self.copied_up_at}",
               f"last {min(self.a.history, n)} ops:"]
        for m in range(max(1, n - self.a.history + 1), n + 1):
            if m < len(self.history):
                out.append("  " + self.describe(m))
        out.append("replay: " + self.replay_command(n))
        print("\n".join(out), flush=True)

    def summary(self) -> str:
        kinds = " ".join(f"{k}={self.counts[k]}" for k in self.kinds if self.counts[k])
        return (f"fsx: ok seed={self.a.seed} ops={self.done} size={len(self.model)} "
                f"read={self.bytes_read} written={self.bytes_written} "
                f"first_write={self.copied_up_at} fallocate={'on' if self.a.fallocate else 'off'} "
                f"mmap={'on' if self.a.mmap else 'off'} [{kinds}]")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops", type=int, default=10000, help="number of operations (default 10000)")
    p.add_argument("--seconds", type=float, default=0,
                   help="also stop starting ops after this many seconds (0: no limit)")
    p.add_argument("--maxlen", type=int, default=256 * 1024, help="largest file size")
    p.add_argument("--maxop", type=int, default=64 * 1024, help="largest single I/O")
    p.add_argument("--create", action="store_true", help="create/truncate FILE first")
    p.add_argument("--initial-from", metavar="PATH",
                   help="the model starts with PATH's content (FILE's expected content)")
    p.add_argument("--read-first", type=int, default=0, metavar="K",
                   help="ops 1..K only read, with FILE opened read-only")
    p.add_argument("--first-op", choices=["write", "truncate_path", "otrunc", "mapwrite",
                                          "append"],
                   help="the kind of op K+1 after --read-first K: how the copy-up comes about "
                        "(truncate_path: by setattr, with the read-only fds still open)")
    p.add_argument("--fallocate", action="store_true",
                   help="also fallocate: mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE")
    p.add_argument("--mmap", action="store_true", help="also MAP_SHARED reads and writes")
    p.add_argument("--check-every", type=int, default=1000, metavar="N",
                   help="read the whole file through a fresh fd every N ops (0: only at the end)")
    p.add_argument("--history", type=int, default=20, help="ops shown before a failure")
    p.add_argument("-v", "--verbose", action="store_true", help="print every op")
    p.add_argument("--selftest-flip", type=int, default=0, metavar="N", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.maxop > a.maxlen:
        p.error("--maxop must not exceed --maxlen")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        fsx = Fsx(a)
    except Failure as f:
        print(f"fsx: FAILURE seed={a.seed} at start: {f}", flush=True)
        return 1
    rc = fsx.run()
    if rc == 0:
        print(fsx.summary(), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
