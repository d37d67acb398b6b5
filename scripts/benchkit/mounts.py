"""The three filesystems the benchmark mounts: kernel overlayfs, fuse-overlayfs and pyunionfs,
each mounted, waited for and unmounted with a watchdog."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchkit import common
from benchkit.common import (
    MOUNT_TIMEOUT,
    PAGE,
    REPO,
    UNMOUNT_TIMEOUT,
    BenchError,
    MountFailed,
    Unavailable,
    log,
    mounted,
    proc_info,
    processes_with_arg,
    reap,
    wait_in_mountinfo,
    wait_until,
)


class Mount:
    """One mounted filesystem; subclasses know how to start and stop it."""

    name = "?"

    def __init__(
        self,
        lowerdir: str,
        upper: Path,
        work: Path,
        merged: Path,
        logfile: Path,
        probe: Path | None = None,
        cwd: Path | None = None,
        extra_options: str = "",
    ) -> None:
        self.lowerdir, self.upper, self.work, self.merged = lowerdir, upper, work, merged
        self.extra_options = extra_options  # a workload's own -o options (e.g. redirect_dir=on)
        self.logfile = logfile
        self.probe = probe or merged  # stat'ed to call the mount ready
        self.cwd = cwd  # relative lowerdir paths are relative to this
        self.proc: subprocess.Popen[bytes] | None = None
        self.bg_pid: int | None = None
        self.ready_s: float | None = None
        self.killed = False

    @property
    def options(self) -> str:
        extra = f",{self.extra_options}" if self.extra_options else ""
        return f"lowerdir={self.lowerdir},upperdir={self.upper},workdir={self.work}{extra}"

    def start(self) -> None:
        raise NotImplementedError

    def start_background(self) -> float:
        """Mount with the command that returns once mounted; its wall time."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """Emergency stop from the watchdog: make blocked syscalls on the mount return."""

    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.bg_pid

    def _probe(self, t0: float) -> None:
        try:
            os.stat(self.probe)
        except OSError as e:
            raise BenchError(f"{self.name}: mounted, but stat {self.probe}: {e.strerror}") from None
        self.ready_s = time.perf_counter() - t0


class KernelMount(Mount):
    name = "kernel"

    def _mount(self) -> None:
        if len(self.options) >= PAGE:
            raise Unavailable(
                f"the option string is {len(self.options)} bytes; mount(2) takes one page ({PAGE})"
            )
        try:
            r = subprocess.run(
                ["mount", "-t", "overlay", "overlay", "-o", self.options, str(self.merged)],
                capture_output=True,
                text=True,
                timeout=MOUNT_TIMEOUT,
                cwd=self.cwd,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"kernel: mount did not return in {MOUNT_TIMEOUT:.0f} s") from None
        if r.returncode != 0:
            msg = " ".join(r.stderr.split())[:300]
            raise MountFailed(f"kernel overlay mount failed: {msg}")

    def start(self) -> None:
        t0 = time.perf_counter()
        self._mount()
        if not wait_in_mountinfo(self.merged, MOUNT_TIMEOUT, lambda: True):
            raise BenchError("kernel: mount returned 0 but the mount point is not in mountinfo")
        self._probe(t0)

    def start_background(self) -> float:
        t0 = time.perf_counter()
        self._mount()
        return time.perf_counter() - t0

    def stop(self) -> None:
        if not mounted(self.merged):
            return
        r = subprocess.run(
            ["umount", str(self.merged)], capture_output=True, timeout=UNMOUNT_TIMEOUT
        )
        if r.returncode != 0:
            log(f"kernel: umount {self.merged} failed; lazy unmount")
            subprocess.run(["umount", "-l", str(self.merged)], timeout=UNMOUNT_TIMEOUT)


class FuseMount(Mount):
    """A FUSE daemon: in the foreground under our Popen (start), or daemonized by its own
    command (start_background), whose daemon is found as our (subreaped) child."""

    def command(self, foreground: bool) -> list[str]:
        raise NotImplementedError

    def _log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in lines[-3:])

    def start(self) -> None:
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(
                self.command(foreground=True),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                cwd=self.cwd,
                start_new_session=True,  # the terminal's ^C goes to us; we unmount it
            )
        proc = self.proc
        if not wait_in_mountinfo(self.merged, MOUNT_TIMEOUT, lambda: proc.poll() is None):
            if proc.poll() is not None:
                rc = proc.wait()
                self.proc = None
                raise BenchError(
                    f"{self.name} exited with {rc} before mounting: {self._log_tail()}"
                )
            self.stop()
            raise BenchError(f"{self.name}: not mounted after {MOUNT_TIMEOUT:.0f} s")
        with watchdog(self, "mount", MOUNT_TIMEOUT):  # a daemon that never answers
            self._probe(t0)

    def start_background(self) -> float:
        t0 = time.perf_counter()
        with open(self.logfile, "ab") as logf:
            try:
                r = subprocess.run(
                    self.command(foreground=False),
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    cwd=self.cwd,
                    timeout=MOUNT_TIMEOUT,
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired:
                self._find_daemon()
                self.stop()
                raise BenchError(
                    f"{self.name}: the mount command did not return in {MOUNT_TIMEOUT:.0f} s"
                ) from None
        elapsed = time.perf_counter() - t0
        self._find_daemon()
        if r.returncode != 0 or not mounted(self.merged):
            self.stop()
            raise BenchError(
                f"{self.name}: background mount exited with {r.returncode}"
                f"{'' if mounted(self.merged) else ', not mounted'}: {self._log_tail()}"
            )
        if self.bg_pid is None:
            log(f"{self.name}: mounted, but its daemon was not found (no subreaper?)")
        return elapsed

    def _find_daemon(self) -> None:
        """The daemon the background command left: it has our unique MERGED in its argv and,
        as we are a child subreaper, us as its parent. Only such a process is ever killed."""
        for _ in range(20):
            pids = processes_with_arg(str(self.merged), os.getpid() if common.SUBREAPER else None)
            if pids:
                self.bg_pid = pids[0]
                return
            time.sleep(0.01)

    def _ours(self, pid: int) -> bool:
        info = proc_info(pid)
        return (
            info is not None
            and str(self.merged) in info[1]
            and (not common.SUBREAPER or info[0] == os.getpid())
        )

    def _unmount(self) -> None:
        if not mounted(self.merged):
            return
        for _ in range(20):
            r = subprocess.run(
                ["fusermount3", "-u", str(self.merged)],
                capture_output=True,
                timeout=UNMOUNT_TIMEOUT,
            )
            if r.returncode == 0 or not mounted(self.merged):
                return
            time.sleep(0.25)  # EBUSY right after a workload: retry briefly
        log(f"{self.name}: {self.merged} busy, lazy unmount")
        subprocess.run(["fusermount3", "-u", "-z", str(self.merged)], timeout=UNMOUNT_TIMEOUT)

    def stop(self) -> None:
        self._unmount()
        if self.proc is not None:
            try:
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                log(
                    f"{self.name}: daemon (pid {self.proc.pid}) still running after unmount; killing it"
                )
                self.proc.kill()
                self.proc.wait(timeout=UNMOUNT_TIMEOUT)
            if self.proc.returncode not in (0, None) and not self.killed:
                log(
                    f"{self.name}: daemon exited with status {self.proc.returncode} (log: {self.logfile})"
                )
            self.proc = None
        if self.bg_pid is not None:
            pid, merged = self.bg_pid, str(self.merged)

            def gone() -> bool:
                return reap(pid) and not processes_with_arg(merged)

            if not wait_until(gone, UNMOUNT_TIMEOUT, 0.01):
                if self._ours(pid):
                    log(f"{self.name}: daemon (pid {pid}) still running after unmount; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    wait_until(lambda: reap(pid), UNMOUNT_TIMEOUT, 0.01)
                else:
                    log(f"{self.name}: a process still has {merged} in its command line")
            self.bg_pid = None

    def kill(self) -> None:
        self.killed = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # the kernel aborts the connection; blocked syscalls get ENOTCONN
        elif self.bg_pid is not None and self._ours(self.bg_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.bg_pid, signal.SIGKILL)


class FuseOverlayfsMount(FuseMount):
    name = "fuse-overlayfs"

    def command(self, foreground: bool) -> list[str]:
        return [
            "fuse-overlayfs",
            *(["-f"] if foreground else []),
            "-o",
            self.options,
            str(self.merged),
        ]


class PyunionfsMount(FuseMount):
    name = "pyunionfs"
    cmd: list[str] = []

    def command(self, foreground: bool) -> list[str]:
        return [
            *self.cmd,
            "mount",
            *(["-f"] if foreground else []),
            *(["-o", self.extra_options] if self.extra_options else []),
            self.lowerdir,
            str(self.upper),
            str(self.work),
            str(self.merged),
        ]


MOUNT_CLASSES: dict[str, type[Mount]] = {
    "kernel": KernelMount,
    "fuse-overlayfs": FuseOverlayfsMount,
    "pyunionfs": PyunionfsMount,
}


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


