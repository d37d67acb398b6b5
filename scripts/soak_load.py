"""The load of scripts/soak.py: the layers it builds, and its workers.

Every worker owns what it checks: a generator owns its subtree (so its model of it is exact and
any errno at all is a failure), the big-file worker owns big/, readers only read tree/ files
whose content never changes (the toucher copies them up by metadata alone), and the cycler owns
the second overlay.  Workers run as forked processes and talk to the parent through one queue:
``("count", kind, n)``, ``("error", kind, op, what)``, ``("info", kind, dict)``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

MiB = 1 << 20
OPTIONS = {"redirect_dir": "on"}  # lower dirs renamed through the mount: redirects, not EXDEV


@dataclass
class Config:
    root: Path  # everything lives below it
    seed: int
    duration: float
    big_files: int
    big_mib: int
    tree_dirs: int
    tree_files: int
    readers: int
    gens: int
    renamers: int
    cycle_pause: float
    fsstress: str | None

    @property
    def lowers(self) -> list[Path]:
        return [self.root / "lower0", self.root / "lower1"]  # top first


@dataclass
class Layout:
    """What the builder wrote and the checkers expect."""
    tree: dict[str, str] = field(default_factory=dict)  # tree/... -> sha256 of its merged content
    tree_dirs: dict[str, list[str]] = field(default_factory=dict)  # tree/dNN -> sorted names
    big: list[str] = field(default_factory=list)  # big/bNNN, in lower1
    gen_subtrees: list[str] = field(default_factory=list)


def err_name(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        return f"{errno.errorcode.get(e.errno, e.errno)} ({e.strerror})"
    return f"{type(e).__name__}: {e}"


# -------------------------------------------------------------------------------------------
# Big files: content computable at any offset, so a 256 MiB file needs no copy in memory
# -------------------------------------------------------------------------------------------

class BigContent:
    """Block b of file i is 1 MiB: a 16-byte header naming (i, b) and a shared random body, so
    a block read from the wrong place or the wrong file shows."""

    def __init__(self, seed: int) -> None:
        self.body = random.Random(seed ^ 0xB16).randbytes(MiB)

    def block(self, index: int, b: int) -> bytes:
        return struct.pack("<QQ", index, b) + self.body[16:]

    def read(self, index: int, offset: int, length: int) -> bytes:
        out = bytearray()
        while length > 0:
            b, within = divmod(offset, MiB)
            piece = self.block(index, b)[within:within + length]
            out += piece
            offset += len(piece)
            length -= len(piece)
        return bytes(out)


# -------------------------------------------------------------------------------------------
# Building the layers
# -------------------------------------------------------------------------------------------

def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _small_tree(rng: random.Random, lower: Path, sub: str, dirs: int, files: int) -> None:
    """Lower dirs with files, nested dirs and symlinks: what generators and renamers start
    from (copy-ups, merged dirs, redirects)."""
    for d in range(dirs):
        base = lower / sub / f"d{d:02}"
        base.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            _write(base / f"f{f:02}", rng.randbytes(rng.randrange(0, 6000)))
        if d % 2 == 0:
            nested = base / "s0"
            nested.mkdir(exist_ok=True)
            _write(nested / "deep", rng.randbytes(rng.randrange(1, 3000)))
            with contextlib.suppress(FileExistsError):
                os.symlink("../f00", nested / "ln")


def build_layers(cfg: Config, stop: Callable[[], bool]) -> Layout:
    rng = random.Random(cfg.seed)
    top, bottom = cfg.lowers
    lay = Layout()
    for p in (top, bottom):
        p.mkdir(parents=True)
    # tree/: read by readers; lower-only, shadowed and merged names
    for d in range(cfg.tree_dirs):
        names = []
        for k in range(cfg.tree_files):
            rel = f"tree/d{d:02}/f{k:03}"
            size = rng.choice((0, 100, 4096, 20_000, 70_000, 300_000))
            data = rng.randbytes(size)
            where = k % 3  # 0: bottom only, 1: top only, 2: both (top wins)
            if where in (0, 2):
                _write(bottom / rel, data if where == 0 else rng.randbytes(size // 2 + 1))
            if where in (1, 2):
                _write(top / rel, data)
            lay.tree[rel] = hashlib.sha256(data).hexdigest()
            names.append(rel.rsplit("/", 1)[1])
        lay.tree_dirs[f"tree/d{d:02}"] = sorted(names)
        if stop():
            return lay
    # big/: lower files to copy up
    content = BigContent(cfg.seed)
    (bottom / "big").mkdir()
    for i in range(cfg.big_files):
        rel = f"big/b{i:03}"
        with open(bottom / rel, "wb") as f:
            for b in range(cfg.big_mib):
                f.write(content.block(i, b))
        lay.big.append(rel)
        if stop():
            return lay
    # subtrees of the generators, renamers and the replayed generator, merged over both lowers
    subs = [f"gen{i}" for i in range(cfg.gens)] + [f"ren{i}" for i in range(cfg.renamers)] + \
        ["replay"]
    for sub in subs:
        _small_tree(rng, bottom, sub, 6, 4)
        _small_tree(rng, top, sub, 3, 3)
    lay.gen_subtrees = subs
    return lay


def copy_lowers(cfg: Config, subtree: str, dest: Path) -> list[Path]:
    """Copies of the lowers' ``subtree`` alone (all the kernel replay reads), with cp -a: modes,
    times, xattrs and links as they are."""
    out = []
    for i, lower in enumerate(cfg.lowers):
        d = dest / f"klower{i}"
        d.mkdir(parents=True)
        if (lower / subtree).exists():
            subprocess.run(["cp", "-a", str(lower / subtree), str(d / subtree)], check=True,
                           timeout=300, stdin=subprocess.DEVNULL)
        out.append(d)
    return out


# -------------------------------------------------------------------------------------------
# The random op generator (what fsstress would do where it is missing), with an exact model
# -------------------------------------------------------------------------------------------

class Mismatch(Exception):
    """The filesystem answered without an errno, but not what the model holds."""


MAX_FILES = 120
MAX_DIRS = 30
MAX_SIZE = 64 * 1024
MODES = (0o644, 0o600, 0o755, 0o640)

GEN_WEIGHTS = {"create": 8, "write": 10, "append": 6, "truncate": 4, "read": 12, "stat": 6,
               "mkdir": 3, "rmdir": 2, "unlink": 5, "rename_file": 6, "rename_dir": 3,
               "symlink": 2, "readlink": 2, "link": 2, "chmod": 3, "setxattr": 3, "readdir": 5,
               "fsync": 2}
RENAME_WEIGHTS = {"rename_file": 45, "rename_dir": 35, "stat": 5, "readdir": 5, "read": 5,
                  "mkdir": 3, "rmdir": 2}


class Gen:
    """Random namespace and data ops on one subtree that nothing else touches: each op is
    drawn from the model alone (never from what the filesystem answered), so the same seed
    and start make the same ops on any overlay: the kernel replay."""

    def __init__(self, root: Path, seed: int, weights: dict[str, int]) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.weights = weights
        self.kinds = sorted(weights)
        self.counter = 0
        self.files: dict[str, int] = {}  # path -> inode id
        self.data: dict[int, bytearray] = {}
        self.dirs: set[str] = set()
        self.symlinks: dict[str, str] = {}
        self.scan()

    # the model ---------------------------------------------------------------------------

    def scan(self) -> None:
        """The model from the filesystem: at the start, and after an error (it may no longer
        hold)."""
        self.files, self.data, self.symlinks = {}, {}, {}
        self.dirs = {""}
        inos: dict[tuple[int, int], int] = {}
        stack = [""]
        while stack:
            rel = stack.pop()
            for name in sorted(os.listdir(self.p(rel))):
                crel = f"{rel}/{name}" if rel else name
                st = os.lstat(self.p(crel))
                if stat.S_ISDIR(st.st_mode):
                    self.dirs.add(crel)
                    stack.append(crel)
                elif stat.S_ISLNK(st.st_mode):
                    self.symlinks[crel] = os.readlink(self.p(crel))
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if key not in inos:
                        inos[key] = len(inos)
                        with open(self.p(crel), "rb") as f:
                            self.data[inos[key]] = bytearray(f.read())
                    self.files[crel] = inos[key]
        self.next_ino = len(inos)

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    def children(self, d: str) -> set[str]:
        pre = f"{d}/" if d else ""
        out = set()
        for name in (*self.files, *self.symlinks, *self.dirs):
            if name and name.startswith(pre) and "/" not in name[len(pre):]:
                out.add(name[len(pre):])
        return out

    def nlink(self, ino: int) -> int:
        return sum(1 for i in self.files.values() if i == ino)

    def new_name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def _pick(self, items: Any) -> Any:
        return self.rng.choice(sorted(items))

    # one op ------------------------------------------------------------------------------

    def step(self) -> tuple[Any, ...]:
        """Draw one op that must succeed, run it, update the model; returns its log entry.
        OSError and Mismatch propagate (the caller counts them and rescans)."""
        rng = self.rng
        kind = rng.choices(self.kinds, [self.weights[k] for k in self.kinds])[0]
        nondirs = len(self.files) + len(self.symlinks)
        if kind in ("create", "symlink", "link") and nondirs >= MAX_FILES:
            kind = "unlink"
        if kind == "mkdir" and len(self.dirs) >= MAX_DIRS:
            kind = "rmdir"
        fn = getattr(self, "op_" + kind)
        entry: tuple[Any, ...] | None = fn()
        return entry if entry is not None else (kind, "noop")

    def _dir(self) -> str:
        return str(self._pick(self.dirs))

    def _join(self, d: str, name: str) -> str:
        return f"{d}/{name}" if d else name

    def op_create(self) -> tuple[Any, ...]:
        path = self._join(self._dir(), self.new_name("n"))
        data = self.rng.randbytes(self.rng.randrange(0, 8192))
        fd = os.open(self.p(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        self.files[path] = self.next_ino
        self.data[self.next_ino] = bytearray(data)
        self.next_ino += 1
        return ("create", path, len(data))

    def _file(self) -> str | None:
        return str(self._pick(self.files)) if self.files else None

    def op_write(self) -> tuple[Any, ...] | None:
        path = self._file()
        if path is None:
            return None
        buf = self.data[self.files[path]]
        if len(buf) > MAX_SIZE:
            return self.op_truncate()
        off = self.rng.randrange(0, len(buf) + 1)
        data = self.rng.randbytes(self.rng.randrange(1, 4096))
        fd = os.open(self.p(path), os.O_WRONLY)
        try:
            if os.pwrite(fd, data, off) != len(data):
                raise Mismatch(f"short pwrite to {path}")
        finally:
            os.close(fd)
        buf[off:off + len(data)] = data
        return ("write", path, off, len(data))

    def op_append(self) -> tuple[Any, ...] | None:
        path = self._file()
        if path is None:
            return None
        buf = self.data[self.files[path]]
        if len(buf) > MAX_SIZE:
            return self.op_truncate()
        data = self.rng.randbytes(self.rng.randrange(1, 2048))
        fd = os.open(self.p(path), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        buf += data
        return ("append", path, len(data))

    def op_truncate(self) -> tuple[Any, ...] | None:
        path = self._file()
        if path is None:
            return None
        buf = self.data[self.files[path]]
        size = self.rng.randrange(0, min(len(buf) + 4096, MAX_SIZE))
        os.truncate(self.p(path), size)
        if size < len(buf):
            del buf[size:]
        else:
            buf += bytes(size - len(buf))
        return ("truncate", path, size)

    def op_read(self) -> tuple[Any, ...] | None:
        path = self._file()
        if path is None:
            return None
        with open(self.p(path), "rb") as f:
            got = f.read()
        want = self.data[self.files[path]]
        if got != want:
            raise Mismatch(f"{path}: read {len(got)} bytes (sha {_sha(got)}), the model has "
                           f"{len(want)} (sha {_sha(bytes(want))})")
        return ("read", path)

    def op_stat(self) -> tuple[Any, ...]:
        everything = sorted({*self.files, *self.symlinks, *self.dirs})
        path = self.rng.choice(everything)
        st = os.lstat(self.p(path))
        if path in self.files:
            ino = self.files[path]
            want = ("file", len(self.data[ino]), self.nlink(ino))
            got = ("file" if stat.S_ISREG(st.st_mode) else oct(st.st_mode), st.st_size,
                   st.st_nlink)
        elif path in self.symlinks:
            want = ("symlink", len(os.fsencode(self.symlinks[path])), 1)
            got = ("symlink" if stat.S_ISLNK(st.st_mode) else oct(st.st_mode), st.st_size,
                   st.st_nlink)
        else:
            want = ("dir", 0, 0)
            got = ("dir" if stat.S_ISDIR(st.st_mode) else oct(st.st_mode), 0, 0)
        if got != want:
            raise Mismatch(f"lstat {path or '.'}: {got}, the model has {want}")
        return ("stat", path)

    def op_mkdir(self) -> tuple[Any, ...] | None:
        parent = self._dir()
        if parent.count("/") >= 4:
            return None
        path = self._join(parent, self.new_name("D"))
        os.mkdir(self.p(path), 0o755)
        self.dirs.add(path)
        return ("mkdir", path)

    def op_rmdir(self) -> tuple[Any, ...] | None:
        empty = [d for d in sorted(self.dirs) if d and not self.children(d)]
        if not empty:
            return None
        path = self.rng.choice(empty)
        os.rmdir(self.p(path))
        self.dirs.discard(path)
        return ("rmdir", path)

    def op_unlink(self) -> tuple[Any, ...] | None:
        names = sorted({*self.files, *self.symlinks})
        if not names:
            return None
        path = self.rng.choice(names)
        os.unlink(self.p(path))
        ino = self.files.pop(path, None)
        self.symlinks.pop(path, None)
        if ino is not None and ino not in self.files.values():
            del self.data[ino]
        return ("unlink", path)

    def op_rename_file(self) -> tuple[Any, ...] | None:
        names = sorted({*self.files, *self.symlinks})
        if not names:
            return None
        src = self.rng.choice(names)
        dst: str | None = None
        if self.rng.random() < 0.2:  # over another file (never a link of the same inode)
            others = [f for f in sorted(self.files) if f != src and
                      self.files.get(f) != self.files.get(src, -1)]
            if others:
                dst = self.rng.choice(others)
        if dst is None:
            dst = self._join(self._dir(), self.new_name("r"))
        os.rename(self.p(src), self.p(dst))
        old = self.files.pop(dst, None)
        if src in self.files:
            self.files[dst] = self.files.pop(src)
        else:
            self.symlinks[dst] = self.symlinks.pop(src)
        if old is not None and old not in self.files.values():
            del self.data[old]
        return ("rename", src, dst)

    def op_rename_dir(self) -> tuple[Any, ...] | None:
        movable = [d for d in sorted(self.dirs) if d]
        if not movable:
            return None
        src = self.rng.choice(movable)
        depth = max((d.count("/") for d in self.dirs if d == src or d.startswith(src + "/")),
                    default=0) - src.count("/")
        parents = [d for d in sorted(self.dirs) if d != src and not d.startswith(src + "/")
                   and d.count("/") + depth < 5]
        if not parents:
            return None
        dst = self._join(self.rng.choice(parents), self.new_name("R"))
        os.rename(self.p(src), self.p(dst))

        def moved(path: str) -> str:
            return dst + path[len(src):] if path == src or path.startswith(src + "/") else path

        self.dirs = {moved(d) for d in self.dirs}
        self.files = {moved(k): v for k, v in self.files.items()}
        self.symlinks = {moved(k): v for k, v in self.symlinks.items()}
        return ("rename", src, dst)

    def op_symlink(self) -> tuple[Any, ...]:
        path = self._join(self._dir(), self.new_name("l"))
        target = self.rng.choice(("../x", "f00", "/nonexistent", "a/b/c")) + str(self.counter)
        os.symlink(target, self.p(path))
        self.symlinks[path] = target
        return ("symlink", path, target)

    def op_readlink(self) -> tuple[Any, ...] | None:
        if not self.symlinks:
            return None
        path = self._pick(self.symlinks)
        got = os.readlink(self.p(path))
        if got != self.symlinks[path]:
            raise Mismatch(f"readlink {path}: {got!r}, the model has {self.symlinks[path]!r}")
        return ("readlink", path)

    def op_link(self) -> tuple[Any, ...] | None:
        src = self._file()
        if src is None:
            return None
        dst = self._join(self._dir(), self.new_name("h"))
        os.link(self.p(src), self.p(dst))
        self.files[dst] = self.files[src]
        return ("link", src, dst)

    def op_chmod(self) -> tuple[Any, ...] | None:
        names = sorted({*self.files, *self.dirs} - {""})
        if not names:
            return None
        path = self.rng.choice(names)
        mode = self.rng.choice((0o755, 0o700, 0o775) if path in self.dirs else MODES)
        os.chmod(self.p(path), mode)
        return ("chmod", path, mode)

    def op_setxattr(self) -> tuple[Any, ...] | None:
        path = self._file()
        if path is None:
            return None
        value = self.rng.randbytes(self.rng.randrange(1, 64))
        os.setxattr(self.p(path), "user.soak", value)
        return ("setxattr", path, len(value))

    def op_readdir(self) -> tuple[Any, ...]:
        d = self._dir()
        got = set(os.listdir(self.p(d)))
        want = self.children(d)
        if got != want:
            raise Mismatch(f"readdir {d or '.'}: extra {sorted(got - want)[:5]}, missing "
                           f"{sorted(want - got)[:5]}")
        return ("readdir", d)

    def op_fsync(self) -> tuple[Any, ...] | None:
        path = self._file()
        if path is None:
            return None
        fd = os.open(self.p(path), os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return ("fsync", path)

    def check_all(self) -> None:
        """The whole subtree against the model (at the end of a run)."""
        for path in sorted(self.files):
            with open(self.p(path), "rb") as f:
                if f.read() != self.data[self.files[path]]:
                    raise Mismatch(f"{path}: content differs from the model at the end")
        for d in sorted(self.dirs):
            if set(os.listdir(self.p(d))) != self.children(d):
                raise Mismatch(f"readdir {d or '.'} differs from the model at the end")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


# -------------------------------------------------------------------------------------------
# Workers
# -------------------------------------------------------------------------------------------

class Worker:
    """Counting and reporting for one worker process (batched: the queue is not an op's cost)."""

    def __init__(self, kind: str, q: Queue[Any], stop: Event) -> None:
        self.kind, self.q, self.stop = kind, q, stop
        self.pending: dict[str, int] = {}
        self.last = time.monotonic()

    def count(self, kind: str | None = None, n: int = 1) -> None:
        k = kind or self.kind
        self.pending[k] = self.pending.get(k, 0) + n
        if time.monotonic() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        for k, n in self.pending.items():
            self.q.put(("count", k, n))
        self.pending = {}
        self.last = time.monotonic()

    def error(self, op: str, what: str, kind: str | None = None) -> None:
        self.q.put(("error", kind or self.kind, op, what))

    def info(self, data: dict[str, Any]) -> None:
        self.q.put(("info", self.kind, data))


def _worker_start() -> None:
    # a terminal's ^C goes to the whole process group: the parent alone decides when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_gen(kind: str, root: Path, seed: int, weights: dict[str, int], q: Queue[Any],
            stop: Event, log_path: Path | None = None) -> None:
    _worker_start()
    w = Worker(kind, q, stop)
    done = 0
    clean = True
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    try:
        try:
            gen = Gen(root, seed, weights)
        except OSError as e:
            w.error("scan", f"{root}: {err_name(e)}")
            return
        while not stop.is_set():
            try:
                entry = gen.step()
            except (OSError, Mismatch) as e:
                clean = False
                w.error(f"op {done}", err_name(e) if isinstance(e, OSError) else str(e))
                with contextlib.suppress(OSError):
                    gen.scan()
                done += 1
                continue
            done += 1
            if log:
                log.write(json.dumps(entry) + "\n")
            w.count()
            w.count(f"{kind}:{entry[0]}")
        try:
            gen.check_all()
            w.count("final-check")
        except (OSError, Mismatch) as e:
            clean = False
            w.error("final check", err_name(e) if isinstance(e, OSError) else str(e))
    finally:
        if log:
            log.close()
        w.flush()
        w.info({"ops": done, "seed": seed, "clean": clean})


