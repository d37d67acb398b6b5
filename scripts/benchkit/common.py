"""Constants, profiles, errors and the small helpers every part of the benchmark uses
(processes, mounts in the mount table, caches)."""

from __future__ import annotations

import ctypes
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


