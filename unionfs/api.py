"""The public Python API: an overlay mount as a context manager, for other projects' tests.

    from unionfs import Overlay
    with Overlay(lowers=[app, base], upper=u, work=w, mountpoint=m) as ov:
        (ov.mountpoint / "etc/motd").write_text("hi")
        assert ov.changes() == [("C", "/etc"), ("A", "/etc/motd")]

The daemon runs as a child process (``pyunionfs mount -f``); ``mount()`` returns once the
mount table has it and raises ``OverlayError`` with the daemon's one-line error otherwise;
``unmount()`` (and leaving the ``with`` block, also by an exception) unmounts and reaps it.
``backend="kernel"`` mounts kernel overlayfs with the same arguments (root only), and
``backend="fuse-overlayfs"`` the C peer (its package installed), so that a test or a
comparison can run on all three.  Layers left out are made as temporary directories, removed
again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

PathLike = str | os.PathLike[str]
OptionValue = bool | str | int

BACKENDS = ("pyunionfs", "kernel", "fuse-overlayfs")
MOUNT_TIMEOUT = 20.0
UMOUNT_TIMEOUT = 20.0


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
    target = os.path.realpath(os.fspath(path))
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mnt = line.split()[4].encode().decode("unicode_escape")
                if mnt == target:
                    return True
    except OSError:
        return False
    return False


class Overlay:
    """An overlay of ``lowers`` (top first) with ``upper`` and ``work`` at ``mountpoint``.

    ``upper=None`` with ``work=None`` makes temporary ones; ``readonly=True`` mounts the
    lowers alone.  ``options``: mount options as a dict (``{"userxattr": True,
    "redirect_dir": "on"}``), a list or a comma-separated string.  ``lowers`` may be left
    out too: one empty temporary lower."""

    def __init__(self, lowers: Sequence[PathLike] | None = None, upper: PathLike | None = None,
                 work: PathLike | None = None, mountpoint: PathLike | None = None,
                 options: Mapping[str, OptionValue] | Sequence[str] | str | None = None,
                 backend: str = "pyunionfs", readonly: bool = False,
                 timeout: float = MOUNT_TIMEOUT) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
        self.backend = backend
        self.options = _options(options)
        self.timeout = timeout
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
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None
        self._mounted = False

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
        if self.backend == "kernel":
            self._mount_kernel()
        else:
            self._mount_daemon()
        self._mounted = True
        _live.add(self)
        return self

    def _mount_kernel(self) -> None:
        if os.geteuid() != 0:
            raise OverlayError("the kernel backend mounts with mount(8): it needs root")
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            ",".join(self._layer_options() + self.options), str(self.mountpoint)],
                           capture_output=True, text=True, timeout=self.timeout,
                           stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            msg = (r.stderr.strip().splitlines() or ["mount failed"])[-1]
            raise OverlayError(f"kernel overlay mount at '{self.mountpoint}' failed: {msg}")

    def _layer_options(self) -> list[str]:
        opts = ["lowerdir=" + ":".join(_escape(str(p)) for p in self.lowers)]
        if self.upper is not None:
            opts += [f"upperdir={_escape(str(self.upper))}", f"workdir={_escape(str(self.work))}"]
        return opts

    def _daemon_args(self) -> list[str]:
        """The daemon's command line, in the foreground."""
        if self.backend == "fuse-overlayfs":
            prog = shutil.which("fuse-overlayfs")
            if prog is None:
                raise OverlayError("the fuse-overlayfs backend needs fuse-overlayfs "
                                   "(Debian: apt-get install fuse-overlayfs)")
            return [prog, "-f", "-o", ",".join(self._layer_options() + self.options),
                    str(self.mountpoint)]
        args = [sys.executable, "-m", "unionfs", "mount", "-f"]
        if self.options:
            args += ["-o", ",".join(self.options)]
        args.append(":".join(str(p).replace(":", "\\:") for p in self.lowers))
        if self.upper is not None:
            args += [str(self.upper), str(self.work)]
        return [*args, str(self.mountpoint)]

    def _mount_daemon(self) -> None:
        args = self._daemon_args()
        base = self._temp or Path(tempfile.mkdtemp(prefix="pyunionfs-overlay-"))
        self._temp = base
        self._log_path = base / f"{self.backend}.log"
        with open(self._log_path, "wb") as log:
            # its own session: a Ctrl-C meant for the test run must not kill it
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while not mounted(self.mountpoint):
            rc = self._proc.poll()
            if rc is not None:
                raise OverlayError(self._reason(f"{self.backend} exited with status {rc}"))
            if time.monotonic() > deadline:
                self._stop_daemon()
                raise OverlayError(f"{self.backend} did not mount '{self.mountpoint}' within "
                                   f"{self.timeout:g} s")
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
        if self._log_path is None:
            return ""
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def is_mounted(self) -> bool:
        return self._mounted and mounted(self.mountpoint)

    def unmount(self) -> None:
        """Unmount and reap the daemon; temporary layers are removed.  Idempotent."""
        problems = []
        if self._mounted:
            self._mounted = False
            _live.discard(self)
            path = str(self.mountpoint)
            if self.backend == "kernel":
                cmd = ["umount", path]
            else:
                cmd = [shutil.which("fusermount3") or "fusermount3", "-u", path]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=UMOUNT_TIMEOUT,
                                   stdin=subprocess.DEVNULL)
                if r.returncode != 0 and mounted(path):
                    problems.append((r.stderr.strip().splitlines() or ["unmount failed"])[-1])
            except (OSError, subprocess.TimeoutExpired) as e:
                problems.append(str(e))
            if mounted(path):  # busy: detach it, so nothing outlives the test
                subprocess.run([*cmd[:-1], "-z" if self.backend != "kernel" else "-l", path],
                               capture_output=True, timeout=UMOUNT_TIMEOUT)
        self._stop_daemon()
        if self._temp is not None and not mounted(self.mountpoint):
            shutil.rmtree(self._temp, ignore_errors=True)
            self._temp = None
        if problems:
            raise OverlayError(f"unmounting '{self.mountpoint}': {problems[0]}")

    def _stop_daemon(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=UMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

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


# Overlays mounted and not unmounted yet: the pytest plugin reports those a test leaves.
_live: set[Overlay] = set()


def live_overlays() -> list[Overlay]:
    return list(_live)
