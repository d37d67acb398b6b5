"""Kernel-as-oracle conformance model (issue 3): random layer stacks and random operations, applied to
kernel overlayfs and pyunionfs side by side; every outcome and every resulting state must match.

* ``stacks()`` generates random but valid layer stacks (1-5 lowers + an upper) over one small name
  universe, so names collide across layers: files (some sparse), dirs, opaque dirs, symlinks, fifos,
  hard links, xattrs, 0/0 whiteouts, a file where a lower has a dir and the reverse, deep paths.
  The harness materialises each stack twice, byte-identical (``overlay_harness.Pair``).
* ``ConformanceMachine`` (hypothesis ``RuleBasedStateMachine``) applies the same operation to both
  mounts and compares outcomes (value or errno); after every step it compares the merged trees and
  the normalised uppers; at the end it checks the lowers are untouched, unmounts both and cross-mounts
  the uppers (kernel over the pyunionfs-written upper, pyunionfs over the kernel-written one).

Deliberate differences (docs/differences.md, "How the conformance harness handles them") are encoded
by explicit rules here, never by ignoring fields wholesale:
  * st_ino/st_dev/f_type: never compared; hard-link groups are compared (Snapshot.links).
  * lower hard links, with a stock pyfuse3 only: ``_lower_linked()`` - an operation that would copy
    up (mutate) a name whose object is a not-yet-copied-up lower file with nlink>1 is not issued
    (``SKIPPED_LINKED``).  Ours keeps each name a node of its own (``NAMES_APART``): all issued.
  * whiteouts in non-merged dirs: ``stacks()`` only puts a whiteout where its parent is merged.
  * redirects: never written by the generator; O_TMPFILE: not in the op set.
  * st_blocks and dir times: not in any snapshot; file mtimes only as the result of ``utimes``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyfuse3
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from overlay_harness import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Dir,
    Fifo,
    File,
    Hardlink,
    KernelMount,
    Pair,
    PyUnionMount,
    StackSpec,
    Symlink,
    Whiteout,
    force_unmount,
    mount_stack,
    mounts_under,
    renameat2,
    snapshot_merged,
    stat_summary,
)

# --------------------------------------------------------------------------------------------------
# Counters (read by scripts/conformance.py and the CI test)
# --------------------------------------------------------------------------------------------------

STATS = {"examples": 0, "operations": 0, "skipped_linked": 0}

# --------------------------------------------------------------------------------------------------
# Layer stacks
# --------------------------------------------------------------------------------------------------

# One small universe of names for both the layers and the operations, so that everything collides.
UNIVERSE = ["a", "b", "d", "e", "d/a", "d/b", "e/a", "e/b", "d/b/a", "d/b/a/f"]
NAMES = UNIVERSE
# An absolute target is outside both mounts, so both sides would share it: it must never be
# creatable (an O_CREAT through it once made one divergence appear out of shared state).
SYMLINK_TARGETS = ["a", "../a", "d/b", "nowhere", "/proc/nonexistent-conformance-target"]
XATTR_NAMES = ["user.k1", "user.k2", "trusted.t"]

_KINDS = ["none", "none", "none", "none", "file", "file", "dir", "dir", "opaque", "symlink", "fifo",
          "hardlink", "whiteout"]


def _parent(p: str) -> str:
    return os.path.dirname(p)


def _ancestors(p: str) -> list[str]:
    out = []
    while (p := _parent(p)):
        out.append(p)
    return out


@st.composite
def _file(draw: st.DrawFn) -> File:
    data = draw(st.sampled_from([b"", b"x", b"hello\n", b"lower data " * 10, bytes(range(256))]))
    offset = draw(st.sampled_from([0, 0, 0, 70000]))  # 70000: a sparse file
    return File(data=data, offset=offset,
                mode=draw(st.sampled_from([0o644, 0o600, 0o755, 0o640, 0o4755])),
                uid=draw(st.sampled_from([0, 0, 1000])), gid=draw(st.sampled_from([0, 0, 1000])),
                xattrs=draw(st.sampled_from([{}, {}, {"user.k1": b"v1"}, {"trusted.t": b"t"}])))


@st.composite
def _dir(draw: st.DrawFn, opaque: bool) -> Dir:
    return Dir(mode=draw(st.sampled_from([0o755, 0o755, 0o700, 0o1777])),
               uid=draw(st.sampled_from([0, 0, 1000])),
               xattrs=draw(st.sampled_from([{}, {}, {"user.k2": b"dir"}])), opaque=opaque)


def _is_dir(layer: dict[str, Any], p: str) -> bool:
    return isinstance(layer.get(p), Dir)


@st.composite
def layer(draw: st.DrawFn, below: dict[str, Any] | None) -> dict[str, Any]:
    """One layer as a materialise() spec. ``below`` is the (already drawn) next lower layer, or None
    for the bottom one; whiteouts are only placed where the parent dir is merged (see module doc)."""
    spec: dict[str, Any] = {}
    for p in UNIVERSE:  # parents come before children in UNIVERSE
        if any(a in spec and not isinstance(spec[a], Dir) for a in _ancestors(p)):
            continue  # an ancestor is a non-dir in this layer
        kind = draw(st.sampled_from(_KINDS))
        if kind == "none":
            continue
        for a in reversed(_ancestors(p)):  # implicit parents, made explicit for the rules below
            spec.setdefault(a, Dir())
        if kind == "whiteout":
            par = _parent(p)
            merged_parent = par == "" or (
                below is not None and _is_dir(below, par)
                and all(_is_dir(spec, a) and not spec[a].opaque for a in [par, *_ancestors(par)]))
            if below is None or not merged_parent:
                kind = "file"
            else:
                spec[p] = Whiteout()
                continue
        if kind == "hardlink":
            files = [q for q, e in spec.items() if isinstance(e, File)]
            if files:
                spec[p] = Hardlink(draw(st.sampled_from(files)))
                continue
            kind = "file"
        if kind == "file":
            spec[p] = draw(_file())
        elif kind in ("dir", "opaque"):
            spec[p] = draw(_dir(kind == "opaque"))
        elif kind == "symlink":
            spec[p] = Symlink(draw(st.sampled_from(SYMLINK_TARGETS)))
        elif kind == "fifo":
            spec[p] = Fifo(mode=draw(st.sampled_from([0o644, 0o600])))
    return spec


@st.composite
def stacks(draw: st.DrawFn, max_lowers: int = 5) -> StackSpec:
    n = draw(st.integers(1, max_lowers))
    layers: list[dict[str, Any]] = []
    below = None
    for _ in range(n + 1):  # bottom lower first, the upper last
        below = draw(layer(below))
        layers.append(below)
    layers.reverse()  # [upper, top lower, ..., bottom lower]
    return StackSpec(lowers=layers[1:], upper=layers[0])


# --------------------------------------------------------------------------------------------------
# Operations: each returns a callable run on both merged roots by overlay_harness.outcome
# --------------------------------------------------------------------------------------------------

OPEN_FLAGS = {
    "RDONLY": os.O_RDONLY,
    "WRONLY": os.O_WRONLY,
    "RDWR": os.O_RDWR,
    "WRONLY|CREAT": os.O_WRONLY | os.O_CREAT,
    "RDWR|CREAT|EXCL": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    "WRONLY|TRUNC": os.O_WRONLY | os.O_TRUNC,
    "WRONLY|CREAT|TRUNC|NOFOLLOW": os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
    "RDWR|APPEND|CREAT": os.O_RDWR | os.O_APPEND | os.O_CREAT,
    "RDONLY|DIRECTORY": os.O_RDONLY | os.O_DIRECTORY,
    "RDONLY|TRUNC": os.O_RDONLY | os.O_TRUNC,
}
# O_NONBLOCK always: opening a fifo must never block (write-only gives ENXIO on both).
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC


def _mutates_open(flags: int) -> bool:
    return bool(flags & WRITE_FLAGS)


def op_open(path: str, flags_name: str, mode: int, data: bytes):
    flags = OPEN_FLAGS[flags_name] | os.O_NONBLOCK

    def open_(m: Path):
        fd = os.open(m / path, flags, mode)
        try:
            n = os.write(fd, data) if data and flags & (os.O_WRONLY | os.O_RDWR) else None
            return n, stat_summary(os.fstat(fd))
        finally:
            os.close(fd)
    return open_


def op_pwrite(path: str, offset: int, data: bytes):
    def pwrite(m: Path):
        fd = os.open(m / path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            return os.pwrite(fd, data, offset), os.fstat(fd).st_size
        finally:
            os.close(fd)
    return pwrite


def op_append(path: str, data: bytes):
    def append(m: Path):
        fd = os.open(m / path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        try:
            return os.write(fd, data), os.fstat(fd).st_size
        finally:
            os.close(fd)
    return append


def op_read(path: str):
    def read(m: Path):
        fd = os.open(m / path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            return os.pread(fd, 1 << 20, 0)
        finally:
            os.close(fd)
    return read


def op_stat(path: str):
    def lstat(m: Path):
        return stat_summary(os.lstat(m / path))
    return lstat


def op_readdir(path: str):
    def readdir(m: Path):
        return sorted(os.listdir(m / path))
    return readdir


def op_readlink(path: str):
    return lambda m: os.readlink(m / path)


# --------------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------------

EXAMPLE_WATCHDOG = float(os.environ.get("CONFORMANCE_EXAMPLE_WATCHDOG", "120"))

paths_st = st.sampled_from(NAMES)
data_st = st.sampled_from([b"", b"A", b"new data\n", b"Z" * 5000])
mode_st = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o2755, 0o1777])
ids_st = st.sampled_from([0, 1000, -1])


class Divergence(AssertionError):
    pass


# Divergences found by this model that are pyunionfs bugs not fixed yet.  Each has a named, strict
# xfail regression test in tests/test_conformance.py; the random model avoids exactly that case (so
# that it keeps finding new ones) unless CONFORMANCE_INCLUDE_KNOWN_BUGS=1.  Remove an entry once the
# bug is fixed (its xfail test then XPASSes and fails, as a reminder).
KNOWN_BUGS: dict[str, str] = {}
# Divergences we can't remove, each a row of docs/differences.md: avoided by the random model, and
# asserted as what they are by a named test.
DELIBERATE = {} if hasattr(pyfuse3.Operations, "setxattr_flags") else {
    "replace-missing-xattr": "a stock pyfuse3 emulates XATTR_REPLACE/XATTR_CREATE with a getxattr "
                             "before calling us, so a refused setxattr on a lower object copies "
                             "nothing up; the kernel has copied the object up first",
}
# Our pyfuse3 sends a node id apart from st_ino: each name of a lower hard link is a node of its
# own, as in the kernel, and the model may change them (a stock pyfuse3 can't: _lower_linked).
NAMES_APART = hasattr(pyfuse3.EntryAttributes, "nodeid")
INCLUDE_KNOWN_BUGS = os.environ.get("CONFORMANCE_INCLUDE_KNOWN_BUGS") == "1"


def known_bug(name: str) -> bool:
    """True if the case is a listed known bug that the random model should not issue."""
    return (name in KNOWN_BUGS and not INCLUDE_KNOWN_BUGS) or name in DELIBERATE


class ConformanceMachine(RuleBasedStateMachine):
    """One example: a random stack, mounted by both; then random operations."""

    # Mount options for both sides (redirect_dir=on, ...); CONFORMANCE_OPTIONS when empty.
    OPTIONS = ""

    def __init__(self) -> None:
        super().__init__()
        self.pair: Pair | None = None
        self.base: Path | None = None
        self.held: list[tuple[int | None, int | None, str]] = []
        self.failed = False
        self.watchdog: threading.Timer | None = None
        self.log: list[str] = []

    # -- set-up -----------------------------------------------------------------------------------

    @initialize(spec=stacks())
    def mount(self, spec: StackSpec) -> None:
        STATS["examples"] += 1
        root = os.environ.get("CONFORMANCE_TMP") or None
        self.base = Path(tempfile.mkdtemp(prefix="conformance-", dir=root))
        self.pair = Pair(spec, self.base / "pair",
                         ours=os.environ.get("UNIONFS_TEST_IMPL", "pyunionfs"),
                         options=self.OPTIONS or os.environ.get("CONFORMANCE_OPTIONS", ""))
        self.watchdog = threading.Timer(EXAMPLE_WATCHDOG, self._kill_daemons)
        self.watchdog.daemon = True
        self.watchdog.start()

    def _kill_daemons(self) -> None:
        """A request the daemon never answers would block us forever: kill it (ENOTCONN follows)."""
        pair = self.pair
        if pair is None:
            return
        for side in pair.sides:
            m = side.mount
            if isinstance(m, PyUnionMount):
                m.overlay.kill()

    # -- helpers ----------------------------------------------------------------------------------

    def same(self, fn, label: str) -> Any:
        assert self.pair is not None
        STATS["operations"] += 1
        k, o = self.pair.both(fn)
        self.log.append(f"{label} -> {k!r}")
        if k != o:
            self.failed = True
            raise Divergence(f"{label}: kernel -> {k!r}, pyunionfs -> {o!r}")
        return k

    def _lower_linked(self, path: str, follow: bool = False) -> bool:
        """Deliberate difference (lower hard links): is ``path`` a lower file with nlink>1 that has
        not been copied up?  Asked of the kernel side only (its lookups don't change its behaviour)."""
        assert self.pair is not None
        if NAMES_APART:
            return False
        kroot = self.pair.k.root
        p = kroot / path
        if follow:
            real = os.path.realpath(p)
            if not (real + "/").startswith(str(kroot) + "/"):
                return False
            path = os.path.relpath(real, kroot)
            p = kroot / path
        try:
            st_ = os.lstat(p)
        except OSError:
            return False
        if not stat.S_ISREG(st_.st_mode) or st_.st_nlink < 2:
            return False
        linked = not os.path.lexists(self.pair.k.upper / path)
        if linked:
            STATS["skipped_linked"] += 1
        return linked

    def _lower_only(self, path: str) -> bool:
        """Does ``path`` name an object (kernel side) that has not been copied up?"""
        assert self.pair is not None
        return (os.path.lexists(self.pair.k.root / path)
                and not os.path.lexists(self.pair.k.upper / path))

    # -- operations -------------------------------------------------------------------------------

    @rule(path=paths_st, flags=st.sampled_from(sorted(OPEN_FLAGS)), mode=mode_st, data=data_st)
    def open_file(self, path: str, flags: str, mode: int, data: bytes) -> None:
        if _mutates_open(OPEN_FLAGS[flags]) and self._lower_linked(path, follow=True):
            return
        self.same(op_open(path, flags, mode, data), f"open({path!r}, {flags}, {oct(mode)}, {data[:8]!r})")

    @rule(path=paths_st, offset=st.sampled_from([0, 3, 4096, 100000]), data=data_st)
    def pwrite(self, path: str, offset: int, data: bytes) -> None:
        if not self._lower_linked(path, follow=True):
            self.same(op_pwrite(path, offset, data), f"pwrite({path!r}, {offset}, {data[:8]!r})")

    @rule(path=paths_st, data=data_st)
    def append(self, path: str, data: bytes) -> None:
        if not self._lower_linked(path, follow=True):
            self.same(op_append(path, data), f"append({path!r}, {data[:8]!r})")

    @rule(path=paths_st, size=st.sampled_from([0, 1, 10, 70001]))
    def truncate(self, path: str, size: int) -> None:
        if not self._lower_linked(path, follow=True):
            self.same(lambda m: os.truncate(m / path, size), f"truncate({path!r}, {size})")

    @rule(path=paths_st)
    def read(self, path: str) -> None:
        self.same(op_read(path), f"read({path!r})")

    @rule(path=paths_st, mode=mode_st)
    def chmod(self, path: str, mode: int) -> None:
        if not self._lower_linked(path, follow=True):
            self.same(lambda m: os.chmod(m / path, mode), f"chmod({path!r}, {oct(mode)})")

    @rule(path=paths_st, uid=ids_st, gid=ids_st)
    def chown(self, path: str, uid: int, gid: int) -> None:
        if not self._lower_linked(path):
            self.same(lambda m: os.lchown(m / path, uid, gid), f"lchown({path!r}, {uid}, {gid})")

    @rule(path=paths_st, t=st.sampled_from([1_000_000_000, 1_700_000_000]))
    def utimes(self, path: str, t: int) -> None:
        if self._lower_linked(path):
            return

        def utimes(m: Path):
            os.utime(m / path, ns=(t * 10**9, t * 10**9 + 5), follow_symlinks=False)
            st_ = os.lstat(m / path)
            return st_.st_atime_ns, st_.st_mtime_ns  # explicitly set: compared
        self.same(utimes, f"utimes({path!r}, {t})")

    @rule(path=paths_st, name=st.sampled_from(XATTR_NAMES), value=st.sampled_from([b"", b"v", b"w" * 100]),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
    def setxattr(self, path: str, name: str, value: bytes, flags: int) -> None:
        if flags and known_bug("replace-missing-xattr") and self._lower_only(path):
            try:
                os.getxattr(self.pair.k.root / path, name, follow_symlinks=False)  # type: ignore[union-attr]
            except OSError:
                if flags == os.XATTR_REPLACE:
                    return
            else:
                if flags == os.XATTR_CREATE:
                    return
        if not self._lower_linked(path):
            self.same(lambda m: os.setxattr(m / path, name, value, flags, follow_symlinks=False),
                      f"setxattr({path!r}, {name!r}, {value[:8]!r}, {flags})")

    @rule(path=paths_st, name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, path: str, name: str) -> None:
        if not self._lower_linked(path):
            self.same(lambda m: os.removexattr(m / path, name, follow_symlinks=False),
                      f"removexattr({path!r}, {name!r})")

    @rule(path=paths_st, name=st.sampled_from(XATTR_NAMES))
    def getxattrs(self, path: str, name: str) -> None:
        self.same(lambda m: sorted(os.listxattr(m / path, follow_symlinks=False)),
                  f"listxattr({path!r})")
        self.same(lambda m: os.getxattr(m / path, name, follow_symlinks=False),
                  f"getxattr({path!r}, {name!r})")

    @rule(path=paths_st, mode=mode_st)
    def mkdir(self, path: str, mode: int) -> None:
        self.same(lambda m: os.mkdir(m / path, mode), f"mkdir({path!r}, {oct(mode)})")

    @rule(path=paths_st)
    def rmdir(self, path: str) -> None:
        self.same(lambda m: os.rmdir(m / path), f"rmdir({path!r})")

    @rule(path=paths_st)
    def unlink(self, path: str) -> None:
        self.same(lambda m: os.unlink(m / path), f"unlink({path!r})")

    @rule(src=paths_st, dst=paths_st,
          flags=st.sampled_from([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, src: str, dst: str, flags: int) -> None:
        if self._lower_linked(src) or (flags == RENAME_EXCHANGE and self._lower_linked(dst)):
            return
        self.same(lambda m: renameat2(m / src, m / dst, flags), f"renameat2({src!r}, {dst!r}, {flags})")

    @rule(src=paths_st, dst=paths_st)
    def link(self, src: str, dst: str) -> None:
        if not self._lower_linked(src):
            self.same(lambda m: os.link(m / src, m / dst, follow_symlinks=False),
                      f"link({src!r}, {dst!r})")

    @rule(path=paths_st, dest=st.sampled_from(SYMLINK_TARGETS))
    def symlink(self, path: str, dest: str) -> None:
        self.same(lambda m: os.symlink(dest, m / path), f"symlink({dest!r}, {path!r})")

    @rule(path=paths_st, mode=st.sampled_from([0o644, 0o600]))
    def mkfifo(self, path: str, mode: int) -> None:
        self.same(lambda m: os.mkfifo(m / path, mode), f"mkfifo({path!r}, {oct(mode)})")

    @rule(path=st.sampled_from(["", *NAMES]))
    def readdir(self, path: str) -> None:
        self.same(op_readdir(path), f"readdir({path!r})")

    @rule(path=paths_st)
    def lstat(self, path: str) -> None:
        self.same(op_stat(path), f"lstat({path!r})")
        self.same(op_readlink(path), f"readlink({path!r})")

    # -- fds held across other operations (reading through an fd opened before a copy-up) --------

    @rule(path=paths_st)
    def hold_open(self, path: str) -> None:
        assert self.pair is not None
        label = f"hold_open({path!r})"
        STATS["operations"] += 1
        fds = []
        for side in self.pair.sides:
            try:
                fds.append(("ok", os.open(side.root / path, os.O_RDONLY | os.O_NONBLOCK)))
            except OSError as e:
                fds.append(("err", errno.errorcode.get(e.errno, str(e.errno))))
        kfd = fds[0][1] if fds[0][0] == "ok" else None
        ofd = fds[1][1] if fds[1][0] == "ok" else None
        if kfd is not None or ofd is not None:
            self.held.append((kfd, ofd, path))
        self.log.append(f"{label} -> {fds[0][0]}")
        if fds[0][0] != fds[1][0] or (fds[0][0] == "err" and fds[0] != fds[1]):
            self.failed = True
            raise Divergence(f"{label}: kernel -> {fds[0]!r}, pyunionfs -> {fds[1]!r}")

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 7))
    def read_held(self, i: int) -> None:
        kfd, ofd, path = self.held[i % len(self.held)]
        fds = iter((kfd, ofd))

        def pread_held(_m: Path):
            fd = next(fds)
            s = os.fstat(fd)
            data = os.pread(fd, 1 << 20, 0) if stat.S_ISREG(s.st_mode) else None
            return data, stat_summary(s)
        self.same(pread_held, f"read_held({path!r})")

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 7))
    def close_held(self, i: int) -> None:
        kfd, ofd, _ = self.held.pop(i % len(self.held))
        for fd in (kfd, ofd):
            if fd is not None:
                os.close(fd)

    # -- state comparison after every step --------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        if self.pair is None:
            return
        a = snapshot_merged(self.pair.k.root)
        b = snapshot_merged(self.pair.o.root)
        if a != b:
            self.failed = True
            raise Divergence("merged trees differ:\n" + a.diff(b))
        try:
            self.pair.assert_same_upper()
        except AssertionError as e:
            self.failed = True
            raise Divergence(str(e)) from None

    # -- end of an example: lowers untouched, then interop --------------------------------------

    def teardown(self) -> None:
        try:
            for kfd, ofd, _ in self.held:
                for fd in (kfd, ofd):
                    if fd is not None:
                        with contextlib.suppress(OSError):
                            os.close(fd)
            self.held = []
            if self.pair is not None and not self.failed:
                self._final_checks()
        finally:
            self._cleanup()

    def _final_checks(self) -> None:
        pair = self.pair
        assert pair is not None
        pair.assert_lowers_untouched()
        before = snapshot_merged(pair.k.root)
        pair.stop()
        # the pyunionfs-written upper under the kernel, the kernel-written upper under pyunionfs
        for paths, impl, writer in ((pair.o.paths, "kernel", pair.o.impl),
                                    (pair.k.paths, pair.o.impl, "kernel")):
            if impl == "kernel" and writer == "kernel":
                continue
            # with the options the layers were written under: another set reads them
            # otherwise (a metacopy without metacopy=on is EPERM), on both sides alike
            m = mount_stack(paths, impl, options=pair.options)
            try:
                after = snapshot_merged(m.root)
            finally:
                m.stop()
            if after != before:
                raise Divergence(f"interop: {impl} over the upper written by {writer} shows another "
                                 "tree:\n" + before.diff(after, ("before", f"{impl}-remount")))

    def _cleanup(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
        errors = []
        if self.pair is not None:
            try:
                self.pair.stop()
            except Exception as e:  # noqa: BLE001 - clean up first, report afterwards
                errors.append(e)
        if self.base is not None:
            left = mounts_under(self.base)
            for m in sorted(left, key=len, reverse=True):
                force_unmount(m)
            if not mounts_under(self.base):
                shutil.rmtree(self.base, ignore_errors=True)
            if left:
                errors.append(RuntimeError(f"mounts left behind: {left}"))
        self.pair = None
        if errors and not self.failed:
            raise errors[0]


def replay(spec: StackSpec, steps: list[tuple[str, dict[str, Any]]],
           check: Any = None) -> ConformanceMachine:
    """Run one example by hand (for named regression tests): mount ``spec``, apply each
    ``(rule name, kwargs)`` step with the state comparison after each, call ``check(machine)`` if
    given (both still mounted), then the end-of-example checks (lowers untouched, interop)."""
    m = ConformanceMachine()
    try:
        m.mount(spec)
        m.same_state()
        for name, kwargs in steps:
            getattr(m, name)(**kwargs)
            m.same_state()
        if check is not None:
            check(m)
    except BaseException:
        m.failed = True
        raise
    finally:
        m.teardown()
    return m


__all__ = ["replay", "STATS", "ConformanceMachine", "Divergence", "KernelMount", "stacks"]
