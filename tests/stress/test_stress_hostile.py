"""Hostile layers: content that tries to lead the daemon out of its layers or past its limits.

Symlinks to /etc and to targets outside the layers (absolute, relative, ``..`` chains), symlink
loops and 40/41-link chains, a lower (and an upper) directory swapped for a symlink while the mount
has it cached, 255-byte and odd-byte names, paths past PATH_MAX, a 2000-deep directory chain,
64 KiB xattrs, device nodes, fifos, setuid/setgid files and a file capability.

A canary tree outside the layers (which also holds every target the symlinks point at) and the
names in /etc are checksummed before and after every set of operations: nothing outside UPPER and
WORK may be written. Where the kernel's behaviour is defined, every operation's result or errno
and the resulting trees are compared with kernel overlayfs (``Pair.same``, ``check_all``).

Writing *through* a symlink that points outside would be the caller's own path walk following it
(the kernel's overlay does the same), so such names get the operations that act on the name itself
(lchown, lutimes, lsetxattr, link, rename, unlink, O_NOFOLLOW and O_EXCL opens, mkdir/symlink
over it); names that resolve inside the mount also get writes, truncate, chmod and creates through
them. What must never happen is the daemon following a symlink stored in a layer.

The tests built on ``Twin`` (long names and paths past PATH_MAX, the 2000-deep chain) and the
stale WORK run as root, as the plain test user (its pyunionfs through fusermount3 on layers it
owns, against root's kernel overlayfs with ``-o userxattr``, every operation run as the user) and
as root of a user namespace: the ``who`` fixture (rootless_support.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    IMPL,
    Device,
    Dir,
    Fifo,
    File,
    Pair,
    StackPaths,
    StackSpec,
    Symlink,
    mounts_under,
    outcome,
    snapshot_raw,
    stat_summary,
)
from rootless_support import Who
from views import assert_log_clean, fd_tree, fd_tree_diff, raise_nofile, report

# Each userns case in a nested pytest of its own: together they (2000-deep chains, paths past
# PATH_MAX) would run past the one time limit of the first case under load.
USERNS_ONE_BY_ONE = True

_libc = ctypes.CDLL(None, use_errno=True)
AT_SYMLINK_NOFOLLOW = 0x100
SECRET = b"SECRET outside the layers"


# ---------------------------------------------------------------------------------------------
# The canary: what must never change
# ---------------------------------------------------------------------------------------------


def _system_churn(name: str) -> bool:
    """Names the system itself makes and drops in /etc (useradd's backups and locks, dpkg's
    temporaries), which another process may create while a test runs."""
    return name.endswith(("-", "~", "+", ".lock", ".tmp")) or ".dpkg-" in name or \
        name.startswith(".#")


def etc_listing() -> tuple[str, frozenset[tuple[str, str]]]:
    """A checksum of the names and types in /etc (not their content: the system may rewrite a
    file), without _system_churn names, and the list itself for a diagnosis."""
    items = set()
    with os.scandir("/etc") as it:
        for e in it:
            if not _system_churn(e.name):
                items.add((e.name, "d" if e.is_dir(follow_symlinks=False)
                           else "l" if e.is_symlink() else "f"))
    return hashlib.sha256(repr(sorted(items)).encode()).hexdigest(), frozenset(items)


class Canary:
    """``outside``: a tree no operation may write; checked with snapshot_raw (content, modes,
    owners, xattrs, mtime, ctime of everything) and /etc's list of names."""

    def __init__(self, outside: Path):
        self.outside = outside
        self.before = snapshot_raw(outside)
        self.etc = etc_listing()
        self.checks = 0

    def check(self, what: str) -> None:
        now = snapshot_raw(self.outside)
        if now != self.before:
            changed = sorted(k for k in set(now) | set(self.before)
                             if now.get(k) != self.before.get(k))
            pairs = [(self.before.get(k), now.get(k)) for k in changed[:3]]
            raise AssertionError(f"after {what}: the canary tree outside the layers changed at "
                                 f"{changed}: {pairs}")
        etc = etc_listing()
        assert etc[0] == self.etc[0], (f"after {what}: /etc's names changed: added "
                                       f"{sorted(etc[1] - self.etc[1])}, removed "
                                       f"{sorted(self.etc[1] - etc[1])}")
        self.checks += 1


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """The canary tree and the symlinks' targets (names partly the same as inside the layers)."""
    o = tmp_path / "outside"
    (o / "dir" / "sub").mkdir(parents=True)
    (o / "secret").write_bytes(SECRET + b"\n")
    (o / "dir" / "f").write_bytes(SECRET + b" f\n")
    (o / "dir" / "sub" / "g").write_bytes(SECRET + b" g\n")
    (o / "dir" / "outside-only-name").write_bytes(SECRET + b" name\n")
    os.setxattr(o / "secret", "user.canary", b"1")
    for p in [o / "secret", o / "dir" / "f", o / "dir", o]:
        os.utime(p, ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
    return o


class Tried:
    """Counts the hostile inputs run through both mounts."""

    def __init__(self, pair: Pair | Twin):
        self.pair = pair
        self.n = 0

    def same(self, fn: Callable[[Path], Any], what: str, expect: Any = ...) -> Any:
        self.n += 1
        return self.pair.same(fn, expect=expect, what=what)


class TwinSide:
    def __init__(self, impl: str, paths: StackPaths, mount: Any):
        self.impl, self.paths, self.mount = impl, paths, mount
        self.root, self.upper = paths.merged, paths.upper


class Twin:
    """Pair.same for stacks deeper than PATH_MAX, which Pair can't snapshot by path: the same
    layers built twice, mounted by the kernel and by pyunionfs; lowers checked by fd walks.
    Layers, mounts and operations are ``who``'s."""

    def __init__(self, make_stack: Callable[..., StackPaths], who: Who, lowers: list,
                 upper: Any = None):
        kp, op = make_stack(lowers, upper), make_stack(lowers, upper)
        who.own(kp.base, op.base)
        self.who = who
        self.lowers_before = [[fd_tree(p) for p in sp.lowers] for sp in (kp, op)]
        self.k = TwinSide("kernel", kp, who.mount(kp, "kernel"))
        self.o = TwinSide(IMPL, op, who.mount(op))
        self.sides = (self.k, self.o)

    def same(self, fn: Callable[[Path], Any], expect: Any = ..., what: str = "") -> Any:
        k, o = self.who.op(fn, self.k.root), self.who.op(fn, self.o.root)
        if expect is not ...:
            premise = (k[0] == "ok") if expect == "ok" else (k == ("err", expect))
            assert premise, f"test premise: kernel gave {k} for {what}, test expects {expect}"
        assert k == o, f"{what}: kernel -> {k!r}, pyunionfs -> {o!r}"
        return k[1]

    def check_all(self) -> None:
        km, om = self.who.call(fd_tree, self.k.root), self.who.call(fd_tree, self.o.root)
        assert km == om, "merged trees differ:\n" + fd_tree_diff(km, om)
        ku, ou = (fd_tree(side.upper, upper=True, prefix=self.who.prefix) for side in self.sides)
        assert ku == ou, "uppers differ:\n" + fd_tree_diff(ku, ou)
        for side, before in zip(self.sides, self.lowers_before):
            for i, (p, b) in enumerate(zip(side.paths.lowers, before)):
                now = fd_tree(p)
                assert now == b, f"{side.impl}: lower{i} changed:\n" + fd_tree_diff(b, now)


def lchmod(path: Path, mode: int) -> None:
    if _libc.fchmodat(-100, os.fsencode(path), mode, AT_SYMLINK_NOFOLLOW) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))


