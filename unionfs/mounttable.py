"""The mount table and the processes behind FUSE mounts, read without touching any mount.

Everything here reads /proc only, so none of it can hang on a dead FUSE daemon: that is why
it is used instead of ``os.path.ismount`` (which stats the mount point) by the API, the
tests and the benchmark alike.
"""

from __future__ import annotations

import os
import select
import sys
import time

MOUNTINFO = "/proc/self/mountinfo"

# typing costs `pyunionfs umount` (which reads the table) 6 ms: checkers see the typed
# NamedTuple, the interpreter the same fields as a collections.namedtuple.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NamedTuple

    class MountEntry(NamedTuple):
        """One line of /proc/self/mountinfo.  The first four fields come first so that a
        row reads as (mount point, type, source, super options)."""

        point: str
        fstype: str
        source: str
        super_options: str
        options: str  # per-mount: rw, nosuid, relatime, ...
        dev: str  # "major:minor"
        root: str
        mount_id: int
        parent_id: int
else:
    from collections import namedtuple

    MountEntry = namedtuple("MountEntry", "point fstype source super_options options dev "
                            "root mount_id parent_id")


def unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = field.encode()
    while i < len(raw):
        code = raw[i + 1 : i + 4]
        if raw[i] == 0x5C and len(code) == 3 and code.isdigit():
            out.append(int(code, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode(errors="surrogateescape")


def parse(line: str) -> MountEntry | None:
    left, sep, right = line.rstrip("\n").partition(" - ")
    fields, rfields = left.split(), right.split()
    if not sep or len(fields) < 6 or not rfields:
        return None
    return MountEntry(unescape(fields[4]), rfields[0],
                      unescape(rfields[1]) if len(rfields) > 1 else "",
                      rfields[2] if len(rfields) > 2 else "", fields[5], fields[2],
                      unescape(fields[3]), int(fields[0]), int(fields[1]))


def mount_table() -> list[MountEntry]:
    with open(MOUNTINFO) as f:
        return [e for e in map(parse, f) if e is not None]


def entry(path: str | os.PathLike[str], resolve: bool = True) -> MountEntry | None:
    """The topmost mount at ``path`` (the last one mounted there), or None.  ``resolve``
    makes the path absolute and resolves symlinks first, which stats each component: a
    daemon looking up its own mount point passes False (it would wait for itself)."""
    want = os.path.realpath(path) if resolve else os.fspath(path)
    found = None
    for e in mount_table():
        if e.point == want:
            found = e
    return found


def is_mounted(path: str | os.PathLike[str]) -> bool:
    return entry(path) is not None


def mounts_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Mount points at or below ``prefix``."""
    pre = os.path.realpath(prefix).rstrip("/") + "/"
    return [e.point for e in mount_table() if (e.point + "/").startswith(pre)]


def wait_mounted(path: str | os.PathLike[str], timeout: float,
                 alive: Callable[[], bool] = lambda: True) -> bool:
    """Wait until ``path`` is a mount point; False after ``timeout`` or once ``alive()`` is
    false.  Woken by the kernel's poll event on each change of the mount table, so a mount is
    seen within microseconds, not a sleep interval later."""
    want = os.path.realpath(path)
    end = time.monotonic() + timeout
    with open(MOUNTINFO) as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while True:
            f.seek(0)
            if any(e is not None and e.point == want for e in map(parse, f)):
                return True
            left = end - time.monotonic()
            if left <= 0 or not alive():
                return False
            poller.poll(min(left, 0.05) * 1000)


# -- the processes behind mounts -----------------------------------------------------------

# A device number comes free when its mount goes, before its daemon has exited: a new
# mount with the same number takes the next free name, and the identity in the answer
# tells the asker which one is its daemon.
NAMES_PER_DEVICE = 8


def socket_names(dev: str) -> list[bytes]:
    """The abstract sockets (``pyunionfs stats``, stats.py) a daemon serving the mount with
    device ``dev`` ("0:53") may listen on, in the order it tries them."""
    return [b"\0pyunionfs-stats-%s-%d" % (dev.encode(), i) for i in range(NAMES_PER_DEVICE)]


def daemon_pid(merged: str) -> tuple[int, str] | None:
    """(pid, device) of the pyunionfs daemon serving ``merged``, from its stats socket's
    peer credentials; None if none answers.  An older daemon of a mount that had the device
    number before may answer first: it is on its way out."""
    e = entry(merged)
    if e is None or e.fstype != "fuse.pyunionfs":
        return None
    pid = serving_pid(e.dev)
    return (pid, e.dev) if pid else None


def serving_pid(dev: str) -> int | None:
    """The pid of the daemon answering on the stats socket of device ``dev`` ("0:53"), if
    any; no path is looked up, so no mount is touched."""
    import _socket  # not socket: its enum and selectors cost `pyunionfs umount` 5 ms

    for name in socket_names(dev):
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(name)
            raw = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        except OSError:
            continue
        finally:
            s.close()
        return int.from_bytes(raw[:4], sys.byteorder) or None
    return None


def copies(dev: str) -> dict[str, int]:
    """The mount namespaces other than ours that hold a mount of device ``dev`` (copies a
    namespace took when it was made, a container's or unshare's), each with one process in
    it: {namespace: pid}.  Only the processes we may look at are seen."""
    mine = os.readlink("/proc/self/ns/mnt")
    found: dict[str, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{name}/ns/mnt")
            if ns == mine or ns in found:
                continue
            with open(f"/proc/{name}/mountinfo") as f:
                if any(line.split(" ", 3)[2] == dev for line in f):
                    found[ns] = int(name)
        except (OSError, IndexError):
            continue
    return found


def process(pid: int) -> tuple[int, list[str]] | None:
    """(parent pid, argv) of a live process; None once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if not fields or fields[0] == b"Z":
        return None
    return int(fields[1]), argv


def processes_with_arg(arg: str, parent: int | None = None) -> list[int]:
    """Live processes (not this one) with ``arg`` as one of their arguments, oldest first;
    only the children of ``parent`` if given."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        info = process(int(name))
        if info is not None and arg in info[1] and (parent is None or info[0] == parent):
            pids.append(int(name))
    return sorted(pids)


def gone(pid: int) -> bool:
    """True once ``pid`` has exited (and been reaped, where it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    except ChildProcessError:
        pass
    return process(pid) is None


def wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()
