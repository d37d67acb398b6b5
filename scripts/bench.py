#!/usr/bin/env python3
"""Benchmark pyunionfs against the kernel's overlayfs and fuse-overlayfs (issue 7).

Main layers, generated once (top first): a "change layer" the kernel wrote (a kernel overlay
mount over the two copies below with an empty upper, a few hundred changes: whiteouts, an opaque
directory, copied-up and chmod'ed files, new files), a copy of this Python's stdlib and a copy of
/usr/include (~16 000 entries), a 1 GiB file, a big/ directory of 30 000 entries over the three
layers. Every workload runs on a fresh mount (fresh upper/work); the filesystems are interleaved
per workload (round r: kernel, fuse-overlayfs, pyunionfs for workload w, then w+1, ...):

  mount_ready   time from starting the mount command until it shows in /proc/self/mountinfo and a
                stat inside succeeds (FUSE daemons in the foreground, -f)
  mount_bg      wall time of the daemonizing command (no -f) until it returns
  find_cold     find MERGED after drop_caches          find_warm   find again, same mount
  lsR_cold      ls -lR MERGED after drop_caches        stat_warm   os.walk + lstat, warmed up
  imports       a fresh python3 -I -S -B importing ~30 stdlib modules from MERGED
  readdir_big   os.scandir of the 30 000-entry merged directory
  read_cold     read the 1 GiB lower file (1 MiB reads) after drop_caches
  read_warm     read it again after an untimed read (the lower file prewarmed outside)
  write         write a new 1 GiB file (1 MiB writes) + fsync
  copyup_big    open the 1 GiB lower file O_APPEND, write 1 byte (a full copy-up)
  append_small  20 000 O_APPEND writes of 100 bytes through one fd
  append_8      200 000 O_APPEND writes of 8 bytes to a new file through one fd (issue 9). Each
                is two FUSE requests for pyunionfs, getxattr(security.capability) and write;
                one for fuse-overlayfs, which runs with the writeback cache (the getxattr)
  untar         tar xf of ~7 000 small files into MERGED/new
  rm_rf         rm -rf of the stdlib copy (~8 000 entries)
  chmod_R       chmod -R g+w of a lower tree of a few thousand entries (copy-up of each)
  mv_dir        mv MERGED/big MERGED/big-moved (the mv command) of a directory of 1 000 files of
                4 KiB that is in one lower only (its own layer: the only lower of this
                workload's mounts); issue 10. The kernel and pyunionfs run with
                -o redirect_dir=on (rename in place, trusted.overlay.redirect); fuse-overlayfs has
                no redirects: rename(2) is EXDEV and mv copies + deletes. Also reported: the bytes
                written to UPPER (st_blocks*512 of UPPER and all below, after the mv and a sync,
                minus before) and the entries under UPPER; MERGED/big-moved must list 1 000
                names and MERGED/big be gone
  chown_r       chown -R 1234:1234 MERGED/tree (the chown command) of a tree of 1 MiB files of
                random data, 16 per directory, 256 MiB in all (--chown-mib; 8 MiB with --quick),
                in a layer of its own built once per run (the only lower of these mounts); issue
                10. The kernel and pyunionfs run with -o metacopy=on (a copy of the metadata
                only; it implies redirect_dir=on); fuse-overlayfs has no metacopy and copies the
                data. Reported like mv_dir: the bytes written to UPPER and the entries under it.
                Every entry under MERGED/tree must show 1234:1234 afterwards, a sample of files
                the lower's size and sha256, and the lower must be unchanged
  chown_r_full  the same with -o metacopy=off for the kernel and pyunionfs (a full copy-up of
                every file, as fuse-overlayfs)

Then "layers": N = 1, 16, 128, 500 lowers sharing a common/ directory of the same 100 names:
mount_ready, ls -l common/ on a cold mount, lookup of 100 present and 50 missing names. And "rss":
the FUSE daemons' VmRSS after mount, after lstat of every entry of /usr, and after
drop_caches (the kernel forgets the inodes).

Tables: medians of N rounds, ratios py/fuse-overlayfs and py/kernel, a target per row (pass or
FAIL; a miss is not an error), the append workloads' operations per second, and the bytes and
entries in UPPER of mv_dir and chown_r[_full] (with the same ratios). A filesystem that is
unavailable shows n/a; a failure or timeout shows ERR/timeout and the script exits 1 (also if
pyunionfs was asked for but is unavailable).

  scripts/bench.py [--quick] [-n N] [--json FILE] [--fs kernel,fuse-overlayfs,pyunionfs]
                   [--workloads KEY,...|layers|rss] [--chown-mib N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fnmatch
import hashlib
import json
import os
import platform
import select
import shlex
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KIB = 1 << 10
MIB = 1 << 20
FS_NAMES = ("kernel", "fuse-overlayfs", "pyunionfs")
FUSE_NAMES = ("fuse-overlayfs", "pyunionfs")
MOUNT_TIMEOUT = 30.0
UNMOUNT_TIMEOUT = 15.0
PAGE = 4096  # the kernel copies mount(2) options into one page
STARTUP_TARGET_S = 0.15  # pyunionfs mount_ready, main layers
LAYERS_RATIO_TARGET = 2.0  # pyunionfs N=128 / N=1
LAYERS_MOUNT_TARGET_S = 1.0  # pyunionfs mount_ready with 500 lowers
RSS_KIB_PER_INODE_TARGET = 0.5
RSS_BACK_FRACTION = 0.2  # after drop_caches: at most base + 20% of the growth
MV_FILES = 1000  # mv_dir: files in the moved directory
MV_FILE_SIZE = 4 * KIB  # ... of this size each
MV_OPTIONS = "redirect_dir=on"  # mv_dir: extra options of the kernel and pyunionfs mounts
CHOWN_OWNER = 1234  # chown_r: the new uid and gid
CHOWN_PER_DIR = 16  # chown_r: files of 1 MiB per directory of the tree
CHOWN_SAMPLE = 8  # chown_r: files whose content is compared with the lower's afterwards
CHOWN_OPTIONS = "metacopy=on"  # chown_r: extra options of the kernel and pyunionfs mounts
CHOWN_FULL_OPTIONS = "metacopy=off"  # chown_r_full: the same, without metacopy
IMPORTS = (
    "json", "email.parser", "email.message", "email.policy", "http.client", "http.cookies",
    "asyncio", "argparse", "logging", "logging.handlers", "unittest", "unittest.mock",
    "xml.dom.minidom", "xml.etree.ElementTree", "urllib.request", "urllib.parse", "csv",
    "decimal", "fractions", "statistics", "datetime", "calendar", "textwrap", "difflib",
    "pathlib", "tempfile", "shutil", "subprocess", "concurrent.futures", "dataclasses",
    "typing", "inspect", "pprint", "configparser", "tarfile", "zipfile", "gzip",
    "html.parser", "string", "uuid", "pickle", "random",
)  # fmt: skip


@dataclass
class Profile:
    mib: int  # size of the big lower file, and of the written file
    bigdir: int  # entries of big/, over the three layers
    untar_files: int  # files in the tar that untar extracts
    untar_dirs: int  # ... in this many directories
    appends: int  # append_small: writes of 100 bytes
    appends_8: int  # append_8: writes of 8 bytes
    chmod_entries: int  # chmod_R: about this many entries (the closest /usr/include subtree)
    chown_mib: int  # chown_r: MiB of the tree (files of 1 MiB)
    layer_counts: list[int]  # "layers": numbers of lowers
    rss_usr: bool  # "rss": /usr as the lower (else the main layers)
    rounds: int  # default N
    stdlib_exclude: tuple[str, ...] = ()  # top-level stdlib entries not copied (fnmatch)
    include_limit: int | None = None  # at most this many entries of /usr/include (None: all)


ALWAYS_EXCLUDED = ("site-packages", "dist-packages")
FULL = Profile(
    mib=1024,
    bigdir=30000,
    untar_files=7000,
    untar_dirs=50,
    appends=20000,
    appends_8=200000,
    chmod_entries=3000,
    chown_mib=256,
    layer_counts=[1, 16, 128, 500],
    rss_usr=True,
    rounds=3,
)
QUICK = Profile(
    mib=32,
    bigdir=3000,
    untar_files=1000,
    untar_dirs=10,
    appends=5000,
    appends_8=20000,
    chmod_entries=300,
    chown_mib=8,
    layer_counts=[1, 16],
    rss_usr=False,
    rounds=1,
    stdlib_exclude=(
        "test",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "config-*",
        "pydoc_data",
    ),  # fmt: skip
    include_limit=1500,
)


class BenchError(Exception):
    pass


class Unavailable(BenchError):
    """This filesystem can't do this here (e.g. the kernel and 500 lowers): n/a, not an error."""


class MountFailed(BenchError):
    """The mount command refused (for the kernel in the layers section: n/a with the reason)."""


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Small helpers


def count_entries(path: Path) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(path):
        n += len(dirnames) + len(filenames)
    return n


def walk_lstat(path: Path) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames:
            os.lstat(os.path.join(dirpath, name))
        for name in filenames:
            os.lstat(os.path.join(dirpath, name))
        n += len(dirnames) + len(filenames)
    return n