def _read(p: Path, n: int = 200) -> bytes:
    with open(p, "rb") as f:
        return f.read(n)


# ---------------------------------------------------------------------------------------------
# 1. symlinks that point out of the layers, loops, .. chains
# ---------------------------------------------------------------------------------------------


def _symlink_layers(o: str) -> tuple[dict, dict, dict[str, bool]]:
    """(lower, upper, {name: resolves inside the mount}) — writes follow only the inside ones."""
    rel_o = o.lstrip("/")
    names: dict[str, tuple[str, bool]] = {
        "abs_secret": (f"{o}/secret", False),
        "abs_dir": (f"{o}/dir", False),
        "abs_dotdot": (f"{o}/dir/sub/../../secret", False),
        "root_dotdot": (f"/../../../..{o}/secret", False),
        "etc": ("/etc", False),
        "etc_passwd": ("/etc/passwd", False),
        "dangling": (f"{o}/nonexistent", False),
        "long_target": ("x/" * 2047 + "y", False),  # 4095 bytes, the longest allowed
        "loop1": ("loop2", False),
        "loop2": ("loop1", False),
        "self": ("self", False),
        "a/b/c/rel_escape": ("../" * 40 + rel_o + "/secret", False),
        "a/b/c/rel_escape_dir": ("../" * 40 + rel_o + "/dir", False),
        "a/b/c/rel_inside": ("../../../plain", True),
        "a/b/c/rel_inside_dir": ("../../x", True),
        "a/b/c/zigzag": ("../../../a/b/c/../../../a/x/../../plain", True),
        "dirloop": (".", True),
        "a/updir": ("..", True),
    }
    for i in range(41):  # chain0 needs 41 links (ELOOP), chain1 exactly 40 (works)
        names[f"chain{i}"] = (f"chain{i + 1}" if i < 40 else "plain", True)
    lower: dict = {"plain": File("plain\n"), "a/x/inner": File("inner\n"),
                   "a/b/c/file": File("c\n")}
    inside = {}
    for n, (target, ins) in names.items():
        lower[n] = Symlink(target, uid=0)
        inside[n] = ins
    upper: dict = {"u_abs_secret": Symlink(f"{o}/secret"), "u_loop": Symlink("u_loop"),
                   "a/b/c/u_rel_escape": Symlink("../" * 40 + rel_o + "/dir/f")}
    inside.update({"u_abs_secret": False, "u_loop": False, "a/b/c/u_rel_escape": False})
    return lower, upper, inside


def _read_ops(name: str) -> list[tuple[str, Callable[[Path], Any]]]:
    def listing(m: Path) -> Any:
        names = os.listdir(m / name)
        return "passwd" in names if name == "etc" else sorted(names)

    def o_path(m: Path) -> Any:
        fd = os.open(m / name, os.O_PATH | os.O_NOFOLLOW)
        try:
            return stat_summary(os.fstat(fd))
        finally:
            os.close(fd)

    def nofollow(m: Path) -> Any:
        os.close(os.open(m / name, os.O_RDONLY | os.O_NOFOLLOW))

    return [
        ("lstat", lambda m: stat_summary(os.lstat(m / name))),
        ("readlink", lambda m: os.readlink(m / name)),
        ("stat", lambda m: stat_summary(os.stat(m / name)) if name != "etc" else "dir"),
        ("read", lambda m: _read(m / name)),
        ("listdir", listing),
        ("trailing slash", lambda m: os.path.isdir(str(m / name) + "/")),
        ("O_NOFOLLOW", nofollow),
        ("O_PATH|O_NOFOLLOW", o_path),
        ("lgetxattr", lambda m: os.getxattr(m / name, "user.x", follow_symlinks=False)),
        ("llistxattr", lambda m: sorted(os.listxattr(m / name, follow_symlinks=False))),
    ]


