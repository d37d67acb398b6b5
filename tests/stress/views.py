"""Shared pieces of the stress suite: the profile, one-line reports, and the view checks run after
each stress load.

``check_views`` proves a stress run left a filesystem state that every way of looking at it agrees
on: the merged tree (types, modes, owners, sizes, sha256 of every file, xattrs, nlink, hard-link
groups, file mtimes) right after the load must be the same after ``drop_caches``, after an
unmount + remount of pyunionfs on the same layers, and under a kernel overlayfs mount of the same
lowers + the upper pyunionfs wrote. The lowers must be untouched throughout and the daemon's log
free of internal errors.

Not a conftest: tests import it (``from views import ...``), as tests/stress/ is on sys.path in
pytest's rootdir import mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from overlay_harness import (
    IMPL,
    Mount,
    PyUnionMount,
    Snapshot,
    StackPaths,
    mount_stack,
    snapshot_diff,
    snapshot_merged,
    snapshot_raw,
    snapshot_upper,
)

# The profile: `make stress` sets PYUNIONFS_STRESS=long and PYUNIONFS_STRESS_MINUTES; every
# stress module (and conftest.py) reads it from here.
LONG = os.environ.get("PYUNIONFS_STRESS") == "long"
MINUTES = float(os.environ.get("PYUNIONFS_STRESS_MINUTES", "10"))


# Seeds: fixed in the bounded profile (a failure replays as is), fresh in the long one (to cover
# more ground; printed in every summary); PYUNIONFS_STRESS_SEED=N replays either.
SEED = int(os.environ.get("PYUNIONFS_STRESS_SEED") or
           (int.from_bytes(os.urandom(3), "big") if LONG else 0))


def budget(short: float, long: float) -> float:
    """``short`` in the bounded profile, ``long`` (for 10 minutes) scaled under make stress."""
    return long * MINUTES / 10 if LONG else short


def watchdog_seconds(long_seconds: float) -> float:
    """For ``pytest.mark.watchdog``: conftest's 150 s in the bounded profile; in the long one the
    test's budgeted time plus room for its checks, below the per-test timeout conftest sets."""
    if not LONG:
        return 150.0
    return min(max(600.0, MINUTES * 60) - 30, budget(0, long_seconds) + 240)


def report(line: str) -> None:
    """One summary line: stdout, and appended to $PYUNIONFS_STRESS_REPORT if set."""
    print(line, flush=True)
    dest = os.environ.get("PYUNIONFS_STRESS_REPORT")
    if dest:
        with open(dest, "a") as f:
            f.write(line.rstrip("\n") + "\n")


def drop_caches() -> bool:
    """``echo 3 > /proc/sys/vm/drop_caches`` (root only); False if not allowed here."""
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


MountFn = Callable[[StackPaths, str], Mount]
Extra = Callable[[Path, str], None]


def lowers_raw(paths: StackPaths) -> list[dict[str, tuple[Any, ...]]]:
    return [snapshot_raw(p) for p in paths.lowers]


def assert_lowers_untouched(paths: StackPaths, before: list[dict[str, tuple[Any, ...]]]) -> None:
    for i, (p, b) in enumerate(zip(paths.lowers, before)):
        after = snapshot_raw(p)
        if after != b:
            changed = sorted(k for k in set(after) | set(b) if after.get(k) != b.get(k))
            raise AssertionError(f"lower{i} ({p}) changed at {changed[:10]}")


_LOG_PROBLEM = re.compile(r"internal error|Traceback|\bERROR\b|\bCRITICAL\b")


def assert_log_clean(mount: Mount) -> None:
    """The daemon answered every request from its rules: no internal error turned into EIO."""
    if not isinstance(mount, PyUnionMount):
        return
    try:
        text = mount.log_path.read_text(errors="replace")
    except OSError:
        return
    bad = [ln for ln in text.splitlines() if _LOG_PROBLEM.search(ln)]
    assert not bad, "pyunionfs logged internal errors:\n" + "\n".join(bad[:20]) + \
        "\n" + mount.log_tail(60)


def _same(ref: Snapshot, other: Snapshot, what: str, label: str) -> None:
    if ref != other:
        raise AssertionError(f"{label}: the merged tree {what} differs from the one right after "
                             f"the load:\n{snapshot_diff(ref, other, ('right after', what))}")


def check_views(paths: StackPaths, mount: Mount, label: str,
                lowers_before: list[dict[str, tuple[Any, ...]]] | None = None,
                mount_fn: MountFn | None = None, extra: Extra | None = None,
                mtimes: bool = True) -> Snapshot:
    """Compare the merged view right after a load with: after drop_caches, after a remount (same
    implementation), under kernel overlayfs of the same layers. Stops ``mount`` (and every mount
    it makes, in ``finally``). ``extra(root, stage)`` runs at each stage ("live", "dropped",
    "remount", "kernel") for the caller's own checks (e.g. fio --verify_only). Returns the live
    snapshot."""
    mount_fn = mount_fn or (lambda p, impl: mount_stack(p, impl))
    t0 = time.monotonic()
    stages = []
    try:
        live = snapshot_merged(mount.root, mtimes)
        if extra:
            extra(mount.root, "live")
        upper_live = snapshot_upper(paths.upper) if paths.upper else None
        if drop_caches():
            _same(live, snapshot_merged(mount.root, mtimes), "after drop_caches", label)
            if extra:
                extra(mount.root, "dropped")
            stages.append("drop_caches")
        assert_log_clean(mount)
    finally:
        mount.stop()
    if paths.upper is not None:
        after = snapshot_upper(paths.upper)
        assert after == upper_live, (f"{label}: unmounting changed the upper:\n"
                                     + snapshot_diff(upper_live, after, ("mounted", "unmounted")))

    m2 = mount_fn(paths, IMPL)
    try:
        _same(live, snapshot_merged(m2.root, mtimes), f"after a remount ({IMPL})", label)
        if extra:
            extra(m2.root, "remount")
        assert_log_clean(m2)
    finally:
        m2.stop()
    stages.append("remount")

    mk = mount_fn(paths, "kernel")
    try:
        _same(live, snapshot_merged(mk.root, mtimes), "under kernel overlayfs", label)
        if extra:
            extra(mk.root, "kernel")
    finally:
        mk.stop()
    stages.append("kernel")
    if lowers_before is not None:
        assert_lowers_untouched(paths, lowers_before)
        stages.append("lowers untouched")
    files = sum(1 for n in live.nodes.values() if n.type == "file")
    report(f"views {label}: {len(live.nodes)} entries ({files} files) equal right after, "
           f"{', '.join(stages)} ({time.monotonic() - t0:.1f}s)")
    return live


