"""The workloads, each declared once in WORKLOADS with its preparation, its timed step, its
check and its target: adding a workload is one entry there (and its functions here)."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchkit.common import (
    CHOWN_FULL_OPTIONS,
    CHOWN_OPTIONS,
    CHOWN_OWNER,
    CHOWN_PER_DIR,
    CHOWN_SAMPLE,
    IMPORTS,
    KIB,
    MIB,
    MV_FILE_SIZE,
    MV_FILES,
    MV_OPTIONS,
    STARTUP_TARGET_S,
    BenchError,
    Profile,
    read_file,
    run_cmd,
    walk_lstat,
)
from benchkit.layers import GIT_ENV, MainLayers

GIT_STATUS_RUNS = 3  # git_status: repeated, as a user or a prompt does
COMPILE_PACKAGES = ("json", "email", "http", "logging", "urllib", "xml", "asyncio")


@dataclass
class Ctx:
    m: Path  # the merged dir
    layers: MainLayers
    p: Profile
    timeout: float
    upper: Path
    figures: dict[str, float] = field(default_factory=dict)  # a run's measured figures, not times
    before: tuple[int, int] = (0, 0)  # upper_usage before the timed part (mv_dir)


def w_getattr_rtt(c: Ctx) -> None:
    fd = os.open(c.m / c.layers.stdlib / "os.py", os.O_RDONLY)
    try:
        for _ in range(c.p.rtt_calls):
            os.fstat(fd)
    finally:
        os.close(fd)


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


def mv_lowers(layers: MainLayers) -> tuple[list[Path], str]:
    return [layers.mv_layer], "big"


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


def git_lowers(layers: MainLayers) -> tuple[list[Path], str]:
    return [layers.git_layer], "repo"


def run_git(c: Ctx, *args: str) -> None:
    run_cmd(["git", "-C", str(c.m / "repo"), *args], c.timeout, f"git {args[0]}",
            env=dict(os.environ, **GIT_ENV))


def prep_git(c: Ctx) -> None:
    """The first status of a checkout on a new mount: its index records the lower's
    device, so git reads every file again and rewrites .git/index (a copy-up)."""
    run_git(c, "status", "--porcelain")


def w_git_status(c: Ctx) -> None:
    for _ in range(GIT_STATUS_RUNS):
        run_git(c, "status", "--porcelain")


def prep_git_grep(c: Ctx) -> None:
    prep_git(c)
    w_git_grep(c)


def w_git_grep(c: Ctx) -> None:
    run_git(c, "grep", "-c", "-e", "import")


def w_git_checkout(c: Ctx) -> None:
    run_git(c, "checkout", "-q", "HEAD~1")


def check_git_checkout(c: Ctx) -> None:
    for rel in c.layers.git_edited[:: max(1, len(c.layers.git_edited) // 20)]:
        if (c.m / "repo" / rel).read_text().endswith("# edited\n"):
            raise BenchError(f"repo/{rel} still has the second commit's edit after checkout")


def w_venv(c: Ctx) -> None:
    # ensurepip: pip installs itself from its bundled wheel into the new venv, offline
    run_cmd([sys.executable, "-m", "venv", str(c.m / "venv")], c.timeout, "python -m venv")


def check_venv(c: Ctx) -> None:
    if not (c.m / "venv" / "bin" / "pip").exists():
        raise BenchError("venv/bin/pip missing after python -m venv")


def compile_dirs(layers: MainLayers) -> list[str]:
    """The stdlib packages compileall rewrites (those the profile's stdlib copy has)."""
    return [d for d in COMPILE_PACKAGES if (layers.dirs[1] / layers.stdlib / d).is_dir()]


def w_compileall(c: Ctx) -> None:
    dirs = [str(c.m / c.layers.stdlib / d) for d in compile_dirs(c.layers)]
    if not dirs:  # (compileall with none would compile sys.path, outside MERGED)
        raise BenchError(f"none of {', '.join(COMPILE_PACKAGES)} in the stdlib copy")
    run_cmd([sys.executable, "-m", "compileall", "-q", "-f", "-j", "1", *dirs], c.timeout,
            "python -m compileall")


def chown_lowers(layers: MainLayers) -> tuple[list[Path], str]:
    assert layers.chown_layer is not None
    return [layers.chown_layer], "tree"


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
    # "ratio": pyunionfs / fuse-overlayfs ≤ value; "kernel": pyunionfs / kernel overlayfs ≤
    # value; "abs": pyunionfs ≤ value seconds
    kind: str
    value: float

    def text(self) -> str:
        if self.kind == "abs":
            return f"py <= {self.value:.2f} s"
        if self.kind == "kernel":
            return f"py/kernel <= {self.value:.1f}"
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
    # (lowers, probe) of this workload's mounts instead of the main layers' (its own layer)
    lowers: Callable[[MainLayers], tuple[list[Path], str]] | None = None
    options: str = ""  # extra -o options of its kernel and pyunionfs mounts (not fuse-overlayfs)
    fuse_options: str = ""  # extra -o options of both FUSE mounts (pyunionfs, fuse-overlayfs)


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
    # start-up (issue 24): the commands users type, from outside (runner.startup_one)
    Workload("mount_cold", lambda L, p: f"mount command with nothing warm (PYUNIONFS_SERVER=0) "
             f"until MERGED/{L.stdlib}/os.py reads back", None, Target("abs", 0.15)),
    Workload("mount_warm", lambda L, p: "the same with pyunionfs's mount server up", None,
             Target("abs", 0.03)),
    Workload("umount", lambda L, p: "unmount command until the daemon has gone", None,
             Target("abs", 0.03)),
    Workload("overlay_cycle", lambda L, p: "unionfs.Overlay enter + read + exit, in this process",
             None, Target("abs", 0.06)),
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
    Workload("getattr_rtt", lambda L, p: f"{p.rtt_calls} fstat() of one file with -o timeout=0 "
             "(FUSE: each a GETATTR round trip; the kernel answers alone)", w_getattr_rtt,
             _ratio_t(1.0), fuse_options="timeout=0", extra=_per_s(lambda p: p.rtt_calls)),
    Workload("readdir_big", lambda L, p: f"os.scandir of big/ ({L.big_expected} entries, 3 layers)",
             w_readdir_big, _ratio_t(0.7)),
    Workload("read_cold", lambda L, p: f"read the {p.mib} MiB lower file, after drop_caches",
             w_read, _ratio_t(1.2), cold=True),
    Workload("read_warm", lambda L, p: f"read the {p.mib} MiB lower file again, same mount",
             w_read, _ratio_t(1.0), prepare=prep_read_warm),
    Workload("write", lambda L, p: f"write a new {p.mib} MiB file (1 MiB writes) + fsync",
             w_write, _ratio_t(1.0)),
    Workload("copyup_big", lambda L, p: f"O_APPEND 1 byte to the {p.mib} MiB lower file "
             "(copy-up; lower prewarmed)", w_copyup_big,
             # we fsync a copy as the kernel does (its data is on disk before its name);
             # fuse-overlayfs does not, so the kernel is the measure
             Target("kernel", 1.2), prepare=prewarm_lower,
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
    Workload("git_status", lambda L, p: f"git status, {GIT_STATUS_RUNS} times, in a checkout of "
             "the stdlib copy (its own lower; after a first status, which rewrites the index)",
             w_git_status, _ratio_t(0.5), prepare=prep_git, lowers=git_lowers),
    Workload("git_grep", lambda L, p: "git grep -c import in that checkout, after a first one",
             w_git_grep, _ratio_t(1.0), prepare=prep_git_grep, lowers=git_lowers),
    Workload("git_checkout", lambda L, p: f"git checkout HEAD~1 in that checkout (rewrites "
             f"{len(L.git_edited)} files)", w_git_checkout, _ratio_t(1.0), prepare=prep_git,
             check=check_git_checkout, lowers=git_lowers),
    Workload("venv", lambda L, p: "python -m venv MERGED/venv (ensurepip installs pip into it)",
             w_venv, _ratio_t(1.0), check=check_venv),
    Workload("compileall", lambda L, p: "python -m compileall -f of MERGED's "
             f"{', '.join(COMPILE_PACKAGES)}", w_compileall, _ratio_t(1.0)),
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


