"""Test harness: layer stacks, mounts (kernel overlayfs and pyunionfs) and snapshots.

Every differential test builds the *same* layer stack twice, byte for byte: one copy is mounted with
the kernel's overlayfs (the reference), the other with pyunionfs.  The same operation then runs on
both merged trees and the outcomes (return values or errno names), the merged trees and the
normalised upper directories are compared.

Environment knobs:
  UNIONFS_TEST_IMPL=kernel   mount the "ours" side with kernel overlayfs too; every differential test
                             must then pass, which proves the harness and the tests' premises.
  UNIONFS_TEST_OPTIONS=...   mount options added on both sides of every pair (the kernel's features:
                             ``redirect_dir=on``, ``metacopy=on``, ``xino=on``...), to run a differential
                             file with them; a test whose premise the option changes says so ("test
                             premise: kernel gave ...") rather than reporting a divergence.
  UNIONFS_OUR_OPTIONS=...    options for the pyunionfs side alone (``writeback``): a profile run under
                             them, with the kernel's defaults as the oracle.
  UNIONFS_TEST_USERNS=1      the rootless dialect: pytest runs as root of a user namespace (uids
                             0..65535 mapped, no capability in the initial namespace, so trusted.*
                             xattrs give EPERM). The kernel side mounts with ``-o userxattr``; layer
                             specs' ``trusted.overlay.*`` markers are written as ``user.overlay.*``
                             and uppers are normalised with that prefix. Start such a run with
                             ``python tests/overlay_harness.py userns -- python -m pytest ...``
                             (see ``userns_main``); ``make test`` runs a subset that way
                             (tests/test_rootless.py::test_differential_suite_in_userns).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import pickle
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from unionfs import mounttable
from unionfs.api import Overlay, OverlayError

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python")
if not os.path.exists(PYTHON):  # e.g. a different checkout layout: use whatever runs pytest
    PYTHON = sys.executable

MOUNT_TIMEOUT = 15.0  # seconds until a mount must be live
UMOUNT_TIMEOUT = 15.0  # seconds until an unmount (and daemon exit) must be done
CMD_TIMEOUT = 30.0  # any other helper command

# A fixed timestamp for every object a layer spec doesn't date explicitly, so both copies of a stack
# are identical down to their times and the lower-untouched check compares exact values.
DEFAULT_TIME_NS = 1_600_000_000 * 10**9

IMPL = os.environ.get("UNIONFS_TEST_IMPL", "pyunionfs")
EXTRA_OPTIONS = os.environ.get("UNIONFS_TEST_OPTIONS", "")
OUR_OPTIONS = os.environ.get("UNIONFS_OUR_OPTIONS", "")
# pyunionfs daemons from the warm mount server, as the API gives them by default
# (UNIONFS_TEST_SERVER=0: each a child process of the test, `pyunionfs mount -f`)
TEST_SERVER = os.environ.get("UNIONFS_TEST_SERVER", "1") != "0"
USERNS = os.environ.get("UNIONFS_TEST_USERNS", "") not in ("", "0")

# The overlay's private xattr prefix ("xattr P" in overlay-semantics.md): trusted.overlay. by default,
# user.overlay. with the kernel's userxattr option (and for rootless pyunionfs).
TRUSTED_PREFIX = "trusted.overlay."
USER_PREFIX = "user.overlay."
PRIVATE_PREFIX = USER_PREFIX if USERNS else TRUSTED_PREFIX


def dialect_xattr(name: str, prefix: str | None = None) -> str:
    """A layer spec's xattr name as it is written on disk in the session's dialect (or in the one
    with private ``prefix``): specs spell private names ``trusted.overlay.*``."""
    prefix = prefix or PRIVATE_PREFIX
    if name.startswith(TRUSTED_PREFIX):
        return prefix + name[len(TRUSTED_PREFIX):]
    return name


# Kernel bookkeeping xattrs that pyunionfs need not reproduce and that carry host-specific data:
#   origin: a lower file handle (bytes differ between the two stacks, which live in other dirs),
#   impure: "this dir has copied-up children whose st_ino comes from origin" (only an ino cache hint),
#   uuid:   the per-mount uuid on the upper root.
# They are ignored on purpose by the upper normaliser.  Anything else under the private prefix
# (opaque, redirect, metacopy, nlink, escaped P.overlay.* names...) is compared.
BOOKKEEPING_XATTRS = ("origin", "impure", "uuid")
IGNORED_UPPER_XATTRS = frozenset(PRIVATE_PREFIX + n for n in BOOKKEEPING_XATTRS)
OPAQUE_XATTR = PRIVATE_PREFIX + "opaque"


# --------------------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class File:
    """A regular file. ``data`` is written at ``offset`` (a large offset makes a sparse file)."""

    data: bytes | str = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float | None = None  # seconds; None = DEFAULT_TIME_NS
    atime: float | None = None
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    offset: int = 0
    size: int | None = None  # truncate to this size afterwards


@dataclass(frozen=True)
class Dir:
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: float | None = None
    atime: float | None = None
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    opaque: bool = False  # trusted.overlay.opaque=y


@dataclass(frozen=True)
class Symlink:
    target: str
    uid: int = 0
    gid: int = 0
    mtime: float | None = None
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)  # trusted.* only (no user.*)


@dataclass(frozen=True)
class Fifo:
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float | None = None
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)


@dataclass(frozen=True)
class Device:
    kind: str = "c"  # "c" or "b"
    major: int = 1
    minor: int = 3
    mode: int = 0o600
    uid: int = 0
    gid: int = 0
    mtime: float | None = None


@dataclass(frozen=True)
class Whiteout:
    """The kernel's whiteout: a 0/0 character device (mode 0, as the kernel makes them)."""


