"""Set-user-ID and set-group-ID bits when a file is written or truncated (issue 8, item 1).

A caller without CAP_FSETID who changes a file's data drops its set-uid bit, and its set-gid bit
where that bit means "run as the group" (g+x) or the caller is not in the file's group; root keeps
both.  FUSE passes a truncating open to the daemon (atomic O_TRUNC), which does it as root, so
nothing in the kernel clears the bits for us there: each case is compared with kernel overlayfs,
on a lower file (copied up by the change), a file already in upper, and a new file.
"""

from __future__ import annotations

import ctypes
import os
import stat
from pathlib import Path

import pytest
from overlay_harness import IMPL, USERNS, File

USER, GROUP = 1000, 1000
_libc = ctypes.CDLL(None, use_errno=True)
# name: (mode, uid, gid); every one writable by USER
FILES = {
    "u4755": (0o4755, USER, GROUP),  # the user's own setuid program
    "r4777": (0o4777, 0, 0),  # root's, world-writable
    "r2777": (0o2777, 0, 0),  # setgid and g+x: a setgid program
    "r2767": (0o2767, 0, 0),  # setgid without g+x (mandatory locking), caller not in group
    "g2767": (0o2767, 0, GROUP),  # the same, caller in the group: kept
    "r6777": (0o6777, 0, 0),
    "u6755": (0o6755, USER, GROUP),
}


def _write(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, b"W", 0)
    finally:
        os.close(fd)


def _truncate(p: Path) -> None:
    os.truncate(p, 1)


def _ftruncate(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.ftruncate(fd, 2)
    finally:
        os.close(fd)


def _open_trunc(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_TRUNC))


def _open_trunc_write(p: Path) -> None:
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, b"new")
    finally:
        os.close(fd)


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def _fallocator(mode: int, offset: int, length: int):
    def op(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY)
        try:
            if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
        finally:
            os.close(fd)
    return op


def _copy_file_range(p: Path) -> None:
    src = os.open(p.parent / "other" if (p.parent / "other").exists() else p, os.O_RDONLY)
    dst = os.open(p, os.O_WRONLY)
    try:
        os.copy_file_range(src, dst, 1, 0, 1)
    finally:
        os.close(src)
        os.close(dst)


OPS = {"write": _write, "truncate": _truncate, "ftruncate": _ftruncate,
       "open_trunc": _open_trunc, "open_trunc_write": _open_trunc_write,
       "fallocate": _fallocator(0, 0, 8192),
       "fallocate_keep": _fallocator(FALLOC_FL_KEEP_SIZE, 0, 8192),
       "punch_hole": _fallocator(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 2),
       "zero_range": _fallocator(FALLOC_FL_ZERO_RANGE, 0, 2),
       "copy_file_range": _copy_file_range}


def _modes(root: Path) -> dict[str, str]:
    return {n: oct(stat.S_IMODE(os.lstat(root / n).st_mode)) for n in FILES}


def _stack(where: str) -> tuple[list[dict[str, File]], dict[str, File] | None]:
    files = {n: File("data", mode=m, uid=u, gid=g) for n, (m, u, g) in FILES.items()}
    if where == "lower":
        return [files], {}
    if where == "upper":
        return [{"other": File("x")}], files
    return [{"other": File("x")}], {}


def _create_all(root: Path) -> None:
    for n, (m, u, g) in FILES.items():
        p = root / n
        p.write_bytes(b"data")
        os.chown(p, u, g)
        os.chmod(p, m)  # after the chown, which clears the bits


@pytest.mark.parametrize("where", ["lower", "upper", "new"])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("caller", ["user", "user-in-group-0", "root"])
def test_setid_bits_after_change_as_kernel(make_pair, where: str, op: str, caller: str) -> None:
    """``user-in-group-0`` has root's group as a supplementary one (FUSE passes only the
    primary group): a set-gid bit without g+x of root's files stays for it."""
    if USERNS and caller == "root":
        pytest.skip("root of a user namespace has no CAP_FSETID where the kernel asks (capable()): "
                    "see test_setid_bits_of_root")
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    if where == "new":
        pair.same(_create_all, "ok")
    before = pair.same(_modes)
    fn = OPS[op]

    def change_all(root: Path) -> None:
        for n in FILES:
            fn(root / n)

    if caller == "root":
        pair.same(change_all, "ok")
    else:
        groups = [0] if caller == "user-in-group-0" else []
        pair.same_as(USER, GROUP, change_all, expect="ok", groups=groups)
    after = pair.same(_modes)
    if caller == "root":
        assert after == before
    else:
        # the premise: the kernel clears something for every file but those whose group
        # the caller is in, when their set-gid bit comes without g+x
        kept = {"g2767", "r2767"} if caller == "user-in-group-0" else {"g2767"}
        assert {n for n in FILES if after[n] != before[n]} == set(FILES) - kept
    pair.assert_same_tree()
    if IMPL != "kernel":
        pair.assert_same_upper()


# name: (mode, gid); u2745 is in the user's group, which root is not in
ROOT_FILES = {"r4755": (0o4755, 0), "r2755": (0o2755, 0), "r2745": (0o2745, 0),
              "r6755": (0o6755, 0), "u2745": (0o2745, GROUP)}


@pytest.mark.parametrize("where", ["lower", "upper"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_setid_bits_of_root(make_pair, where: str, op: str) -> None:
    """Root keeps the bits: CAP_FSETID.  Root of a user namespace (rootless containers) has
    it only there, not where the kernel asks (capable()), so there the bits go, as in the
    kernel; a set-gid bit without g+x stays, root being in the file's group or, for a
    group it is not in, having CAP_FSETID in its own namespace (in_group_or_capable)."""
    files = {n: File("data", mode=m, gid=g) for n, (m, g) in ROOT_FILES.items()}
    lowers, upper = ([files], {}) if where == "lower" else ([{"other": File("x")}], files)
    pair = make_pair(lowers=lowers, upper=upper)

    def modes(root: Path) -> dict[str, str]:
        return {n: oct(stat.S_IMODE(os.lstat(root / n).st_mode)) for n in ROOT_FILES}

    def change_all(root: Path) -> None:
        for n in ROOT_FILES:
            OPS[op](root / n)

    before = pair.same(modes)
    pair.same(change_all, "ok")
    after = pair.same(modes)
    changed = {n for n in ROOT_FILES if after[n] != before[n]}
    assert changed == ({"r4755", "r2755", "r6755"} if USERNS else set())
    if IMPL != "kernel":
        pair.assert_same_upper()