def spread(items: list[str], n: int, offset: int) -> list[str]:
    """n items evenly spread over the list; offsets 0, 1, 2 give disjoint picks."""
    if not items or n <= 0:
        return []
    step = max(3, len(items) // n)
    return items[offset::step][:n]


def drop_caches(what: str = "3") -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write(what + "\n")
        return True
    except OSError:
        return False


def read_file(path: Path) -> int:
    buf = bytearray(MIB)
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return total


def run_cmd(cmd: list[str], timeout: float, what: str, cwd: Path | None = None) -> None:
    try:
        r = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no result after {timeout:.0f} s") from None
    if r.returncode != 0:
        err = r.stderr.decode(errors="replace").strip().splitlines()
        first = f": {err[0][:200]}" if err else ""
        more = f" (+{len(err) - 1} more lines)" if len(err) > 1 else ""
        raise BenchError(f"{what} exited with {r.returncode}{first}{more}")


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


# --------------------------------------------------------------------------------------------
# Processes: the daemonizing forms leave a grandchild; as a child subreaper it becomes ours.

SUBREAPER = False


def become_subreaper() -> None:
    global SUBREAPER
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        SUBREAPER = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        SUBREAPER = False


def proc_info(pid: int) -> tuple[int, list[str]] | None:
    """(ppid, argv) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    fields = st[st.rindex(b")") + 2 :].split()
    if fields and fields[0] == b"Z":
        return None  # a zombie is gone for our purposes
    return int(fields[1]), argv


def processes_with_arg(arg: str, ppid: int | None = None) -> list[int]:
    pids = []
    for ent in os.listdir("/proc"):
        if not ent.isdigit() or int(ent) == os.getpid():
            continue
        info = proc_info(int(ent))
        if info and arg in info[1] and (ppid is None or info[0] == ppid):
            pids.append(int(ent))
    return pids


def reap(pid: int) -> bool:
    """True once pid has exited (and, if it is our child, been reaped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    except ChildProcessError:
        pass
    return proc_info(pid) is None


# --------------------------------------------------------------------------------------------
# Mounts


def _escape_mount_path(path: Path) -> str:
    s = str(path).replace("\\", "\\134").replace(" ", "\\040").replace("\t", "\\011")
    return s.replace("\n", "\\012")


def mounted(path: Path) -> bool:
    want = _escape_mount_path(path)
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


def wait_in_mountinfo(path: Path, timeout: float, alive: Callable[[], bool]) -> bool:
    """Wait until path is a mount point in /proc/self/mountinfo; woken by the kernel's poll
    event on every change of the mount table, so the time is exact to a few microseconds."""
    want = _escape_mount_path(path).encode()
    end = time.monotonic() + timeout
    with open("/proc/self/mountinfo", "rb", buffering=0) as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            chunks = []
            while chunk := f.read(65536):
                chunks.append(chunk)
            for line in b"".join(chunks).split(b"\n"):
                fields = line.split(b" ", 5)
                if len(fields) > 4 and fields[4] == want:
                    return True
            left = end - time.monotonic()
            if left <= 0 or not alive():
                return False
            poller.poll(min(left, 0.02) * 1000)


class Mount:
    """One mounted filesystem; subclasses know how to start and stop it."""

    name = "?"

    def __init__(
        self,
        lowerdir: str,
        upper: Path,
        work: Path,
        merged: Path,
        logfile: Path,
        probe: Path | None = None,
        cwd: Path | None = None,
        extra_options: str = "",
    ) -> None:
        self.lowerdir, self.upper, self.work, self.merged = lowerdir, upper, work, merged
        self.extra_options = extra_options  # a workload's own -o options (e.g. redirect_dir=on)
        self.logfile = logfile
        self.probe = probe or merged  # stat'ed to call the mount ready
        self.cwd = cwd  # relative lowerdir paths are relative to this
        self.proc: subprocess.Popen[bytes] | None = None
        self.bg_pid: int | None = None
        self.ready_s: float | None = None
        self.killed = False

    @property
    def options(self) -> str:
        extra = f",{self.extra_options}" if self.extra_options else ""
        return f"lowerdir={self.lowerdir},upperdir={self.upper},workdir={self.work}{extra}"

    def start(self) -> None:
        raise NotImplementedError

    def start_background(self) -> float:
        """Mount with the command that returns once mounted; its wall time."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """Emergency stop from the watchdog: make blocked syscalls on the mount return."""

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.bg_pid

    def _probe(self, t0: float) -> None:
        try:
            os.stat(self.probe)
        except OSError as e:
            raise BenchError(f"{self.name}: mounted, but stat {self.probe}: {e.strerror}") from None
        self.ready_s = time.perf_counter() - t0


class KernelMount(Mount):
    name = "kernel"

    def _mount(self) -> None:
        if len(self.options) >= PAGE:
            raise Unavailable(
                f"the option string is {len(self.options)} bytes; mount(2) takes one page ({PAGE})"
            )
        try:
            r = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", self.options, str(self.merged)],
                capture_output=True,
                text=True,
                timeout=MOUNT_TIMEOUT,
                cwd=self.cwd,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"kernel: mount did not return in {MOUNT_TIMEOUT:.0f} s") from None
        if r.returncode != 0:
            msg = " ".join(r.stderr.split())[:300]
            raise MountFailed(f"kernel overlay mount failed: {msg}")

    def start(self) -> None:
        t0 = time.perf_counter()
        self._mount()
        if not wait_in_mountinfo(self.merged, MOUNT_TIMEOUT, lambda: True):
            raise BenchError("kernel: mount returned 0 but the mount point is not in mountinfo")
        self._probe(t0)

    def start_background(self) -> float:
        t0 = time.perf_counter()
        self._mount()
        return time.perf_counter() - t0

    def stop(self) -> None:
        if not mounted(self.merged):
            return
        r = subprocess.run(
            ["umount", str(self.merged)], capture_output=True, timeout=UNMOUNT_TIMEOUT
        )
        if r.returncode != 0:
            log(f"kernel: umount {self.merged} failed; lazy unmount")
            subprocess.run(["umount", "-l", str(self.merged)], timeout=UNMOUNT_TIMEOUT)


class FuseMount(Mount):
    """A FUSE daemon: in the foreground under our Popen (start), or daemonized by its own
    command (start_background), whose daemon is found as our (subreaped) child."""

    def command(self, foreground: bool) -> list[str]:
        raise NotImplementedError

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in lines[-3:])

    def start(self) -> None:
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(foreground=True),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=self.cwd,
                start_new_session=True,  # the terminal's ^C goes to us; we unmount it
            )
        proc = self.proc
        if not wait_in_mountinfo(self.merged, MOUNT_TIMEOUT, lambda: proc.poll() is None):
            if proc.poll() is not None:
                rc = proc.wait()
                self.proc = None
                raise BenchError(
                    f"{self.name} exited with {rc} before mounting: {self._log_tail()}"
                )
            self.stop()
            raise BenchError(f"{self.name}: not mounted after {MOUNT_TIMEOUT:.0f} s")
        with watchdog(self, "mount", MOUNT_TIMEOUT):  # a daemon that never answers
            self._probe(t0)

    def start_background(self) -> float:
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as logf:
            try:
                r = subprocess.run(
                    self.command(foreground=False),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    cwd=self.cwd,
                    timeout=MOUNT_TIMEOUT,
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired:
                self._find_daemon()
                self.stop()
                raise BenchError(
                    f"{self.name}: the mount command did not return in {MOUNT_TIMEOUT:.0f} s"
                ) from None
        elapsed = time.perf_counter() - t0
        self._find_daemon()
        if r.returncode != 0 or not mounted(self.merged):
            self.stop()
            raise BenchError(
                f"{self.name}: background mount exited with {r.returncode}"
                f"{'' if mounted(self.merged) else ', not mounted'}: {self._log_tail()}"
            )
        if self.bg_pid is None:
            log(f"{self.name}: mounted, but its daemon was not found (no subreaper?)")
        return elapsed

    def _find_daemon(self) -> None:
        """The daemon the background command left: it has our unique MERGED in its argv and,
        as we are a child subreaper, us as its parent. Only such a process is ever killed."""
        for _ in range(20):
            pids = processes_with_arg(str(self.merged), os.getpid() if SUBREAPER else None)
            if pids:
                self.bg_pid = pids[0]
                return
            time.sleep(0.01)

    def _ours(self, pid: int) -> bool:
        info = proc_info(pid)
        return (
            info is not None
            and str(self.merged) in info[1]
            and (not SUBREAPER or info[0] == os.getpid())
        )

    def _unmount(self) -> None:
        if not mounted(self.merged):
            return
        for _ in range(20):
            r = subprocess.run(
                ["fusermount3", "-u", str(self.merged)],
                capture_output=True,
                timeout=UNMOUNT_TIMEOUT,
            )
            if r.returncode == 0 or not mounted(self.merged):
                return
            time.sleep(0.25)  # EBUSY right after a workload: retry briefly
        log(f"{self.name}: {self.merged} busy, lazy unmount")
        subprocess.run(["fusermount3", "-u", "-z", str(self.merged)], timeout=UNMOUNT_TIMEOUT)

    def stop(self) -> None:
        self._unmount()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(
                    f"{self.name}: daemon (pid {self.proc.pid}) still running after unmount; killing it"
                )
                self.proc.kill()
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            if self.proc.returncode not in (0, None) and not self.killed:
                log(
                    f"{self.name}: daemon exited with status {self.proc.returncode} (log: {self.logfile})"
                )
            self.proc = None
        if self.bg_pid is not None:
            pid, merged = self.bg_pid, str(self.merged)

            def gone() -> bool:
                return reap(pid) and not processes_with_arg(merged)

            if not wait_until(gone, UNMOUNT_TIMEOUT, 0.01):
                if self._ours(pid):
                    log(f"{self.name}: daemon (pid {pid}) still running after unmount; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    wait_until(lambda: reap(pid), UNMOUNT_TIMEOUT, 0.01)
                else:
                    log(f"{self.name}: a process still has {merged} in its command line")
            self.bg_pid = None

    def kill(self) -> None:
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # the kernel aborts the connection; blocked syscalls get ENOTCONN
        elif self.bg_pid is not None and self._ours(self.bg_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.bg_pid, signal.SIGKILL)


class FuseOverlayfsMount(FuseMount):
    name = "fuse-overlayfs"

    def command(self, foreground: bool) -> list[str]:
        return [
            "fuse-overlayfs",
            *(["-f"] if foreground else []),
            "-o",
            self.options,
            str(self.merged),
        ]


class PyunionfsMount(FuseMount):
    name = "pyunionfs"
    cmd: list[str] = []

    def command(self, foreground: bool) -> list[str]:
        return [
            *self.cmd,
            "mount",
            *(["-f"] if foreground else []),
            *(["-o", self.extra_options] if self.extra_options else []),
            self.lowerdir,
            str(self.upper),
            str(self.work),
            str(self.merged),
        ]


MOUNT_CLASSES: dict[str, type[Mount]] = {
    "kernel": KernelMount,
    "fuse-overlayfs": FuseOverlayfsMount,
    "pyunionfs": PyunionfsMount,
}


@contextlib.contextmanager
def watchdog(mount: Mount, what: str, timeout: float) -> Iterator[threading.Event]:
    """Stop the filesystem if the block takes longer than timeout (a request never answered)."""
    fired = threading.Event()

    def on_timeout() -> None:
        fired.set()
        log(f"{mount.name}: {what} exceeded {timeout:.0f} s; stopping the filesystem")
        mount.kill()

    timer = threading.Timer(timeout, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def default_pyunionfs_cmd() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pyunionfs"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "unionfs"]


def kernel_overlay_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read() and subprocess.run(["modprobe", "overlay"]).returncode:
            return "overlay module not available"
    return None


def availability(name: str, pyunionfs_cmd: list[str]) -> str | None:
    """None if the filesystem can be benchmarked here, else the reason why not."""
    if name == "kernel":
        return kernel_overlay_problem()
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "this user may not open /dev/fuse"
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
# Main layers


@dataclass
class MainLayers:
    root: Path
    dirs: list[Path]  # top first, as lowerdir= wants them
    stdlib: str  # the stdlib copy: MERGED/<stdlib>
    stdlib_src: Path
    dynload: str  # the real lib-dynload (C extensions are imported from there)
    include: str  # the /usr/include copy: MERGED/<include>
    large: str  # the big lower file
    tarball: Path  # for untar, outside the layers
    untar_last: str  # a file the tar extracts (checked)
    chmod_target: str
    big_expected: int  # visible entries of big/
    mv_layer: Path  # mv_dir's own (only) lower: big/ with MV_FILES files
    # chown_r's own (only) lower: tree/dNN/fNN of 1 MiB each (None: not built, not selected)
    chown_layer: Path | None = None
    chown_files: list[str] = field(default_factory=list)  # the files, relative to the layer
    entries: int | None = None  # visible entries of the merged tree (None: not counted)
    stdlib_entries: int = 0  # ... under <stdlib>
    chmod_entries: int = 0  # ... under chmod_target
    changes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lowerdir(self) -> str:
        return ":".join(str(d).replace(":", "\\:") for d in self.dirs)


def _top_entries(src: Path, exclude: tuple[str, ...], limit: int | None) -> list[str]:
    names = sorted(
        n for n in os.listdir(src) if not any(fnmatch.fnmatch(n, pat) for pat in exclude)
    )
    if limit is None:
        return names
    chosen, total = [], 0
    for n in names:
        size = 1 + (count_entries(src / n) if (src / n).is_dir() else 0)
        if total + size <= limit:
            chosen.append(n)
            total += size
    return chosen


def copy_tree(src: Path, dst: Path, exclude: tuple[str, ...], limit: int | None) -> None:
    """cp -a of src's top-level entries (less the excluded) into dst, with src's own metadata."""
    dst.mkdir()
    entries = _top_entries(src, exclude, limit)
    if entries:
        run_cmd(["cp", "-a", "-t", str(dst), *(str(src / n) for n in entries)], 600, "cp -a")
    shutil.copystat(src, dst)
    with contextlib.suppress(OSError):
        st = os.stat(src)
        os.chown(dst, st.st_uid, st.st_gid)


def write_large(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        for i in range(0, mib, 4):
            f.write(block[: min(4, mib - i) * MIB])
        f.flush()
        os.fsync(f.fileno())


def make_tarball(scratch: Path, p: Profile) -> tuple[Path, str]:
    src = scratch / "untar-src"
    blob = os.urandom(8192)
    last = ""
    dirs = [f"t{d // 10:02d}/d{d:03d}" for d in range(p.untar_dirs)]
    for d in dirs:
        (src / d).mkdir(parents=True)
    for i in range(p.untar_files):
        rel = f"{dirs[i % len(dirs)]}/f{i:05d}"
        (src / rel).write_bytes(blob[: 200 + (i * 733) % 3900])
        last = rel
    tarball = scratch / "untar.tar"
    run_cmd(["tar", "cf", str(tarball), "-C", str(src), "."], 300, "tar cf")
    shutil.rmtree(src)
    return tarball, last


def make_mv_layer(layer: Path) -> Path:
    """mv_dir's lower: big/ holding MV_FILES files of MV_FILE_SIZE bytes (a layer of its own, so
    that big/ is in no other layer)."""
    (layer / "big").mkdir(parents=True)
    blob = os.urandom(MV_FILE_SIZE + MV_FILES)
    for i in range(MV_FILES):
        (layer / "big" / f"f{i:04d}").write_bytes(blob[i : i + MV_FILE_SIZE])
    return layer


def make_chown_layer(layer: Path, mib: int) -> list[str]:
    """chown_r's lower: tree/ holding mib files of 1 MiB of random data (none alike, so that
    nothing dedups or compresses them), CHOWN_PER_DIR per directory; returns their paths."""
    files = []
    for i in range(mib):
        rel = f"tree/d{i // CHOWN_PER_DIR:03d}/f{i % CHOWN_PER_DIR:02d}"
        (layer / rel).parent.mkdir(parents=True, exist_ok=True)
        (layer / rel).write_bytes(os.urandom(MIB))
        files.append(rel)
    return files


class KernelChanges:
    """The change layer's edits, made through a kernel overlay mount (the kernel writes it)."""

    def __init__(self, merged: Path) -> None:
        self.m = merged
        self.skipped: dict[str, int] = {}

    def delete(self, rel: str) -> None:
        os.unlink(self.m / rel)

    def replace_dir(self, rel: str) -> None:
        shutil.rmtree(self.m / rel)
        os.mkdir(self.m / rel)
        (self.m / rel / "replaced.txt").write_text("rm -rf and mkdir again\n")

    def append(self, rel: str) -> None:
        with open(self.m / rel, "ab") as f:
            f.write(b"\n/* appended by the change layer */\n")

    def chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.m / rel, mode)

    def touch(self, rel: str) -> None:
        os.utime(self.m / rel)

    def mkdir(self, rel: str) -> None:
        os.mkdir(self.m / rel)

    def create(self, rel: str, data: bytes) -> None:
        (self.m / rel).write_bytes(data)