@dataclass(frozen=True)
class Hardlink:
    """Another name for ``target`` (a path relative to the same layer root)."""

    target: str


Entry = File | Dir | Symlink | Fifo | Device | Whiteout | Hardlink
# A layer is a {relpath: Entry} mapping, or a deterministic builder called with the layer root.
LayerSpec = Mapping[str, Entry] | Callable[[Path], None]


def _ns(t: float | None) -> int:
    return DEFAULT_TIME_NS if t is None else int(round(t * 10**9))


def _b(v: bytes | str) -> bytes:
    return os.fsencode(v) if isinstance(v, str) else v


def _skip_in_userns(reason: str) -> None:
    import pytest  # only the test suite builds stacks in userns mode

    pytest.skip(f"userns mode: {reason}")


def materialise(spec: LayerSpec | None, root: Path, prefix: str | None = None) -> None:
    """Create ``root`` and fill it from ``spec``, deterministically. Private ``trusted.overlay.*``
    names in the spec (and ``Dir(opaque=True)``) are written with ``prefix`` (default: the session's
    dialect, PRIVATE_PREFIX).

    Order matters for identical results: dirs, then other objects, then hard links; then xattrs,
    owners, modes; times last, deepest first, so creating children does not disturb a parent's mtime.
    """
    root.mkdir(parents=True, exist_ok=True)
    if spec is None:
        spec = {}
    if callable(spec):
        spec(root)
        return
    entries: dict[str, Entry] = {}
    for rel, ent in spec.items():
        rel = rel.strip("/") or "."
        entries[rel] = ent
        # implicit parents are plain 0755 root dirs
        parent = os.path.dirname(rel)
        while parent and parent not in entries and parent not in spec:
            entries[parent] = Dir()
            parent = os.path.dirname(parent)
    entries.setdefault(".", Dir())

    def p(rel: str) -> str:
        return str(root) if rel == "." else os.path.join(root, rel)

    ordered = sorted(entries, key=lambda r: (r.count("/"), r))
    for rel in ordered:
        if isinstance(entries[rel], Dir) and rel != ".":
            os.mkdir(p(rel), 0o700)
    for rel in ordered:
        ent = entries[rel]
        path = p(rel)
        if isinstance(ent, File):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                data = _b(ent.data)
                if data:
                    os.pwrite(fd, data, ent.offset)
                elif ent.offset:
                    os.ftruncate(fd, ent.offset)
                if ent.size is not None:
                    os.ftruncate(fd, ent.size)
            finally:
                os.close(fd)
        elif isinstance(ent, Symlink):
            os.symlink(ent.target, path)
        elif isinstance(ent, Fifo):
            os.mkfifo(path, 0o600)
        elif isinstance(ent, Device):
            kind = stat.S_IFCHR if ent.kind == "c" else stat.S_IFBLK
            try:
                os.mknod(path, kind | 0o600, os.makedev(ent.major, ent.minor))
            except PermissionError:
                if USERNS:
                    _skip_in_userns(f"the layer spec has a device node {ent.kind} "
                                    f"{ent.major}:{ent.minor}, which needs CAP_MKNOD outside the "
                                    "user namespace")
                raise
        elif isinstance(ent, Whiteout):
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
    for rel in ordered:
        ent = entries[rel]
        if isinstance(ent, Hardlink):
            os.link(p(ent.target), p(rel))
    for rel in ordered:
        ent = entries[rel]
        path = p(rel)
        if isinstance(ent, (Whiteout, Hardlink)):
            continue
        os.chown(path, ent.uid, ent.gid, follow_symlinks=False)
        if not isinstance(ent, Symlink):
            os.chmod(path, ent.mode)  # after chown, which clears setuid/setgid bits
        # xattrs last: chown drops security.capability
        xattrs = {dialect_xattr(n, prefix): v for n, v in getattr(ent, "xattrs", {}).items()}
        if isinstance(ent, Dir) and ent.opaque:
            xattrs[(prefix or PRIVATE_PREFIX) + "opaque"] = b"y"
        for name in sorted(xattrs):
            try:
                os.setxattr(path, name, _b(xattrs[name]), follow_symlinks=False)
            except PermissionError:
                if USERNS and name.startswith("trusted."):
                    _skip_in_userns(f"the layer spec needs xattr {name}, which root of a user "
                                    "namespace cannot store")
                raise
    for rel in sorted(ordered, key=lambda r: (-r.count("/"), r)):
        ent = entries[rel]
        if isinstance(ent, Hardlink):
            continue
        if isinstance(ent, Whiteout):
            os.utime(p(rel), ns=(DEFAULT_TIME_NS, DEFAULT_TIME_NS), follow_symlinks=False)
            continue
        mt = _ns(ent.mtime)
        at = _ns(getattr(ent, "atime", None) if getattr(ent, "atime", None) is not None else ent.mtime)
        os.utime(p(rel), ns=(at, mt), follow_symlinks=False)
    if "." in entries and isinstance(entries["."], Dir):
        ent = entries["."]
        os.utime(root, ns=(_ns(ent.atime if ent.atime is not None else ent.mtime), _ns(ent.mtime)))


