"""Mounting where it can't work (issue 8, items 3 and 4): over the dead mount a killed daemon
left, and without a usable /dev/fuse.  Each is one 'pyunionfs: error: ' line that says what to
do, a non-zero exit, and nothing created in WORK.

Each runs as root, as the plain test user (through fusermount3, /dev/fuse granted by an ACL) and
as root of a user namespace (the ``who`` fixture, rootless_support.py)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    MOUNT_TIMEOUT,
    REPO,
    USERNS,
    File,
    force_unmount,
    is_mounted,
    unionfs_pids,
)
from rootless_support import Who

PYTHON = sys.executable


def _cli(who: Who, *args: str,
         timeout: float = MOUNT_TIMEOUT + 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(who.argv([PYTHON, "-m", "unionfs", *args]), capture_output=True,
                          text=True, cwd=str(REPO), timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def _read_f(m: Path) -> str:
    os.stat(m)
    return (m / "f").read_text()


def _one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode != 0, f"succeeded: {r.stdout} {r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyunionfs: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _daemon_pid(merged: Path) -> int:
    """The pid of the daemon serving ``merged``, which this test started."""
    pids = unionfs_pids(merged)
    assert len(pids) == 1, f"daemons for {merged}: {pids}"
    return pids[0]


TRIES = 10
USER_TRIES = 5  # a try as the user costs 2 s (four commands through setpriv, a fork to read)


def test_mount_over_killed_daemon_is_refused_every_time(make_stack, who: Who) -> None:
    """The kernel answers stat() of a dead mount from its cache; we must not stack a new mount
    on it.  After each kill: refused in one line; `pyunionfs umount` clears it; mount works.
    (The daemon is killed by root, also the user's: what an OOM kill does.)"""
    paths = make_stack([{"f": File("lower")}], upper={})
    who.own(paths.base)
    lowers, up, wk, m = str(paths.lowers[0]), str(paths.upper), str(paths.work), str(paths.merged)
    refused = 0
    tries = USER_TRIES if who.user else TRIES
    try:
        for _ in range(tries):
            r = _cli(who, "mount", lowers, up, wk, m)
            assert r.returncode == 0, r.stderr
            assert who.call(_read_f, paths.merged) == "lower"  # warm the kernel's caches
            pid = _daemon_pid(paths.merged)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + CMD_TIMEOUT
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.01)
            r = _cli(who, "mount", lowers, up, wk, m)
            _one_error_line(r, "stale FUSE mount", "pyunionfs umount")
            refused += 1
            assert sum(1 for line in open("/proc/self/mountinfo") if f" {m} " in line) == 1
            r = _cli(who, "umount", m)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(paths.merged)
        r = _cli(who, "mount", lowers, up, wk, m)
        assert r.returncode == 0, r.stderr
        assert who.call(_read_f, paths.merged) == "lower"
        assert _cli(who, "umount", m).returncode == 0
    finally:
        if is_mounted(paths.merged):
            force_unmount(m)
    assert refused == tries


def _in_mount_ns(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` (sh) in a private mount namespace, where /dev/fuse can be swapped safely."""
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1)")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", script,
                           "sh", *args], capture_output=True, text=True, cwd=str(REPO),
                          timeout=MOUNT_TIMEOUT + 15, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


CASES = {
    # a plain file where the device should be
    "not-a-device": ("touch \"$4/fake\"; mount --bind \"$4/fake\" /dev/fuse",
                     ("not the FUSE device", "mknod")),
    # another character device (/dev/null)
    "other-device": ("mount --bind /dev/null /dev/fuse", ("not the FUSE device",)),
    # no device at all: a /dev of its own without it
    "missing": ("mount -t tmpfs none /dev", ("no /dev/fuse", "modprobe fuse")),
    # the device, but not ours to open: root without CAP_DAC_OVERRIDE (or the plain user), a
    # node owned by another
    "no-access": ("mknod -m 600 \"$4/fuse\" c 10 229; chown 4242 \"$4/fuse\"; "
                  "mount --bind \"$4/fuse\" /dev/fuse",
                  ("may not open /dev/fuse", "setfacl")),
}
# Root of a user namespace may not mknod a FUSE node of its own (CAP_MKNOD counts in the initial
# namespace only), and is the owner of the real one (uid 0 is mapped): the node not ours to
# open is the real /dev/fuse, opened as another uid of the namespace without capabilities.
NO_ACCESS_IN_USERNS = "setpriv --reuid=4242 --regid=4242 --clear-groups --inh-caps=-all " \
    "--bounding-set=-all --"


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_usable_dev_fuse_is_one_line_and_creates_nothing(make_stack, tmp_path: Path,
                                                           case: str, who: Who) -> None:
    """The user's case: root swaps /dev/fuse in a private mount namespace (as the root case
    does), then the user mounts there."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse here to stand in for")
    setup, needles = CASES[case]
    paths = make_stack([{"f": File("x")}], upper={})
    who.own(paths.base)
    spare = tmp_path / "spare"
    spare.mkdir()
    cmd = shlex.join(who.argv([PYTHON, "-m", "unionfs", "mount"]))
    run = f"{cmd} \"$1\" \"$2\" \"$3\" \"$5\""
    if case == "no-access" and USERNS:
        if os.stat("/dev/fuse").st_mode & 0o006 == 0o006:
            pytest.skip("/dev/fuse is rw for everyone here: no uid of a user namespace lacks "
                        "access to it, and root of one can't mknod a node that is not its own")
        setup, run = "true", f"{NO_ACCESS_IN_USERNS} {run}"
    elif case == "no-access" and not who.user:
        run = f"setpriv --inh-caps=-all --bounding-set=-all -- {run}"
    r = _in_mount_ns(f"{setup}; exec {run}", str(paths.lowers[0]), str(paths.upper),
                     str(paths.work), str(spare), str(paths.merged))
    try:
        _one_error_line(r, *needles)
        assert os.listdir(paths.work) == [], "WORK/work made before the mount was possible"
    finally:
        if is_mounted(paths.merged):
            force_unmount(str(paths.merged))


def test_work_left_by_a_root_kernel_mount_is_reused(make_stack, who: Who) -> None:
    """A kernel overlay mounted by root leaves WORK/work empty, mode 000 and root's: a later
    mount by anyone who may write WORK replaces it (it was EPERM for a plain user, who may
    remove that directory but not list it)."""
    paths = make_stack([{"a": File("lower")}], upper={})
    who.own(paths.base)
    left = paths.work / "work"
    left.mkdir()
    os.chmod(left, 0)
    if who.user:
        os.chown(left, 0, 0)
    m = who.mount(paths)
    assert who.call(lambda r: (r / "a").read_text(), m.root) == "lower"
    who.call(lambda r: (r / "a").write_text("upper"), m.root)
    m.stop()
    assert (paths.upper / "a").read_text() == "upper"
