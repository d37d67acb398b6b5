"""Trees deeper than PATH_MAX and than Python's stack (issue 8, item 2), against the kernel.

A lower chain 2 000 directories deep with 8-byte names: 18 000 bytes of path at the leaf.
The kernel walks it: `find`, a write at the leaf (copy-up of all 2 000 parents), `rm -rf`.
The operations here reach the leaf through directory fds, as `find` and `rm` do, since the
path is too long for one system call.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from overlay_harness import CMD_TIMEOUT, IMPL

DEPTH = 2000
NAMES = [f"d{i:07d}" for i in range(DEPTH)]  # 8 bytes each


def _chain(root: Path) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in NAMES:
            os.mkdir(n, 0o755, dir_fd=fd)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"leaf\n")
        os.close(leaf)
    finally:
        os.close(fd)


def _at_leaf(root: Path, fn):  # type: ignore[no-untyped-def]
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for n in NAMES:
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fn(fd)
    finally:
        os.close(fd)


def _append_at_leaf(root: Path) -> bytes:
    def run(dfd: int) -> bytes:
        f = os.open("leaf", os.O_WRONLY | os.O_APPEND, dir_fd=dfd)
        os.write(f, b"more\n")
        os.close(f)
        os.mkdir("new", 0o700, dir_fd=dfd)
        f = os.open("leaf", os.O_RDONLY, dir_fd=dfd)
        try:
            return os.read(f, 100)
        finally:
            os.close(f)
    return _at_leaf(root, run)


def _leaf_listing(root: Path) -> list[str]:
    return _at_leaf(root, lambda dfd: sorted(os.listdir(dfd)))


def _find(root: Path) -> tuple[int, int, str]:
    r = subprocess.run(["find", "."], cwd=root, capture_output=True, text=True,
                       timeout=CMD_TIMEOUT)
    return r.returncode, r.stdout.count("\n"), r.stderr[:300]


def _rm_rf(root: Path) -> tuple[int, str]:
    r = subprocess.run(["rm", "-rf", NAMES[0]], cwd=root, capture_output=True, text=True,
                       timeout=CMD_TIMEOUT)
    return r.returncode, r.stderr[:300]


def _upper_depth(upper: Path) -> int:
    """How deep the copied-up chain in upper goes (walked by fd, iteratively)."""
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        for n in NAMES:
            try:
                st = os.stat(n, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                break
            assert stat.S_ISDIR(st.st_mode)
            nfd = os.open(n, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            depth += 1
    finally:
        os.close(fd)
    return depth


def _same(results: dict[str, object], what: str) -> object:
    assert len(set(map(repr, results.values()))) == 1, f"{what}: {results}"
    return results["kernel"]


@pytest.mark.timeout(300)
@pytest.mark.watchdog(240)
def test_2000_deep_find_write_rm_as_kernel(make_stack, mounter) -> None:
    # Not make_pair: its snapshots walk by path, which a tree this deep doesn't allow.
    impls = ["kernel", IMPL]
    stacks = {impl: make_stack([_chain], upper={}) for impl in impls}
    mounts = {impl: mounter(stacks[impl], impl) for impl in impls}
    roots = {impl: m.root for impl, m in mounts.items()}

    def same(fn, what: str) -> object:  # type: ignore[no-untyped-def]
        return _same({impl: fn(r) for impl, r in roots.items()}, what)

    assert same(_find, "find") == (0, DEPTH + 2, "")  # ., 2000 dirs, the leaf
    assert same(_append_at_leaf, "append at the leaf") == b"leaf\nmore\n"
    assert same(_leaf_listing, "leaf listing") == ["leaf", "new"]
    for impl in impls:
        assert _upper_depth(stacks[impl].upper) == DEPTH, impl
    assert same(_find, "find after") == (0, DEPTH + 3, "")
    assert same(_rm_rf, "rm -rf") == (0, "")
    assert same(lambda root: sorted(os.listdir(root)), "root listing") == []
    for impl in impls:
        # upper holds one whiteout, the chain's top; what was copied up is gone
        st = os.lstat(stacks[impl].upper / NAMES[0])
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, impl
    for m in mounts.values():
        m.stop()
    for impl in impls:  # pytest's own clean-up recurses per level: too deep for it
        subprocess.run(["rm", "-rf", str(stacks[impl].lowers[0])], check=True,
                       timeout=CMD_TIMEOUT)