@dataclass
class StackSpec:
    """``lowers[0]`` is the top lower layer. ``upper=None`` and ``readonly`` give a lowers-only mount."""

    lowers: list[LayerSpec]
    upper: LayerSpec | None = None
    readonly: bool = False
    prefix: str | None = None  # private xattr prefix on disk; None = the session's PRIVATE_PREFIX


@dataclass
class StackPaths:
    base: Path
    lowers: list[Path]
    upper: Path | None
    work: Path | None
    merged: Path


def make_traversable(path: Path) -> None:
    """Add search (x) permission for everyone on ``path`` and its ancestors, so steps run as an
    unprivileged uid can reach the mount (pytest makes its temp root 0700)."""
    for p in [path, *path.parents]:
        st = os.stat(p)
        if st.st_mode & 0o011 != 0o011:
            os.chmod(p, stat.S_IMODE(st.st_mode) | 0o011)


def build_stack(spec: StackSpec, base: Path) -> StackPaths:
    base.mkdir(parents=True, exist_ok=True)
    make_traversable(base)
    lowers = []
    for i, layer in enumerate(spec.lowers):
        d = base / f"lower{i}"
        materialise(layer, d, spec.prefix)
        lowers.append(d)
    upper = work = None
    if not spec.readonly:
        upper = base / "upper"
        materialise(spec.upper, upper, spec.prefix)
        work = base / "work"
        work.mkdir()
    merged = base / "merged"
    merged.mkdir()
    return StackPaths(base, lowers, upper, work, merged)


# --------------------------------------------------------------------------------------------------
# Mount table and mounts
# --------------------------------------------------------------------------------------------------


def mount_table() -> list[mounttable.MountEntry]:
    """Every mount, as rows (mount point, fs type, source, super options, ...); never touches
    the mounts themselves, so it cannot hang on a dead FUSE daemon."""
    return mounttable.mount_table()


is_mounted = mounttable.is_mounted
mounts_under = mounttable.mounts_under
wait_until = mounttable.wait_until


