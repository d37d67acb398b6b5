"""The three filesystems the benchmark mounts (kernel overlayfs, fuse-overlayfs, pyunionfs),
each a ``unionfs.Overlay`` with the benchmark's timing (mount until the first stat answers)
and a watchdog."""

from __future__ import annotations

import contextlib
import os
import platform
import select
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from benchkit.common import (
    MOUNT_TIMEOUT,
    REPO,
    BenchError,
    MountFailed,
    log,
)
from unionfs import mounttable, stats
from unionfs.api import Overlay, OverlayError


class Mount:
    """One filesystem over the benchmark's layers: ``lowers`` (top first; relative ones are
    taken from ``cwd``), a fresh upper, work and merged."""

    pyunionfs_cmd: list[str] = []  # set by the runner (--pyunionfs)
    pyunionfs_options = ""  # set by the runner (--pyunionfs-options)

    def __init__(
        self,
        name: str,
        lowers: Sequence[Path],
        upper: Path,
        work: Path,
        merged: Path,
        logfile: Path,
        probe: Path | None = None,
        cwd: Path | None = None,
        extra_options: str = "",
    ) -> None:
        self.name = name
        self.upper, self.work, self.merged = upper, work, merged
        self.probe = probe or merged  # stat'ed to call the mount ready
        self.ready_s: float | None = None
        program = self.pyunionfs_cmd if name == "pyunionfs" and self.pyunionfs_cmd else None
        if name == "pyunionfs" and self.pyunionfs_options:
            extra_options = ",".join(o for o in (extra_options, self.pyunionfs_options) if o)
        self.overlay = Overlay(lowers=lowers, upper=upper, work=work, mountpoint=merged,
                               options=extra_options, backend=name, timeout=MOUNT_TIMEOUT,
                               program=program, log_path=logfile, cwd=cwd)

    def _mount(self, detach: bool) -> None:
        self.overlay.detach = detach
        try:
            self.overlay.mount()
        except OverlayError as e:
            if self.name == "kernel":  # a refusal (e.g. too many lowers): n/a in the layers table
                raise MountFailed(f"kernel overlay mount failed: {e}") from None
            raise BenchError(f"{self.name}: {e}") from None

    def start(self) -> None:
        """Mount (the daemon as our child) and time it until a stat through it answers."""
        t0 = time.perf_counter()
        self._mount(detach=False)
        with watchdog(self, "mount", MOUNT_TIMEOUT):  # a daemon that never answers
            try:
                os.stat(self.probe)
            except OSError as e:
                raise BenchError(f"{self.name}: mounted, but stat {self.probe}: {e.strerror}") \
                    from None
        self.ready_s = time.perf_counter() - t0

    def start_background(self) -> float:
        """Mount with the command that returns once mounted (the daemon forks away); its wall
        time."""
        self._mount(detach=True)
        elapsed = self.overlay.mount_seconds
        assert elapsed is not None
        if self.name != "kernel" and self.overlay.pid is None:
            log(f"{self.name}: mounted, but its daemon was not found")
        return elapsed

    def stop(self) -> None:
        try:
            self.overlay.unmount()
        except OverlayError as e:
            log(f"{self.name}: {e} (log: {self.overlay.log_path})")

    def kill(self) -> None:
        """Emergency stop from the watchdog: make blocked syscalls on the mount return."""
        self.overlay.kill()

    def pid(self) -> int | None:
        return self.overlay.pid


@contextlib.contextmanager
def watchdog(mount: Mount, what: str, timeout: float) -> Iterator[threading.Event]:
    """Stop the filesystem if the block takes longer than timeout (a request never answered)."""
    fired = threading.Event()

    def on_timeout() -> None:
        fired.set()
        log(f"{mount.name}: {what} exceeded {timeout:.0f} s; stopping the filesystem")
        mount.kill()

    timer = threading.Timer(timeout, on_timeout)
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def default_pyunionfs_cmd() -> list[str]:
    exe = REPO / ".venv" / "bin" / "pyunionfs"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "unionfs"]


def kernel_overlay_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    with open("/proc/filesystems") as f:
        if "overlay" not in f.read() and subprocess.run(["modprobe", "overlay"]).returncode:
            return "overlay module not available"
    return None


def availability(name: str, pyunionfs_cmd: list[str]) -> str | None:
    """None if the filesystem can be benchmarked here, else the reason why not."""
    if name == "kernel":
        return kernel_overlay_problem()
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "this user may not open /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed"
    if name == "fuse-overlayfs":
        return None if shutil.which("fuse-overlayfs") else "fuse-overlayfs not installed"
    try:
        r = subprocess.run(
            [*pyunionfs_cmd, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{shlex.join(pyunionfs_cmd)}: {e}"
    if r.returncode != 0:
        last = ((r.stderr or r.stdout).strip().splitlines() or [""])[-1][-200:]
        return f"{shlex.join(pyunionfs_cmd)} --version failed: {last}"
    return None


def version_of(name: str, pyunionfs_cmd: list[str]) -> str:
    try:
        if name == "kernel":
            return platform.release()
        cmd = (
            ["fuse-overlayfs", "--version"]
            if name == "fuse-overlayfs"
            else [*pyunionfs_cmd, "--version"]
        )
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        lines = (out.stdout + out.stderr).splitlines()
        return next(
            (ln.strip() for ln in lines if "version" in ln.lower() and "fusermount" not in ln), ""
        )
    except Exception:
        return ""


def requests_served(mount: Mount) -> tuple[int, float] | None:
    """(requests, daemon CPU seconds) the pyunionfs daemon behind ``mount`` has served and
    spent so far (``pyunionfs stats``); None for the other filesystems, or a pyunionfs
    without the counts."""
    if mount.name != "pyunionfs":
        return None
    try:
        data = stats.fetch(str(mount.merged))
        return int(data["requests"]), float(data["daemon_cpu_s"])
    except (stats.StatsError, OSError, ValueError, KeyError):
        return None


# -- start-up: the commands a user types, timed from outside ------------------------------


def mount_command(mount: Mount) -> list[str]:
    """The command line that mounts ``mount``'s stack (daemonizing for the FUSE ones)."""
    ov = mount.overlay
    if mount.name == "kernel":
        return ["mount", "-t", "overlay", "overlay", "-o", ov.mount_options(), str(ov.mountpoint)]
    if mount.name == "fuse-overlayfs":
        return ov._daemon_args(foreground=False)
    return [*(mount.pyunionfs_cmd or default_pyunionfs_cmd()), *ov._command([])]


def umount_command(mount: Mount) -> list[str]:
    if mount.name == "kernel":
        return ["umount", str(mount.merged)]
    if mount.name == "fuse-overlayfs":
        return ["fusermount3", "-u", str(mount.merged)]
    return [*(mount.pyunionfs_cmd or default_pyunionfs_cmd()), "umount", str(mount.merged)]


def daemon_of(mount: Mount) -> int | None:
    if mount.name == "kernel":
        return None
    if mount.name == "pyunionfs":
        found = mounttable.daemon_pid(str(mount.merged))
        return found[0] if found else None
    pids = mounttable.processes_with_arg(str(mount.merged))
    return pids[-1] if pids else None


def wait_gone(pid: int | None, timeout: float) -> None:
    if pid is None:
        return
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
