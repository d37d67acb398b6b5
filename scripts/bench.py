#!/usr/bin/env python3
"""Benchmark pyunionfs against the kernel's overlayfs and fuse-overlayfs.

All three mount the same generated lower layers (3 layers, merged directories, a few
whiteouts); each round mounts every filesystem with a fresh upper/work dir, in turn, and runs:

  a. stat every file of a ~5k-file tree (os.walk + lstat), cold (caches dropped) then warm
  b. readdir of a 10k-entry merged directory
  c. sequential read of a 200 MiB lower file (1 MiB reads)
  d. sequential write of a 200 MiB new file (1 MiB writes, no fsync)
  e. copy-up: open 500 small lower files for append
  f. create + unlink 2000 files in a lower directory
  g. tar c of the tree, piped (GNU tar skips reading when writing to /dev/null itself)

The table shows the median of N rounds and the ratios pyunionfs/kernel and
pyunionfs/fuse-overlayfs. A filesystem that is unavailable (no root for the kernel mount,
fuse-overlayfs not installed) shows n/a; a failure or timeout shows ERR and the script exits 1.

  scripts/bench.py [--quick] [-n N] [--json FILE] [--fs kernel,fuse-overlayfs,pyunionfs]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
FS_NAMES = ("kernel", "fuse-overlayfs", "pyunionfs")
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 15.0


@dataclass
class Profile:
    files: int  # files in the stat/tar tree, spread over 3 layers
    dirs: int  # leaf directories of that tree
    bigdir: int  # entries in the readdir directory
    mib: int  # size of the read file and of the written file
    copyup: int  # lower files opened for append
    churn: int  # files created and unlinked
    rounds: int  # default N


FULL = Profile(files=5000, dirs=100, bigdir=10000, mib=200, copyup=500, churn=2000, rounds=3)
QUICK = Profile(files=1000, dirs=20, bigdir=2000, mib=32, copyup=100, churn=400, rounds=1)


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Layers


@dataclass
class Layers:
    root: Path
    dirs: list[Path]  # top first, as lowerdir= wants them
    expected_files: int  # visible regular files under tree/
    tree_dirs: list[str] = field(default_factory=list)

    @property
    def lowerdir(self) -> str:
        return ":".join(str(d).replace(":", "\\:") for d in self.dirs)


def make_layers(root: Path, p: Profile, whiteouts: bool) -> Layers:
    """Generate 3 lower layers; L0 is the top one."""
    dirs = [root / f"L{i}" for i in range(3)]
    blob = os.urandom(64 * 1024)
    tree_dirs = [f"tree/d{i % 10:02d}/s{i:03d}" for i in range(p.dirs)]
    for d in dirs:
        for td in tree_dirs:
            (d / td).mkdir(parents=True)
        (d / "big").mkdir()
    visible = 0
    for i in range(p.files):
        td = tree_dirs[i % p.dirs]
        layer = dirs[i % 3]
        size = (i * 613) % 8192
        (layer / td / f"f{i:05d}").write_bytes(blob[:size])
        visible += 1
        # every 97th file of the bottom layer is deleted again by a whiteout in the top layer
        if whiteouts and i % 3 == 2 and i % 97 == 0:
            os.mknod(dirs[0] / td / f"f{i:05d}", stat.S_IFCHR, os.makedev(0, 0))
            visible -= 1
    for j in range(p.bigdir):
        (dirs[j % 3] / "big" / f"entry-{j:05d}").touch()
    (dirs[2] / "data").mkdir()
    with open(dirs[2] / "data" / "large.bin", "wb") as f:
        chunk = blob * (MIB // len(blob))
        for _ in range(p.mib):
            f.write(chunk)
    (dirs[1] / "cu").mkdir()
    for i in range(p.copyup):
        (dirs[1] / "cu" / f"small-{i:04d}").write_bytes(blob[:4096])
    (dirs[2] / "churn").mkdir()
    return Layers(root=root, dirs=dirs, expected_files=visible, tree_dirs=tree_dirs)


# --------------------------------------------------------------------------------------------
# Mounts


def mounted(path: Path) -> bool:
    want = str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    want = want.replace("\n", "\\012")
    with open("/proc/mounts") as f:
        return any(line.split(" ")[1] == want for line in f)


def mounts_below(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/mounts") as f:
        return [line.split(" ")[1] for line in f if line.split(" ")[1].startswith(prefix)]


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


class Mount:
    """One mounted filesystem; subclasses know how to start and stop it."""

    name = "?"

    def __init__(self, layers: Layers, upper: Path, work: Path, merged: Path, logfile: Path):
        self.layers, self.upper, self.work, self.merged = layers, upper, work, merged
        self.logfile = logfile
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """Emergency stop from the watchdog: make blocked syscalls on the mount return."""

    def __enter__(self) -> Mount:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class KernelMount(Mount):
    name = "kernel"

    def start(self) -> None:
        opts = f"lowerdir={self.layers.lowerdir},upperdir={self.upper},workdir={self.work}"
        r = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)],
            capture_output=True,
            text=True,
            timeout=MOUNT_TIMEOUT,
        )
        if r.returncode != 0:
            raise BenchError(f"kernel overlay mount failed: {r.stderr.strip()}")

    def stop(self) -> None:
        if not mounted(self.merged):
            return
        r = subprocess.run(
            ["umount", str(self.merged)], capture_output=True, timeout=UNMOUNT_TIMEOUT
        )
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(self.merged)], timeout=UNMOUNT_TIMEOUT)


class FuseMount(Mount):
    """A FUSE daemon started in the foreground by us, so we own exactly that process."""

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,  # the terminal's ^C goes to us; we unmount it
            )
        proc = self.proc
        if not wait_until(lambda: mounted(self.merged) or proc.poll() is not None, MOUNT_TIMEOUT):
            self.stop()
            raise BenchError(f"{self.name}: not mounted after {MOUNT_TIMEOUT:.0f} s")
        if not mounted(self.merged):
            rc = proc.wait()
            self.proc = None
            tail = self.logfile.read_text(errors="replace").strip().splitlines()[-3:]
            raise BenchError(f"{self.name} exited with {rc} before mounting: {' | '.join(tail)}")

    def stop(self) -> None:
        if mounted(self.merged):
            for _ in range(20):
                r = subprocess.run(
                    ["fusermount3", "-u", str(self.merged)],
                    capture_output=True,
                    timeout=UNMOUNT_TIMEOUT,
                )
                if r.returncode == 0 or not mounted(self.merged):
                    break
                time.sleep(0.25)  # EBUSY right after a workload: retry briefly
            else:
                log(f"{self.name}: {self.merged} busy, lazy unmount")
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(self.merged)], timeout=UNMOUNT_TIMEOUT
                )
        if self.proc is not None:
            try:
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(
                    f"{self.name}: daemon (pid {self.proc.pid}) still running after unmount; killing it"
                )
                self.proc.kill()
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            if self.proc.returncode not in (0, None) and not getattr(self, "killed", False):
                log(
                    f"{self.name}: daemon exited with status {self.proc.returncode} (log: {self.logfile})"
                )
            self.proc = None

    def kill(self) -> None:
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # the kernel aborts the connection; blocked syscalls get ENOTCONN


class FuseOverlayfsMount(FuseMount):
    name = "fuse-overlayfs"

    def command(self) -> list[str]:
        opts = f"lowerdir={self.layers.lowerdir},upperdir={self.upper},workdir={self.work}"
        return ["fuse-overlayfs", "-f", "-o", opts, str(self.merged)]


class PyunionfsMount(FuseMount):
    name = "pyunionfs"
    cmd: list[str] = []

    def command(self) -> list[str]:
        return [
            *self.cmd,
            "mount",
            "-f",
            self.layers.lowerdir,
            str(self.upper),
            str(self.work),
            str(self.merged),
        ]


def default_pyunionfs_cmd() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pyunionfs"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "unionfs"]


def availability(name: str, pyunionfs_cmd: list[str]) -> str | None:
    """None if the filesystem can be benchmarked here, else the reason why not."""
    if name == "kernel":
        if os.geteuid() != 0:
            return "needs root"
        with open("/proc/filesystems") as f:
            if "overlay" not in f.read() and subprocess.run(["modprobe", "overlay"]).returncode:
                return "overlay module not available"
        return None
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed"
    if name == "fuse-overlayfs":
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed"
    try:
        r = subprocess.run(
            [*pyunionfs_cmd, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{shlex.join(pyunionfs_cmd)}: {e}"
    if r.returncode != 0:
        last = ((r.stderr or r.stdout).strip().splitlines() or [""])[-1][-200:]
        return f"{shlex.join(pyunionfs_cmd)} --version failed: {last}"
    return None


def version_of(name: str, pyunionfs_cmd: list[str]) -> str:
    try:
        if name == "kernel":
            return platform.release()
        cmd = (
            ["fuse-overlayfs", "--version"]
            if name == "fuse-overlayfs"
            else [*pyunionfs_cmd, "--version"]
        )
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        lines = (out.stdout + out.stderr).splitlines()
        return next(
            (ln.strip() for ln in lines if "version" in ln.lower() and "fusermount" not in ln), ""
        )
    except Exception:
        return ""


# --------------------------------------------------------------------------------------------
# Workloads: each gets the merged dir and the layers, returns nothing, raises on a wrong result.


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def w_stat_tree(m: Path, layers: Layers, p: Profile) -> None:
    files = 0
    for dirpath, dirnames, filenames in os.walk(m / "tree"):
        for name in dirnames:
            os.lstat(os.path.join(dirpath, name))
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
            files += 1
    if files != layers.expected_files:
        raise BenchError(f"found {files} files, expected {layers.expected_files}")


def w_readdir(m: Path, layers: Layers, p: Profile) -> None:
    with os.scandir(m / "big") as it:
        n = sum(1 for _ in it)
    if n != p.bigdir:
        raise BenchError(f"listed {n} entries, expected {p.bigdir}")


def w_read(m: Path, layers: Layers, p: Profile) -> None:
    buf = bytearray(MIB)
    total = 0
    fd = os.open(m / "data" / "large.bin", os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    if total != p.mib * MIB:
        raise BenchError(f"read {total} bytes, expected {p.mib * MIB}")


def w_write(m: Path, layers: Layers, p: Profile) -> None:
    buf = os.urandom(MIB)
    fd = os.open(m / "written.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(p.mib):
            if os.write(fd, buf) != MIB:
                raise BenchError("short write")
    finally:
        os.close(fd)


def w_copyup(m: Path, layers: Layers, p: Profile) -> None:
    for i in range(p.copyup):
        os.close(os.open(m / "cu" / f"small-{i:04d}", os.O_WRONLY | os.O_APPEND))


def w_churn(m: Path, layers: Layers, p: Profile) -> None:
    d = m / "churn"
    for i in range(p.churn):
        os.close(os.open(d / f"tmp-{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    for i in range(p.churn):
        os.unlink(d / f"tmp-{i:05d}")


def w_tar(m: Path, layers: Layers, p: Profile) -> None:
    proc = subprocess.Popen(["tar", "cf", "-", "-C", str(m), "tree"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    while chunk := proc.stdout.read(MIB):
        total += len(chunk)
    if proc.wait() != 0:
        raise BenchError(f"tar exited with {proc.returncode}")
    if total < 512 * layers.expected_files:
        raise BenchError(f"tar wrote only {total} bytes")


def prewarm_lower(layers: Layers) -> None:
    """Read the big lower file directly, so (c) measures the filesystem, not the disk."""
    with open(layers.dirs[2] / "data" / "large.bin", "rb") as f:
        while f.read(8 * MIB):
            pass


@dataclass
class Workload:
    key: str
    label: Callable[[Profile], str]
    run: Callable[[Path, Layers, Profile], None]
    cold: bool = False  # drop caches first
    before: Callable[[Layers], None] | None = None  # untimed preparation
    after: Callable[[Path], None] | None = None  # untimed cleanup


def _after_write(m: Path) -> None:
    os.sync()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(m / "written.bin")


WORKLOADS = [
    Workload("stat_cold", lambda p: f"a. stat {p.files} files (cold)", w_stat_tree, cold=True),
    Workload("stat_warm", lambda p: f"a. stat {p.files} files (warm)", w_stat_tree),
    Workload("readdir", lambda p: f"b. readdir {p.bigdir}-entry dir", w_readdir),
    Workload("tar", lambda p: "g. tar c tree | read", w_tar),
    Workload("read", lambda p: f"c. read {p.mib} MiB sequential", w_read, before=prewarm_lower),
    Workload("write", lambda p: f"d. write {p.mib} MiB new file", w_write, after=_after_write),
    Workload("copyup", lambda p: f"e. copy-up {p.copyup} small files", w_copyup),
    Workload("churn", lambda p: f"f. create+unlink {p.churn} files", w_churn),
]


# --------------------------------------------------------------------------------------------
# Driver


@dataclass
class Result:
    runs: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.runs) if self.runs and self.error is None else None


def run_round(
    mount: Mount,
    workloads: list[Workload],
    layers: Layers,
    p: Profile,
    results: dict[str, dict[str, Result]],
    timeout: float,
    can_drop: bool,
) -> None:
    with mount:
        dead = False
        for w in workloads:
            res = results[w.key][mount.name]
            if res.error is not None:
                continue
            if dead:
                res.error = "skipped: filesystem died"
                continue
            if w.before:
                w.before(layers)
            if w.cold and can_drop:
                drop_caches()
            fired = threading.Event()

            def on_timeout(fired: threading.Event = fired, key: str = w.key) -> None:
                fired.set()
                log(f"{mount.name}: {key} exceeded {timeout:.0f} s; stopping the filesystem")
                mount.kill()

            timer = threading.Timer(timeout, on_timeout)
            timer.daemon = True
            timer.start()
            t0 = time.perf_counter()
            try:
                w.run(mount.merged, layers, p)
                elapsed = time.perf_counter() - t0
            except Exception as e:  # a wrong result, an errno, or the watchdog
                elapsed = None
                res.error = "timeout" if fired.is_set() else f"{type(e).__name__}: {e}"
                log(f"{mount.name}: {w.key}: {res.error}")
                dead = fired.is_set() or not mounted(mount.merged)
            finally:
                timer.cancel()
            if elapsed is not None:
                res.runs.append(elapsed)
            if w.after and not dead:
                try:
                    w.after(mount.merged)
                except OSError as e:
                    log(f"{mount.name}: cleanup after {w.key}: {e}")


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 0.01:
        return f"{t * 1000:.0f} ms"
    return f"{t * 1000:.1f} ms"


def cell(res: Result | None, reason: str | None) -> str:
    if reason is not None:
        return "n/a"
    if res is None:
        return "-"
    if res.error is not None:
        return (
            "timeout"
            if res.error == "timeout"
            else "skipped"
            if res.error.startswith("skip")
            else "ERR"
        )
    return fmt_time(res.median)


def ratio(a: Result | None, b: Result | None) -> str:
    if a is None or b is None or a.median is None or b.median is None or b.median <= 0:
        return "n/a"
    return f"{a.median / b.median:.1f}x"


def print_table(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
    p: Profile,
) -> None:
    headers = ["workload", *FS_NAMES, "py/kernel", "py/fuse-ovl"]
    rows = []
    for w in sorted(workloads, key=lambda w: w.label(p)[:2]):  # a..g; run order differs
        r = results[w.key]
        rows.append(
            [
                w.label(p),
                *(cell(r.get(fs), unavailable.get(fs)) for fs in FS_NAMES),
                ratio(r.get("pyunionfs"), r.get("kernel")),
                ratio(r.get("pyunionfs"), r.get("fuse-overlayfs")),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join(
        h.ljust(widths[0]) if i == 0 else h.rjust(widths[i]) for i, h in enumerate(headers)
    )
    print(line)
    print("-" * len(line))
    for row in rows:
        print(
            "  ".join(
                c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)
            )
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and 1 round: a smoke run")
    ap.add_argument(
        "-n",
        "--rounds",
        type=int,
        help="rounds per filesystem (median of N); default 3, 1 with --quick",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument(
        "--fs",
        default=",".join(FS_NAMES),
        help="comma-separated subset of: " + ", ".join(FS_NAMES),
    )
    ap.add_argument(
        "--workloads",
        help="comma-separated subset of: " + ", ".join(w.key for w in WORKLOADS),
    )
    ap.add_argument(
        "--pyunionfs", help="command that runs pyunionfs (default: .venv/bin/pyunionfs)"
    )
    ap.add_argument(
        "--dir",
        help="parent for the scratch dir (default: $TMPDIR or /tmp); needs ~3x the file size free",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds per workload before the filesystem is stopped (default 300, 60 with --quick)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    for name in ("files", "bigdir", "mib", "copyup", "churn"):
        ap.add_argument(f"--{name}", type=int, help=f"override the profile's {name}")
    args = ap.parse_args(argv)

    base = QUICK if args.quick else FULL
    p = Profile(**{k: getattr(args, k, None) or v for k, v in base.__dict__.items()})
    p.dirs = min(p.dirs, max(1, p.files // 10))
    rounds = args.rounds or p.rounds
    timeout = args.timeout or (60.0 if args.quick else 300.0)
    pycmd = shlex.split(args.pyunionfs) if args.pyunionfs else default_pyunionfs_cmd()
    PyunionfsMount.cmd = pycmd
    chosen = [f.strip() for f in args.fs.split(",") if f.strip()]
    if bad := [f for f in chosen if f not in FS_NAMES]:
        ap.error(f"unknown filesystem(s): {', '.join(bad)}")
    workloads = WORKLOADS
    if args.workloads:
        keys = [k.strip() for k in args.workloads.split(",")]
        if bad := [k for k in keys if k not in {w.key for w in WORKLOADS}]:
            ap.error(f"unknown workload(s): {', '.join(bad)}")
        workloads = [w for w in WORKLOADS if w.key in keys]

    unavailable = {fs: "not selected" for fs in FS_NAMES if fs not in chosen}
    for fs in chosen:
        if (why := availability(fs, pycmd)) is not None:
            unavailable[fs] = why
            log(f"{fs}: n/a ({why})")
    active = [fs for fs in FS_NAMES if fs not in unavailable]
    # pyunionfs is what is measured: asked for but unusable is a failure (exit 1)
    subject_missing = "pyunionfs" in chosen and "pyunionfs" in unavailable
    if not active:
        log("no filesystem to benchmark")
        return 1
    can_drop = os.geteuid() == 0
    if not can_drop:
        log("not root: caches are not dropped, 'cold' runs are warm")

    classes = {
        "kernel": KernelMount,
        "fuse-overlayfs": FuseOverlayfsMount,
        "pyunionfs": PyunionfsMount,
    }
    results: dict[str, dict[str, Result]] = {
        w.key: {fs: Result() for fs in active} for w in workloads
    }
    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-bench-", dir=args.dir)).resolve()
    current: list[Mount] = []

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    try:
        log(
            f"generating layers in {scratch} ({p.files} files, {p.bigdir}-entry dir, {p.mib} MiB file)"
        )
        t0 = time.perf_counter()
        layers = make_layers(scratch / "layers", p, whiteouts=os.geteuid() == 0)
        os.sync()
        log(
            f"layers ready in {time.perf_counter() - t0:.1f} s; {rounds} round(s) of {', '.join(active)}"
        )
        for rnd in range(rounds):
            for fs in active:
                rd = scratch / f"{fs}-{rnd}"
                upper, work, merged = rd / "upper", rd / "work", rd / "merged"
                for d in (upper, work, merged):
                    d.mkdir(parents=True)
                mount = classes[fs](layers, upper, work, merged, scratch / f"{fs}.log")
                current.append(mount)
                t0 = time.perf_counter()
                try:
                    run_round(mount, workloads, layers, p, results, timeout, can_drop)
                except BenchError as e:
                    log(str(e))
                    for w in workloads:
                        results[w.key][fs].error = results[w.key][fs].error or str(e)
                finally:
                    current.remove(mount)
                log(f"round {rnd + 1}/{rounds} {fs}: {time.perf_counter() - t0:.1f} s")
                if not mounts_below(rd):
                    shutil.rmtree(rd, ignore_errors=True)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for mount in current:
            try:
                mount.stop()
            except Exception as e:
                log(f"unmounting {mount.merged}: {e}")
        leftover = mounts_below(scratch)
        if leftover:
            log(f"still mounted, scratch dir kept: {', '.join(leftover)}")
        elif args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(
        f"pyunionfs benchmark: {rounds} round(s), median; {'quick' if args.quick else 'full'} profile; "
        f"kernel {platform.release()}; {os.cpu_count()} CPUs"
    )
    print()
    print_table(workloads, results, unavailable, p)
    for fs, why in unavailable.items():
        if why != "not selected":
            print(f"  {fs}: n/a — {why}")
    errors = [
        (w.key, fs, r.error) for w in workloads for fs, r in results[w.key].items() if r.error
    ]
    for key, fs, err in errors:
        print(f"  {fs} {key}: {err}")

    if args.json:
        data = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 1),
            "host": {
                "kernel": platform.release(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "root": os.geteuid() == 0,
            },
            "profile": {**p.__dict__, "rounds": rounds, "quick": args.quick},
            "filesystems": {
                fs: {
                    "available": fs not in unavailable,
                    "reason": unavailable.get(fs),
                    "version": version_of(fs, pycmd) if fs not in unavailable else None,
                }
                for fs in FS_NAMES
            },
            "results": {
                w.key: {
                    "label": w.label(p),
                    **{
                        fs: {"median_s": r.median, "runs_s": r.runs, "error": r.error}
                        for fs, r in results[w.key].items()
                    },
                }
                for w in workloads
            },
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if errors or subject_missing else 0


if __name__ == "__main__":
    sys.exit(main())