def run_cmd(cmd: list[str], timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def force_unmount(path: str) -> None:
    """Last resort for anything left mounted: lazy unmounts never block on a dead daemon."""
    for cmd in (["fusermount3", "-uz", path], ["umount", "-l", path]):
        if not is_mounted(path):
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            run_cmd(cmd, timeout=UMOUNT_TIMEOUT)


MountError = OverlayError


class Mount:
    """A mounted stack: a ``unionfs.Overlay`` over ``StackPaths``; ``stop()`` is idempotent,
    always leaves nothing mounted, and raises ``MountError`` (with the daemon's log) when the
    clean way of unmounting failed."""

    impl: str
    paths: StackPaths
    overlay: Overlay

    def __init__(self, paths: StackPaths, work: Path | None, options: str, **kw: Any) -> None:
        self.paths = paths
        self.log_path = paths.base / f"{self.impl}.log"
        self.overlay = Overlay(lowers=paths.lowers, upper=paths.upper,
                               work=None if paths.upper is None else work or paths.work,
                               mountpoint=paths.merged, options=options, backend=self.impl,
                               readonly=paths.upper is None, timeout=MOUNT_TIMEOUT,
                               log_path=self.log_path, **kw)
        try:
            self.overlay.mount()
        except OverlayError as e:
            force_unmount(str(paths.merged))
            raise MountError(f"{self.impl} mount failed: {e}\n{self.log_tail()}") from None

    @property
    def root(self) -> Path:
        return self.paths.merged

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The daemon as a child process: for a mount made with ``server=False``."""
        proc = self.overlay.process
        assert proc is not None, f"{self.impl} has no daemon child process (server=False)"
        return proc

    @property
    def pid(self) -> int:
        pid = self.overlay.pid
        assert pid is not None, f"{self.impl} has no daemon process"
        return pid

    def log_tail(self, n: int = 40) -> str:
        lines = self.overlay.log.splitlines()
        return "\n".join(lines[-n:]) if lines else "(no log)"

    def stop(self) -> None:
        try:
            self.overlay.unmount()
        except OverlayError as e:
            raise MountError(f"{e}\n{self.log_tail()}") from None

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class KernelMount(Mount):
    impl = "kernel"

    def __init__(self, paths: StackPaths, work: Path | None = None, userxattr: bool | None = None,
                 options: str = ""):
        """``userxattr`` (default: in userns mode) mounts with the kernel's user.overlay. dialect;
        ``options`` are more mount options (``noatime,...``)."""
        opts = ",".join(o for o in ("userxattr" if (USERNS if userxattr is None else userxattr)
                                    else "", options) if o)
        super().__init__(paths, work, opts)


class PyUnionMount(Mount):
    """A daemon from the warm mount server, or (``server=False``, or UNIONFS_TEST_SERVER=0)
    ``python -m unionfs mount -f ...`` as a child process (``proc``)."""

    impl = "pyunionfs"
    server = TEST_SERVER

    def __init__(self, paths: StackPaths, work: Path | None = None, options: str = "",
                 server: bool | None = None):
        env = dict(os.environ)
        env.pop("UNIONFS_TEST_IMPL", None)
        # Options of ours alone (writeback, ...), for a whole profile run under them.
        options = ",".join(o for o in (options, OUR_OPTIONS) if o)
        server = self.server if server is None else server
        super().__init__(paths, work, options, program=None if server else
                         [PYTHON, "-m", "unionfs"], cwd=REPO, env=env, server=server)


def mount_stack(paths: StackPaths, impl: str, work: Path | None = None,
                userxattr: bool | None = None, options: str = "") -> Mount:
    """``userxattr`` applies to the kernel only: pyunionfs picks its dialect itself at mount.
    ``options`` (``-o`` words) go to both."""
    if impl == "kernel":
        return KernelMount(paths, work, userxattr, options)
    return PyUnionMount(paths, work, options)


# --------------------------------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------------------------------


class Node(NamedTuple):
    type: str  # file dir symlink fifo chr blk sock whiteout
    mode: int | None  # S_IMODE (incl. setuid/setgid/sticky)
    uid: int | None
    gid: int | None
    size: int | None  # None for dirs: a dir's st_size is filesystem bookkeeping, not overlay semantics
    digest: str | None  # sha256 of content or symlink target
    rdev: tuple[int, int] | None
    xattrs: tuple[tuple[str, bytes], ...]
    nlink: int | None  # None for dirs (merged dirs report 1 by rule, not worth coupling to)
    opaque: bool | None = None  # upper snapshots only
    mtime_ns: int | None = None  # only when asked for


class Snapshot(NamedTuple):
    nodes: dict[str, Node]
    links: frozenset[frozenset[str]]  # hard-link groups (paths sharing one inode), non-dirs only

    def diff(self, other: Snapshot, names: tuple[str, str] = ("kernel", "pyunionfs")) -> str:
        return snapshot_diff(self, other, names)


_TYPES = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        # O_NOATIME: taking a snapshot must not change what a later check of atimes sees
        fd = os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        fd = os.open(path, flags)
    try:
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def read_xattrs(path: str, prefixes: tuple[str, ...] = ("user.", "trusted.")) -> dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    for name in names:
        if name.startswith(prefixes):
            try:
                out[name] = os.getxattr(path, name, follow_symlinks=False)
            except OSError as e:
                out[name] = f"<{errno.errorcode.get(e.errno, e.errno)}>".encode()
    return out


def _walk(root: str) -> Iterator[tuple[str, str, os.stat_result]]:
    st = os.lstat(root)
    yield ".", root, st
    stack = [("", root)]
    while stack:
        rel, path = stack.pop()
        for name in sorted(os.listdir(path)):
            crel = f"{rel}/{name}" if rel else name
            cpath = os.path.join(path, name)
            cst = os.lstat(cpath)
            yield crel, cpath, cst
            if stat.S_ISDIR(cst.st_mode):
                stack.append((crel, cpath))


def _node(path: str, st: os.stat_result, upper: bool, mtimes: bool,
          prefix: str | None = None) -> Node:
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "?")
    if upper and kind == "chr" and st.st_rdev == 0:
        return Node("whiteout", None, None, None, None, None, None, (), None)
    xattrs = read_xattrs(path)
    opaque = None
    if upper:
        prefix = prefix or PRIVATE_PREFIX
        for n in BOOKKEEPING_XATTRS:
            xattrs.pop(prefix + n, None)
        if kind == "dir":
            opaque = xattrs.pop(prefix + "opaque", None) == b"y"
    digest = None
    if kind == "file":
        digest = _sha256_file(path)
    elif kind == "symlink":
        digest = hashlib.sha256(os.fsencode(os.readlink(path))).hexdigest()
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None
    isdir = kind == "dir"
    return Node(
        type=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=None if isdir else st.st_size,
        digest=digest,
        rdev=rdev,
        xattrs=tuple(sorted(xattrs.items())),
        nlink=None if isdir else st.st_nlink,
        opaque=opaque,
        mtime_ns=(st.st_mtime_ns if (mtimes and not isdir) else None),
    )


def _snapshot(root: Path | str, upper: bool, mtimes: bool, prefix: str | None = None) -> Snapshot:
    nodes: dict[str, Node] = {}
    inodes: dict[tuple[int, int], set[str]] = {}
    for rel, path, st in _walk(str(root)):
        node = _node(path, st, upper, mtimes, prefix)
        nodes[rel] = node
        if node.type not in ("dir", "whiteout"):
            inodes.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    links = frozenset(frozenset(g) for g in inodes.values() if len(g) > 1)
    return Snapshot(nodes, links)


def snapshot_merged(root: Path | str, mtimes: bool = False) -> Snapshot:
    """What a user sees in a merged tree. ``mtimes=True`` adds file (non-dir) mtimes."""
    return _snapshot(root, upper=False, mtimes=mtimes)


def snapshot_upper(root: Path | str, mtimes: bool = False, prefix: str | None = None) -> Snapshot:
    """A layer dir as overlay semantics see it: whiteouts are just 'whiteout' (the kernel hard-links
    one shared whiteout inode, so their nlink/owner carry no meaning), dirs carry ``opaque``, and the
    kernel bookkeeping xattrs (BOOKKEEPING_XATTRS under the private ``prefix``, by default the
    session's PRIVATE_PREFIX: IGNORED_UPPER_XATTRS) are dropped."""
    return _snapshot(root, upper=True, mtimes=mtimes, prefix=prefix)


def snapshot_raw(root: Path | str) -> dict[str, tuple[Any, ...]]:
    """Everything about a layer dir that an overlay must never change (lower layers): content,
    metadata, xattrs, mtime and ctime of every object (atime has its own test)."""
    out: dict[str, tuple[Any, ...]] = {}
    for rel, path, st in _walk(str(root)):
        node = _node(path, st, upper=False, mtimes=True)
        out[rel] = (node, st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)
    return out


def snapshot_diff(a: Snapshot, b: Snapshot, names: tuple[str, str] = ("kernel", "pyunionfs")) -> str:
    lines = []
    for k in sorted(set(a.nodes) | set(b.nodes)):
        va, vb = a.nodes.get(k), b.nodes.get(k)
        if va == vb:
            continue
        if va is None or vb is None:
            lines.append(f"  {k}: only in {names[0] if vb is None else names[1]}: {va or vb}")
            continue
        fields = [f"{f}: {getattr(va, f)!r} != {getattr(vb, f)!r}" for f in Node._fields
                  if getattr(va, f) != getattr(vb, f)]
        lines.append(f"  {k}: " + "; ".join(fields))
    if a.links != b.links:
        show = lambda s: sorted(sorted(g) for g in s)  # noqa: E731
        lines.append(f"  hard links: {names[0]}={show(a.links)} {names[1]}={show(b.links)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Running operations and comparing outcomes
# --------------------------------------------------------------------------------------------------

Op = Callable[[Path], Any]


def _normalise(value: Any, root: Path) -> Any:
    r = str(root)
    if isinstance(value, os.stat_result):
        raise TypeError("return stat_summary(...) instead of a raw stat_result (inode numbers differ)")
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return value.replace(r, "<MERGED>")
    if isinstance(value, list):
        return [_normalise(v, root) for v in value]
    if isinstance(value, tuple):
        return tuple(_normalise(v, root) for v in value)
    if isinstance(value, dict):
        return {_normalise(k, root): _normalise(v, root) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return frozenset(_normalise(v, root) for v in value)
    return value


def outcome(fn: Op, root: Path) -> tuple[str, Any]:
    """('ok', normalised return value) or ('err', 'ENOENT')."""
    try:
        value = fn(root)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, str(e.errno)) if e.errno else repr(e))
    return ("ok", _normalise(value, root))


def stat_summary(st: os.stat_result, times: bool = False) -> tuple[Any, ...]:
    """The comparable part of a stat result (never inode numbers or st_dev)."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "?")
    s: tuple[Any, ...] = (kind, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
                          None if kind == "dir" else st.st_size, None if kind == "dir" else st.st_nlink)
    if times:
        s += (st.st_mtime_ns,)
    return s


def run_as(uid: int, gid: int, fn: Op, root: Path, umask: int = 0o022,
           timeout: float = CMD_TIMEOUT, groups: Iterable[int] = ()) -> tuple[str, Any]:
    """Run ``fn(root)`` in a forked child with uid/gid, supplementary ``groups`` (none by default)
    and umask; return its outcome. Used for ownership/umask/permission rules that depend on the
    caller's credentials."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        try:
            os.close(rfd)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(umask)
            try:
                res = outcome(fn, root)
            except BaseException as e:  # noqa: BLE001 - report anything to the parent
                res = ("exc", repr(e))
            os.write(wfd, pickle.dumps(res))
        finally:
            os._exit(0)
    os.close(wfd)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"run_as child did not finish in {timeout}s")
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if not data:
        raise RuntimeError("run_as child died without a result")
    res = pickle.loads(data)
    if res[0] == "exc":
        raise RuntimeError(f"run_as child raised {res[1]}")
    return res


class Side:
    """One half of a pair: a stack, its mount, and the lowers' raw state taken before mounting."""

    def __init__(self, spec: StackSpec, base: Path, impl: str, options: str = ""):
        self.impl = impl
        self.paths = build_stack(spec, base)
        self.lowers_before = [snapshot_raw(p) for p in self.paths.lowers]
        self.mount: Mount | None = mount_stack(self.paths, impl, options=options)

    @property
    def root(self) -> Path:
        return self.paths.merged

    @property
    def upper(self) -> Path:
        assert self.paths.upper is not None
        return self.paths.upper

    def stop(self) -> None:
        if self.mount is not None:
            m, self.mount = self.mount, None
            m.stop()


def stop_all(items: Iterable[Any]) -> None:
    """``stop()`` every item even when some fail, then raise the first failure."""
    errs = []
    for it in items:
        try:
            it.stop()
        except Exception as e:  # noqa: BLE001 - stop all, then report
            errs.append(e)
    if errs:
        raise errs[0]


class Pair:
    """Kernel overlayfs and pyunionfs over byte-identical copies of one stack."""

    def __init__(self, spec: StackSpec, base: Path, ours: str = IMPL, options: str = ""):
        self.spec = spec
        options = ",".join(o for o in (EXTRA_OPTIONS, options) if o)
        self.options = options
        self.k = Side(spec, base / "kernel", "kernel", options)
        try:
            self.o = Side(spec, base / "ours", ours, options)
        except BaseException:
            self.k.stop()
            raise
        self.names = ("kernel", f"ours({ours})")

    @property
    def sides(self) -> tuple[Side, Side]:
        return (self.k, self.o)

    def stop(self) -> None:
        stop_all((self.o, self.k))

    # -- operations -------------------------------------------------------------------------------

    def both(self, fn: Op) -> tuple[tuple[str, Any], tuple[str, Any]]:
        return outcome(fn, self.k.root), outcome(fn, self.o.root)

    def same(self, fn: Op, expect: Any = ..., what: str = "") -> Any:
        """Run ``fn(merged_root)`` on both; assert equal outcomes. ``expect`` (an errno name such as
        'EXDEV', or 'ok') also checks the kernel gives what the test believes, so a test whose premise
        is wrong fails loudly instead of comparing two irrelevant outcomes.  Returns the kernel value."""
        k, o = self.both(fn)
        label = what or getattr(fn, "__name__", "op")
        if expect is not ...:
            premise = (k[0] == "ok") if expect == "ok" else (k == ("err", expect))
            assert premise, f"test premise: kernel gave {k} for {label}, test expects {expect}"
        assert k == o, f"{label}: kernel -> {k!r}, {self.names[1]} -> {o!r}"
        return k[1]

    def same_as(self, uid: int, gid: int, fn: Op, umask: int = 0o022, expect: Any = ...,
                what: str = "", groups: Iterable[int] = ()) -> Any:
        k = run_as(uid, gid, fn, self.k.root, umask, groups=groups)
        o = run_as(uid, gid, fn, self.o.root, umask, groups=groups)
        label = what or getattr(fn, "__name__", "op")
        if expect is not ...:
            premise = (k[0] == "ok") if expect == "ok" else (k == ("err", expect))
            assert premise, f"test premise: kernel gave {k} for {label}, test expects {expect}"
        assert k == o, f"{label} as {uid}:{gid}: kernel -> {k!r}, {self.names[1]} -> {o!r}"
        return k[1]

    # -- state comparisons ------------------------------------------------------------------------

    def assert_same_tree(self, mtimes: bool = False) -> Snapshot:
        a = snapshot_merged(self.k.root, mtimes)
        b = snapshot_merged(self.o.root, mtimes)
        assert a == b, "merged trees differ:\n" + a.diff(b, self.names)
        return a

    def assert_same_upper(self, mtimes: bool = False) -> Snapshot:
        a = snapshot_upper(self.k.upper, mtimes)
        b = snapshot_upper(self.o.upper, mtimes)
        assert a == b, "upper dirs differ:\n" + a.diff(b, self.names)
        return a

    def assert_lowers_untouched(self) -> None:
        for side in self.sides:
            for i, (p, before) in enumerate(zip(side.paths.lowers, side.lowers_before)):
                after = snapshot_raw(p)
                if after != before:
                    changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
                    raise AssertionError(f"{side.impl}: lower{i} changed at {changed}: "
                                         f"{[(before.get(k), after.get(k)) for k in changed[:3]]}")

    def check_all(self, mtimes: bool = False) -> None:
        """The usual epilogue: same merged tree, same normalised upper, lowers untouched."""
        self.assert_same_tree(mtimes)
        if not self.spec.readonly:
            self.assert_same_upper(mtimes)
        self.assert_lowers_untouched()


# --------------------------------------------------------------------------------------------------
# libc helpers: renameat2 and a DIR* stream (d_type, telldir/seekdir)
# --------------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
_SYS_renameat2 = 316  # x86_64
AT_FDCWD = -100


def renameat2(old: Path | str, new: Path | str, flags: int = 0) -> None:
    o, n = os.fsencode(str(old)), os.fsencode(str(new))
    if hasattr(_libc, "renameat2"):
        f = _libc.renameat2
        f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = f(AT_FDCWD, o, AT_FDCWD, n, flags)
    else:  # pragma: no cover - old glibc
        rc = _libc.syscall(_SYS_renameat2, AT_FDCWD, o, AT_FDCWD, n, ctypes.c_uint(flags))
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(old), None, str(new))


