"""One upper, one mount (claim.py): a second mount on the UPPER or the WORK of a live one is
refused in one line naming what holds it, and changes nothing; the claim dies with the daemon
(kill -9 included) and waits for one that is on its way out; a kernel overlay mount on the same
directories is refused too (docs/differences.md: the kernel only warns without index=on)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from overlay_harness import (
    MOUNT_TIMEOUT,
    PYTHON,
    REPO,
    File,
    Mount,
    StackPaths,
    force_unmount,
    is_mounted,
    run_cmd,
)

from unionfs import claim

IMAGE: dict = dict(lowers=[{"a": File("lower a"), "d/b": File("b")}], upper={"u": File("up")})


def cli_mount(lowers: list[Path], upper: Path, work: Path, merged: Path
              ) -> subprocess.CompletedProcess[str]:
    """``pyunionfs mount`` as a user types it (a refusal must come back as its exit code)."""
    merged.mkdir(exist_ok=True)
    work.mkdir(exist_ok=True)
    return subprocess.run([PYTHON, "-m", "unionfs", "mount", ":".join(map(str, lowers)),
                           str(upper), str(work), str(merged)], capture_output=True, text=True,
                          timeout=MOUNT_TIMEOUT + 15, cwd=str(REPO), stdin=subprocess.DEVNULL)


def unmount(merged: Path) -> None:
    if is_mounted(merged):
        r = run_cmd([PYTHON, "-m", "unionfs", "umount", str(merged)])
        assert r.returncode == 0, r.stderr
    force_unmount(str(merged))


def work_state(paths: StackPaths) -> tuple[int, list[str]]:
    """WORK/work's inode and contents: a second mount that went ahead would have wiped it."""
    w = paths.work / "work"
    return os.lstat(w).st_ino, sorted(os.listdir(w))


def second_mount(paths: StackPaths, shared: str
                 ) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """A mount that shares only ``shared`` ("upper" or "work") with ``paths``, at merged2;
    unmounted again if it went ahead.  (its result, the other upper, the other work)."""
    other_upper, other_work = paths.base / "upper2", paths.base / "work2"
    other_upper.mkdir()
    m2 = paths.base / "merged2"
    try:
        r = cli_mount(paths.lowers, paths.upper if shared == "upper" else other_upper,
                      other_work if shared == "upper" else paths.work, m2)
        assert not is_mounted(m2)
    finally:
        unmount(m2)
    return r, other_upper, other_work


@pytest.mark.parametrize("shared", ["upper", "work"])
def test_second_mount_is_refused_naming_the_first(make_stack: Callable[..., StackPaths],
                                                  mounter: Callable[..., Mount],
                                                  shared: str) -> None:
    paths = make_stack(**IMAGE)
    first = mounter(paths)
    (first.root / "a").write_text("changed")  # a copy-up: WORK/work was used
    before = work_state(paths)
    r, other_upper, other_work = second_mount(paths, shared)
    assert r.returncode != 0
    held = paths.upper if shared == "upper" else paths.work
    want = (f"pyunionfs: error: {shared} directory '{held}' is in use by the pyunionfs mount "
            f"on '{first.root}' (pid {first.pid})")
    assert r.stderr.strip() == want, r.stderr
    assert r.stderr.count("\n") == 1 and not r.stdout
    # nothing changed: the first mount's work and upper are as they were, and it serves on
    assert work_state(paths) == before
    assert not os.listdir(other_upper)
    assert not other_work.exists() or not os.listdir(other_work)
    (first.root / "n").write_text("new")
    assert (paths.upper / "n").read_text() == "new"
    assert (first.root / "a").read_text() == "changed"


def test_claim_dies_with_a_killed_daemon(make_stack: Callable[..., StackPaths],
                                         mounter: Callable[..., Mount]) -> None:
    paths = make_stack(**IMAGE)
    first = mounter(paths)
    first.overlay.kill()
    m2 = paths.base / "merged2"
    try:
        t0 = time.monotonic()
        r = cli_mount(paths.lowers, paths.upper, paths.work, m2)
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        assert (m2 / "a").read_text() == "lower a" and (m2 / "u").read_text() == "up"
    finally:
        unmount(m2)
        first.stop()
    # no waiting on a dead holder: the kernel dropped its lock with its last descriptor
    assert took < claim.UNSEEN_WAIT, took