@contextlib.contextmanager
def stopping(mount: Mount):
    """``with stopping(m): ...`` stops ``m`` on the way out (idempotent)."""
    try:
        yield mount
    finally:
        mount.stop()


# --------------------------------------------------------------------------------------------------
# Trees deeper than PATH_MAX: the harness's snapshots walk by path; these walk by directory fd.
# --------------------------------------------------------------------------------------------------


def raise_nofile() -> None:
    """A walk holds one fd per level: lift the soft RLIMIT_NOFILE to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fd_tree(root: Path | str, upper: bool = False, prefix: str = "trusted.overlay."
            ) -> dict[str, tuple[Any, ...]]:
    """{relpath: (type, mode, uid, gid, size, sha256, rdev, xattrs, nlink)} of any depth, walked
    through directory fds (``/proc/self/fd/N/name`` for xattrs, never a long path). Like
    snapshot_merged / snapshot_upper: dirs have no size or nlink; with ``upper`` a 0/0 char device
    is just "whiteout", dirs carry the opaque flag and the kernel's bookkeeping xattrs are
    dropped."""
    import hashlib
    import stat as st_

    raise_nofile()
    kinds = {st_.S_IFREG: "file", st_.S_IFDIR: "dir", st_.S_IFLNK: "symlink",
             st_.S_IFIFO: "fifo", st_.S_IFCHR: "chr", st_.S_IFBLK: "blk", st_.S_IFSOCK: "sock"}
    out: dict[str, tuple[Any, ...]] = {}

    def node(dfd: int, name: str, st: os.stat_result) -> tuple[Any, ...]:
        kind = kinds.get(st_.S_IFMT(st.st_mode), "?")
        if upper and kind == "chr" and st.st_rdev == 0:
            return ("whiteout",)
        at = f"/proc/self/fd/{dfd}/{name}" if name != "." else f"/proc/self/fd/{dfd}"
        xattrs = {}
        try:
            names = os.listxattr(at, follow_symlinks=False)
        except OSError:
            names = []
        for x in names:
            if x.startswith(("user.", "trusted.")):
                try:
                    xattrs[x] = os.getxattr(at, x, follow_symlinks=False)
                except OSError as e:
                    xattrs[x] = f"<{e.errno}>".encode()
        opaque = None
        if upper:
            for b in ("origin", "impure", "uuid"):
                xattrs.pop(prefix + b, None)
            if kind == "dir":
                opaque = xattrs.pop(prefix + "opaque", None) == b"y"
        digest = None
        if kind == "file":
            h = hashlib.sha256()
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            try:
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
            finally:
                os.close(fd)
            digest = h.hexdigest()
        elif kind == "symlink":
            digest = hashlib.sha256(os.fsencode(os.readlink(name, dir_fd=dfd))).hexdigest()
        isdir = kind == "dir"
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None
        return (kind, st_.S_IMODE(st.st_mode), st.st_uid, st.st_gid, None if isdir else st.st_size,
                digest, rdev, tuple(sorted(xattrs.items())), None if isdir else st.st_nlink, opaque)

    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    out["."] = node(top, ".", os.fstat(top))
    stack: list[tuple[str, int, list[str]]] = [("", top, sorted(os.listdir(top)))]
    try:
        while stack:
            rel, dfd, names = stack[-1]
            if not names:
                os.close(dfd)
                stack.pop()
                continue
            name = names.pop(0)
            crel = f"{rel}/{name}" if rel else name
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            out[crel] = node(dfd, name, st)
            if st_.S_ISDIR(st.st_mode):
                cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                stack.append((crel, cfd, sorted(os.listdir(cfd))))
    finally:
        for _rel, dfd, _names in stack:
            os.close(dfd)
    return out


def fd_tree_diff(a: dict[str, tuple[Any, ...]], b: dict[str, tuple[Any, ...]],
                 names: tuple[str, str] = ("kernel", "pyunionfs"), limit: int = 20) -> str:
    lines = []
    for k in sorted(set(a) | set(b), key=lambda r: (r.count("/"), r)):
        if a.get(k) != b.get(k):
            short = k if len(k) < 200 else f"...({len(k)} chars, depth {k.count('/')})/" + \
                k.rsplit("/", 1)[-1][:40]
            lines.append(f"  {short}: {names[0]}={a.get(k)} {names[1]}={b.get(k)}")
            if len(lines) >= limit:
                lines.append("  ...")
                break
    return "\n".join(lines)