class _Dirent(ctypes.Structure):  # glibc x86_64 struct dirent (== dirent64)
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.restype = None
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.rewinddir.restype = None
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]

DT_NAMES = {0: "unknown", 1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "file", 10: "symlink", 12: "sock",
            14: "wht"}


class DirStream:
    """libc opendir/readdir/telldir/seekdir on one handle: what ls, find and rm -r really do."""

    def __init__(self, path: Path | str):
        self._d = _libc.opendir(os.fsencode(str(path)))
        if not self._d:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), str(path))

    def read(self) -> tuple[str, str, int] | None:
        """(name, d_type name, d_ino) or None at the end."""
        ctypes.set_errno(0)
        ent = _libc.readdir(self._d)
        if not ent:
            e = ctypes.get_errno()
            if e:
                raise OSError(e, os.strerror(e))
            return None
        d = ent.contents
        return os.fsdecode(d.d_name), DT_NAMES.get(d.d_type, str(d.d_type)), d.d_ino

    def read_all(self) -> list[tuple[str, str, int]]:
        out = []
        while (e := self.read()) is not None:
            out.append(e)
        return out

    def tell(self) -> int:
        return _libc.telldir(self._d)

    def seek(self, pos: int) -> None:
        _libc.seekdir(self._d, pos)

    def rewind(self) -> None:
        _libc.rewinddir(self._d)

    def close(self) -> None:
        if self._d:
            _libc.closedir(self._d)
            self._d = None

    def __enter__(self) -> DirStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------------------