class HandChanges(KernelChanges):
    """The same edits written directly into the top layer, as the kernel would have. Without
    root there are no 0/0 whiteouts and no trusted.overlay.opaque: those edits are skipped."""

    def __init__(self, top: Path, lowers: list[Path]) -> None:
        super().__init__(top)
        self.lowers = lowers
        self.root = os.geteuid() == 0

    def _skip(self, what: str) -> bool:
        if self.root:
            return False
        self.skipped[what] = self.skipped.get(what, 0) + 1
        return True

    def _lower(self, rel: str) -> Path:
        for layer in self.lowers:
            if os.path.lexists(layer / rel):
                return layer / rel
        raise FileNotFoundError(rel)

    def _parents(self, rel: str) -> None:
        parts = Path(rel).parts[:-1]
        for i in range(1, len(parts) + 1):
            sub = Path(*parts[:i])
            if not (self.m / sub).exists():
                os.mkdir(self.m / sub)
                with contextlib.suppress(FileNotFoundError):
                    self._copy_meta(self._lower(str(sub)), self.m / sub)

    def _copy_meta(self, src: Path, dst: Path) -> None:
        shutil.copystat(src, dst, follow_symlinks=False)
        if self.root:
            st = os.lstat(src)
            os.lchown(dst, st.st_uid, st.st_gid)

    def _copy_up(self, rel: str) -> None:
        self._parents(rel)
        if not os.path.lexists(self.m / rel):
            src = self._lower(rel)
            shutil.copy2(src, self.m / rel, follow_symlinks=False)
            self._copy_meta(src, self.m / rel)

    def delete(self, rel: str) -> None:
        if not self._skip("whiteouts"):
            self._parents(rel)
            os.mknod(self.m / rel, stat.S_IFCHR, os.makedev(0, 0))

    def replace_dir(self, rel: str) -> None:
        self._parents(rel)
        os.mkdir(self.m / rel)
        self._copy_meta(self._lower(rel), self.m / rel)
        if not self._skip("opaque marks"):
            os.setxattr(self.m / rel, "trusted.overlay.opaque", b"y")
        (self.m / rel / "replaced.txt").write_text("rm -rf and mkdir again\n")

    def append(self, rel: str) -> None:
        self._copy_up(rel)
        super().append(rel)

    def chmod(self, rel: str, mode: int) -> None:
        self._copy_up(rel)
        super().chmod(rel, mode)

    def touch(self, rel: str) -> None:
        self._copy_up(rel)
        super().touch(rel)

    def mkdir(self, rel: str) -> None:
        self._parents(rel)
        super().mkdir(rel)

    def create(self, rel: str, data: bytes) -> None:
        self._parents(rel)
        super().create(rel, data)


def _files_under(layer: Path, rel: str) -> list[str]:
    out = []
    for dirpath, _dirnames, filenames in os.walk(layer / rel):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(full).st_mode):
                out.append(os.path.relpath(full, layer))
    return sorted(out)


