"""Read-only mount (no upper, ≥2 lowers): the merged view works, every change is EROFS
(overlay-semantics §1.2), compared with the kernel's lowers-only overlay."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from overlay_harness import RENAME_EXCHANGE, Dir, File, Symlink, Whiteout, renameat2

LOWERS = [
    {"f": File("top", xattrs={"user.a": "1"}), "d/a": File("a"), "gone": Whiteout(),
     "od": Dir(opaque=True), "od/x": File(), "s": Symlink("f")},
    {"f": File("bottom"), "d/b": File("b"), "gone": File("hidden"), "od/y": File(), "g": File("g")},
]

MUTATIONS: dict[str, Callable[[Path], object]] = {
    "create": lambda m: os.open(m / "new", os.O_CREAT | os.O_WRONLY, 0o644),
    "open-wronly": lambda m: os.open(m / "f", os.O_WRONLY),
    "open-rdwr": lambda m: os.open(m / "f", os.O_RDWR),
    "open-trunc": lambda m: os.open(m / "f", os.O_RDONLY | os.O_TRUNC),
    "truncate": lambda m: os.truncate(m / "f", 0),
    "mkdir": lambda m: os.mkdir(m / "newdir"),
    "rmdir": lambda m: os.rmdir(m / "od"),
    "unlink": lambda m: os.unlink(m / "g"),
    "unlink-in-merged-dir": lambda m: os.unlink(m / "d/a"),
    "rename": lambda m: os.rename(m / "g", m / "h"),
    "exchange": lambda m: renameat2(m / "f", m / "g", RENAME_EXCHANGE),
    "link": lambda m: os.link(m / "g", m / "g2"),
    "symlink": lambda m: os.symlink("g", m / "s2"),
    "mkfifo": lambda m: os.mkfifo(m / "p"),
    "mknod": lambda m: os.mknod(m / "n", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
    "chmod": lambda m: os.chmod(m / "f", 0o600),
    "chown": lambda m: os.chown(m / "f", 1, 1),
    "utime": lambda m: os.utime(m / "f", (1, 1)),
    "setxattr": lambda m: os.setxattr(m / "f", "user.b", b"2"),
    "removexattr": lambda m: os.removexattr(m / "f", "user.a"),
    "chmod-dir": lambda m: os.chmod(m / "d", 0o700),
}


@pytest.fixture
def ro_pair(make_pair):
    return make_pair(lowers=LOWERS, readonly=True)


def test_readonly_view(ro_pair):
    assert ro_pair.same(lambda m: (m / "f").read_text()) == "top"
    assert ro_pair.same(lambda m: sorted(os.listdir(m))) == ["d", "f", "g", "od", "s"]
    assert ro_pair.same(lambda m: sorted(os.listdir(m / "d"))) == ["a", "b"]
    assert ro_pair.same(lambda m: sorted(os.listdir(m / "od"))) == ["x"]
    ro_pair.same(lambda m: os.lstat(m / "gone"), expect="ENOENT")
    assert ro_pair.same(lambda m: bool(os.statvfs(m).f_flag & os.ST_RDONLY)) is True
    ro_pair.check_all()


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_every_mutation_is_erofs(ro_pair, name):
    def op(m: Path) -> None:
        res = MUTATIONS[name](m)
        if isinstance(res, int):  # an fd that should never have been returned
            os.close(res)

    ro_pair.same(op, expect="EROFS", what=name)
    ro_pair.check_all()


def test_readonly_statfs_from_top_lower(ro_pair):
    def op(m: Path) -> tuple[bool, bool]:
        a, b = os.statvfs(m), os.statvfs(m.parent / "lower0")
        return a.f_namemax == b.f_namemax, a.f_bsize == b.f_bsize

    assert ro_pair.same(op) == (True, True)