def _nofollow_write_ops(name: str) -> list[tuple[str, Callable[[Path], Any]]]:
    def lchown(m: Path) -> Any:
        os.chown(m / name, 1000, 1000, follow_symlinks=False)
        return stat_summary(os.lstat(m / name))

    def lutime(m: Path) -> Any:
        os.utime(m / name, ns=(1_234_000_000 * 10**9, 1_234_000_000 * 10**9),
                 follow_symlinks=False)
        return os.lstat(m / name).st_mtime_ns

    def ltrusted(m: Path) -> Any:
        os.setxattr(m / name, "trusted.hostile", b"v", follow_symlinks=False)
        return os.getxattr(m / name, "trusted.hostile", follow_symlinks=False)

    def hardlink(m: Path) -> Any:
        os.link(m / name, m / (name + ".hl"), follow_symlinks=False)
        return os.lstat(m / (name + ".hl")).st_nlink, os.readlink(m / (name + ".hl"))

    def excl(m: Path) -> Any:
        os.close(os.open(m / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))

    def rename_round(m: Path) -> Any:
        os.rename(m / name, m / (name + ".mv"))
        os.rename(m / (name + ".mv"), m / name)
        return os.readlink(m / name)

    return [
        ("lchown", lchown),
        ("lutime", lutime),
        ("lchmod", lambda m: lchmod(m / name, 0o600)),
        ("lsetxattr user.*", lambda m: os.setxattr(m / name, "user.x", b"v",
                                                   follow_symlinks=False)),
        ("lsetxattr trusted.*", ltrusted),
        ("link", hardlink),
        ("O_CREAT|O_EXCL", excl),
        ("mkdir over", lambda m: os.mkdir(m / name)),
        ("symlink over", lambda m: os.symlink("x", m / name)),
        ("rename away and back", rename_round),
        ("unlink the link", lambda m: os.unlink(m / (name + ".hl"))),
    ]


def _follow_write_ops(name: str) -> list[tuple[str, Callable[[Path], Any]]]:
    """Only for symlinks that resolve inside the mount: writes through them."""
    def append(m: Path) -> Any:
        with open(m / name, "ab") as f:
            f.write(b"appended through a symlink\n")
        return _read(m / name)

    def create_in(m: Path) -> Any:
        (m / name / "new-inside").write_bytes(b"new\n")
        return sorted(os.listdir(m / name))

    return [
        ("append through", append),
        ("truncate through", lambda m: os.truncate(m / name, 3)),
        ("chmod through", lambda m: os.chmod(m / name, 0o640)),
        ("create inside", create_in),
        ("mkdir inside", lambda m: os.mkdir(m / name / "newdir")),
    ]