def test_mount_right_after_fusermount_waits_for_the_exiting_daemon(
        make_stack: Callable[..., StackPaths]) -> None:
    """``fusermount3 -u`` returns before the daemon has exited (and let go of its claim): an
    immediate new mount on the same directories must wait for it, not fail."""
    paths = make_stack(**IMAGE)
    try:
        for _ in range(3):
            r = cli_mount(paths.lowers, paths.upper, paths.work, paths.merged)
            assert r.returncode == 0, r.stderr
            r = run_cmd(["fusermount3", "-u", str(paths.merged)])
            assert r.returncode == 0, r.stderr
            r = cli_mount(paths.lowers, paths.upper, paths.work, paths.merged)
            assert r.returncode == 0, r.stderr
            assert (paths.merged / "u").read_text() == "up"
            unmount(paths.merged)
    finally:
        unmount(paths.merged)


@pytest.mark.parametrize("shared", ["upper", "work"])
def test_kernel_mount_on_the_same_dirs_is_refused(make_stack: Callable[..., StackPaths],
                                                  mounter: Callable[..., Mount],
                                                  shared: str) -> None:
    paths = make_stack(**IMAGE)
    k = mounter(paths, "kernel")
    try:
        r, other_upper, _ = second_mount(paths, shared)
    finally:
        k.stop()
    held = paths.upper if shared == "upper" else paths.work
    assert r.returncode != 0
    assert r.stderr.strip() == (f"pyunionfs: error: {shared} directory '{held}' is in use by "
                                f"the kernel overlay mount on '{paths.merged}' "
                                f"(its {shared}dir)"), r.stderr
    assert not os.listdir(other_upper)


def test_other_dirs_mount_side_by_side(make_stack: Callable[..., StackPaths],
                                       mounter: Callable[..., Mount]) -> None:
    """Only the upper and work are claimed: mounts sharing their lowers coexist."""
    paths = make_stack(**IMAGE)
    first = mounter(paths)
    u2, w2, m2 = paths.base / "upper2", paths.base / "work2", paths.base / "merged2"
    u2.mkdir()
    try:
        r = cli_mount(paths.lowers, u2, w2, m2)
        assert r.returncode == 0, r.stderr
        (m2 / "a").write_text("second")
        assert (first.root / "a").read_text() == "lower a"
    finally:
        unmount(m2)
    assert (paths.upper / "a").exists() is False and (u2 / "a").read_text() == "second"


def test_the_claim_holds_for_every_user(who, make_stack: Callable[..., StackPaths]) -> None:
    """As root, as a plain user (fusermount3) and as root of a user namespace: the second
    mount on the same upper is refused naming the first, and goes ahead once it is gone."""
    paths = make_stack(**IMAGE)
    w2, m2 = paths.base / "work2", paths.base / "merged2"
    w2.mkdir()
    m2.mkdir()
    who.own(paths.base)
    first = who.mount(paths)
    argv = [PYTHON, "-m", "unionfs", "mount", ":".join(map(str, paths.lowers)), str(paths.upper),
            str(w2), str(m2)]
    try:
        r = subprocess.run(who.argv(argv), capture_output=True, text=True, cwd=str(REPO),
                           timeout=MOUNT_TIMEOUT + 15, stdin=subprocess.DEVNULL)
        assert not is_mounted(m2)
        assert r.returncode == 1
        assert r.stderr.startswith(f"pyunionfs: error: upper directory '{paths.upper}' is in "
                                   f"use by the pyunionfs mount on '{first.root}' (pid "), r.stderr
        assert r.stderr.count("\n") == 1
        first.stop()
        r = subprocess.run(who.argv(argv), capture_output=True, text=True, cwd=str(REPO),
                           timeout=MOUNT_TIMEOUT + 15, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, r.stderr
        assert who.call(lambda m: (m / "u").read_text(), m2) == "up"
    finally:
        if is_mounted(m2):
            r = subprocess.run(who.argv([PYTHON, "-m", "unionfs", "umount", str(m2)]),
                               capture_output=True, text=True, timeout=MOUNT_TIMEOUT)
        force_unmount(str(m2))


def test_a_strangers_lock_does_not_keep_the_owner_out(make_stack: Callable[..., StackPaths]
                                                      ) -> None:
    """Whoever may open the upper may flock it: a lock held by a uid that is neither ours,
    root's nor the directory owner's is not a claim (a warning, and the mount goes ahead)."""
    paths = make_stack(**IMAGE)
    os.chmod(paths.base, 0o755)
    holder = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c",
         "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(paths.upper)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        t0 = time.monotonic()
        r = cli_mount(paths.lowers, paths.upper, paths.work, paths.merged)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 < claim.UNSEEN_WAIT
        assert (paths.merged / "u").read_text() == "up"
    finally:
        unmount(paths.merged)
        holder.kill()
        holder.wait(timeout=10)
