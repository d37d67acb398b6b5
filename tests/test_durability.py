"""Copy-up is durable (issue 8, item 6): the copy's data is fsynced before its name appears in
UPPER, as the kernel does (ovl_copy_up_file), unless the mount is `volatile` / `fsync=0`.
Seen from outside: the daemon runs under strace, and the order of its calls is checked."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from overlay_harness import (
    MOUNT_TIMEOUT,
    REPO,
    UMOUNT_TIMEOUT,
    USERNS,
    File,
    force_unmount,
    is_mounted,
)

pytestmark = [
    pytest.mark.skipif(shutil.which("strace") is None,
                       reason="needs strace (scripts/install-deps.sh installs it)"),
    pytest.mark.skipif(USERNS, reason="strace of the daemon is done from the initial namespace"),
]

DATA = os.urandom(300_000)


def _traced_mount(paths, log: Path, options: list[str]) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
    argv = ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,renameat2,renameat,rename",
            "-o", str(log), sys.executable, "-m", "unionfs", "mount", "-f", *options,
            str(paths.lowers[0]), str(paths.upper), str(paths.work), str(paths.merged)]
    proc = subprocess.Popen(argv, cwd=str(REPO), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    deadline = time.monotonic() + MOUNT_TIMEOUT * 2
    while not is_mounted(paths.merged):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"traced mount did not come up ({proc.poll()})")
        time.sleep(0.02)
    return proc


def _copy_up_calls(make_stack, tmp_path: Path, options: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    paths = make_stack([{"big": File(DATA), "empty": File(b"")}], upper={})
    log = tmp_path / "strace.log"
    proc = _traced_mount(paths, log, options)
    try:
        with open(paths.merged / "big", "ab") as f:
            f.write(b"tail")
        with open(paths.merged / "empty", "ab") as f:
            f.write(b"x")
    finally:
        subprocess.run(["fusermount3", "-u", str(paths.merged)], timeout=UMOUNT_TIMEOUT,
                       check=False)
        try:
            proc.wait(timeout=UMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=UMOUNT_TIMEOUT)
        if is_mounted(paths.merged):
            force_unmount(str(paths.merged))
    assert paths.upper is not None
    assert (paths.upper / "big").read_bytes() == DATA + b"tail"
    return [line.split(None, 1)[1] for line in log.read_text().splitlines() if " " in line]


def _rename_into(calls: list[str], name: str) -> int:
    for i, c in enumerate(calls):
        if re.match(rf"renameat2?\(.*\"#[0-9a-f]+\", .*\"{re.escape(name)}\"", c):
            return i
    raise AssertionError(f"no rename of a copy into {name!r} in {calls}")


def test_copy_up_is_synced_before_its_rename(make_stack, tmp_path: Path) -> None:
    calls = _copy_up_calls(make_stack, tmp_path, [])
    big = _rename_into(calls, "big")
    assert any(c.startswith("fsync(") for c in calls[:big]), calls
    # nothing to lose in an empty file: no fsync between its copy and the previous rename
    empty = _rename_into(calls, "empty")
    assert not any(c.startswith("fsync(") for c in calls[big + 1:empty]), calls


@pytest.mark.parametrize("option", ["volatile", "fsync=0"])
def test_volatile_copy_up_is_not_synced(make_stack, tmp_path: Path, option: str) -> None:
    calls = _copy_up_calls(make_stack, tmp_path, ["-o", option])
    _rename_into(calls, "big")
    assert not any(c.startswith(("fsync(", "fdatasync(")) for c in calls), calls
