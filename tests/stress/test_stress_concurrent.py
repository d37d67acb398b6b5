"""Concurrent namespace stress: several processes create, rewrite, append, rename, link, chmod and
delete in shared directories of a merged view that has lower content (merged, lower-only and
pure-upper dirs), while others stat, list and read. Every file ever written holds self-checking
records, so a reader can tell a torn or stale read from a race it may legitimately see.

Only the errno a real filesystem gives in such races is tolerated (ENOENT, EEXIST, ENOTEMPTY,
ENOTDIR, EISDIR, EXDEV for directories overlayfs can't rename, ...; each op has its own list);
anything else — EIO, ENOTCONN, EINVAL (but from readlink of a name that is not a symlink),
ESTALE, a bad record — is a failure. Afterwards every file must hold only whole valid records,
and the view checks (views.py) must agree.

A second test races copy-ups: six processes copy up the same lower file at once, each its own
way, then write their own block; no write may be lost, no reader see a byte that is neither the
lower's nor a writer's.

UNIONFS_TEST_IMPL=kernel runs both against the kernel's overlay: the premises hold there.

The workers are this module run as a program (``python -m test_stress_concurrent worker JSON``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Records: one line each, "R <who> <seq> <crc32> <payload>"; files hold only whole records.
# ---------------------------------------------------------------------------------------------


def record(who: str, seq: int, payload: str) -> bytes:
    body = f"{who} {seq} {payload}"
    return f"R {zlib.crc32(body.encode()):08x} {body}\n".encode()


def bad_records(data: bytes, allow_partial_tail: bool) -> str | None:
    """None if ``data`` is whole valid records (plus, if allowed, one unfinished last line)."""
    if not data:
        return None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when data ends with a newline
    if tail and not allow_partial_tail:
        return f"unfinished last line {tail[:60]!r}"
    for i, ln in enumerate(lines):
        parts = ln.split(b" ", 2)
        if len(parts) != 3 or parts[0] != b"R":
            return f"line {i}: not a record: {ln[:80]!r}"
        try:
            ok = int(parts[1], 16) == zlib.crc32(parts[2])
        except ValueError:
            ok = False
        if not ok:
            return f"line {i}: bad checksum: {ln[:80]!r}"
    return None


# ---------------------------------------------------------------------------------------------
# The namespace the workers share
# ---------------------------------------------------------------------------------------------

SHARED = ["s0", "s1", "s2", "s3", "u0"]   # never renamed or removed
SUBDIRS = ["d0", "d1", "ld0", "ld1"]      # ld* exist in lowers of some shared dirs
FILES = [f"n{i}" for i in range(10)] + ["l0", "l1", "l2"]  # l* exist in lowers
TARGETS = [f"t/f{i}" for i in range(4)]   # what symlinks point at: static lower files

# errno names each op may meet in a race; anything else is a bug
COMMON = {"ENOENT", "ENOTDIR"}
TOLERATED = {
    "create": COMMON | {"EEXIST"},
    "replace": COMMON | {"EISDIR"},
    # EEXIST: a lower file's name was taken while an open copied it up (the kernel's too)
    "append": COMMON | {"EISDIR", "EEXIST"},
    # EINVAL: the target's directory (s/ldX, walked to first) was itself renamed to the
    # source's name meanwhile, so the source is now that directory (rename(2) on any fs)
    "rename": COMMON | {"EISDIR", "ENOTEMPTY", "EXDEV", "EEXIST", "EINVAL"},
    "unlink": COMMON | {"EISDIR"},
    "mkdir": COMMON | {"EEXIST"},
    "rmdir": COMMON | {"ENOTEMPTY"},
    "rename_dir": COMMON | {"EISDIR", "ENOTEMPTY", "EXDEV", "EEXIST"},
    "link": COMMON | {"EEXIST", "EPERM"},  # EPERM: the source became a directory
    "symlink": COMMON | {"EEXIST"},
    "chmod": COMMON,
    "setxattr": COMMON,
    "stat": COMMON,
    "listdir": COMMON,
    "read": COMMON | {"EISDIR"},
    "readlink": COMMON | {"EINVAL"},  # EINVAL only if the name is (now) not a symlink
    "getxattr": COMMON | {"ENODATA"},
    "walk": COMMON,
    "drop": set(),
}
# No truncation here: a read racing a truncate and the appends after it may see old and new bytes
# mixed on any filesystem (the kernel's overlay shows it), which records can't tell from a bug.
# fsx (test_stress_integrity.py) covers truncation.
WRITER_OPS = {"create": 10, "replace": 8, "append": 10, "rename": 10, "unlink": 8, "mkdir": 5,
              "rmdir": 4, "rename_dir": 4, "link": 3, "symlink": 3, "chmod": 3, "setxattr": 3,
              "stat": 2, "read": 2}
READER_OPS = {"stat": 10, "listdir": 8, "read": 15, "readlink": 3, "getxattr": 3, "walk": 1}


def lower_layers() -> list[dict]:
    """Two lowers: shared dirs merged over both, lower-only subdirs, hidden and whiteouted
    names, the static symlink targets. Built from records, like every file the workers write."""
    from overlay_harness import Dir, File, Whiteout

    top: dict = {"t": Dir()}
    bottom: dict = {}
    seq = 0
    for i, target in enumerate(TARGETS):
        top[target] = File(record("L", i, "target " * 20))
    for s in ("s0", "s1", "s2"):
        for name in ("l0", "l1"):
            seq += 1
            top[f"{s}/{name}"] = File(record("L", seq, f"top {s}/{name} " * 8))
        for name in ("l1", "l2"):
            seq += 1
            bottom[f"{s}/{name}"] = File(record("L", seq, f"bottom {s}/{name} " * 8))
        for j in range(3):
            seq += 1
            bottom[f"{s}/ld0/n{j}"] = File(record("L", seq, "in a lower-only dir " * 4))
            top[f"{s}/ld1/n{j}"] = File(record("L", seq, "merged dir, top " * 4))
            bottom[f"{s}/ld1/n{j + 3}"] = File(record("L", seq, "merged dir, bottom " * 4))
    top["s2/l2"] = Whiteout()            # hides bottom's s2/l2
    top["s3"] = Dir(opaque=True)         # an opaque dir over a bottom one
    bottom["s3/l0"] = File(record("L", 999, "hidden by opaque s3"))
    return [top, bottom]


# ---------------------------------------------------------------------------------------------
# The worker (a separate process)
# ---------------------------------------------------------------------------------------------


class Worker:
    def __init__(self, cfg: dict):
        self.root = cfg["root"]
        self.wid = cfg["wid"]
        self.rng = random.Random(cfg["seed"])
        self.deadline = time.monotonic() + cfg["seconds"]
        self.max_ops = cfg["ops"]
        ops = WRITER_OPS if cfg["role"] == "writer" else READER_OPS
        self.kinds, self.weights = list(ops), list(ops.values())
        self.counts: Counter[str] = Counter()
        self.errnos: Counter[str] = Counter()
        self.bad: list[str] = []
        self.seq = 0
        # one reader also drops the kernel's dentries and inodes now and then: FORGETs race
        # with lookups and the inodes the workers hold
        self.dropper = cfg.get("dropper", False) and os.geteuid() == 0
        self.last_drop = time.monotonic()

    def p(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def file_rel(self) -> str:
        s = self.rng.choice(SHARED)
        if self.rng.random() < 0.25:
            s = f"{s}/{self.rng.choice(SUBDIRS)}"
        return f"{s}/{self.rng.choice(FILES)}"

    def dir_rel(self) -> str:
        return f"{self.rng.choice(SHARED)}/{self.rng.choice(SUBDIRS)}"

    def payload(self) -> bytes:
        self.seq += 1
        return b"".join(record(f"w{self.wid}", self.seq, f"{i} " + "x" * self.rng.randrange(80))
                        for i in range(self.rng.randrange(1, 6)))

    def check_data(self, rel: str, data: bytes, partial_ok: bool = True) -> None:
        problem = bad_records(data, allow_partial_tail=partial_ok)
        if problem:
            self.fail(f"read {rel}: {problem} ({len(data)} bytes: {data[:400]!r})")

    def fail(self, msg: str) -> None:
        if len(self.bad) < 50:
            self.bad.append(f"w{self.wid}: {msg}")

    # -- writer ops ----------------------------------------------------------------------------
    def op_create(self) -> None:
        # O_APPEND: another worker may append to the new file before this write; a write at
        # offset 0 would then overwrite that record (on any filesystem)
        fd = os.open(self.p(self.file_rel()), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND,
                     0o644)
        try:
            os.write(fd, self.payload())
        finally:
            os.close(fd)

    def op_replace(self) -> None:
        rel = self.file_rel()
        tmp = os.path.join(os.path.dirname(rel), f".tmp-w{self.wid}-{self.seq}")
        fd = os.open(self.p(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, self.payload())
        finally:
            os.close(fd)
        try:
            os.rename(self.p(tmp), self.p(rel))
        except OSError:
            try:
                os.unlink(self.p(tmp))
            except FileNotFoundError:  # its dir went away with it
                pass
            raise

    def op_append(self) -> None:
        fd = os.open(self.p(self.file_rel()), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, self.payload())
        finally:
            os.close(fd)

    def op_rename(self) -> None:
        src = self.file_rel()
        dst = self.file_rel() if self.rng.random() < 0.9 else self.dir_rel()
        os.rename(self.p(src), self.p(dst))

    def op_unlink(self) -> None:
        os.unlink(self.p(self.file_rel()))

    def op_mkdir(self) -> None:
        os.mkdir(self.p(self.dir_rel()), 0o755)

    def op_rmdir(self) -> None:
        os.rmdir(self.p(self.dir_rel()))

    def op_rename_dir(self) -> None:
        src = self.dir_rel()
        dst = self.dir_rel() if self.rng.random() < 0.8 else \
            f"{self.rng.choice(SHARED)}/{self.rng.choice(FILES)}"
        os.rename(self.p(src), self.p(dst))

    def op_link(self) -> None:
        os.link(self.p(self.file_rel()), self.p(self.file_rel()), follow_symlinks=False)

    def op_symlink(self) -> None:
        rel = self.file_rel()
        up = "../" * rel.count("/")
        os.symlink(up + self.rng.choice(TARGETS), self.p(rel))

    def op_chmod(self) -> None:
        rel = self.rng.choice([self.file_rel(), self.dir_rel()])
        os.chmod(self.p(rel), self.rng.choice([0o644, 0o600, 0o640, 0o755]))

    def op_setxattr(self) -> None:
        os.setxattr(self.p(self.file_rel()), "user.stress", f"w{self.wid}-{self.seq}".encode())

    # -- reader ops ----------------------------------------------------------------------------
    def op_stat(self) -> None:
        rel = self.rng.choice([self.file_rel(), self.dir_rel()])
        (os.stat if self.rng.random() < 0.5 else os.lstat)(self.p(rel))

    def op_listdir(self) -> None:
        rel = self.rng.choice(SHARED) if self.rng.random() < 0.6 else self.dir_rel()
        for name in os.listdir(self.p(rel)):
            try:
                os.lstat(self.p(f"{rel}/{name}"))
            except OSError as e:
                self.note("stat", e)

    def op_read(self) -> None:
        rel = self.file_rel()
        with open(self.p(rel), "rb") as f:
            data = f.read()
        self.check_data(rel, data)

    def op_readlink(self) -> None:
        rel = self.file_rel()
        try:
            target = os.readlink(self.p(rel))
        except OSError as e:
            if e.errno == errno.EINVAL:
                try:
                    if stat.S_ISLNK(os.lstat(self.p(rel)).st_mode):
                        self.fail(f"readlink {rel}: EINVAL but it is a symlink")
                except OSError:
                    pass
            raise
        if not target.lstrip("./").startswith("t/f"):
            self.fail(f"readlink {rel}: unexpected target {target!r}")

    def op_getxattr(self) -> None:
        v = os.getxattr(self.p(self.file_rel()), "user.stress")
        if not v.startswith(b"w"):
            self.fail(f"getxattr: unexpected value {v!r}")

    def op_drop(self) -> None:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")

    def op_walk(self) -> None:
        errs: list[OSError] = []
        for _dirpath, _dirs, _files in os.walk(self.root, onerror=errs.append):
            pass
        for e in errs:
            self.note("walk", e)

    # -- loop ----------------------------------------------------------------------------------
    def note(self, kind: str, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.errnos[name] += 1
        if name not in TOLERATED[kind]:
            self.fail(f"{kind}: {name} {e.filename!r} {e.filename2 or ''}".rstrip())

    def run(self) -> dict:
        n = 0
        while n < self.max_ops and time.monotonic() < self.deadline:
            n += 1
            kind = self.rng.choices(self.kinds, self.weights)[0]
            if self.dropper and time.monotonic() - self.last_drop > 0.5:
                kind, self.last_drop = "drop", time.monotonic()
            self.counts[kind] += 1
            try:
                getattr(self, "op_" + kind)()
            except OSError as e:
                self.note(kind, e)
        return {"wid": self.wid, "ops": n, "counts": dict(self.counts),
                "errnos": dict(self.errnos), "bad": self.bad}


# ---------------------------------------------------------------------------------------------
# Racing copy-ups: every writer copies up the same lower file at the same moment
# ---------------------------------------------------------------------------------------------

BIG = 4 << 20        # each raced lower file
BLOCK = 4000         # what each writer writes, at an unaligned offset of its own
TRIGGERS = ["open", "truncate", "chmod", "setxattr", "utime"]  # how a writer's copy-up starts


def big_content(seed: int, r: int) -> bytes:
    return random.Random(f"big-{seed}-{r}").randbytes(BIG)


def block_of(seed: int, r: int, w: int) -> tuple[int, bytes]:
    return w * 65536 + 1234, random.Random(f"blk-{seed}-{r}-{w}").randbytes(BLOCK)


def check_big(data: bytes, seed: int, r: int, writers: int, final: bool) -> str | None:
    """Outside the writers' blocks the lower content; in each block, byte by byte, the lower or
    the new bytes (a read racing a write may see part of it, as on any filesystem); once all
    are done, the new ones: no write lost to a racing copy-up."""
    lower = big_content(seed, r)
    if len(data) != BIG:
        return f"size {len(data)}, expected {BIG}"
    expect = bytearray(lower)
    for w in range(writers):
        off, blk = block_of(seed, r, w)
        got, old = data[off:off + BLOCK], lower[off:off + BLOCK]
        if got == blk or (not final and (got == old or all(
                g in (o, n) for g, o, n in zip(got, old, blk)))):
            expect[off:off + BLOCK] = got
        else:
            state = "old" if got == old else "partly old" if all(
                g in (o, n) for g, o, n in zip(got, old, blk)) else "neither old nor new"
            return f"writer {w}'s block at {off:#x}: {state}{' (a lost write)' if final else ''}"
    if data != expect:
        bad = next(i for i in range(BIG) if data[i] != expect[i])
        return f"byte {bad:#x} outside the writers' blocks changed"
    return None


def copyup_main(cfg: dict) -> dict:
    """Round r: at start + r * gap every writer copies up big/f{r} its own way, then writes its
    block through an fd opened for writing; readers read the whole file meanwhile."""
    root, wid, seed = cfg["root"], cfg["wid"], cfg["seed"]
    bad, reads = [], 0
    for r in range(cfg["rounds"]):
        path = os.path.join(root, "big", f"f{r}")
        at = cfg["start"] + r * cfg["gap"]
        time.sleep(max(0.0, at - time.time()))
        try:
            if cfg["role"] == "copyup-writer":
                trigger = TRIGGERS[(wid + r) % len(TRIGGERS)]
                if trigger == "truncate":
                    os.truncate(path, BIG)
                elif trigger == "chmod":
                    os.chmod(path, 0o640)
                elif trigger == "setxattr":
                    os.setxattr(path, f"user.w{wid}", b"1")
                elif trigger == "utime":
                    os.utime(path, ns=(10**18, 10**18))
                off, blk = block_of(seed, r, wid)
                fd = os.open(path, os.O_WRONLY)
                try:
                    if os.pwrite(fd, blk, off) != BLOCK:
                        bad.append(f"round {r}: short write")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                while time.time() < at + cfg["gap"] * 0.8:
                    with open(path, "rb") as f:
                        data = f.read()
                    reads += 1
                    problem = check_big(data, seed, r, cfg["writers"], final=False)
                    if problem:
                        bad.append(f"round {r}: reader saw {problem}")
                        break
        except OSError as e:
            bad.append(f"round {r}: {errno.errorcode.get(e.errno or 0, e.errno)} {e}")
    return {"wid": wid, "ops": reads or cfg["rounds"], "bad": bad, "counts": {}, "errnos": {}}


def worker_main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    res = copyup_main(cfg) if cfg["role"].startswith("copyup") else Worker(cfg).run()
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit("usage: python -m test_stress_concurrent worker JSON")


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------

import pytest  # noqa: E402  (the workers above need neither pytest nor the harness)
from overlay_harness import PYTHON, Dir, File  # noqa: E402
from views import (  # noqa: E402
    LONG,
    SEED,
    budget,
    check_views,
    lowers_raw,
    report,
    watchdog_seconds,
)

SECONDS = budget(10, 100)
WRITERS, READERS = (4, 3) if not LONG else (6, 4)
HERE = Path(__file__).resolve().parent


def validate_tree(root: Path, stage: str) -> int:
    """Every regular file in the merged tree holds whole valid records; returns the file count."""
    files = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            files += 1
            with open(path, "rb") as f:
                data = f.read()
            problem = bad_records(data, allow_partial_tail=False)
            assert problem is None, f"{stage}: {os.path.relpath(path, root)}: {problem}"
    return files


def start_workers(root: Path, seed: int) -> list[tuple[dict, subprocess.Popen]]:
    return spawn(root, [{"root": str(root), "wid": wid, "seed": seed * 100 + wid,
                         "seconds": SECONDS, "ops": 10**9,
                         "role": "writer" if wid < WRITERS else "reader",
                         "dropper": wid == WRITERS} for wid in range(WRITERS + READERS)])


def spawn(root: Path, cfgs: list[dict]) -> list[tuple[dict, subprocess.Popen]]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    return [(cfg, subprocess.Popen([PYTHON, "-m", "test_stress_concurrent", "worker",
                                    json.dumps(cfg)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=str(root), env=env))
            for cfg in cfgs]


def collect(procs: list[tuple[dict, subprocess.Popen]], seconds: float = SECONDS) -> list[dict]:
    results, problems = [], []
    deadline = time.monotonic() + seconds + 60
    try:
        for cfg, p in procs:
            try:
                out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"worker {cfg['wid']} still running {seconds + 60:.0f}s after "
                                "start (a request never answered?)")
                continue
            if p.returncode != 0:
                problems.append(f"worker {cfg['wid']} exited {p.returncode}: {err[-2000:]}")
                continue
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for _cfg, p in procs:  # only our own workers, by their pid
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    problems.append(f"worker pid {p.pid} did not die")
    assert not problems, "\n".join(problems)
    return results


@pytest.mark.watchdog(watchdog_seconds(SECONDS))
def test_concurrent_namespace_churn(make_stack, mounter):
    paths = make_stack(lowers=lower_layers(), upper={"u0": Dir()})
    before = lowers_raw(paths)
    m = mounter(paths)
    t0 = time.monotonic()
    results = collect(start_workers(m.root, seed=SEED + 1))
    elapsed = time.monotonic() - t0
    bad = [b for r in results for b in r["bad"]]
    total = sum(r["ops"] for r in results)
    counts: Counter[str] = Counter()
    errnos: Counter[str] = Counter()
    for r in results:
        counts.update(r["counts"])
        errnos.update(r["errnos"])
    report(f"stress concurrent: seed {SEED + 1}, {WRITERS + READERS} processes ({WRITERS} "
           f"writers, {READERS} readers), {total} ops in {elapsed:.1f}s ({counts['drop']} "
           f"drop_caches), tolerated errnos "
           f"{dict(errnos.most_common())}, {len(bad)} failures")
    assert not bad, "unexpected errno or bad data:\n" + "\n".join(bad[:40])
    assert all(counts[k] > 0 for k in WRITER_OPS), counts  # every kind of op ran
    assert total > 50 * (WRITERS + READERS), f"only {total} ops ran"
    files = validate_tree(m.root, "right after")
    assert files > 10, f"only {files} files left"
    check_views(paths, m, "concurrent", before, mounter,
                extra=lambda root, stage: None if stage == "live" else validate_tree(root, stage))


ROUNDS = int(budget(5, 60))
CU_WRITERS, CU_READERS = 6, 2


@pytest.mark.watchdog(watchdog_seconds(ROUNDS * 1.5))
def test_concurrent_copy_ups_of_one_file(make_stack, mounter):
    """Six processes copy up the same 4 MiB lower file at the same moment, each its own way
    (open for writing, truncate to its size, chmod, setxattr, utimes), then each writes its own
    block; readers read it whole meanwhile. A copy-up that is not serialised loses writes (made
    to a copy another copy-up then replaces) or shows a reader a half-copied file."""
    seed = SEED + 7
    paths = make_stack(lowers=[{f"big/f{r}": File(big_content(seed, r)) for r in range(ROUNDS)}])
    before = lowers_raw(paths)
    m = mounter(paths)
    gap = 1.2
    start = time.time() + 2.0  # time for the workers to start
    cfgs = [{"root": str(m.root), "wid": w, "seed": seed, "rounds": ROUNDS, "gap": gap,
             "start": start, "writers": CU_WRITERS,
             "role": "copyup-writer" if w < CU_WRITERS else "copyup-reader"}
            for w in range(CU_WRITERS + CU_READERS)]
    results = collect(spawn(m.root, cfgs), seconds=2.0 + ROUNDS * gap)
    bad = [b for r in results for b in r["bad"]]
    reads = sum(r["ops"] for r in results if r["wid"] >= CU_WRITERS)
    lost = []

    def final(root: Path, stage: str) -> None:
        for r in range(ROUNDS):
            with open(root / "big" / f"f{r}", "rb") as f:
                problem = check_big(f.read(), seed, r, CU_WRITERS, final=True)
            if problem:
                lost.append(f"{stage}: big/f{r}: {problem}")

    final(m.root, "right after")
    report(f"stress concurrent copy-ups: seed {seed}, {ROUNDS} lower files of {BIG >> 20} MiB, "
           f"each copied up by {CU_WRITERS} processes at once ({', '.join(TRIGGERS)}), "
           f"{reads} whole-file reads meanwhile, {len(bad) + len(lost)} failures")
    assert not bad, "\n".join(bad[:20])
    assert not lost, "\n".join(lost[:20])
    check_views(paths, m, "concurrent copy-ups", before, mounter,
                extra=lambda root, stage: None if stage == "live" else final(root, stage))
    assert not lost, "\n".join(lost[:20])