def environment_problem() -> str | None:
    """Why mount tests can't run here, or None."""
    if os.geteuid() != 0:
        return "mount tests need root (kernel overlayfs reference mounts, trusted.* xattrs)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if subprocess.run(["sh", "-c", "command -v fusermount3"], capture_output=True,
                      timeout=CMD_TIMEOUT).returncode != 0:
        return "fusermount3 not installed"
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1] == "overlay" for line in f if line.strip()):
                return "kernel overlayfs not available (/proc/filesystems has no overlay)"
    except OSError as e:
        return f"cannot read /proc/filesystems: {e}"
    return None


def tree_of(root: Path | str) -> dict[str, str]:
    """{relpath: type} of a real tree, for quick premise checks in tests."""
    return {rel: _TYPES.get(stat.S_IFMT(st.st_mode), "?") for rel, _, st in _walk(str(root))}


def hash_tree(root: Path | str) -> str:
    """One digest of a tree's content and metadata (no atime) — 'the lower is untouched'."""
    return hashlib.sha256(repr(sorted(snapshot_raw(root).items())).encode()).hexdigest()


def unionfs_pids(merged: Path) -> list[int]:
    """pids of unionfs processes whose command line names this (unique, per-test) mount point:
    the daemon a background mount forked."""
    return [pid for pid in mounttable.processes_with_arg(str(merged))
            if any("unionfs" in a for a in (mounttable.process(pid) or (0, []))[1])]