def run_reader(idx: int, merged: Path, layout: Layout, seed: int, q: Queue[Any],
               stop: Event) -> None:
    _worker_start()
    w = Worker("read", q, stop)
    rng = random.Random(seed)
    files = sorted(layout.tree)
    dirs = sorted(layout.tree_dirs)
    nbytes = 0
    try:
        while not stop.is_set():
            if rng.random() < 0.1:
                d = rng.choice(dirs)
                try:
                    got = sorted(os.listdir(merged / d))
                except OSError as e:
                    w.error(f"listdir {d}", err_name(e))
                    continue
                if got != layout.tree_dirs[d]:
                    w.error(f"listdir {d}", f"names {got[:8]}..., expected "
                            f"{layout.tree_dirs[d][:8]}...")
                w.count("readdir")
                continue
            rel = rng.choice(files)
            h = hashlib.sha256()
            try:
                with open(merged / rel, "rb") as f:
                    while chunk := f.read(1 << 16):
                        h.update(chunk)
                        nbytes += len(chunk)
            except OSError as e:
                w.error(f"read {rel}", err_name(e))
                continue
            if h.hexdigest() != layout.tree[rel]:
                w.error(f"read {rel}", f"sha256 {h.hexdigest()[:12]} != expected "
                        f"{layout.tree[rel][:12]}")
            w.count()
    finally:
        w.flush()
        w.info({"reader": idx, "bytes": nbytes})


