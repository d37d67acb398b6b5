"""Mount flags after the mount: ``mount -o remount,ro|rw|noatime...`` and following them.

mount(8) runs the helper for a remount too (``pyunionfs SOURCE MERGED -o ro,remount,...``, the
mount table's options merged in).  FUSE's superblock takes a change of ro/rw, and the mount a
change of its flags (nosuid, nodev, noexec, the atime words), from mount(2) with MS_REMOUNT,
as kernel overlayfs does; the layers can't change.  The kernel enforces ro itself.  The atime
flags are ours to honour (FUSE inodes keep no atime of their own), so the daemon watches its
line of /proc/self/mountinfo (``follow``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import time
from collections.abc import Callable
from typing import TextIO

from unionfs.errors import MountError
from unionfs.mounttable import MountEntry, mount_table, parse

log = logging.getLogger(__name__)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT = 0x20
MS_NOATIME, MS_NODIRATIME, MS_BIND = 0x400, 0x800, 0x1000
MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
# word -> (flag, set?), in the order given: the last word for a flag wins
WORDS = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "bind": (MS_BIND, True),  # remount,bind,...: this mount's flags only, not the filesystem's
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True), "nolazytime": (MS_LAZYTIME, False),
}
FSTYPE = "fuse.pyunionfs"


def flags_of(words: list[str]) -> int:
    flags = 0
    for w in words:
        flag, on = WORDS.get(w, (0, False))
        flags = flags | flag if on else flags & ~flag
    return flags


def _mount_line(merged: str | None, dev: str | None = None,
                table: TextIO | None = None) -> MountEntry | None:
    """The last mount table entry for the mount point ``merged`` (any type), or for the
    device ``dev`` ("major:minor"); read again from ``table`` (an open mountinfo) if given."""
    found = None
    if table is not None:
        table.seek(0)
    for e in mount_table() if table is None else filter(None, map(parse, table)):
        if e.dev == dev if dev is not None else e.point == merged:
            found = e
    return found


def remount(merged: str, words: list[str]) -> None:
    """``mount -o remount,WORDS MERGED`` for a pyunionfs mount.  Words that name layers or
    other mount-time options are ignored, as mount(8) passes the fstab line's options again."""
    path = os.path.realpath(merged)
    fields = _mount_line(path)
    if fields is None:
        raise MountError(f"'{merged}' is not mounted", errno.EINVAL)
    fstype = fields.fstype
    if fstype != FSTYPE:
        raise MountError(f"'{merged}' is a {fstype} mount, not a pyunionfs one", errno.EINVAL)
    flags = flags_of(words)
    try:
        _mount_flags(path, MS_REMOUNT | flags)
        # A read-only stack's daemon takes a remount rw back at once (follow): only a
        # mount that was read-only can be one, so only then is there something to wait for.
        if not flags & MS_RDONLY and not _writable(fields) and _stays_read_only(path):
            raise MountError(f"cannot remount '{merged}' read-write: it has no upper "
                             "directory", errno.EROFS)
    except OSError as e:
        if e.errno == errno.EPERM:
            raise MountError(f"cannot remount '{merged}': only root (or root of the user "
                             "namespace that made the mount) may; fusermount3 can't remount",
                             e.errno) from None
        raise MountError(f"cannot remount '{merged}': {e.strerror}", e.errno or errno.EIO) \
            from None


def _stays_read_only(path: str, wait: float = 1.0) -> bool:
    """After a remount rw: did the daemon take it back (``follow``, no upper layer)?"""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        fields = _mount_line(path)
        if fields is None or not _writable(fields):
            return True
        time.sleep(0.05)
    return False


def _mount_flags(path: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    if libc.mount(None, os.fsencode(path), None, flags, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def _writable(fields: MountEntry) -> bool:
    return "rw" in fields.options.split(",") or "rw" in fields.super_options.split(",")


def _remount_own(merged: str, dev: str, flags: int) -> None:
    """mount(2) on our own mount, reached by an fd checked to be on our device: whatever
    sits at the path now (a symlink put there since) is not what gets remounted."""
    fd = os.open(merged, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        major, minor = (int(x) for x in dev.split(":"))
        if os.fstat(fd).st_dev != os.makedev(major, minor):
            raise OSError(errno.ESTALE, "the mount point is no longer our mount", merged)
        _mount_flags(f"/proc/self/fd/{fd}", flags)
    finally:
        os.close(fd)


def atime_policy(opts: set[str]) -> tuple[str, bool]:
    """(relatime|strictatime|noatime, nodiratime) of a mount with per-mount ``opts`` as
    mountinfo shows them: strictatime is the absence of the other two."""
    mode = "noatime" if "noatime" in opts else "relatime" if "relatime" in opts \
        else "strictatime"
    return mode, "nodiratime" in opts


def follow(merged: str, words: list[str], readonly: bool,
           changed: Callable[[set[str]], None], stop: Callable[[], bool]) -> bool:
    """Call ``changed(options)`` whenever our mount's per-mount options change (a remount),
    until ``stop()``; blocks, so it runs in a thread.  The mount table is pollable: it says
    POLLPRI when any mount in the namespace changes.  A ``readonly`` mount (no upper layer)
    that somebody remounted rw is made read-only again, as the kernel refuses it (the helper
    then says so).  ``words`` that libfuse wouldn't pass (nodiratime, strictatime) are set on
    the mount first, where we may, so that the mount table shows them, mount(8) keeps them
    over a remount, and what a remount changes is read against them.  True once our mount
    has left this namespace's table (unmounted here; copies in other namespaces may live on)."""
    first = _mount_line(merged)
    if first is None or first.fstype != FSTYPE:
        return False
    dev, seen = first.dev, first.options
    want = seen.split(",") + words
    if flags_of(want) != flags_of(seen.split(",")):
        try:
            _remount_own(merged, dev, MS_REMOUNT | MS_BIND | flags_of(want))
        except OSError as e:
            log.debug("%s not shown in the mount table: %s", ",".join(words), e.strerror)
        else:
            now = _mount_line(None, dev)
            seen = now.options if now is not None else seen
    with open("/proc/self/mountinfo") as f:
        poller = select.poll()
        poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
        while not stop():
            if not poller.poll(1000):
                continue
            # from the table held open: out of descriptors (EMFILE), a new open would fail
            # and take the filesystem loop down with it
            now = _mount_line(None, dev, f)
            if now is None:
                return True  # unmounted
            if readonly and _writable(now):
                words = now.options.split(",") + ["ro"]
                for flags in (MS_REMOUNT | flags_of(words), MS_REMOUNT | MS_BIND | flags_of(words)):
                    try:
                        _remount_own(merged, dev, flags)
                    except OSError as e:
                        log.warning("remounted rw without an upper layer, and cannot make it "
                                    "read-only again: %s", e.strerror)
                continue
            if now.options != seen:
                seen = now.options
                changed(set(seen.split(",")))
    return False