def ls_op(rel: str = ".") -> Op:
    """An operation for ``Pair.same``: the sorted names in directory ``rel`` of the mount."""
    def op(m: Path) -> list[str]:
        return sorted(os.listdir(m / rel))

    op.__name__ = f"listdir {rel}"
    return op


# --------------------------------------------------------------------------------------------------
# User namespaces: the rootless dialect (UNIONFS_TEST_USERNS=1)
# --------------------------------------------------------------------------------------------------

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 1 << 18
PR_SET_PDEATHSIG = 1
USERNS_IDS = 65536  # uids/gids 0..65535 are mapped onto themselves (specs use 1000, 2000, 65534...)
_INIT_UID_MAP = ["0", "0", "4294967295"]

_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
MNT_DETACH = 2


def _leave_others_mounts() -> None:
    """In a fresh private mount namespace: detach every overlay and FUSE mount copied from the
    parent.  Those are other tests' (pytest-xdist runs files side by side); a copy held here
    would keep their superblocks alive after they unmount, so their daemons would not exit
    until this namespace is gone."""
    _libc_check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "making / private")
    for e in reversed(mounttable.mount_table()):
        if e.fstype in ("overlay", "fuse", "fuseblk") or e.fstype.startswith("fuse."):
            _libc.umount2(os.fsencode(e.point), MNT_DETACH)  # gone with a parent: fine


