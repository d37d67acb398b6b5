"""One upper, one mount: the daemon's exclusive claim on UPPER and WORK.

Two daemons writing one upper (or one work directory, which each wipes at mount) corrupt
each other's state.  The kernel marks the directories "in use" and, without index=on, only
warns (semantics §1.5); we refuse always (docs/differences.md).

The claim is ``flock(LOCK_EX)`` on a descriptor of each directory itself, held by the
daemon until it exits: the kernel drops it however the daemon ends (kill -9 included), so
no stale pid file can lock a user out, and nothing is written inside WORK (a kernel mount
recreates WORK/work, which would take a lock file with it).  A kernel overlay mount made
*after* ours can't see the claim; one made before is found in mountinfo.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time

from unionfs import mounttable
from unionfs.errors import MountError

log = logging.getLogger(__name__)

# A daemon whose mount has just gone (fusermount3 -u, a lazy umount) still holds its claim
# while it exits: a new mount waits that long for it rather than failing.  Less for a holder
# we can't see at all (another user's, or one that forked away from the pid we know).
EXIT_WAIT = 10.0
UNSEEN_WAIT = 3.0


def take(dirs: list[tuple[str, str, int]]) -> list[int]:
    """Claim each (what, path, fd) — ``fd`` may be O_PATH — and return the descriptors that
    hold the claims (close them to let go).  Raises MountError naming the holder."""
    held: list[int] = []
    try:
        for what, path, fd in dirs:
            st = os.fstat(fd)
            _refuse_kernel_user(what, path, st)
            lock_fd = _lock_fd(what, path, fd)
            if lock_fd is None:
                continue
            held.append(lock_fd)
            _lock(what, path, lock_fd, st)
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return held


def _lock_fd(what: str, path: str, fd: int) -> int | None:
    """A descriptor flock() takes (an O_PATH one is refused with EBADF)."""
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
    except OSError as e:
        # A directory we may write but not list (mode 0300): unusual enough to mount
        # unguarded rather than refuse.
        log.warning("%s directory '%s': no exclusive claim (%s): a second mount on it "
                    "would not be refused", what, path, e.strerror)
        return None


def _lock(what: str, path: str, fd: int, st: os.stat_result) -> None:
    start = time.monotonic()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                # e.g. NFS, where flock is a byte-range lock that wants a writable fd
                log.warning("%s directory '%s': no exclusive claim (flock: %s): a second "
                            "mount on it would not be refused", what, path, e.strerror)
                return
        pid = holder(st)
        uid = _uid(pid) if pid is not None else None
        if uid is not None and uid not in (os.geteuid(), 0, st.st_uid):
            # Anyone who may open the directory may flock it: a lock of a stranger (not
            # us, not root, not the directory's owner) doesn't keep its owner out.
            log.warning("%s directory '%s': ignoring a lock held by uid %d (pid %d), who is "
                        "not its owner; the mount is not exclusive", what, path, uid, pid)
            return
        point = _served_by(pid) if pid is not None else None
        waited = time.monotonic() - start
        if point is not None or waited >= (EXIT_WAIT if uid is not None else UNSEEN_WAIT):
            raise MountError(f"{what} directory '{path}' is in use by "
                             f"{describe(pid, point)}", errno.EBUSY)
        time.sleep(0.05)


def describe(pid: int | None, point: str | None) -> str:
    if pid is None:
        return "another mount (a process this user can't see holds its lock)"
    if point is not None:
        return f"the pyunionfs mount on '{point}' (pid {pid})"
    info = mounttable.process(pid)
    cmd = " ".join(info[1])[:80] if info else "?"
    return f"process {pid} ({cmd}), whose mount is not visible here"


def holder(st: os.stat_result) -> int | None:
    """The pid of a process holding a flock on the file ``st``.  Each descriptor's fdinfo
    lists the locks its open file holds; else /proc/locks names the process that took the
    lock (which, for a daemon that forked away from its starter, has exited).  Matched by
    inode number and then by a stat of the descriptor: the device in those lines is the
    superblock's, which is not st_dev on btrfs or an overlay."""
    ino = f":{st.st_ino} "
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        base = f"/proc/{name}/fdinfo"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                with open(f"{base}/{fd}") as f:
                    text = f.read()
                if not any(line.startswith("lock:") and "FLOCK" in line and ino in line
                           for line in text.splitlines()):
                    continue
                got = os.stat(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if (got.st_dev, got.st_ino) == (st.st_dev, st.st_ino):
                return int(name)
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # here the device must match too: nothing confirms what the line names
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key \
                        and fields[4].isdigit() and mounttable.process(int(fields[4])):
                    return int(fields[4])
    except OSError:
        pass
    return None


def _uid(pid: int) -> int | None:
    """The real uid of a live process (/proc/PID/status is readable by all)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _served_by(pid: int) -> str | None:
    """The mount point of the pyunionfs mount ``pid`` serves, if it is visible here.  By
    the mounts' devices, never their paths: a hung daemon elsewhere must not hang us."""
    for e in mounttable.mount_table():
        if e.fstype == "fuse.pyunionfs" and mounttable.serving_pid(e.dev) == pid:
            return e.point
    return None


def _refuse_kernel_user(what: str, path: str, st: os.stat_result) -> None:
    """Refuse a directory that a kernel overlay mount visible here uses as its upperdir or
    workdir (compared by device and inode: the paths in mountinfo may be spelt otherwise)."""
    for e in mounttable.mount_table():
        if e.fstype != "overlay":
            continue
        for opt in e.super_options.split(","):
            key, _, value = opt.partition("=")
            if key not in ("upperdir", "workdir") or not value:
                continue
            try:
                theirs = os.stat(mounttable.unescape(value))
            except OSError:
                continue  # a path of another mount namespace or root
            if (theirs.st_dev, theirs.st_ino) == (st.st_dev, st.st_ino):
                raise MountError(f"{what} directory '{path}' is in use by the kernel overlay "
                                 f"mount on '{e.point}' (its {key})", errno.EBUSY)