def run_toucher(merged: Path, layout: Layout, seed: int, q: Queue[Any], stop: Event) -> None:
    """Copies tree/ files up by their metadata alone, so that readers read lower-only and
    copied-up files of unchanged content side by side."""
    _worker_start()
    w = Worker("touch", q, stop)
    rng = random.Random(seed)
    files = sorted(layout.tree)
    try:
        while not stop.is_set():
            rel = rng.choice(files)
            path = merged / rel
            op = rng.choice(("chmod", "setxattr", "utime"))
            try:
                if op == "chmod":
                    os.chmod(path, rng.choice((0o644, 0o640)))
                elif op == "setxattr":
                    os.setxattr(path, "user.touched", str(rng.random()).encode())
                else:
                    os.utime(path, (rng.randrange(1 << 30), rng.randrange(1 << 30)))
            except OSError as e:
                w.error(f"{op} {rel}", err_name(e))
                continue
            w.count()
            time.sleep(0.002)  # metadata copy-ups at a pace that leaves room for the rest
    finally:
        w.flush()


class BigModel:
    """One big file as the worker wrote it: the original's first ``keep`` bytes, then
    ``tail`` (bounded, so its copy in memory stays small)."""

    def __init__(self, index: int, size: int) -> None:
        self.index, self.keep, self.tail = index, size, bytearray()

    @property
    def size(self) -> int:
        return self.keep + len(self.tail)

    def expect(self, content: BigContent, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        head = b""
        if offset < self.keep:
            n = min(length, self.keep - offset)
            head = content.read(self.index, offset, n)
            offset, length = offset + n, length - n
        t = offset - self.keep
        return head + bytes(self.tail[t:t + length])


def _verify_big(path: Path, m: BigModel, content: BigContent, rng: random.Random,
                full: bool) -> str | None:
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != m.size:
            return f"size {size} != model {m.size}"
        spans = [(0, m.size)] if full else \
            [(rng.randrange(0, max(1, m.size)), MiB), (max(0, m.keep - 4096), 8192 + len(m.tail))]
        for off, length in spans:
            pos = off
            while pos < min(off + length, m.size):
                n = min(4 * MiB, off + length - pos)
                got = os.pread(f.fileno(), n, pos)
                want = m.expect(content, pos, n)
                if got != want:
                    bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                               min(len(got), len(want)))
                    return f"bytes differ from offset {pos + bad} (read {len(got)} of {n})"
                pos += n
    return None