def _again_on_eloop(fn: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """``fn``, tried once more after ELOOP.  A path walk that started in RCU mode and must
    restart (a FUSE symlink whose text isn't cached can't be read there) keeps the links it
    counted (fs/namei.c sets total_link_count once per lookup): a 38-link chain can then
    pass 40 on our mount.  The retry finds the texts cached; a real loop fails again."""
    def op(m: Path) -> Any:
        try:
            return fn(m)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            return fn(m)
    op.__name__ = getattr(fn, "__name__", "op")
    return op


def test_symlinks_out_of_the_layers_loops_and_dotdot_chains(make_pair, outside):
    lower, upper, inside = _symlink_layers(str(outside))
    canary = Canary(outside)
    pair = make_pair(lowers=[lower], upper=upper)
    t = Tried(pair)
    assert t.same(lambda m: _read(m / "abs_secret"), "premise: reads follow") == SECRET + b"\n"
    t.same(lambda m: _read(m / "chain0"), "41 links", expect="ELOOP")
    assert t.same(lambda m: _read(m / "chain1"), "40 links") == b"plain\n"
    for name in inside:
        for what, fn in _read_ops(name):
            t.same(_again_on_eloop(fn), f"{what} {name}")
        canary.check(f"reads of {name}")
    for name in inside:
        for what, fn in _nofollow_write_ops(name):
            t.same(fn, f"{what} {name}")
        canary.check(f"non-following writes of {name}")
    for name in [n for n, ins in inside.items() if ins]:
        for what, fn in _follow_write_ops(name):
            t.same(fn, f"{what} {name}")
        canary.check(f"writes through {name}")
    t.same(lambda m: sorted(os.listdir(m)), "list the root")
    pair.check_all()
    for name in sorted(inside, key=lambda n: -n.count("/")):
        t.same(lambda m, n=name: os.unlink(m / n), f"unlink {name}", expect="ok")
    canary.check("unlinks")
    pair.check_all()
    report(f"stress hostile symlinks: {len(inside)} hostile names, {t.n} operations compared "
           f"with the kernel, canary checked {canary.checks} times, unchanged")


# ---------------------------------------------------------------------------------------------
# 2. a directory swapped for a symlink under a live mount that has it cached
# ---------------------------------------------------------------------------------------------


def _swap_for_symlink(layer: Path, name: str, target: Path, keep: bool) -> None:
    real = layer / name
    if keep:
        os.rename(real, layer / f".{name}.moved-away")  # still alive under another name
    else:
        for dirpath, dirs, files in os.walk(real, topdown=False):
            for f in files:
                os.unlink(os.path.join(dirpath, f))
            for d in dirs:
                os.rmdir(os.path.join(dirpath, d))
        os.rmdir(real)
    os.symlink(target, real)


def _read_at(d: int, name: str, size: int = 100) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=d)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def _append_at(d: int, name: str, data: bytes = b"more\n", size: int = 100) -> bytes:
    fd = os.open(name, os.O_RDWR | os.O_APPEND, dir_fd=d)
    try:
        os.write(fd, data)
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def _dir_ops(created: set[str]) -> list[tuple[str, Callable[[int], Any]]]:
    """Operations relative to a directory fd held from before the swap (so no path lookup of the
    swapped name happens in the caller's VFS: only the daemon may resolve it)."""

    def create(d: int) -> None:
        created.add("new")
        fd = os.open("new", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)
        os.write(fd, b"new\n")
        os.close(fd)

    def deep(d: int) -> bytes:
        fd = os.open("sub", os.O_RDONLY | os.O_DIRECTORY, dir_fd=d)
        try:
            created.add("sub/newer")
            os.close(os.open("newer", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
            return _read_at(fd, "g", 200)
        finally:
            os.close(fd)

    def read_in(d: int, sub: str, name: str) -> bytes:
        fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=d)
        try:
            return _read_at(fd, name, 200)
        finally:
            os.close(fd)

    def mkdir(d: int) -> None:
        created.add("newdir")
        os.mkdir("newdir", dir_fd=d)

    def rename(d: int) -> None:
        created.add("f.renamed")
        os.rename("f", "f.renamed", src_dir_fd=d, dst_dir_fd=d)

    def symlink(d: int) -> None:
        created.add("ln")
        os.symlink("f", "ln", dir_fd=d)

    return [
        ("listdir", lambda d: sorted(os.listdir(d))),
        ("stat f", lambda d: stat_summary(os.stat("f", dir_fd=d, follow_symlinks=False))),
        ("read f", lambda d: _read_at(d, "f", 200)),
        ("read sub/g", lambda d: read_in(d, "sub", "g")),
        ("write f", lambda d: _append_at(d, "f", b"written\n", 200)),
        ("create new", create),
        ("create in sub", deep),
        ("mkdir", mkdir),
        ("chmod f", lambda d: os.chmod("f", 0o600, dir_fd=d)),
        ("truncate f", lambda d: os.truncate(_fd_path(d, "f"), 1)),
        ("setxattr f", lambda d: os.setxattr(_fd_path(d, "f"), "user.h", b"1")),
        ("symlink", symlink),
        ("rename f", rename),
        ("unlink", lambda d: os.unlink("f.renamed", dir_fd=d)),
        ("listdir again", lambda d: sorted(os.listdir(d))),
    ]


def _fd_path(d: int, name: str) -> str:
    return f"/proc/self/fd/{d}/{name}"


def test_dir_swapped_for_symlink_while_cached(make_pair, outside):
    """Layers changed under a live mount are undefined for overlayfs, so the errno is not
    compared with the kernel's; what must hold on both: nothing outside is written, no outside
    data or name shows, no symlink to outside appears in the upper, the mount keeps answering."""
    lower = {"d/f": File("lower f\n"), "d/sub/g": File("lower g\n"), "e/f": File("lower e/f\n"),
             "e/sub/g": File("lower e/g\n")}
    upper = {"u/f": File("upper f\n"), "u/sub/g": File("upper g\n")}
    canary = Canary(outside)
    pair = make_pair(lowers=[lower], upper=upper)
    target = outside / "dir"
    outcomes: dict[str, dict[str, tuple[str, Any]]] = {}
    leaks, tried = [], 0
    for side in pair.sides:
        held = {}
        for name in ("d", "e", "u"):
            # cache it: lookups, attributes, a listing, data, and hold the directory open
            os.listdir(side.root / name)
            _read(side.root / name / "f")
            os.stat(side.root / name / "sub" / "g")
            held[name] = os.open(side.root / name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _swap_for_symlink(side.paths.lowers[0], "d", target, keep=True)
            _swap_for_symlink(side.paths.lowers[0], "e", target, keep=False)
            _swap_for_symlink(side.upper, "u", target, keep=True)
            for name, dfd in held.items():
                created: set[str] = set()
                for what, fn in _dir_ops(created):
                    tried += 1
                    try:
                        res: tuple[str, Any] = ("ok", fn(dfd))
                    except OSError as e:
                        res = ("err", errno.errorcode.get(e.errno or 0, str(e.errno)))
                    outcomes.setdefault(f"{name}: {what}", {})[side.impl] = res
                    shown = repr(res)
                    if "SECRET" in shown or "outside-only-name" in shown:
                        leaks.append(f"{side.impl} {name}: {what} -> {res}")
                    canary.check(f"{side.impl}: {what} in swapped {name}")
            assert sorted(os.listdir(side.root)), f"{side.impl}: the mount stopped answering"
            for dirpath, dirs, files in os.walk(side.upper):
                for f in dirs + files:  # (a symlink to a directory is listed in dirs)
                    p = os.path.join(dirpath, f)
                    if os.path.islink(p) and os.readlink(p).startswith(str(outside)) and \
                            os.path.relpath(p, side.upper) != "u":
                        leaks.append(f"{side.impl}: a symlink to outside appeared in the upper:"
                                     f" {os.path.relpath(p, side.upper)}")
        finally:
            for dfd in held.values():
                os.close(dfd)
    assert not leaks, "followed a symlink out of the layer:\n" + "\n".join(leaks)
    canary.check("all")
    differ = {k: v for k, v in outcomes.items() if v.get("kernel") != v.get(IMPL)}
    kinds = {impl: Counter(v[impl][1] if v[impl][0] == "err" else "ok"
                           for v in outcomes.values() if impl in v)
             for impl in ("kernel", IMPL)}
    for side in pair.sides:  # an internal error is an EIO: the daemon must keep to its rules
        if side.mount is not None:
            assert_log_clean(side.mount)
    report(f"stress hostile swapped dirs: {tried} operations in 3 dirs swapped for symlinks "
           f"(lower kept, lower deleted, upper) on both mounts, nothing leaked or written "
           f"outside; outcomes (undefined for overlayfs, {len(differ)} differ): kernel "
           f"{dict(kinds['kernel'])}, {IMPL} {dict(kinds[IMPL])}")


# ---------------------------------------------------------------------------------------------
# 3. 255-byte and odd names, paths past PATH_MAX
# ---------------------------------------------------------------------------------------------

N255 = "n" * 255
D255 = "d" * 255
ODD = ["new\nline", "tab\there", "back\\slash", " lead", "trail ", "-dash", ".wh.fake", "...",
       "#1", "é" * 127 + "x", os.fsdecode(b"\xff\xfe-not-utf8"), "*?[glob]", "a:b"]
LONG_LEVELS = [f"L{i:02d}" + "x" * 252 for i in range(18)]  # 18 x 256 bytes: 4.6 KB of path


def _long_lower(root: Path) -> None:
    (root / N255).write_bytes(b"255\n")
    (root / D255).mkdir()
    (root / D255 / N255).write_bytes(b"inner 255\n")
    os.symlink(N255, root / ("s" * 255))
    for n in ODD:
        (root / n).write_bytes(n.encode(errors="surrogateescape") + b"\n")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in LONG_LEVELS:
            os.mkdir(n, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"past PATH_MAX\n")
        os.close(leaf)
    finally:
        os.close(fd)
    for dirpath, dirs, files in os.walk(root):  # deterministic times for the pair's two copies
        for n in dirs + files:
            with contextlib.suppress(OSError):
                os.utime(os.path.join(dirpath, n), ns=(10**18, 10**18), follow_symlinks=False)


def _walk_down(names: list[str], fn: Callable[[int], Any]) -> Callable[[Path], Any]:
    """``fn(fd)`` on the directory ``names`` below the mount, reached one fd at a time (the
    path is too long for one call)."""
    def op(m: Path) -> Any:
        fd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for n in names:
                nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nfd
            return fn(fd)
        finally:
            os.close(fd)
    return op


def _at_bottom(fn: Callable[[int], Any]) -> Callable[[Path], Any]:
    return _walk_down(LONG_LEVELS, fn)


def test_long_and_odd_names_and_paths_past_path_max(make_stack, outside, who: Who):
    canary = Canary(outside)
    pair = Twin(make_stack, who, [_long_lower])
    t = Tried(pair)
    for n in [N255, f"{D255}/{N255}", "s" * 255, *ODD]:
        t.same(lambda m, n=n: stat_summary(os.lstat(m / n)), f"lstat {n!r}")
        t.same(lambda m, n=n: _read(m / n), f"read {n!r}", expect="ok")
        t.same(lambda m, n=n: (m / n).open("ab").write(b"+\n"), f"append {n!r}", expect="ok")
        t.same(lambda m, n=n: os.chmod(m / n, 0o600), f"chmod {n!r}")
        t.same(lambda m, n=n: os.truncate(m / n, 2), f"truncate {n!r}")
        t.same(lambda m, n=n: os.setxattr(m / n, "user." + "x" * 250, b"v" * 1000),
               f"255-byte xattr name on {n!r}")
        t.same(lambda m, n=n: os.setxattr(m / n, "user." + "x" * 251, b"v"),
               f"256-byte xattr name on {n!r}")
        t.same(lambda m, n=n: os.link(m / n, m / (n + ".hl")), f"link {n!r}")
        t.same(lambda m, n=n: (os.rename(m / n, m / (n[:-1] + "R")), sorted(os.listdir(m)),
                               os.rename(m / (n[:-1] + "R"), m / n))[1], f"rename {n!r}")
    canary.check("ops on long and odd names")
    too_long = "z" * 256
    t.same(lambda m: os.close(os.open(m / too_long, os.O_CREAT | os.O_WRONLY)), "create 256",
           expect="ENAMETOOLONG")
    t.same(lambda m: os.mkdir(m / too_long), "mkdir 256", expect="ENAMETOOLONG")
    t.same(lambda m: os.rename(m / D255, m / too_long), "rename to 256", expect="ENAMETOOLONG")
    t.same(lambda m: os.mkdir(m / D255 / ("e" * 255)), "mkdir 255 in a 255 dir", expect="ok")
    t.same(lambda m: os.symlink("t/" * 2047 + "y", m / "sym4095"), "symlink 4095", expect="ok")
    t.same(lambda m: os.symlink("t/" * 2048, m / "sym4096"), "symlink 4096",
           expect="ENAMETOOLONG")
    t.same(lambda m: os.rename(m / D255, m / ("D" * 255)), "rename a merged 255 dir")
    t.same(lambda m: sorted(os.listdir(m)), "listing")
    # past PATH_MAX, through directory fds (as find and rm do)
    t.same(_at_bottom(lambda d: _read_at(d, "leaf")), "read past PATH_MAX", expect="ok")
    t.same(_at_bottom(lambda d: _append_at(d, "leaf")), "append past PATH_MAX (copy-up of 18 "
           "parents with 256-byte names)", expect="ok")
    t.same(_at_bottom(lambda d: os.mkdir(N255, dir_fd=d)), "mkdir past PATH_MAX", expect="ok")
    t.same(_at_bottom(lambda d: os.rename("leaf", "leaf2", src_dir_fd=d, dst_dir_fd=d)),
           "rename past PATH_MAX", expect="ok")
    t.same(_at_bottom(lambda d: sorted(os.listdir(d))), "listdir past PATH_MAX", expect="ok")
    canary.check("ops past PATH_MAX")
    pair.check_all()
    report(f"stress hostile names: {len(ODD) + 3} long/odd names, a {len(LONG_LEVELS) * 256}-byte "
           f"path, {t.n} operations compared with the kernel, canary unchanged")


# ---------------------------------------------------------------------------------------------
# 4. a 2000-deep directory chain
# ---------------------------------------------------------------------------------------------

DEPTH = 2000
# short names, a 255-byte one every 250 levels: 12 KB of path at the leaf
CHAIN = [("y" * 255 if i % 250 == 249 else str(i)) for i in range(DEPTH)]


def _deep_lower(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in CHAIN:
            os.mkdir(n, 0o755, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
        os.symlink("loop", "loop", dir_fd=fd)
        os.symlink("../" * 10 + "leafcopy", "up10", dir_fd=fd)
        os.mkfifo("fifo", dir_fd=fd)
    finally:
        os.close(fd)
    (root / "beside").write_bytes(b"beside\n")


def _walk_chain(fn: Callable[[int], Any]) -> Callable[[Path], Any]:
    return _walk_down(CHAIN, fn)


def _find(m: Path) -> Any:
    r = subprocess.run(["find", ".", "-printf", "%d %y %m %s %f\\n"], cwd=m, capture_output=True,
                       timeout=CMD_TIMEOUT * 2, check=False)
    lines = sorted(r.stdout.splitlines())
    return r.returncode, r.stderr.decode(errors="replace")[-500:], len(lines), \
        hashlib.sha256(b"\n".join(lines)).hexdigest()


def _rm_rf(m: Path) -> Any:
    r = subprocess.run(["rm", "-rf", "--", CHAIN[0]], cwd=m, capture_output=True,
                       timeout=CMD_TIMEOUT * 2, check=False)
    return r.returncode, r.stderr.decode(errors="replace")[-500:], sorted(os.listdir(m))


def _remove_deep(twin: Twin) -> None:
    """pytest's own clean-up of old temp dirs recurses once per level and fails on this tree:
    remove it here, once nothing is mounted below the stack (never under a live mount)."""
    for side in twin.sides:
        side.mount.stop()
        if mounts_under(side.paths.base):
            continue
        for d in [*side.paths.lowers, side.paths.upper]:
            subprocess.run(["rm", "-rf", "--", str(d)], timeout=CMD_TIMEOUT * 2, check=False)


def test_2000_deep_chain_find_write_rm(make_stack, outside, who: Who):
    raise_nofile()
    canary = Canary(outside)
    t0 = time.monotonic()
    pair = Twin(make_stack, who, [_deep_lower])
    try:
        _deep_chain_steps(pair, canary, t0)
    finally:
        _remove_deep(pair)


def _deep_chain_steps(pair: Twin, canary: Canary, t0: float) -> None:
    t = Tried(pair)
    found = t.same(_find, "find over 2000 levels", expect="ok")
    assert found[0] == 0 and found[2] == 1 + DEPTH + 5, found  # ., the chain, 4 + 1 files

    def write_at_leaf(d: int) -> Any:
        fd = os.open("leaf", os.O_RDWR | os.O_APPEND, dir_fd=d)
        try:
            os.write(fd, b"written at depth 2000\n")
            data = os.pread(fd, 100, 0)
        finally:
            os.close(fd)
        os.mkdir("newdir", dir_fd=d)
        os.rename("leaf", "leafcopy", src_dir_fd=d, dst_dir_fd=d)
        loop = outcome(lambda _: os.stat("loop", dir_fd=d), Path("/"))
        return data, sorted(os.listdir(d)), os.readlink("up10", dir_fd=d), loop

    data = t.same(_walk_chain(write_at_leaf), "write at the leaf (copy-up of 2000 parents)",
                  expect="ok")
    assert data[0] == b"at the bottom\nwritten at depth 2000\n" and data[3] == ("err", "ELOOP")
    canary.check("write at depth 2000")
    pair.check_all()
    t.same(_rm_rf, "rm -rf of the chain", expect="ok")
    canary.check("rm -rf at depth 2000")
    pair.check_all()
    report(f"stress hostile deep chain: {DEPTH} levels, {t.n} steps (find, write at the leaf, "
           f"rm -rf) and the trees after each equal to the kernel in {time.monotonic() - t0:.1f}s, "
           "canary unchanged")


# ---------------------------------------------------------------------------------------------
# 5. 64 KiB xattrs (user.*), on ext4 (which refuses them) and on tmpfs (which takes them)
# ---------------------------------------------------------------------------------------------

XATTR_MAX = 65536


def _xattr_layers() -> tuple[list, dict]:
    big = bytes(range(256)) * (XATTR_MAX // 256)
    lower = {
        "f": File("lower file\n", xattrs={"user.mid": b"m" * 3000}),
        "d/inner": File("inner\n"),
    }
    return [lower], {"big": big}


def _xattr_ops(big: bytes) -> list[tuple[str, Callable[[Path], Any], Any]]:
    def digest(m: Path, name: str, attr: str) -> Any:
        v = os.getxattr(m / name, attr)
        return len(v), hashlib.sha256(v).hexdigest()[:16]

    def many(m: Path) -> Any:
        # enough names that the list passes 64 KiB: listxattr must say E2BIG, not truncate
        for i in range(5000):
            os.setxattr(m / "many", f"user.n{i:05d}." + "p" * 8, b"")
        return len(os.listxattr(m / "many"))

    def size_query(m: Path, name: str, attr: str) -> Any:
        buf = ctypes.create_string_buffer(0)
        n = _libc.getxattr(os.fsencode(m / name), attr.encode(), buf, 0)
        return n if n >= 0 else -ctypes.get_errno()

    return [
        ("set 64 KiB on a lower file (copy-up)", lambda m: os.setxattr(m / "f", "user.big", big),
         ...),
        ("get it", lambda m: digest(m, "f", "user.big"), ...),
        ("size query", lambda m: size_query(m, "f", "user.big"), ...),
        ("the lower xattr survived", lambda m: digest(m, "f", "user.mid"), "ok"),
        ("set 64 KiB + 1", lambda m: os.setxattr(m / "f", "user.toobig", big + b"x"), "E2BIG"),
        ("set 64 KiB, 255-byte name, on a lower dir",
         lambda m: os.setxattr(m / "d", "user." + "n" * 250, big), ...),
        ("get it from the dir", lambda m: digest(m, "d", "user." + "n" * 250), ...),
        ("new file with 64 KiB", lambda m: ((m / "new").write_bytes(b"n"),
                                            os.setxattr(m / "new", "user.big", big))[1], ...),
        ("replace with a smaller value", lambda m: os.setxattr(m / "new", "user.big", b"s"), ...),
        ("XATTR_CREATE on an existing name",
         lambda m: os.setxattr(m / "f", "user.mid", b"x", os.XATTR_CREATE), "EEXIST"),
        ("XATTR_REPLACE on a missing name",
         lambda m: os.setxattr(m / "f", "user.nope", b"x", os.XATTR_REPLACE), "ENODATA"),
        ("list", lambda m: sorted(os.listxattr(m / "f")), "ok"),
        ("many names", lambda m: ((m / "many").write_bytes(b""), many(m))[1], ...),
        ("list many again", lambda m: len(os.listxattr(m / "many")), ...),
        ("unlink it", lambda m: os.unlink(m / "many"), "ok"),  # snapshots can't list it
        ("remove the big one", lambda m: os.removexattr(m / "f", "user.big"), ...),
        ("get after remove", lambda m: digest(m, "f", "user.big"), "ENODATA"),
        ("copy-up by write keeps the rest",
         lambda m: ((m / "d" / "inner").open("ab").write(b"x"),
                    sorted(os.listxattr(m / "d" / "inner")))[1], "ok"),
    ]


@pytest.mark.parametrize("fs", ["ext4", "tmpfs"])
def test_64k_xattrs(make_pair, tmpfs, outside, fs):
    canary = Canary(outside)
    lowers, extra = _xattr_layers()
    if fs == "ext4":
        pair = make_pair(lowers=lowers)
    else:
        pair = Pair(StackSpec(lowers=lowers), tmpfs() / "pair")
    try:
        t = Tried(pair)
        results = []
        for what, fn, expect in _xattr_ops(extra["big"]):
            results.append((what, t.same(fn, what, expect=expect)))
        canary.check("xattr ops")
        pair.check_all()
    finally:
        if fs == "tmpfs":
            pair.stop()
    refused = Counter(r for _w, r in results if isinstance(r, str) and r.startswith("E"))
    report(f"stress hostile xattrs on {fs}: {t.n} operations with 64 KiB values and 5000 names "
           f"equal to the kernel (refused alike: {dict(refused)}), canary unchanged")


# ---------------------------------------------------------------------------------------------
# 6. device nodes, fifos, setuid/setgid files, a file capability
# ---------------------------------------------------------------------------------------------

# security.capability v2: cap_net_raw (bit 13) permitted, effective
CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


def _special_lower() -> dict:
    return {
        "dev/null": Device("c", 1, 3, mode=0o666),
        "dev/zero": Device("c", 1, 5, mode=0o666),
        "dev/blk": Device("b", 7, 250, mode=0o600),   # never opened
        "dev/fifo": Fifo(mode=0o666),
        "bin/suid": File("#!/bin/sh\n", mode=0o4755, uid=1000, gid=1000),
        "bin/suid_root": File("#!/bin/sh\n", mode=0o4755),
        "bin/sgid": File("#!/bin/sh\n", mode=0o2755, gid=1000),
        "bin/suid_open": File("world-writable setuid\n", mode=0o4777, uid=1000, gid=1000),
        "bin/cap": File("capable\n", mode=0o755, xattrs={"security.capability": CAP_NET_RAW}),
        "shared": Dir(mode=0o2777, gid=1000),
    }


def _special_ops() -> list[tuple[str, Callable[[Path], Any], Any, int | None]]:
    """(what, op, expected kernel outcome or ..., run as uid or None for root)."""
    def st(rel: str) -> Callable[[Path], Any]:
        return lambda m: stat_summary(os.lstat(m / rel))

    def rw(rel: str, data: bytes) -> Callable[[Path], Any]:
        def op(m: Path) -> Any:
            fd = os.open(m / rel, os.O_RDWR | os.O_NONBLOCK)
            try:
                os.write(fd, data)
                return os.read(fd, 16)
            finally:
                os.close(fd)
        return op

    def append(rel: str) -> Callable[[Path], Any]:
        def op(m: Path) -> Any:
            with open(m / rel, "ab") as f:
                f.write(b"appended\n")
            return stat_summary(os.lstat(m / rel))
        return op

    def mk(m: Path) -> Any:
        os.mkdir(m / "shared" / "sub")
        (m / "shared" / "file").write_bytes(b"x")
        return stat_summary(os.lstat(m / "shared" / "sub")), stat_summary(
            os.lstat(m / "shared" / "file"))

    ops: list[tuple[str, Callable[[Path], Any], Any, int | None]] = []
    for rel in ("dev/null", "dev/zero", "dev/blk", "dev/fifo", "bin/suid", "bin/suid_root",
                "bin/sgid", "bin/suid_open", "bin/cap", "shared"):
        ops.append((f"lstat {rel}", st(rel), "ok", None))
    ops += [
        ("write /dev/null twin, no copy-up", rw("dev/null", b"x" * 100), "ok", None),
        ("read /dev/zero twin", lambda m: open(m / "dev/zero", "rb").read(8), "ok", None),
        ("fifo: write and read back", rw("dev/fifo", b"through the pipe"), "ok", None),
        ("chmod a char device (copy-up)", lambda m: os.chmod(m / "dev/null", 0o600), "ok", None),
        ("chown a block device", lambda m: os.chown(m / "dev/blk", 1000, 1000), "ok", None),
        ("chmod the fifo", lambda m: os.chmod(m / "dev/fifo", 0o640), "ok", None),
        ("link the fifo", lambda m: os.link(m / "dev/fifo", m / "dev/fifo2"), "ok", None),
        ("rename the device", lambda m: os.rename(m / "dev/blk", m / "dev/blk2"), "ok", None),
        ("truncate a device", lambda m: os.truncate(m / "dev/zero", 0), ..., None),
        ("mknod 0/0 (a whiteout) through the mount",
         lambda m: os.mknod(m / "dev/wh", stat.S_IFCHR | 0o600, 0), "EPERM", None),
        ("mknod a char device", lambda m: os.mknod(m / "dev/new", stat.S_IFCHR | 0o600,
                                                   os.makedev(1, 7)), "ok", None),
        ("mkfifo", lambda m: os.mkfifo(m / "dev/newfifo"), "ok", None),
        ("write as root keeps setuid", append("bin/suid"), "ok", None),
        ("write as uid 2000 drops setuid", append("bin/suid_open"), "ok", 2000),
        ("truncate as uid 2000", lambda m: os.truncate(m / "bin/suid_open", 3), "ok", 2000),
        ("chown by root drops setgid", lambda m: os.chown(m / "bin/sgid", 0, 1000), "ok", None),
        ("chmod keeps setuid as root", lambda m: os.chmod(m / "bin/suid_root", 0o6755), "ok",
         None),
        ("copy-up by chmod", lambda m: os.chmod(m / "bin/cap", 0o750), "ok", None),
        ("the capability", lambda m: os.getxattr(m / "bin/cap", "security.capability"), "ok",
         None),
        ("a write kills it", append("bin/cap"), "ok", None),
        ("the capability after a write",
         lambda m: os.getxattr(m / "bin/cap", "security.capability"), "ENODATA", None),
        ("setgid dir: mkdir and create as uid 2000", mk, "ok", 2000),
        ("unlink the devices", lambda m: [os.unlink(m / "dev" / n) for n in
                                          sorted(os.listdir(m / "dev"))], "ok", None),
    ]
    for rel in ("bin/suid", "bin/suid_root", "bin/sgid", "bin/suid_open", "bin/cap"):
        ops.append((f"lstat {rel} at the end", st(rel), "ok", None))
    return ops


def test_devices_fifos_setuid(make_pair, outside):
    canary = Canary(outside)
    pair = make_pair(lowers=[_special_lower()])
    t = Tried(pair)
    got = {}
    for what, fn, expect, uid in _special_ops():
        if uid is None:
            got[what] = t.same(fn, what, expect=expect)
        else:
            t.n += 1
            got[what] = pair.same_as(uid, uid, fn, expect=expect, what=what)
        canary.check(what)
    pair.check_all()
    # the premises, as the kernel showed them
    assert got["lstat bin/suid at the end"][1] == "0o4755"
    assert got["lstat bin/suid_open at the end"][1] == "0o777"
    assert got["lstat bin/sgid at the end"][1] == "0o755"
    assert got["the capability"] == CAP_NET_RAW
    report(f"stress hostile special files: {t.n} operations on device nodes, fifos, setuid/setgid "
           f"files and a capability equal to the kernel, canary unchanged")


# ---------------------------------------------------------------------------------------------
# 7. a stale WORK with symlinks out of it (the mount wipes WORK/work: never through a symlink)
# ---------------------------------------------------------------------------------------------


def _plant_work(work: Path, o: Path, variant: str) -> None:
    w = work / "work"
    if variant == "work-is-a-symlink":
        os.symlink(o / "dir", w)
        return
    (w / "sub").mkdir(parents=True)
    os.symlink(o / "dir", w / "evil_dir")
    os.symlink(o / "secret", w / "evil_file")
    os.symlink(o / "dir", w / "#1")
    os.symlink(o / "dir", w / "sub" / "deeper")
    (w / "sub" / "plain").write_bytes(b"stale\n")
    os.mkfifo(w / "fifo")
    os.symlink(o / "dir", work / "index")  # the kernel's index dir (index=off: left alone)


@pytest.mark.parametrize("variant", ["symlinks-in-work", "work-is-a-symlink"])
def test_stale_workdir_with_symlinks_out(make_stack, outside, variant, who: Who):
    canary = Canary(outside)
    lower = {"d/f": File("f\n"), "d/g": File("g\n"), "e/h": File("h\n")}
    stacks = {impl: make_stack([lower]) for impl in ("kernel", IMPL)}
    for sp in stacks.values():
        _plant_work(sp.work, outside, variant)
        who.own(sp.base)  # the user's stale WORK: its own leftovers
    canary.check("planting")
    results: dict[str, Any] = {}
    for impl, sp in stacks.items():
        try:
            m = who.mount(sp, impl)
        except Exception as e:  # noqa: BLE001 - refusing such a WORK is fine too; compared below
            results[impl] = ("refused", type(e).__name__)
            canary.check(f"{impl} refusing the mount")
            continue
        canary.check(f"{impl} mount")
        out = []
        for what, fn in [
            ("copy-up", lambda r: (r / "d" / "f").open("ab").write(b"+")),
            ("whiteout", lambda r: os.unlink(r / "d" / "g")),
            ("rmdir of a merged dir", lambda r: (os.unlink(r / "e" / "h"), os.rmdir(r / "e"))),
            ("create", lambda r: (r / "new").write_bytes(b"new\n")),
            ("rename over", lambda r: os.rename(r / "new", r / "d" / "f")),
        ]:
            out.append((what, who.op(fn, m.root)))
            canary.check(f"{impl}: {what}")
        out.append(("tree", who.call(lambda r: sorted(os.listdir(r / "d")), m.root)))
        m.stop()
        canary.check(f"{impl} unmount")
        assert os.path.islink(sp.work / "index") == (variant == "symlinks-in-work"), impl
        results[impl] = out
    assert results["kernel"] == results[IMPL], results
    report(f"stress hostile stale workdir ({variant}): mounted, 5 operations through WORK on "
           f"both, the same results as the kernel's, canary unchanged")