def apply_changes(ch: KernelChanges, py: Path, inc: Path, layers: MainLayers, p: Profile) -> bool:
    """A few hundred edits of a realistic image layer; returns whether whiteouts were made."""
    S, I = layers.stdlib, layers.include  # noqa: E741
    subdirs = sorted(
        (count_entries(inc / I / d), d)
        for d in os.listdir(inc / I)
        if (inc / I / d).is_dir() and not (inc / I / d).is_symlink()
        and f"{I}/{d}" != layers.chmod_target
    )  # fmt: skip
    replaced = [f"{I}/{d}" for n, d in subdirs if n >= 3][:2]
    if (py / S / "test" / "test_email").is_dir():
        replaced.append(f"{S}/test/test_email")
    for rel in replaced:
        ch.replace_dir(rel)

    def keep(rel: str) -> bool:
        return not any(rel.startswith(r + "/") for r in replaced) and not rel.startswith(
            layers.chmod_target + "/"
        )

    inc_files = [f for f in _files_under(inc, I) if keep(f)]
    stdlib_files = _files_under(py, S)
    opt2 = [f for f in stdlib_files if f.endswith(".opt-2.pyc")]
    tests = [f for f in stdlib_files if f.startswith(f"{S}/test/") and keep(f)]
    for rel in spread(opt2, 50, 0) + spread(inc_files, 50, 0) + spread(tests, 30, 0):
        ch.delete(rel)
    for rel in spread(inc_files, 50, 1) + spread(tests, 30, 1):
        ch.append(rel)
    for i, rel in enumerate(spread(inc_files, 50, 2)):
        ch.chmod(rel, 0o600 if i % 2 else 0o755)
    for i in range(50):
        ch.create(f"{S}/bench-new-{i:03d}.txt", b"new in the change layer\n" * (i + 1))
    kept_dirs = [f"{I}/{d}" for _n, d in subdirs if f"{I}/{d}" not in replaced][:10]
    for i in range(40):
        target = kept_dirs[i % len(kept_dirs)] if kept_dirs else I
        ch.create(f"{target}/bench-new-{i:03d}.h", b"#define BENCH_NEW 1\n")
    ch.mkdir(f"{I}/bench-new-dir")
    for i in range(10):
        ch.create(f"{I}/bench-new-dir/n{i}.h", b"/* new */\n")
    # big/: the top layer's third, a few whiteouts, a few names copied up
    for j in range(0, p.bigdir, 3):
        ch.create(f"big/entry-{j:05d}", b"")
    whiteouts = not isinstance(ch, HandChanges) or ch.root
    for k in range(100, 105):
        ch.delete(f"big/entry-{1 + 3 * k:05d}")
    for k in range(200, 205):
        ch.touch(f"big/entry-{1 + 3 * k:05d}")
    return whiteouts


def layer_census(top: Path) -> dict[str, int]:
    c = {"whiteouts": 0, "opaque_dirs": 0, "dirs": 0, "files": 0}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            c["dirs"] += 1
            with contextlib.suppress(OSError):
                if os.getxattr(os.path.join(dirpath, name), "trusted.overlay.opaque") == b"y":
                    c["opaque_dirs"] += 1
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                c["whiteouts"] += 1
            else:
                c["files"] += 1
    return c


def stdlib_source() -> tuple[Path, str]:
    src = Path(sysconfig.get_paths()["stdlib"]).resolve()
    dyn = next((p for p in sys.path if p.endswith("lib-dynload")), None)
    dyn = dyn or str(sysconfig.get_config_var("DESTSHARED") or src / "lib-dynload")
    return src, dyn


def make_main_layers(
    scratch: Path, p: Profile, by_hand: bool = False, chown: bool = False
) -> MainLayers:
    root = scratch / "L"
    ch, py, inc = root / "ch", root / "py", root / "inc"
    for d in (ch, py, inc):
        d.mkdir(parents=True)
    src, dynload = stdlib_source()
    include_src = Path("/usr/include")
    notes: list[str] = []
    copy_tree(src, py / src.name, ALWAYS_EXCLUDED + p.stdlib_exclude, None)
    if include_src.is_dir():
        copy_tree(include_src, inc / "include", (), p.include_limit)
    else:
        (inc / "include").mkdir()
        notes.append("no /usr/include here: its copy is empty")
    # big/ in the two copies' layers: j % 3 == 1 in py, 2 in inc (0 comes with the change layer);
    # the first five of inc's names are in py too
    (py / "big").mkdir()
    (inc / "big").mkdir()
    for j in range(p.bigdir):
        if j % 3:
            ((py if j % 3 == 1 else inc) / "big" / f"entry-{j:05d}").touch()
    for j in range(2, 15, 3):
        (py / "big" / f"entry-{j:05d}").touch()
    large = "data/large.bin"
    write_large(inc / large, p.mib)
    tarball, untar_last = make_tarball(scratch, p)
    mv_layer = make_mv_layer(root / "mv")
    # chmod_R: the /usr/include subtree closest to the wanted size
    sizes = sorted(
        (abs(count_entries(inc / "include" / d) + 1 - p.chmod_entries), d)
        for d in os.listdir(inc / "include")
        if (inc / "include" / d).is_dir() and not (inc / "include" / d).is_symlink()
    )
    chmod_target = f"include/{sizes[0][1]}" if sizes else f"{src.name}/encodings"
    layers = MainLayers(
        root=root,
        dirs=[ch, py, inc],
        stdlib=src.name,
        stdlib_src=src,
        dynload=dynload,
        include="include",
        large=large,
        tarball=tarball,
        untar_last=untar_last,
        chmod_target=chmod_target,
        big_expected=p.bigdir,
        mv_layer=mv_layer,
        notes=notes,
    )
    if chown:  # only when a chown_r workload runs: p.chown_mib MiB to write
        layers.chown_layer = root / "chown"
        layers.chown_files = make_chown_layer(layers.chown_layer, p.chown_mib)
    build_change_layer(layers, p, by_hand)
    os.sync()
    return layers


def build_change_layer(layers: MainLayers, p: Profile, by_hand: bool) -> None:
    ch, py, inc = layers.dirs
    why = "not asked for (--change-layer=hand)" if by_hand else kernel_overlay_problem()
    if why is None:
        work, merged = layers.root / "chwork", layers.root / "chmerged"
        work.mkdir()
        merged.mkdir()
        km = KernelMount(f"{py}:{inc}", ch, work, merged, layers.root / "chmount.log")
        km.start()
        try:
            whiteouts = apply_changes(KernelChanges(merged), py, inc, layers, p)
            layers.entries = count_entries(merged)
            layers.stdlib_entries = count_entries(merged / layers.stdlib)
            layers.chmod_entries = count_entries(merged / layers.chmod_target)
            layers.notes.append("change layer written by the kernel (overlay mount, empty upper)")
        finally:
            km.stop()
        shutil.rmtree(work)
        merged.rmdir()
    else:
        hand = HandChanges(ch, [py, inc])
        whiteouts = apply_changes(hand, py, inc, layers, p)
        layers.stdlib_entries = count_entries(py / layers.stdlib)
        layers.chmod_entries = count_entries(inc / layers.chmod_target)
        note = f"change layer written by hand (kernel overlay: {why})"
        if hand.skipped:
            note += "; skipped (need root): " + ", ".join(
                f"{n} {what}" for what, n in hand.skipped.items()
            )
        layers.notes.append(note)
        log(note)
    if whiteouts:
        layers.big_expected = p.bigdir - 5
    layers.changes = layer_census(ch)


# --------------------------------------------------------------------------------------------
# Main workloads: run on a fresh mount; raise BenchError on a wrong result.


@dataclass
class Ctx:
    m: Path  # the merged dir
    layers: MainLayers
    p: Profile
    timeout: float
    upper: Path
    figures: dict[str, float] = field(default_factory=dict)  # a run's measured figures, not times
    before: tuple[int, int] = (0, 0)  # upper_usage before the timed part (mv_dir)


def w_find(c: Ctx) -> None:
    run_cmd(["find", str(c.m)], c.timeout, "find")


def w_ls_r(c: Ctx) -> None:
    run_cmd(["ls", "-lR", str(c.m)], c.timeout, "ls -lR")


def w_stat(c: Ctx) -> None:
    n = walk_lstat(c.m)
    if c.layers.entries is not None and n != c.layers.entries:
        raise BenchError(f"found {n} entries, expected {c.layers.entries}")


# Modules imported at start-up, and frozen ones (os, stat, importlib.util, ...), keep their
# origin; every other pure-Python module must come from MERGED.
IMPORT_CODE = """
import sys
m, dyn = sys.argv[1], sys.argv[2]
before = set(sys.modules)
sys.path[:] = [m, dyn]
for name in sys.argv[3:]:
    __import__(name)
import json
assert json.__file__.startswith(m + "/"), json.__file__
bad = [k for k, v in sys.modules.items()
       if k not in before and getattr(getattr(v, "__spec__", None), "origin", "") != "frozen"
       and (getattr(v, "__file__", None) or "").endswith(".py")
       and not v.__file__.startswith(m + "/")]
if bad:
    sys.exit(f"imported from outside {m}: {bad[:5]}")
"""


def w_imports(c: Ctx) -> None:
    run_cmd(
        [
            sys.executable, "-I", "-S", "-B", "-c", IMPORT_CODE,
            str(c.m / c.layers.stdlib), c.layers.dynload, *IMPORTS,
        ],
        c.timeout,
        "python3 -c 'import ...'",
    )  # fmt: skip


def w_readdir_big(c: Ctx) -> None:
    with os.scandir(c.m / "big") as it:
        n = sum(1 for _ in it)
    if n != c.layers.big_expected:
        raise BenchError(f"listed {n} entries, expected {c.layers.big_expected}")


def w_read(c: Ctx) -> None:
    total = read_file(c.m / c.layers.large)
    if total != c.p.mib * MIB:
        raise BenchError(f"read {total} bytes, expected {c.p.mib * MIB}")


def prewarm_lower(c: Ctx) -> None:
    """Read the big lower file directly, so a warm run measures the filesystem, not the disk."""
    read_file(c.layers.dirs[2] / c.layers.large)


def prep_read_warm(c: Ctx) -> None:
    prewarm_lower(c)
    w_read(c)


