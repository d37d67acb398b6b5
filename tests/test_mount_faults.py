"""Mounting where it can't work (issue 8, items 3 and 4): over the dead mount a killed daemon
left, and without a usable /dev/fuse.  Each is one 'pyunionfs: error: ' line that says what to
do, a non-zero exit, and nothing created in WORK."""

from __future__ import annotations

import os
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

PYTHON = sys.executable
pytestmark = pytest.mark.skipif(USERNS, reason="kills daemons and makes mount namespaces as "
                                               "real root")


def _cli(*args: str, timeout: float = MOUNT_TIMEOUT + 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "unionfs", *args], capture_output=True, text=True,
                          cwd=str(REPO), timeout=timeout, stdin=subprocess.DEVNULL,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


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


def test_mount_over_killed_daemon_is_refused_every_time(make_stack) -> None:
    """The kernel answers stat() of a dead mount from its cache; we must not stack a new mount
    on it.  After each kill: refused in one line; `pyunionfs umount` clears it; mount works."""
    paths = make_stack([{"f": File("lower")}], upper={})
    lowers, up, wk, m = str(paths.lowers[0]), str(paths.upper), str(paths.work), str(paths.merged)
    refused = 0
    try:
        for _ in range(TRIES):
            r = _cli("mount", lowers, up, wk, m)
            assert r.returncode == 0, r.stderr
            assert (paths.merged / "f").read_text() == "lower"  # warm the kernel's caches
            os.stat(paths.merged)
            pid = _daemon_pid(paths.merged)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + CMD_TIMEOUT
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.01)
            r = _cli("mount", lowers, up, wk, m)
            _one_error_line(r, "stale FUSE mount", "pyunionfs umount")
            refused += 1
            assert sum(1 for line in open("/proc/self/mountinfo") if f" {m} " in line) == 1
            r = _cli("umount", m)
            assert r.returncode == 0, r.stderr
            assert not is_mounted(paths.merged)
        r = _cli("mount", lowers, up, wk, m)
        assert r.returncode == 0, r.stderr
        assert (paths.merged / "f").read_text() == "lower"
        assert _cli("umount", m).returncode == 0
    finally:
        if is_mounted(paths.merged):
            force_unmount(m)
    assert refused == TRIES


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
    # the device, but not ours to open: root without CAP_DAC_OVERRIDE, a node owned by another
    "no-access": ("mknod -m 600 \"$4/fuse\" c 10 229; chown 4242 \"$4/fuse\"; "
                  "mount --bind \"$4/fuse\" /dev/fuse",
                  ("may not open /dev/fuse", "setfacl")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_usable_dev_fuse_is_one_line_and_creates_nothing(make_stack, tmp_path: Path,
                                                           case: str) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse here to stand in for")
    setup, needles = CASES[case]
    paths = make_stack([{"f": File("x")}], upper={})
    spare = tmp_path / "spare"
    spare.mkdir()
    run = f"{PYTHON} -m unionfs mount \"$1\" \"$2\" \"$3\" \"$5\""
    if case == "no-access":
        run = f"setpriv --inh-caps=-all --bounding-set=-all -- {run}"
    r = _in_mount_ns(f"{setup}; exec {run}", str(paths.lowers[0]), str(paths.upper),
                     str(paths.work), str(spare), str(paths.merged))
    try:
        _one_error_line(r, *needles)
        assert os.listdir(paths.work) == [], "WORK/work made before the mount was possible"
    finally:
        if is_mounted(paths.merged):
            force_unmount(str(paths.merged))
