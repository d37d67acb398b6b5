"""Set-user-ID and set-group-ID bits when a file is written or truncated (issue 8, item 1).

A caller without CAP_FSETID who changes a file's data drops its set-uid bit, and its set-gid bit
where that bit means "run as the group" (g+x) or the caller is not in the file's group; root keeps
both.  FUSE passes a truncating open to the daemon (atomic O_TRUNC), which does it as root, so
nothing in the kernel clears the bits for us there: each case is compared with kernel overlayfs,
on a lower file (copied up by the change), a file already in upper, and a new file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from overlay_harness import IMPL, USERNS, File

USER, GROUP = 1000, 1000
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


OPS = {"write": _write, "truncate": _truncate, "ftruncate": _ftruncate,
       "open_trunc": _open_trunc, "open_trunc_write": _open_trunc_write}


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


@pytest.mark.skipif(USERNS, reason="USER's files and a root caller with CAP_FSETID need ids "
                                   "outside a user namespace's map: see test_setid_bits_of_root")
@pytest.mark.parametrize("where", ["lower", "upper", "new"])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("caller", ["user", "root"])
def test_setid_bits_after_change_as_kernel(make_pair, where: str, op: str, caller: str) -> None:
    lowers, upper = _stack(where)
    pair = make_pair(lowers=lowers, upper=upper)
    if where == "new":
        pair.same(_create_all, "ok")
    before = pair.same(_modes)
    fn = OPS[op]

    def change_all(root: Path) -> None:
        for n in FILES:
            fn(root / n)

    if caller == "user":
        pair.same_as(USER, GROUP, change_all, expect="ok")
    else:
        pair.same(change_all, "ok")
    after = pair.same(_modes)
    if caller == "root":
        assert after == before
    else:
        # the premise: the kernel clears something for every file but g2767
        assert {n for n in FILES if after[n] != before[n]} == set(FILES) - {"g2767"}
    pair.assert_same_tree()
    if IMPL != "kernel":
        pair.assert_same_upper()


ROOT_FILES = {"r4755": 0o4755, "r2755": 0o2755, "r2745": 0o2745, "r6755": 0o6755}


@pytest.mark.parametrize("where", ["lower", "upper"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_setid_bits_of_root(make_pair, where: str, op: str) -> None:
    """Root keeps the bits: CAP_FSETID.  Root of a user namespace (rootless containers) has
    it only there, not where the kernel asks (capable()), so there the bits go, as in the
    kernel; a set-gid bit without g+x stays, root being in the file's group."""
    files = {n: File("data", mode=m) for n, m in ROOT_FILES.items()}
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