def w_write(c: Ctx) -> None:
    buf = os.urandom(MIB)
    fd = os.open(c.m / "written.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(c.p.mib):
            if os.write(fd, buf) != MIB:
                raise BenchError("short write")
        os.fsync(fd)
    finally:
        os.close(fd)


def w_copyup_big(c: Ctx) -> None:
    fd = os.open(c.m / c.layers.large, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def check_copyup_big(c: Ctx) -> None:
    size = os.stat(c.m / c.layers.large).st_size
    if size != c.p.mib * MIB + 1:
        raise BenchError(f"size after the append is {size}, expected {c.p.mib * MIB + 1}")
    if os.stat(c.layers.dirs[2] / c.layers.large).st_size != c.p.mib * MIB:
        raise BenchError("the lower file changed")


def w_append_small(c: Ctx) -> None:
    rec = b"a" * 99 + b"\n"
    fd = os.open(c.m / "appended.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    try:
        for _ in range(c.p.appends):
            os.write(fd, rec)
    finally:
        os.close(fd)


def check_append_small(c: Ctx) -> None:
    size = os.stat(c.m / "appended.log").st_size
    if size != 100 * c.p.appends:
        raise BenchError(f"size {size}, expected {100 * c.p.appends}")


APPEND_8 = b"1234567\n"


def w_append_8(c: Ctx) -> None:
    write, rec = os.write, APPEND_8
    fd = os.open(c.m / "appended8.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
    try:
        for _ in range(c.p.appends_8):
            write(fd, rec)
    finally:
        os.close(fd)


def check_append_8(c: Ctx) -> None:
    size = os.stat(c.m / "appended8.log").st_size
    if size != len(APPEND_8) * c.p.appends_8:
        raise BenchError(f"size {size}, expected {len(APPEND_8) * c.p.appends_8}")


def prep_untar(c: Ctx) -> None:
    os.mkdir(c.m / "new")


def w_untar(c: Ctx) -> None:
    run_cmd(["tar", "xf", str(c.layers.tarball), "-C", str(c.m / "new")], c.timeout, "tar xf")


def check_untar(c: Ctx) -> None:
    if not (c.m / "new" / c.layers.untar_last).is_file():
        raise BenchError(f"new/{c.layers.untar_last} missing after tar xf")


def w_rm_rf(c: Ctx) -> None:
    run_cmd(["rm", "-rf", str(c.m / c.layers.stdlib)], c.timeout, "rm -rf")


def check_rm_rf(c: Ctx) -> None:
    if os.path.lexists(c.m / c.layers.stdlib):
        raise BenchError(f"{c.layers.stdlib} still there after rm -rf")


def w_chmod_r(c: Ctx) -> None:
    run_cmd(["chmod", "-R", "g+w", str(c.m / c.layers.chmod_target)], c.timeout, "chmod -R")


def check_chmod_r(c: Ctx) -> None:
    if not os.lstat(c.m / c.layers.chmod_target).st_mode & stat.S_IWGRP:
        raise BenchError("mode unchanged after chmod -R")


def upper_usage(upper: Path) -> tuple[int, int]:
    """(st_blocks * 512 of UPPER and everything below it, number of entries below it)."""
    used, n = os.lstat(upper).st_blocks * 512, 0
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in dirnames + filenames:
            used += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            n += 1
    return used, n


def mv_lowers(layers: MainLayers) -> tuple[str, str]:
    return str(layers.mv_layer).replace(":", "\\:"), "big"


def prep_mv_dir(c: Ctx) -> None:
    for name in os.listdir(c.layers.mv_layer / "big"):  # a warm lower, read directly
        read_file(c.layers.mv_layer / "big" / name)
    os.sync()
    c.before = upper_usage(c.upper)


def w_mv_dir(c: Ctx) -> None:
    run_cmd(["mv", str(c.m / "big"), str(c.m / "big-moved")], c.timeout, "mv")


def check_mv_dir(c: Ctx) -> None:
    if os.path.lexists(c.m / "big"):
        raise BenchError("MERGED/big still there after mv")
    n = len(os.listdir(c.m / "big-moved"))
    if n != MV_FILES:
        raise BenchError(f"MERGED/big-moved lists {n} entries after mv, expected {MV_FILES}")
    if len(os.listdir(c.layers.mv_layer / "big")) != MV_FILES:
        raise BenchError("the lower big/ changed")
    os.sync()  # delayed allocation: the copied files' blocks are counted once written
    used, entries = upper_usage(c.upper)
    c.figures["upper_bytes"] = used - c.before[0]
    c.figures["upper_entries"] = entries


def chown_lowers(layers: MainLayers) -> tuple[str, str]:
    assert layers.chown_layer is not None
    return str(layers.chown_layer).replace(":", "\\:"), "tree"


def sha256_of(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(MIB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def prep_chown_r(c: Ctx) -> None:
    assert c.layers.chown_layer is not None
    for rel in c.layers.chown_files:  # a warm lower, read directly (the copy-ups read it)
        read_file(c.layers.chown_layer / rel)
    os.sync()
    c.before = upper_usage(c.upper)


def w_chown_r(c: Ctx) -> None:
    owner = f"{CHOWN_OWNER}:{CHOWN_OWNER}"
    run_cmd(["chown", "-R", owner, str(c.m / "tree")], c.timeout, "chown -R")


def check_chown_r(c: Ctx) -> None:
    """UPPER is measured first (nothing read through MERGED yet), then every entry's owner, a
    sample of files' size and sha256 against the lower's, and the lower's owners."""
    lower, files = c.layers.chown_layer, c.layers.chown_files
    assert lower is not None
    os.sync()  # delayed allocation: the copied files' blocks are counted once written
    used, entries = upper_usage(c.upper)
    c.figures["upper_bytes"] = used - c.before[0]
    c.figures["upper_entries"] = entries
    wrong, n = [], 0
    for dirpath, _dirnames, filenames in os.walk(c.m / "tree"):
        for name in ["", *filenames]:  # every directory once, as its walk's dirpath
            path = os.path.join(dirpath, name) if name else dirpath
            st = os.lstat(path)
            n += 1
            if (st.st_uid, st.st_gid) != (CHOWN_OWNER, CHOWN_OWNER):
                wrong.append(f"{path} {st.st_uid}:{st.st_gid}")
    want = 1 + len({os.path.dirname(f) for f in files}) + len(files)
    if n != want:
        raise BenchError(f"MERGED/tree holds {n} entries after chown -R, expected {want}")
    if wrong:
        raise BenchError(f"{len(wrong)} entries not {CHOWN_OWNER}:{CHOWN_OWNER}: {wrong[0]}")
    step = max(1, len(files) // CHOWN_SAMPLE)
    for rel in [*files[::step][: CHOWN_SAMPLE - 1], files[-1]]:
        size = os.stat(c.m / rel).st_size
        if size != MIB:
            raise BenchError(f"MERGED/{rel}: size {size} after chown -R, expected {MIB}")
        if sha256_of(c.m / rel) != sha256_of(lower / rel):
            raise BenchError(f"MERGED/{rel}: content differs from the lower's after chown -R")
    for rel in ["tree", *files[::step]]:
        if os.lstat(lower / rel).st_uid == CHOWN_OWNER:
            raise BenchError(f"the lower's {rel} was chowned")


@dataclass
class Target:
    kind: str  # "ratio": pyunionfs / fuse-overlayfs ≤ value; "abs": pyunionfs ≤ value seconds
    value: float

    def text(self) -> str:
        if self.kind == "abs":
            return f"py <= {self.value:.2f} s"
        return f"py/fo <= {self.value:.1f}"


@dataclass
class Workload:
    key: str
    desc: Callable[[MainLayers, Profile], str]
    run: Callable[[Ctx], None] | None  # timed; None: the mount itself is what is timed
    target: Target | None = None
    cold: bool = False  # drop caches just before the timed part
    prepare: Callable[[Ctx], None] | None = None  # untimed, on the same mount, before
    check: Callable[[Ctx], None] | None = None  # untimed verification, after
    extra: Callable[[float, Profile], dict[str, float]] | None = None  # derived figures
    # (lowerdir, probe) of this workload's mounts instead of the main layers' (its own layer)
    lowers: Callable[[MainLayers], tuple[str, str]] | None = None
    options: str = ""  # extra -o options of its kernel and pyunionfs mounts (not fuse-overlayfs)


def _ents(n: int | None) -> str:
    return f"{n / 1000:.1f}k entries" if n else "the tree"


def _ratio_t(v: float) -> Target:
    return Target("ratio", v)


def _per_s(count: Callable[[Profile], int]) -> Callable[[float, Profile], dict[str, float]]:
    """extra: operations per second of the run."""
    return lambda t, p: {"ops_per_s": round(count(p) / t)} if t > 0 else {}


WORKLOADS = [
    Workload(
        "mount_ready",
        lambda L, p: f"mount (-f) until in mountinfo and stat MERGED/{L.stdlib} works",
        None,
        Target("abs", STARTUP_TARGET_S),
    ),
    Workload("mount_bg", lambda L, p: "daemonizing mount command, until it returns", None),
    Workload("find_cold", lambda L, p: f"find MERGED ({_ents(L.entries)}), after drop_caches",
             w_find, _ratio_t(1.0), cold=True),
    Workload("find_warm", lambda L, p: "find MERGED again, same mount", w_find, _ratio_t(0.5),
             prepare=w_find),
    Workload("lsR_cold", lambda L, p: "ls -lR MERGED, after drop_caches", w_ls_r, _ratio_t(1.0),
             cold=True),
    Workload("stat_warm", lambda L, p: "os.walk + lstat of every entry, after a warm-up pass",
             w_stat, _ratio_t(0.5), prepare=w_stat),
    Workload("imports", lambda L, p: f"python3 -I -S -B: import {len(IMPORTS)} stdlib modules "
             f"from MERGED/{L.stdlib}", w_imports, _ratio_t(1.0)),
    Workload("readdir_big", lambda L, p: f"os.scandir of big/ ({L.big_expected} entries, 3 layers)",
             w_readdir_big, _ratio_t(1.0)),
    Workload("read_cold", lambda L, p: f"read the {p.mib} MiB lower file, after drop_caches",
             w_read, _ratio_t(1.2), cold=True),
    Workload("read_warm", lambda L, p: f"read the {p.mib} MiB lower file again, same mount",
             w_read, _ratio_t(1.2), prepare=prep_read_warm),
    Workload("write", lambda L, p: f"write a new {p.mib} MiB file (1 MiB writes) + fsync",
             w_write, _ratio_t(1.2)),
    Workload("copyup_big", lambda L, p: f"O_APPEND 1 byte to the {p.mib} MiB lower file "
             "(copy-up; lower prewarmed)", w_copyup_big, _ratio_t(1.0), prepare=prewarm_lower,
             check=check_copyup_big),
    Workload("append_small", lambda L, p: f"{p.appends} O_APPEND writes of 100 bytes, one fd",
             w_append_small, _ratio_t(1.0), check=check_append_small,
             extra=_per_s(lambda p: p.appends)),
    Workload("append_8", lambda L, p: f"{p.appends_8} O_APPEND writes of 8 bytes to a new file, "
             "one fd", w_append_8, _ratio_t(1.0), check=check_append_8,
             extra=_per_s(lambda p: p.appends_8)),
    Workload("untar", lambda L, p: f"tar xf of {p.untar_files} small files "
             f"({p.untar_dirs} dirs) into MERGED/new", w_untar, _ratio_t(1.0), prepare=prep_untar,
             check=check_untar),
    Workload("rm_rf", lambda L, p: f"rm -rf MERGED/{L.stdlib} ({_ents(L.stdlib_entries)})",
             w_rm_rf, _ratio_t(0.5), check=check_rm_rf),
    Workload("chmod_R", lambda L, p: f"chmod -R g+w MERGED/{L.chmod_target} "
             f"({_ents(L.chmod_entries)}, copy-up of each)", w_chmod_r, _ratio_t(1.0),
             check=check_chmod_r),
    Workload("mv_dir", lambda L, p: f"mv MERGED/big MERGED/big-moved ({MV_FILES} files of "
             f"{MV_FILE_SIZE // KIB} KiB, one lower only); kernel, pyunionfs: -o {MV_OPTIONS}, "
             "fuse-overlayfs: EXDEV, mv copies + deletes", w_mv_dir, prepare=prep_mv_dir,
             check=check_mv_dir, lowers=mv_lowers, options=MV_OPTIONS),
    Workload("chown_r", lambda L, p: f"chown -R {CHOWN_OWNER}:{CHOWN_OWNER} MERGED/tree "
             f"({p.chown_mib} files of 1 MiB, {CHOWN_PER_DIR} per dir, one lower only); kernel, "
             f"pyunionfs: -o {CHOWN_OPTIONS}, fuse-overlayfs: copies the data", w_chown_r,
             prepare=prep_chown_r, check=check_chown_r, lowers=chown_lowers,
             options=CHOWN_OPTIONS),
    Workload("chown_r_full", lambda L, p: f"the same as chown_r with -o {CHOWN_FULL_OPTIONS} "
             "(kernel, pyunionfs: a full copy-up of every file)", w_chown_r,
             prepare=prep_chown_r, check=check_chown_r, lowers=chown_lowers,
             options=CHOWN_FULL_OPTIONS),
]  # fmt: skip
CHOWN_KEYS = ("chown_r", "chown_r_full")  # the workloads that need MainLayers.chown_layer
# The figures that workloads measure besides the time (Ctx.figures): label, unit
FIGURES = {
    "upper_bytes": ("bytes written to UPPER", "bytes"),
    "upper_entries": ("entries in UPPER", ""),
}
SECTION_KEYS = ("layers", "rss")


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    runs: list[float] = field(default_factory=list)
    error: str | None = None
    na: str | None = None  # not possible here (reason); not an error
    figures: list[dict[str, float]] = field(default_factory=list)  # per run (Ctx.figures)

    @property
    def median(self) -> float | None:
        if not self.runs or self.error is not None or self.na is not None:
            return None
        return statistics.median(self.runs)

    def figure(self, key: str) -> float | None:
        """The median of a measured figure over the runs (None: failed, or not measured)."""
        values = [f[key] for f in self.figures if key in f]
        if not values or self.median is None:
            return None
        return statistics.median(values)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "median_s": self.median,
            "runs_s": self.runs,
            "error": self.error,
            "na": self.na,
        }
        if self.figures:
            out.update({k: self.figure(k) for k in FIGURES if any(k in f for f in self.figures)})
            out["figures_runs"] = self.figures
        return out


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
    if res.na is not None:
        return "n/a"
    if res.error is not None:
        return "timeout" if res.error == "timeout" else "ERR"
    return fmt_time(res.median)


def ratio_of(a: Result | None, b: Result | None) -> float | None:
    if a is None or b is None or a.median is None or b.median is None or b.median <= 0:
        return None
    return a.median / b.median


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def mark(ok: bool | None) -> str:
    return "-" if ok is None else "pass" if ok else "FAIL"


def print_rows(headers: list[str], rows: list[list[str]], left: int = 1) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()

    line = fmt(headers)
    print(line)
    print("-" * len(line))
    for row in rows:
        print(fmt(row))


# --------------------------------------------------------------------------------------------
# Driver


class Bench:
    def __init__(
        self,
        scratch: Path,
        p: Profile,
        rounds: int,
        timeout: float,
        active: list[str],
        can_drop: bool,
    ) -> None:
        self.scratch, self.p, self.rounds, self.timeout = scratch, p, rounds, timeout
        self.active, self.can_drop = active, can_drop
        self.current: list[Mount] = []
        self.cache_cold = True  # caches dropped since the lowers were last read
        self.n = 0
        (scratch / "logs").mkdir()

    def fresh(
        self,
        fs: str,
        lowerdir: str,
        probe: str | None = None,
        cwd: Path | None = None,
        options: str = "",
    ) -> Mount:
        self.n += 1
        rd = self.scratch / "run" / f"{self.n:04d}-{fs}"
        upper, work, merged = rd / "upper", rd / "work", rd / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        return MOUNT_CLASSES[fs](
            lowerdir,
            upper,
            work,
            merged,
            self.scratch / "logs" / f"{fs}.log",
            probe=merged / probe if probe else None,
            cwd=cwd,
            extra_options=options,
        )

    @contextlib.contextmanager
    def mounted(self, mount: Mount, background: bool = False) -> Iterator[float]:
        """Mount (timed: mount_ready, or the background command's wall time), yield the time,
        unmount and remove the run dir."""
        self.current.append(mount)
        try:
            if background:
                t = mount.start_background()
            else:
                mount.start()
                assert mount.ready_s is not None
                t = mount.ready_s
            yield t
        finally:
            try:
                mount.stop()
            finally:
                self.current.remove(mount)
            rd = mount.merged.parent
            if not mounts_below(rd) and not mounted(mount.merged):
                shutil.rmtree(rd, ignore_errors=True)

    def stop_all(self) -> None:
        for mount in list(self.current):
            try:
                mount.stop()
            except Exception as e:
                log(f"unmounting {mount.merged}: {e}")

    def timed(self, mount: Mount, what: str, fn: Callable[[], None]) -> float:
        with watchdog(mount, what, self.timeout) as fired:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:
                if fired.is_set():
                    raise BenchError("timeout") from None
                if isinstance(e, BenchError):
                    raise
                raise BenchError(f"{type(e).__name__}: {e}") from None
            return time.perf_counter() - t0

    # ---- main workloads

    def run_main(
        self, layers: MainLayers, workloads: list[Workload]
    ) -> dict[str, dict[str, Result]]:
        results = {w.key: {fs: Result() for fs in self.active} for w in workloads}
        probe = layers.stdlib
        for fs in self.active:  # untimed warm-up: the daemons' code in the page cache
            try:
                with self.mounted(self.fresh(fs, layers.lowerdir, probe)):
                    pass
            except BenchError as e:
                log(f"{fs}: warm-up mount: {e}")
                for w in workloads:  # reported once per workload, not tried again
                    results[w.key][fs].error = f"cannot mount: {e}"
        for rnd in range(self.rounds):
            t_round = time.perf_counter()
            for w in workloads:
                for fs in self.active:
                    res = results[w.key][fs]
                    if res.error is not None:
                        continue  # failed in an earlier round: not again
                    try:
                        t, figures = self.run_one(fs, w, layers)
                        res.runs.append(t)
                        if figures:
                            res.figures.append(figures)
                    except BenchError as e:
                        res.error = str(e)
                        log(f"{fs}: {w.key}: {e}")
                times = ", ".join(
                    f"{fs} {fmt_time(r.runs[-1]) if r.error is None and r.runs else 'ERR'}"
                    for fs, r in results[w.key].items()
                )
                log(f"round {rnd + 1} {w.key}: {times}")
            log(f"round {rnd + 1}/{self.rounds}: {time.perf_counter() - t_round:.1f} s")
        return results

    def run_one(self, fs: str, w: Workload, layers: MainLayers) -> tuple[float, dict[str, float]]:
        """The time of one run, and the figures it measured (Ctx.figures)."""
        lowerdir, probe = w.lowers(layers) if w.lowers else (layers.lowerdir, layers.stdlib)
        options = w.options if fs in ("kernel", "pyunionfs") else ""
        mount = self.fresh(fs, lowerdir, probe, options=options)
        with self.mounted(mount, background=w.key == "mount_bg") as t_mount:
            if w.run is None:
                return t_mount, {}
            c = Ctx(mount.merged, layers, self.p, self.timeout, mount.upper)
            prepare = w.prepare
            if not w.cold and w.lowers is None:
                self.warm_lowers(layers)
            if prepare is not None:
                self.timed(mount, f"{w.key} (preparation)", lambda: prepare(c))
            os.sync()
            if w.cold and self.can_drop:
                drop_caches()
                self.cache_cold = True
            run = w.run
            t = self.timed(mount, w.key, lambda: run(c))
            check = w.check
            if check is not None:
                self.timed(mount, f"{w.key} (check)", lambda: check(c))
            return t, c.figures

    def warm_lowers(self, layers: MainLayers) -> None:
        """After a drop_caches, read the layers' metadata and small files (and the tarball)
        directly, so that the first filesystem of a warm workload (the kernel) does not pay the
        disk reads that the others then profit from. The big file is prewarmed where wanted."""
        if not self.cache_cold:
            return
        large = {str(layers.dirs[2] / layers.large)}
        for layer in layers.dirs:
            for dirpath, _dirnames, filenames in os.walk(layer):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    if stat.S_ISREG(os.lstat(full).st_mode) and full not in large:
                        read_file(Path(full))
        read_file(layers.tarball)
        self.cache_cold = False

    # ---- layer scaling

    def make_scaling_layers(self) -> Path:
        base = self.scratch / "S"
        names = [f"c{i:03d}" for i in range(100)]
        for k in range(1, max(self.p.layer_counts) + 1):
            (base / str(k) / "common").mkdir(parents=True)
            for n in names:
                (base / str(k) / "common" / n).write_bytes(b"%d\n" % k)
            (base / str(k) / f"only-{k}").write_bytes(b"")
        os.sync()
        return base

    def run_layers(self) -> dict[str, dict[str, dict[int, Result]]]:
        measures = ("mount_ready", "ls", "lookup")
        res = {
            m: {fs: {n: Result() for n in self.p.layer_counts} for fs in self.active}
            for m in measures
        }
        t0 = time.perf_counter()
        base = self.make_scaling_layers()
        log(
            f"scaling layers ({max(self.p.layer_counts)} lowers) ready in {time.perf_counter() - t0:.1f} s"
        )
        for rnd in range(self.rounds):
            t_round = time.perf_counter()
            for n in self.p.layer_counts:
                lowerdir = ":".join(str(k) for k in range(1, n + 1))  # relative to base
                for fs in self.active:
                    for measure in measures:
                        r = res[measure][fs][n]
                        if r.error is not None or r.na is not None:
                            continue
                        try:
                            r.runs.append(self.run_layer_one(fs, measure, n, lowerdir, base))
                        except Unavailable as e:
                            r.na = str(e)
                            log(f"{fs}: layers N={n} {measure}: n/a ({e})")
                        except MountFailed as e:
                            if fs != "kernel":
                                r.error = str(e)
                                continue
                            for m in measures:  # e.g. a kernel that takes fewer lowers
                                res[m][fs][n].na = str(e)
                            log(f"{fs}: layers N={n}: n/a ({e})")
                            break
                        except BenchError as e:
                            r.error = str(e)
                            log(f"{fs}: layers N={n} {measure}: {e}")
            log(f"layers round {rnd + 1}/{self.rounds}: {time.perf_counter() - t_round:.1f} s")
        return res

    def run_layer_one(self, fs: str, measure: str, n: int, lowerdir: str, base: Path) -> float:
        mount = self.fresh(fs, lowerdir, "common" if measure == "mount_ready" else None, cwd=base)
        with self.mounted(mount) as t_mount:
            m = mount.merged
            if measure == "mount_ready":

                def check_root() -> None:
                    if len(os.listdir(m)) != n + 1:
                        raise BenchError(f"{len(os.listdir(m))} names in MERGED, expected {n + 1}")

                self.timed(mount, "layers check", check_root)
                return t_mount
            if measure == "ls":
                return self.timed(
                    mount,
                    "ls -l",
                    lambda: run_cmd(["ls", "-l", str(m / "common")], self.timeout, "ls -l"),
                )

            def lookups() -> None:
                for i in range(100):
                    os.stat(m / "common" / f"c{i:03d}")
                for i in range(50):
                    try:
                        os.stat(m / "common" / f"missing-{i:02d}")
                    except FileNotFoundError:
                        continue
                    raise BenchError(f"common/missing-{i:02d} exists")

            return self.timed(mount, "lookup", lookups)

    # ---- daemon RSS

    def run_rss(self, layers: MainLayers | None) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.p.rss_usr:
            lowerdir, tree = "/usr", "/usr (one lower)"
        else:
            assert layers is not None
            lowerdir, tree = layers.lowerdir, "the main layers (3 lowers)"
        for fs in self.active:
            if fs not in FUSE_NAMES:
                continue
            r: dict[str, Any] = {"tree": tree, "error": None}
            out[fs] = r
            try:
                self.rss_one(fs, lowerdir, r)
            except (BenchError, OSError) as e:
                r["error"] = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                log(f"{fs}: rss: {r['error']}")
        return out

    def rss_one(self, fs: str, lowerdir: str, r: dict[str, Any]) -> None:
        mount = self.fresh(fs, lowerdir)
        with self.mounted(mount):
            pid = mount.pid()
            assert pid is not None
            r["rss_mount_kib"] = base = vm_rss_kib(pid)
            entries = 0

            def walk() -> None:
                nonlocal entries
                entries = walk_lstat(mount.merged)

            r["stat_s"] = round(self.timed(mount, "rss: lstat of every entry", walk), 3)
            r["entries"] = entries
            r["rss_stat_kib"] = peak = vm_rss_kib(pid)
            r["kib_per_inode"] = round((peak - base) / entries, 3) if entries else None
            r["rss_drop_kib"] = r["back_near_base"] = None
            if self.can_drop:
                drop_caches("2")
                r["rss_drop_kib"] = dropped = self.settled_rss(pid)
                r["back_near_base"] = dropped - base <= RSS_BACK_FRACTION * max(peak - base, 0)
        kpi, back = r["kib_per_inode"], r["back_near_base"]
        r["pass"] = (
            None
            if fs != "pyunionfs" or kpi is None
            else kpi <= RSS_KIB_PER_INODE_TARGET and back is not False
        )

    @staticmethod
    def settled_rss(pid: int) -> int:
        """VmRSS once the FORGETs after drop_caches have been handled: stable for 1 s (max 15 s)."""
        last, stable_since = vm_rss_kib(pid), time.monotonic()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            time.sleep(0.2)
            now = vm_rss_kib(pid)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 1.0:
                break
        return last


# --------------------------------------------------------------------------------------------
# Reports


def main_rows(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    rows, summary = [], {}
    for w in workloads:
        r = results[w.key]
        py, fo, kern = r.get("pyunionfs"), r.get("fuse-overlayfs"), r.get("kernel")
        py_fo, py_k = ratio_of(py, fo), ratio_of(py, kern)
        ok: bool | None = None
        if w.target is not None and w.target.kind == "ratio" and py_fo is not None:
            ok = py_fo <= w.target.value
        elif (
            w.target is not None
            and w.target.kind == "abs"
            and py is not None
            and py.median is not None
        ):
            ok = py.median <= w.target.value
        rows.append(
            [
                w.key,
                *(cell(r.get(fs), unavailable.get(fs)) for fs in FS_NAMES),
                fmt_ratio(py_fo),
                fmt_ratio(py_k),
                w.target.text() if w.target else "-",
                mark(ok),
            ]
        )
        summary[w.key] = {"py_fo": py_fo, "py_kernel": py_k, "pass": ok}
    return rows, summary


def rate_rows(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
    p: Profile,
) -> list[list[str]]:
    """Operations per second (of the median run) for the workloads that count them."""
    rows = []
    for w in workloads:
        if w.extra is None:
            continue
        row = [w.key]
        for fs in FS_NAMES:
            r = results[w.key].get(fs)
            rate = w.extra(r.median, p).get("ops_per_s") if r and r.median else None
            row.append(cell(r, unavailable.get(fs)) if rate is None else f"{rate:,.0f}/s")
        rows.append(row)
    return rows


def fmt_figure(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if FIGURES.get(key, ("", ""))[1] != "bytes":
        return f"{v:,.0f}"
    if abs(v) >= MIB:
        return f"{v / MIB:.1f} MiB"
    return f"{v / KIB:.0f} KiB" if abs(v) >= KIB else f"{v:.0f} B"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def figure_rows(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    """The figures workloads measured besides the time (medians), with py/fo and py/kernel."""
    rows: list[list[str]] = []
    summary: dict[str, dict[str, Any]] = {}
    for w in workloads:
        r = results[w.key]
        for key, (label, _unit) in FIGURES.items():
            vals = {fs: (r[fs].figure(key) if fs in r else None) for fs in FS_NAMES}
            if all(v is None for v in vals.values()):
                continue
            py_fo, py_k = (_div(vals["pyunionfs"], vals[o]) for o in ("fuse-overlayfs", "kernel"))
            cells = [
                fmt_figure(key, vals[fs])
                if vals[fs] is not None
                else cell(r.get(fs), unavailable.get(fs))
                for fs in FS_NAMES
            ]
            rows.append([f"{w.key}: {label}", *cells, fmt_ratio(py_fo), fmt_ratio(py_k)])
            summary.setdefault(w.key, {}).update({f"{key}_py_fo": py_fo, f"{key}_py_kernel": py_k})
    return rows, summary


def layer_rows(
    res: dict[str, dict[str, dict[int, Result]]], counts: list[int], unavailable: dict[str, str]
) -> tuple[list[list[str]], dict[str, Any]]:
    rows, summary = [], {}
    for measure, by_fs in res.items():
        for fs in FS_NAMES:
            if fs not in by_fs:
                continue
            cells = by_fs[fs]
            r128 = ratio_of(cells.get(128), cells.get(1))
            target, ok = "-", None
            if fs == "pyunionfs":
                target = f"128/1 <= {LAYERS_RATIO_TARGET:.1f}"
                oks = [] if r128 is None else [r128 <= LAYERS_RATIO_TARGET]
                if measure == "mount_ready" and 500 in cells:
                    target += f", N=500 < {LAYERS_MOUNT_TARGET_S:.0f} s"
                    m500 = cells[500].median
                    oks += [] if m500 is None else [m500 < LAYERS_MOUNT_TARGET_S]
                ok = all(oks) if oks else None
                summary[measure] = {"ratio_128_1": r128, "pass": ok}
            rows.append(
                [
                    measure,
                    fs,
                    *(cell(cells.get(n), unavailable.get(fs)) for n in counts),
                    fmt_ratio(r128),
                    target,
                    mark(ok),
                ]
            )
    return rows, summary


def rss_rows(rss: dict[str, dict[str, Any]]) -> list[list[str]]:
    def mib(k: Any) -> str:
        return "-" if k is None else f"{k / KIB:.1f} MiB"

    rows = []
    for fs, r in rss.items():
        if r.get("error"):
            rows.append([fs, "ERR", "", "", "", "", "", r["error"][:60]])
            continue
        kpi, back = r.get("kib_per_inode"), r.get("back_near_base")
        rows.append(
            [
                fs,
                str(r.get("entries", "-")),
                mib(r.get("rss_mount_kib")),
                mib(r.get("rss_stat_kib")),
                mib(r.get("rss_drop_kib")),
                "-" if kpi is None else f"{kpi:.2f}",
                "-" if back is None else "yes" if back else "no",
                mark(r.get("pass")),
            ]
        )
    return rows


def print_errors(errors: list[tuple[str, str, str]]) -> None:
    """The first error of each filesystem in full, the others by name only."""
    seen: dict[str, list[str]] = {}
    for fs, where, msg in errors:
        if fs not in seen:
            print(f"  error: {fs} {where}: {msg}")
            seen[fs] = []
        else:
            seen[fs].append(where)
    for fs, more in seen.items():
        if more:
            print(
                f"  error: {fs} also failed in: {', '.join(more)} (messages in the log and --json)"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and 1 round: a smoke run")
    ap.add_argument(
        "-n", "--rounds", type=int, help="rounds (median of N); default 3, 1 with --quick"
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument(
        "--fs", default=",".join(FS_NAMES), help="comma-separated subset of: " + ", ".join(FS_NAMES)
    )
    keys = [w.key for w in WORKLOADS] + list(SECTION_KEYS)
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(keys))
    ap.add_argument(
        "--pyunionfs", help="command that runs pyunionfs (default: .venv/bin/pyunionfs)"
    )
    ap.add_argument(
        "--dir",
        help="parent for the scratch dir (default: $TMPDIR or /tmp); needs ~4x the file size free",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds per workload before the filesystem is stopped (default 300, 60 with --quick)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument(
        "--change-layer",
        choices=("auto", "hand"),
        default="auto",
        help="auto: the kernel writes the top layer when it can (root); hand: written directly",
    )
    ap.add_argument("--mib", type=int, help="size of the big file in MiB")
    ap.add_argument("--bigdir", type=int, help="entries of big/")
    ap.add_argument("--untar-files", type=int, help="files in the untar tarball")
    ap.add_argument("--appends", type=int, help="append_small: number of writes")
    ap.add_argument("--appends-8", type=int, help="append_8: number of writes")
    ap.add_argument(
        "--chown-mib", type=int, help="chown_r: MiB of the tree, in files of 1 MiB (default 256)"
    )
    ap.add_argument("--layer-counts", help="comma-separated numbers of lowers (max 500)")
    args = ap.parse_args(argv)

    p = Profile(**(QUICK if args.quick else FULL).__dict__)
    for name in ("mib", "bigdir", "untar_files", "appends", "appends_8", "chown_mib"):
        if getattr(args, name):
            setattr(p, name, getattr(args, name))
    if args.layer_counts:
        try:
            p.layer_counts = sorted({int(x) for x in args.layer_counts.split(",") if x.strip()})
        except ValueError:
            ap.error("--layer-counts: comma-separated integers")
        if not p.layer_counts or min(p.layer_counts) < 1 or max(p.layer_counts) > 500:
            ap.error("--layer-counts: between 1 and 500")
    p.bigdir = max(p.bigdir, 700)  # the change layer's whiteouts in big/ need that many
    rounds = args.rounds or p.rounds
    timeout = args.timeout or (60.0 if args.quick else 300.0)
    pycmd = shlex.split(args.pyunionfs) if args.pyunionfs else default_pyunionfs_cmd()
    PyunionfsMount.cmd = pycmd
    chosen = [f.strip() for f in args.fs.split(",") if f.strip()]
    if bad := [f for f in chosen if f not in FS_NAMES]:
        ap.error(f"unknown filesystem(s): {', '.join(bad)}")
    selected = set(keys)
    if args.workloads:
        selected = {k.strip() for k in args.workloads.split(",") if k.strip()}
        if bad := sorted(selected - set(keys)):
            ap.error(f"unknown workload(s): {', '.join(bad)}")
    workloads = [w for w in WORKLOADS if w.key in selected]

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
    become_subreaper()

    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-bench-", dir=args.dir)).resolve()
    bench = Bench(scratch, p, rounds, timeout, active, can_drop)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    layers: MainLayers | None = None
    results: dict[str, dict[str, Result]] = {}
    scaling: dict[str, dict[str, dict[int, Result]]] = {}
    rss: dict[str, dict[str, Any]] = {}
    fatal: str | None = None
    try:
        need_main = bool(workloads) or ("rss" in selected and not p.rss_usr)
        if need_main:
            log(
                f"generating the main layers in {scratch} ({p.mib} MiB file, {p.bigdir}-entry big/)"
            )
            t0 = time.perf_counter()
            chown = any(w.key in CHOWN_KEYS for w in workloads)
            if chown:
                log(f"and chown_r's layer ({p.chown_mib} files of 1 MiB)")
            by_hand = args.change_layer == "hand"
            layers = make_main_layers(scratch, p, by_hand=by_hand, chown=chown)
            log(
                f"main layers ready in {time.perf_counter() - t0:.1f} s: {_ents(layers.entries)}, "
                f"change layer {layers.changes}; {rounds} round(s) of {', '.join(active)}"
            )
        if workloads:
            assert layers is not None
            results = bench.run_main(layers, workloads)
        if "layers" in selected:
            scaling = bench.run_layers()
        if "rss" in selected:
            rss = bench.run_rss(layers)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, OSError) as e:
        fatal = f"{type(e).__name__}: {e}" if not isinstance(e, BenchError) else str(e)
        log(f"error: {fatal}")
    finally:
        bench.stop_all()
        leftover = mounts_below(scratch)
        if leftover:
            log(f"still mounted, scratch dir kept: {', '.join(leftover)}")
        elif args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    duration = time.time() - started
    print()
    print(
        f"pyunionfs benchmark: {rounds} round(s), median; {'quick' if args.quick else 'full'} profile; "
        f"kernel {platform.release()}; {os.cpu_count()} CPUs; {duration:.0f} s"
    )
    errors: list[tuple[str, str, str]] = [("bench", "setup", fatal)] if fatal else []
    main_summary: dict[str, dict[str, Any]] = {}
    if results and layers is not None:
        print()
        rows, main_summary = main_rows(workloads, results, unavailable)
        print_rows(["workload", *FS_NAMES, "py/fo", "py/kernel", "target", "ok"], rows)
        if rates := rate_rows(workloads, results, unavailable, p):
            print()
            print_rows(["ops per second", *FS_NAMES], rates)
        figs, fig_summary = figure_rows(workloads, results, unavailable)
        if figs:
            print()
            print_rows(["measured", *FS_NAMES, "py/fo", "py/kernel"], figs)
            for key, extra in fig_summary.items():
                main_summary.setdefault(key, {}).update(extra)
        print()
        for w in workloads:
            print(f"  {w.key:<13} {w.desc(layers, p)}")
        for note in layers.notes:
            print(f"  note: {note}")
        errors += [
            (fs, w.key, r.error) for w in workloads for fs, r in results[w.key].items() if r.error
        ]
    layer_summary: dict[str, Any] = {}
    if scaling:
        print()
        print(
            f"layer scaling: N lowers, each with common/ holding the same 100 names ({rounds} round(s), median)"
        )
        rows, layer_summary = layer_rows(scaling, p.layer_counts, unavailable)
        print_rows(
            ["measure", "fs", *(f"N={n}" for n in p.layer_counts), "128/1", "target", "ok"],
            rows,
            left=2,
        )
        print(
            "  mount_ready: until in mountinfo and stat MERGED/common works; ls: ls -l common/ as the"
        )
        print(
            "  first access of a fresh mount; lookup: stat of 100 names in common/ + 50 missing ones"
        )
        for m, by_fs in scaling.items():
            for fs, cells in by_fs.items():
                for n, r in cells.items():
                    if r.error:
                        errors.append((fs, f"layers N={n} {m}", r.error))
                    elif r.na and (m == "mount_ready" or fs != "kernel"):
                        print(f"  {fs} N={n} {m}: n/a — {r.na}")
    if rss:
        print()
        tree = next(iter(rss.values()))["tree"]
        print(f"daemon RSS: lstat of every entry of {tree} with an empty upper, then drop_caches 2")
        print_rows(
            ["fs", "entries", "after mount", "after stat", "after drop", "KiB/inode", "back", "ok"],
            rss_rows(rss),
        )
        print(
            f"  target (pyunionfs): <= {RSS_KIB_PER_INODE_TARGET} KiB/inode, and after drop_caches at most "
            f"base + {RSS_BACK_FRACTION:.0%} of the growth ('back')"
        )
        errors += [(fs, "rss", r["error"]) for fs, r in rss.items() if r.get("error")]
    for fs, why in unavailable.items():
        if why != "not selected":
            print(f"  {fs}: n/a — {why}")
    print_errors(errors)

    if args.json:
        data = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(duration, 1),
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
            "layers": None
            if layers is None
            else {
                "lowers": [
                    "change layer",
                    f"stdlib copy ({layers.stdlib_src})",
                    "/usr/include copy",
                ],
                "entries": layers.entries,
                "stdlib_entries": layers.stdlib_entries,
                "chmod_target": layers.chmod_target,
                "chmod_entries": layers.chmod_entries,
                "big_entries": layers.big_expected,
                "chown_files": len(layers.chown_files),
                "change_layer": layers.changes,
                "notes": layers.notes,
            },
            "results": {
                w.key: {
                    "label": w.desc(layers, p) if layers else w.key,
                    "target": None if w.target is None else w.target.text(),
                    **main_summary.get(w.key, {}),
                    **{
                        fs: {
                            **r.json(),
                            **(w.extra(r.median, p) if w.extra and r.median else {}),
                        }
                        for fs, r in results[w.key].items()
                    },
                }
                for w in workloads
                if w.key in results
            },
            "layer_scaling": {
                m: {
                    **layer_summary.get(m, {}),
                    **{
                        fs: {str(n): r.json() for n, r in cells.items()}
                        for fs, cells in by_fs.items()
                    },
                }
                for m, by_fs in scaling.items()
            },
            "rss": rss,
            "errors": [f"{fs} {where}: {msg}" for fs, where, msg in errors],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if errors or subject_missing else 0


if __name__ == "__main__":
    sys.exit(main())