def run_big(merged: Path, layout: Layout, cfg: Config, q: Queue[Any], stop: Event) -> None:
    """Copy-ups of big lower files spread over the run (one every duration/N s), and between
    them appends, truncates (shrink and grow) and checked reads of the copied-up ones."""
    _worker_start()
    w = Worker("bigio", q, stop)
    rng = random.Random(cfg.seed ^ 0xB19)
    content = BigContent(cfg.seed)
    size = cfg.big_mib * MiB
    copied: dict[str, BigModel] = {}
    todo = list(enumerate(layout.big))
    t0 = time.monotonic()
    period = cfg.duration * 0.8 / max(1, len(todo))
    rates = []
    try:
        while not stop.is_set():
            if todo and time.monotonic() - t0 >= period * (len(layout.big) - len(todo)):
                i, rel = todo.pop(0)
                m = BigModel(i, size)
                try:
                    problem = _verify_big(merged / rel, m, content, rng, full=False)
                    if problem:
                        w.error(f"read lower {rel}", problem, "copyup")
                    t = time.monotonic()
                    fd = os.open(merged / rel, os.O_WRONLY | os.O_APPEND)
                    opened = time.monotonic() - t
                    try:
                        data = rng.randbytes(rng.randrange(1, MiB))
                        os.write(fd, data)
                    finally:
                        os.close(fd)
                    m.tail += data
                    rates.append(cfg.big_mib / max(opened, 1e-6))
                    copied[rel] = m
                    problem = _verify_big(merged / rel, m, content, rng, full=False)
                    if problem:
                        w.error(f"copy-up {rel}", problem, "copyup")
                    w.count("copyup")
                except OSError as e:
                    w.error(f"copy-up {rel}", err_name(e), "copyup")
                continue
            if not copied:
                stop.wait(0.2)
                continue
            rel = rng.choice(sorted(copied))
            m = copied[rel]
            op = rng.choices(("append", "truncate", "verify"), (4, 2, 4))[0]
            if len(m.tail) > 16 * MiB:
                op = "truncate"
            try:
                if op == "append":
                    data = rng.randbytes(rng.randrange(1, 2 * MiB))
                    with open(merged / rel, "ab") as f:
                        f.write(data)
                    m.tail += data
                elif op == "truncate":
                    new = rng.randrange(size // 2, m.keep + len(m.tail) + MiB)
                    os.truncate(merged / rel, new)
                    if new <= m.keep:
                        m.keep, m.tail = new, bytearray()
                    elif new - m.keep <= len(m.tail):
                        del m.tail[new - m.keep:]
                    else:
                        m.tail += bytes(new - m.keep - len(m.tail))
                else:
                    problem = _verify_big(merged / rel, m, content, rng, full=False)
                    if problem:
                        w.error(f"verify {rel}", problem)
            except OSError as e:
                w.error(f"{op} {rel}", err_name(e))
                continue
            w.count()
            w.count(f"bigio:{op}")
            time.sleep(0.01)
        for rel, m in sorted(copied.items()):  # everything once, whole
            try:
                problem = _verify_big(merged / rel, m, content, rng, full=True)
            except OSError as e:
                problem = err_name(e)
            if problem:
                w.error(f"final verify {rel}", problem)
            w.count("final-check")
    finally:
        w.flush()
        w.info({"copied": len(copied), "copyup_mib_s": rates})


def run_cycler(cfg: Config, layout: Layout, q: Queue[Any], stop: Event) -> None:
    """Mount, use, unmount a second overlay (its own upper/work, the same lowers) again and
    again: each cycle reads tree files, copies a big file up, renames a lower dir (a
    redirect), then unmounts and checks what landed in its upper."""
    from unionfs.api import Overlay, OverlayError

    _worker_start()
    w = Worker("mount_cycle", q, stop)
    rng = random.Random(cfg.seed ^ 0xC7C)
    upper, work, merged = cfg.root / "upper2", cfg.root / "work2", cfg.root / "merged2"
    merged.mkdir(exist_ok=True)
    content = BigContent(cfg.seed)
    n = 0
    mount_s: list[float] = []
    try:
        while not stop.is_set():
            for layer in (upper, work):
                shutil.rmtree(layer, ignore_errors=True)
                layer.mkdir()
            ov = Overlay(cfg.lowers, upper, work, merged, options=OPTIONS, server=False,
                         log_path=cfg.root / "cycler.log")
            step = "mount"
            try:
                ov.mount()
                q.put(("pid", "mount_cycle", ov.pid))
                mount_s.append(ov.mount_seconds or 0.0)
                step = "readdir"
                d = rng.choice(sorted(layout.tree_dirs))
                if sorted(os.listdir(merged / d)) != layout.tree_dirs[d]:
                    w.error(f"cycle {n} readdir {d}", "names differ from the lowers'")
                step = "read"
                for rel in rng.sample(sorted(layout.tree), 3):
                    if _sha((merged / rel).read_bytes()) != layout.tree[rel][:12]:
                        w.error(f"cycle {n} read {rel}", "content differs from the lowers'")
                big = None
                if layout.big:
                    i = rng.randrange(len(layout.big))
                    big = layout.big[i]
                    step = f"copy-up {big}"
                    with open(merged / big, "ab") as f:
                        f.write(b"cycle")
                    m = BigModel(i, cfg.big_mib * MiB)
                    m.tail += b"cycle"
                    problem = _verify_big(merged / big, m, content, rng, full=False)
                    if problem:
                        w.error(f"cycle {n} {step}", problem)
                step = "rename lower dir"
                src = f"ren0/d{rng.randrange(6):02}" if cfg.renamers else "replay/d00"
                os.rename(merged / src, merged / f"{src}-moved")
                step = "create"
                (merged / f"cycle{n}").write_bytes(b"x" * 100)
                step = "unmount"
                ov.unmount()
                step = "check upper"
                if big and (upper / big).stat().st_size != cfg.big_mib * MiB + 5:
                    w.error(f"cycle {n} upper", f"{big} has the wrong size in upper2")
                if not os.getxattr(upper / f"{src}-moved", "trusted.overlay.redirect"):
                    w.error(f"cycle {n} upper", f"{src}-moved has no redirect")
                w.count()
            except (OSError, OverlayError) as e:
                w.error(f"cycle {n} {step}", err_name(e))
            finally:
                with contextlib.suppress(OverlayError):
                    ov.unmount()
            n += 1
            stop.wait(cfg.cycle_pause)
    finally:
        w.flush()
        w.info({"cycles": n, "mount_s": mount_s})


def run_fsstress(binary: str, merged: Path, seed: int, q: Queue[Any], stop: Event) -> None:
    """fsstress in rounds of a fixed op count (its own process group, ended by its pgid at
    stop); a round that exits non-zero is an error."""
    _worker_start()
    w = Worker("fsstress", q, stop)
    d = merged / "fsstress"
    d.mkdir(exist_ok=True)
    nproc, nops = 2, 2000
    rnd = 0
    try:
        while not stop.is_set():
            proc = subprocess.Popen([binary, "-d", str(d), "-p", str(nproc), "-n", str(nops),
                                     "-s", str(seed + rnd)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True)
            while proc.poll() is None and not stop.wait(0.2):
                pass
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                break
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            if proc.returncode != 0:
                w.error(f"fsstress round {rnd} (seed {seed + rnd})",
                        f"exit {proc.returncode}: {err.strip()[-300:]}")
            else:
                w.count(n=nproc * nops)
            rnd += 1
    finally:
        w.flush()
