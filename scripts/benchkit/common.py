"""Constants, profiles, errors and the small helpers every part of the benchmark uses
(processes, mounts in the mount table, caches)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


KIB = 1 << 10


MIB = 1 << 20


FS_NAMES = ("kernel", "fuse-overlayfs", "pyunionfs")


FUSE_NAMES = ("fuse-overlayfs", "pyunionfs")


MOUNT_TIMEOUT = 30.0




STARTUP_TARGET_S = 0.15  # pyunionfs mount_ready, main layers


RTT_CPU_TARGET_US = 30.0  # pyunionfs daemon CPU per getattr round trip (getattr_rtt)


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
    rtt_calls: int  # getattr_rtt: fstat() calls, each a round trip on FUSE
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
    rtt_calls=50000,
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
    rtt_calls=10000,
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


def run_cmd(cmd: list[str], timeout: float, what: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> None:
    try:
        r = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            cwd=cwd,
            env=env,
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


def become_subreaper() -> None:
    """Daemons that fork away (the mount_bg workload) become our children, so that their
    exit is seen and reaped here rather than by init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
