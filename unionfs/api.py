"""The public Python API: an overlay mount as a context manager, for other projects' tests.

    from unionfs import Overlay
    with Overlay(lowers=[app, base], upper=u, work=w, mountpoint=m) as ov:
        (ov.mountpoint / "etc/motd").write_text("hi")
        assert ov.changes() == [("C", "/etc"), ("A", "/etc/motd")]

The daemon comes from the user's warm mount server (server.py) where there is one: no
interpreter start, no imports, a mount in tens of milliseconds; else, and with
``server=False``, it runs as a child process (``pyunionfs mount -f``, ``process``), and
the mount leaves a server for the next one.  ``mount()`` returns once the mount serves and
raises ``OverlayError`` with the daemon's one-line error otherwise; ``unmount()`` (and
leaving the ``with`` block, also by an exception) unmounts and waits for the daemon's end.
``backend="kernel"`` mounts kernel overlayfs with the same arguments (root only), and
``backend="fuse-overlayfs"`` the C peer (its package installed), so that a test or a
comparison can run on all three.  Layers left out are made as temporary directories, removed
again.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from unionfs import client, mounttable

PathLike = str | os.PathLike[str]
OptionValue = bool | str | int

BACKENDS = ("pyunionfs", "kernel", "fuse-overlayfs")
MOUNT_TIMEOUT = 20.0
UMOUNT_TIMEOUT = 20.0
# a daemon still there this long after the unmount serves copies only (or is very slow to
# go, under load): it is told to end
COPIES_GRACE = 2.0
BUSY_RETRY = 2.0  # seconds an unmount retries EBUSY (a shell that just left the mount)
PAGE = os.sysconf("SC_PAGE_SIZE")


class OverlayError(Exception):
    """A mount or unmount that failed; ``str()`` is the one-line reason."""


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def _options(options: Mapping[str, OptionValue] | Sequence[str] | str | None) -> list[str]:
    if not options:
        return []
    if isinstance(options, str):
        return [o for o in options.split(",") if o]
    if isinstance(options, Mapping):
        out = []
        for key, value in options.items():
            if value is True:
                out.append(key)
            elif value is not False and value is not None:
                out.append(f"{key}={value}")
        return out
    return list(options)


def mounted(path: PathLike) -> bool:
    """Is ``path`` a mount point now (the mount table, not os.path.ismount: a dead FUSE
    mount is still one)?"""
    try:
        return mounttable.is_mounted(path)
    except OSError:
        return False


class Overlay:
    """An overlay of ``lowers`` (top first) with ``upper`` and ``work`` at ``mountpoint``.

    ``upper=None`` with ``work=None`` makes temporary ones; ``readonly=True`` mounts the
    lowers alone.  ``options``: mount options as a dict (``{"userxattr": True,
    "redirect_dir": "on"}``), a list or a comma-separated string.  ``lowers`` may be left
    out too: one empty temporary lower; relative lowers are taken from ``cwd``.

    For the daemon backends: ``program`` is the command that runs it (default: this
    interpreter's ``-m unionfs``, or ``fuse-overlayfs`` from PATH), ``log_path`` where its
    output goes (default: a temporary file, read back by ``log``), ``env`` its environment,
    and ``detach=True`` mounts with the command a shell user types (no ``-f``: the daemon
    forks away and is found by its command line) instead of a child process.  ``server``:
    whether the default pyunionfs daemon may come from the warm mount server (False: always
    a child process, for a test that needs its exit status)."""

    def __init__(self, lowers: Sequence[PathLike] | None = None, upper: PathLike | None = None,
                 work: PathLike | None = None, mountpoint: PathLike | None = None,
                 options: Mapping[str, OptionValue] | Sequence[str] | str | None = None,
                 backend: str = "pyunionfs", readonly: bool = False,
                 timeout: float = MOUNT_TIMEOUT, *, program: Sequence[str] | None = None,
                 log_path: PathLike | None = None, cwd: PathLike | None = None,
                 env: Mapping[str, str] | None = None, detach: bool = False,
                 server: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.backend = backend
        self.options = _options(options)
        self.timeout = timeout
        self.program = list(program) if program else None
        self.cwd = Path(cwd) if cwd is not None else None
        self.env = dict(env) if env is not None else None
        self.detach = detach
        self.server = server
        self._pidfd: int | None = None  # the warm daemon's (it is not our child)
        self._temp: Path | None = None
        # a read-only overlay needs two lowers (the kernel's rule, and ours)
        self.lowers = [Path(p) for p in lowers] if lowers else \
            [self._tempdir(f"lower{i}") for i in range(2 if readonly else 1)]
        if readonly:
            if upper is not None or work is not None:
                raise ValueError("readonly=True takes no upper or work")
            self.upper: Path | None = None
            self.work: Path | None = None
        else:
            self.upper = Path(upper) if upper is not None else self._tempdir("upper")
            self.work = Path(work) if work is not None else self._tempdir("work")
        self.mountpoint = Path(mountpoint) if mountpoint is not None else self._tempdir("merged")
        self.log_path: Path | None = Path(log_path) if log_path is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None  # the detached daemon's
        self._killed = False
        self._mounted = False
        self.mount_seconds: float | None = None  # the last mount(): until it was in place

    def _tempdir(self, name: str) -> Path:
        if self._temp is None:
            self._temp = Path(tempfile.mkdtemp(prefix="pyunionfs-overlay-"))
            os.chmod(self._temp, 0o755)
        path = self._temp / name
        path.mkdir()
        return path

    # -- mounting --------------------------------------------------------------------------

    def mount(self) -> Overlay:
        if self._mounted:
            raise OverlayError(f"'{self.mountpoint}' is mounted already by this Overlay")
        if mounted(self.mountpoint):
            raise OverlayError(f"'{self.mountpoint}' is a mount point already")
        self._killed = False
        self._t0 = time.perf_counter()
        if self.backend == "kernel":
            self._mount_kernel()
        elif self.detach:
            self._mount_detached()
        else:
            self._mount_daemon()
        self._mounted = True
        _live.add(self)
        return self

    def mount_options(self) -> str:
        """The ``-o`` string the kernel and fuse-overlayfs are given."""
        return ",".join(self._layer_options() + self.options)

    def _mount_kernel(self) -> None:
        if os.geteuid() != 0:
            raise OverlayError("the kernel backend mounts with mount(8): it needs root")
        opts = self.mount_options()
        if len(opts) >= PAGE:
            raise OverlayError(f"the option string is {len(opts)} bytes; mount(2) takes one "
                               f"page ({PAGE})")
        try:
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts,
                                str(self.mountpoint)], capture_output=True, text=True,
                               timeout=self.timeout, stdin=subprocess.DEVNULL, cwd=self.cwd)
        except subprocess.TimeoutExpired:
            raise OverlayError(f"kernel overlay mount at '{self.mountpoint}' did not return "
                               f"within {self.timeout:g} s") from None
        if r.returncode != 0:
            msg = " ".join(r.stderr.split()) or "mount failed"
            raise OverlayError(f"kernel overlay mount at '{self.mountpoint}' failed: {msg}")
        self.mount_seconds = time.perf_counter() - self._t0

    def _layer_options(self) -> list[str]:
        opts = ["lowerdir=" + ":".join(_escape(str(p)) for p in self.lowers)]
        if self.upper is not None:
            opts += [f"upperdir={_escape(str(self.upper))}", f"workdir={_escape(str(self.work))}"]
        return opts

    def _daemon_args(self, foreground: bool = True) -> list[str]:
        fg = ["-f"] if foreground else []
        if self.backend == "fuse-overlayfs":
            prog = self.program or [shutil.which("fuse-overlayfs") or ""]
            if not prog[0]:
                raise OverlayError("the fuse-overlayfs backend needs fuse-overlayfs "
                                   "(Debian: apt-get install fuse-overlayfs)")
            return [*prog, *fg, "-o", self.mount_options(), str(self.mountpoint)]
        return [*(self.program or [sys.executable, "-m", "unionfs"]), *self._command(fg)]

    def _command(self, flags: list[str]) -> list[str]:
        """``mount FLAGS [-o OPTS] LOWERS [UPPER WORK] MERGED``."""
        args = ["mount", *flags]
        if self.options:
            args += ["-o", ",".join(self.options)]
        args.append(":".join(str(p).replace(":", "\\:") for p in self.lowers))
        if self.upper is not None:
            args += [str(self.upper), str(self.work)]
        return [*args, str(self.mountpoint)]

    def _open_log(self) -> int:
        if self.log_path is None:
            base = self._temp or Path(tempfile.mkdtemp(prefix="pyunionfs-overlay-"))
            self._temp = base
            self.log_path = base / f"{self.backend}.log"
        return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                       0o644)

    def _mount_daemon(self) -> None:
        env = os.environ if self.env is None else self.env
        warm = self.server and self.backend == "pyunionfs" and self.program is None \
            and client.enabled(env) and "debug" not in self.options
        spawn = False
        if warm:
            done = self._mount_warm(env)
            if done:
                return
            spawn = done is None  # no server: leave one for the next mount
        args = self._daemon_args()
        log = self._open_log()
        try:
            # its own session: a Ctrl-C meant for the test run must not kill it
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          cwd=self.cwd, env=self.env)
        finally:
            os.close(log)
        proc = self._proc
        if mounttable.wait_mounted(self.mountpoint, self.timeout, lambda: proc.poll() is None):
            self.mount_seconds = time.perf_counter() - self._t0
            if spawn:
                client.spawn_server(env)
            return
        rc = proc.poll()
        if rc is not None:
            self._proc = None
            raise OverlayError(self._reason(f"{self.backend} exited with status {rc}"))
        self._stop_daemon(kill=True)
        raise OverlayError(f"{self.backend} did not mount '{self.mountpoint}' within "
                           f"{self.timeout:g} s")

    def _mount_warm(self, env: Mapping[str, str]) -> bool | None:
        """Through the warm server: True once mounted; for a cold start instead, None where
        there is no server and False where it can't act for us; OverlayError when the mount
        itself failed."""
        log = self._open_log()
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        cwd = os.open(self.cwd or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        argv = self._command(["--log", str(self.log_path)])
        try:
            rc, pid = client.request(argv, dict(env), (null, log, log), cwd=cwd,
                                     title=[sys.executable, "-m", "unionfs", *argv],
                                     timeout=self.timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except (OSError, client.Refused, client.Unsafe):
            return False
        except RuntimeError as e:
            raise OverlayError(f"pyunionfs: {e}") from None
        finally:
            for fd in (log, null, cwd):
                os.close(fd)
        if rc != 0:
            raise OverlayError(self._reason(f"pyunionfs exited with status {rc}"))
        self.mount_seconds = time.perf_counter() - self._t0
        self._pid = pid
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)
        return True

    def _mount_detached(self) -> None:
        args = self._daemon_args(foreground=False)
        log = self._open_log()
        try:
            r = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True,
                               cwd=self.cwd, env=self.env, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._find_daemon()
            self._mounted = True
            with contextlib.suppress(OverlayError):
                self.unmount()
            raise OverlayError(f"{self.backend}: the mount command did not return within "
                               f"{self.timeout:g} s") from None
        finally:
            os.close(log)
        self.mount_seconds = time.perf_counter() - self._t0
        self._find_daemon()
        if r.returncode != 0 or not mounted(self.mountpoint):
            was = mounted(self.mountpoint)
            self._mounted = was
            with contextlib.suppress(OverlayError):
                self.unmount()
            raise OverlayError(self._reason(f"{self.backend} mount exited with status "
                                            f"{r.returncode}{'' if was else ', not mounted'}"))

    def _find_daemon(self) -> None:
        """The process the daemonizing command left: the one with our mount point among its
        arguments (it is a child of ours only where we are a child subreaper)."""
        point = str(self.mountpoint)
        for _ in range(50):
            pids = mounttable.processes_with_arg(point)
            if pids:
                self._pid = pids[-1]
                return
            time.sleep(0.01)

    def _reason(self, fallback: str) -> str:
        lines = [ln.strip() for ln in self.log.splitlines() if ln.strip()]
        for line in reversed(lines):
            if "error: " in line:
                return line.split("error: ", 1)[1].strip()
        # fuse-overlayfs says why in its own words, last
        return f"{fallback}: {lines[-1]}" if lines and self.backend != "pyunionfs" else fallback

    @property
    def log(self) -> str:
        """The daemon's output so far (the pyunionfs and fuse-overlayfs backends)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int | None:
        """The daemon's process id while it runs (None for the kernel backend)."""
        if self._proc is not None:
            return self._proc.pid
        return self._pid

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The daemon as a child process (not for ``detach=True`` or the kernel)."""
        return self._proc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send the daemon a signal (SIGKILL: the kernel aborts the connection, so calls
        blocked on the mount return ENOTCONN); unmount() then cleans up without
        complaining about how it exited."""
        pid = self.pid
        if pid is None or mounttable.process(pid) is None:
            return
        if self._proc is None and not self._ours(pid):
            return  # the number went to another process
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    @property
    def is_mounted(self) -> bool:
        return self._mounted and mounted(self.mountpoint)

    def unmount(self) -> None:
        """Unmount and reap the daemon; temporary layers are removed.  Idempotent.  Raises
        ``OverlayError`` when the clean way failed: the unmount was refused (the mount is then
        detached lazily, so nothing outlives the call), the daemon did not exit, or it exited
        with an error."""
        problems = []
        if self._pidfd is not None and not self._killed and self._pid is not None and \
                mounttable.process(self._pid) is None:
            # its status is its parent's; and not the pidfd, readable only once the last of
            # its threads has gone
            problems.append("the daemon ended before the unmount")
        if self._mounted:
            self._mounted = False
            _live.discard(self)
            problems += self._unmount()
        problems += self._stop_daemon()
        if self._temp is not None and not mounted(self.mountpoint):
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
            if self.log_path is not None and not self.log_path.exists():
                self.log_path = None
        if problems:
            raise OverlayError(f"unmounting '{self.mountpoint}': {'; '.join(problems)}")

    def _unmount(self) -> list[str]:
        path = str(self.mountpoint)
        if self.backend == "kernel":
            cmd = ["umount", path]
        else:
            cmd = [shutil.which("fusermount3") or "fusermount3", "-u", path]
        failed = ""
        deadline = time.monotonic() + BUSY_RETRY
        while mounted(path):
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=UMOUNT_TIMEOUT,
                                   stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                failed = str(e)
                break
            if r.returncode == 0:
                break
            failed = (r.stderr.strip().splitlines() or ["unmount failed"])[-1]
            if "busy" not in failed.lower() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not mounted(path):
            return []
        # busy or refused: detach it, so nothing outlives the test
        lazy = [*cmd[:-2], "-uz", path] if self.backend != "kernel" else ["umount", "-l", path]
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            subprocess.run(lazy, capture_output=True, timeout=UMOUNT_TIMEOUT,
                           stdin=subprocess.DEVNULL)
        return [failed or "unmount failed", *(["still mounted"] if mounted(path) else [])]

    def _stop_daemon(self, kill: bool = False) -> list[str]:
        """Wait for the daemon to exit after the unmount.  One still serving after a moment
        serves copies of the mount that other mount namespaces took while it was mounted (a
        container or unshare started meanwhile, e.g. by a test running beside ours): it is
        told to end (SIGTERM) after COPIES_GRACE, those copies then say ENOTCONN.  SIGKILL
        after the timeout."""
        problems = []
        proc, self._proc = self._proc, None
        pid, self._pid = self._pid, None
        pidfd, self._pidfd = self._pidfd, None
        if proc is not None:
            try:
                proc.wait(timeout=0 if kill else COPIES_GRACE)
            except subprocess.TimeoutExpired:
                if not kill:
                    proc.terminate()
                    self._killed = True  # a -15 is ours
                    try:
                        proc.wait(timeout=UMOUNT_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        problems.append(f"the daemon did not exit within {UMOUNT_TIMEOUT:g} s")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            if proc.returncode not in (0, None) and not self._killed and not kill:
                problems.append(f"the daemon exited with status {proc.returncode}")
        elif pid is not None:
            try:
                if not _wait_gone(pid, pidfd, COPIES_GRACE) and self._ours(pid):
                    os.kill(pid, signal.SIGTERM)
                    if not _wait_gone(pid, pidfd, UMOUNT_TIMEOUT) and self._ours(pid):
                        problems.append(f"the daemon did not exit within {UMOUNT_TIMEOUT:g} s")
                        os.kill(pid, signal.SIGKILL)
                        _wait_gone(pid, pidfd, 5)
            except ProcessLookupError:
                pass
            finally:
                if pidfd is not None:
                    os.close(pidfd)
        return problems

    def _ours(self, pid: int) -> bool:
        """``pid`` is still our daemon (its command line names our mount point)."""
        info = mounttable.process(pid)
        return info is not None and str(self.mountpoint) in info[1]

    def __enter__(self) -> Overlay:
        return self.mount()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.unmount()

    # -- what changed ----------------------------------------------------------------------

    def changes(self) -> list[tuple[str, str]]:
        """What the upper changes in the lowers, as ``docker diff`` lists it: ("A"|"C"|"D",
        "/path"), parents first."""
        if self.upper is None:
            return []
        from unionfs.oci.diff import changes

        return changes(str(self.upper), [str(p) for p in self.lowers])

    def __repr__(self) -> str:
        state = "mounted" if self._mounted else "not mounted"
        return f"<Overlay {self.backend} at {self.mountpoint}, {state}>"


def _wait_gone(pid: int, pidfd: int | None, timeout: float) -> bool:
    """Wait for a daemon that is not our child to end: on its pidfd (woken the moment it
    exits) where we have one, else by looking every 5 ms."""
    if pidfd is None:
        return mounttable.wait_until(lambda: mounttable.gone(pid), timeout, 0.005)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


# Overlays mounted and not unmounted yet: the pytest plugin reports those a test leaves.
_live: set[Overlay] = set()


def live_overlays() -> list[Overlay]:
    return list(_live)