def in_user_namespace() -> bool:
    """True unless this process is in the initial user namespace."""
    with open("/proc/self/uid_map") as f:
        return f.read().split() != _INIT_UID_MAP


def _libc_check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def userns_run(argv: list[str], ids: int = USERNS_IDS) -> int:
    """Run ``argv`` as uid/gid 0 of new user, mount and pid namespaces; return its exit status.

    Like ``unshare --user --map-users=0,0,N --map-groups=0,0,N --mount --propagation private --pid
    --fork --mount-proc`` (util-linux's --map-users needs newuidmap; as root we write the maps
    ourselves). Root of that namespace can mount overlay and FUSE but has no capability outside it,
    so trusted.* xattrs give EPERM: the rootless situation. The pid namespace makes cleanup total:
    when the command exits or anything here is killed, every process it left (FUSE daemons
    included) dies with the namespace's init, and their mounts with the mount namespace.
    Must be called from a single-threaded process (it forks); ``python overlay_harness.py userns``.
    """
    r_unshared, w_unshared = os.pipe()
    r_mapped, w_mapped = os.pipe()
    child = os.fork()
    if child == 0:  # never returns
        code = 125
        try:
            os.close(r_unshared)
            os.close(w_mapped)
            _libc_check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            if not in_user_namespace():  # then the copies can't be detached (locked)
                _libc_check(_libc.unshare(CLONE_NEWNS), "unshare")
                _leave_others_mounts()
            _libc_check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID), "unshare")
            os.write(w_unshared, b"u")
            os.close(w_unshared)
            if os.read(r_mapped, 1) != b"m":
                raise RuntimeError("the parent did not write the id maps")
            os.close(r_mapped)
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            _libc_check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
                        "making / private")
            init = os.fork()
            if init == 0:  # pid 1 of the new pid namespace
                code = 125
                try:
                    _libc_check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
                    _libc_check(_libc.mount(b"proc", b"/proc", b"proc",
                                            MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mounting /proc")
                    cmd = os.fork()
                    if cmd == 0:
                        try:
                            os.execvp(argv[0], argv)
                        except OSError as e:
                            print(f"userns: cannot run {argv[0]}: {e}", file=sys.stderr)
                        os._exit(127)
                    while True:  # reap orphans until the command itself exits
                        pid, status = os.wait()
                        if pid == cmd:
                            code = _exit_code(status)
                            break
                except BaseException as e:  # noqa: BLE001 - report, then exit (never return)
                    print(f"userns: {e}", file=sys.stderr)
                finally:
                    os._exit(code)  # kills whatever is left in the pid namespace
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, lambda *_: os.kill(init, signal.SIGKILL))
            while True:
                try:
                    _, status = os.waitpid(init, 0)
                    break
                except InterruptedError:  # pragma: no cover - PEP 475 retries already
                    continue
            code = _exit_code(status)
        except BaseException as e:  # noqa: BLE001 - report, then exit (never return)
            print(f"userns: {e}", file=sys.stderr)
        finally:
            os._exit(code)
    os.close(w_unshared)
    os.close(r_mapped)
    try:
        if os.read(r_unshared, 1) != b"u":
            raise RuntimeError("userns: the child failed before unsharing")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child}/{name}", "w") as f:
                f.write(f"0 0 {ids}\n")
        os.write(w_mapped, b"m")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        raise
    finally:
        os.close(r_unshared)
        os.close(w_mapped)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: os.kill(child, signal.SIGTERM))
    _, status = os.waitpid(child, 0)
    return _exit_code(status)


def userns_main(args: list[str]) -> int:
    """``python tests/overlay_harness.py userns [--] CMD ARGS...``: run CMD with UNIONFS_TEST_USERNS=1
    in a fresh user namespace (see ``userns_run``), e.g.
    ``.venv/bin/python tests/overlay_harness.py userns .venv/bin/python -m pytest tests/test_rename.py``.
    """
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: overlay_harness.py userns [--] CMD [ARGS...]", file=sys.stderr)
        return 2
    if os.geteuid() != 0 or in_user_namespace():
        print("userns: must run as root of the initial user namespace (it writes a 0..65535 id "
              "map)", file=sys.stderr)
        return 2
    os.environ["UNIONFS_TEST_USERNS"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    return userns_run(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["userns"]:
        sys.exit(userns_main(sys.argv[2:]))
    print("usage: overlay_harness.py userns [--] CMD [ARGS...]", file=sys.stderr)
    sys.exit(2)
