"""The one place that makes raw system calls on layer trees.

Layers are untrusted data: a symlink stored in a layer must never be followed
while we resolve a path inside UPPER, WORK or a lower.  Every helper here
takes a directory file descriptor and a single name (``*at()`` calls with
``AT_SYMLINK_NOFOLLOW``/``O_NOFOLLOW``), and multi-component paths are
resolved only with ``openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)``.
Everything raises ``OSError``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_OPENAT2 = 437  # the same on every architecture (asm-generic numbering)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _check(res: int, what: str, name: str | None = None) -> int:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", name)
    return res


def open_root(path: str) -> int:
    """O_PATH fd for a layer root given by the user (here symlinks may be followed:
    the user named this directory on the command line)."""
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def open_dir_beneath(rootfd: int, relpath: str) -> int:
    """O_PATH fd for directory ``relpath`` below ``rootfd``, refusing any symlink
    on the way (ELOOP) and any escape from the root (EXDEV)."""
    if not relpath:
        return os.dup(rootfd)
    # RESOLVE_NO_XDEV: a mount point inside a layer is not part of the layer (EXDEV).
    how = _OpenHow(O_PATH_DIR, 0, RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
                   | RESOLVE_NO_XDEV)
    res = _libc.syscall(SYS_OPENAT2, rootfd, os.fsencode(relpath), ctypes.byref(how),
                        ctypes.sizeof(how))
    return _check(res, "openat2", relpath)


def renameat2(olddirfd: int, oldname: str, newdirfd: int, newname: str,
              flags: int = 0) -> None:
    if not flags:
        os.rename(oldname, newname, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    res = _libc.renameat2(olddirfd, os.fsencode(oldname), newdirfd, os.fsencode(newname),
                          ctypes.c_uint(flags))
    _check(res, "renameat2", newname)


def lstat(dirfd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def lstat_or_none(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        # ENOTDIR/ELOOP: a component is not a directory here, so the name is absent.
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def open_at(dirfd: int, name: str, flags: int, mode: int = 0o600) -> int:
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


def open_noatime(dirfd: int, name: str, flags: int, mode: int = 0o600) -> int:
    """Open without touching the atime where we may: O_NOATIME needs ownership of
    the file or CAP_FOWNER, which a rootless mount often lacks for lower files."""
    try:
        return open_at(dirfd, name, flags | os.O_NOATIME, mode)
    except PermissionError as e:
        if e.errno != errno.EPERM:
            raise
        return open_at(dirfd, name, flags, mode)


def reopen(fd: int, flags: int, noatime: bool) -> int:
    """Another open file of what ``fd`` has open, with ``flags``: through its /proc link,
    which leads to the inode itself (also one whose names are all gone), never by name."""
    path = f"/proc/self/fd/{fd}"
    if noatime:
        try:
            return os.open(path, flags | os.O_NOATIME | os.O_CLOEXEC)
        except PermissionError as e:
            if e.errno != errno.EPERM:
                raise
    return os.open(path, flags | os.O_CLOEXEC)


def open_path(dirfd: int, name: str) -> int:
    """O_PATH fd to the object itself (a symlink is not followed)."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


def open_dir_for_listing(dirfd: int, name: str = ".", noatime: bool = False) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY
    if noatime:
        return open_noatime(dirfd, name, flags)
    return open_at(dirfd, name, flags)


def proc_fd(fd: int) -> str:
    # The magic link lands on the object itself, symlinks included, so xattr and
    # chmod calls through it never resolve a name stored in the layer.
    return f"/proc/self/fd/{fd}"


class ObjectRef:
    """An O_PATH fd for one object, usable where a path is needed (xattrs, chmod)."""

    __slots__ = ("fd",)

    def __init__(self, dirfd: int, name: str) -> None:
        self.fd = open_path(dirfd, name)

    def __enter__(self) -> str:
        return proc_fd(self.fd)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def at_path(dirfd: int, name: str) -> str:
    """A path naming ``name`` in ``dirfd`` for calls that have no *at() form.

    The /proc magic link jumps straight to the directory, and the l*xattr()
    calls don't follow ``name`` itself, so nothing stored in a layer is followed."""
    return f"/proc/self/fd/{dirfd}/{name}"


def getxattr(dirfd: int, name: str, attr: str) -> bytes:
    return os.getxattr(at_path(dirfd, name), attr, follow_symlinks=False)


def getxattr_or_none(dirfd: int, name: str, attr: str) -> bytes | None:
    try:
        return getxattr(dirfd, name, attr)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def listxattr(dirfd: int, name: str) -> list[str]:
    try:
        return os.listxattr(at_path(dirfd, name), follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise


def setxattr(dirfd: int, name: str, attr: str, value: bytes, flags: int = 0) -> None:
    os.setxattr(at_path(dirfd, name), attr, value, flags, follow_symlinks=False)


def removexattr(dirfd: int, name: str, attr: str) -> None:
    os.removexattr(at_path(dirfd, name), attr, follow_symlinks=False)


def fd_getxattr_or_none(fd: int, attr: str) -> bytes | None:
    try:
        return os.getxattr(proc_fd(fd), attr)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def chmod(dirfd: int, name: str, mode: int) -> None:
    # fchmodat() cannot refuse to follow a symlink on older kernels; go through
    # an O_PATH fd instead.  Symlink modes are fixed on Linux: nothing to do.
    st = lstat(dirfd, name)
    if stat.S_ISLNK(st.st_mode):
        return
    with ObjectRef(dirfd, name) as p:
        os.chmod(p, mode)


def as_owner(dirfd: int, name: str, fn: Callable[[], None]) -> None:
    """Run ``fn``, a change in or of directory ``name`` (``"."``: ``dirfd`` itself).
    Unprivileged, a directory of ours without u+wx (a lower dir of mode 0555, copied up;
    mkdir -m 555) refuses it where the kernel, with its privileges, would go ahead:
    then give ourselves u+wx for the moment of ``fn``."""
    try:
        fn()
        return
    except PermissionError as e:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        if e.errno != errno.EACCES or st.st_uid != os.geteuid() or \
                not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o300 == 0o300:
            raise
    with ObjectRef(dirfd, name) as p:
        os.chmod(p, stat.S_IMODE(st.st_mode) | 0o300)
        try:
            fn()
        finally:
            os.chmod(p, stat.S_IMODE(st.st_mode))


def chown(dirfd: int, name: str, uid: int, gid: int) -> None:
    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)


def utimens(dirfd: int, name: str, atime_ns: int | None, mtime_ns: int | None,
            st: os.stat_result | None = None) -> None:
    if atime_ns is None or mtime_ns is None:
        st = st or lstat(dirfd, name)
        atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
        mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
    os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=dirfd, follow_symlinks=False)


def mknod(dirfd: int, name: str, mode: int, rdev: int = 0) -> None:
    os.mknod(name, mode, rdev, dir_fd=dirfd)


def mkdir(dirfd: int, name: str, mode: int) -> None:
    os.mkdir(name, mode, dir_fd=dirfd)


def symlink(target: str, dirfd: int, name: str) -> None:
    os.symlink(target, name, dir_fd=dirfd)


def readlink(dirfd: int, name: str) -> str:
    return os.readlink(name, dir_fd=dirfd)


def link(srcdirfd: int, srcname: str, dstdirfd: int, dstname: str) -> None:
    os.link(srcname, dstname, src_dir_fd=srcdirfd, dst_dir_fd=dstdirfd,
            follow_symlinks=False)


def unlink(dirfd: int, name: str) -> None:
    os.unlink(name, dir_fd=dirfd)


def rmdir(dirfd: int, name: str) -> None:
    os.rmdir(name, dir_fd=dirfd)


def scandir_fd(dirfd: int, name: str = ".", noatime: bool = False
               ) -> list[tuple[str, int, int]]:
    """(name, d_type-ish S_IFMT or 0 when unknown, d_ino) for each entry, in the
    directory's own order.  '.' and '..' are not included."""
    fd = open_dir_for_listing(dirfd, name, noatime)
    try:
        out = []
        with os.scandir(fd) as it:
            for ent in it:
                out.append((ent.name, _dtype(ent), ent.inode()))
        return out
    finally:
        os.close(fd)


def _dtype(ent: os.DirEntry[str]) -> int:
    # DirEntry.is_*() answer from d_type without a syscall when d_type is known.
    try:
        if ent.is_symlink():
            return stat.S_IFLNK
        if ent.is_dir(follow_symlinks=False):
            return stat.S_IFDIR
        if ent.is_file(follow_symlinks=False):
            return stat.S_IFREG
    except OSError:
        return 0
    return 0  # fifo, socket, device: caller stats when it matters


def copy_file_data(src_fd: int, dst_fd: int, size: int) -> None:
    """Copy ``size`` bytes, keeping holes: only the data extents are copied."""
    off = 0
    while off < size:
        try:
            data = os.lseek(src_fd, off, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = off  # no SEEK_DATA on this fs: copy everything
        try:
            hole = os.lseek(src_fd, data, os.SEEK_HOLE)
        except OSError:
            hole = size
        hole = min(hole, size)
        pos = data
        while pos < hole:
            n = _copy_range(src_fd, dst_fd, pos, hole - pos)
            if n == 0:
                return  # the file shrank under us
            pos += n
        off = hole
    os.ftruncate(dst_fd, size)


def _copy_range(src_fd: int, dst_fd: int, pos: int, count: int) -> int:
    count = min(count, 1 << 30)  # in-kernel copy: fewer, larger calls
    try:
        return os.copy_file_range(src_fd, dst_fd, count, pos, pos)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    buf = os.pread(src_fd, min(count, 1 << 20), pos)
    if buf:
        os.pwrite(dst_fd, buf, pos)
    return len(buf)


def release_free_memory() -> None:
    """Hand memory that Python freed back to the system (glibc keeps it otherwise)."""
    trim = getattr(_libc, "malloc_trim", None)  # glibc only
    if trim is not None:
        trim(0)


_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its modes (os.posix_fallocate has none, and glibc's emulation of
    it writes zeros where the filesystem has no fallocate: the caller's glibc does that
    itself on an EOPNOTSUPP, as on the kernel's overlay)."""
    res = _fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length))
    _check(res, "fallocate")


# -- file handles and filesystem identity (overlay.origin) ------------------------------

MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000
# _IOR(0x15, 0, struct fsuuid2 { __u8 len; __u8 uuid[16]; }) (Linux 6.5+)
FS_IOC_GETFSUUID = (2 << 30) | (17 << 16) | (0x15 << 8)


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(dirfd: int, name: str) -> tuple[int, bytes]:
    """(handle type, handle bytes) of ``name`` in ``dirfd`` (not followed if a symlink),
    or of ``dirfd`` itself for ""."""
    fh = _FileHandle(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    flags = AT_EMPTY_PATH if not name else 0  # a symlink's own handle: never followed
    res = _libc.name_to_handle_at(dirfd, os.fsencode(name), ctypes.byref(fh),
                                  ctypes.byref(mount_id), flags)
    _check(res, "name_to_handle_at", name)
    return fh.handle_type, bytes(fh.f_handle[:fh.handle_bytes])


def open_by_handle(mount_fd: int, kind: int, handle: bytes) -> int:
    """An O_PATH fd for a handle on the filesystem of ``mount_fd`` (needs
    CAP_DAC_READ_SEARCH)."""
    fh = _FileHandle(len(handle), kind)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    res = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), os.O_PATH | os.O_CLOEXEC)
    return _check(res, "open_by_handle_at")


def fs_uuid(dirfd: int) -> bytes | None:
    """The s_uuid of the filesystem holding directory ``dirfd`` (O_PATH will do), what
    overlayfs puts in a file handle; None where the kernel can't tell (before Linux 6.5,
    or a filesystem without one)."""
    buf = bytearray(17)
    try:
        fd = os.open(proc_fd(dirfd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf)
    except OSError:
        return None
    finally:
        os.close(fd)
    return bytes(buf[1:1 + min(buf[0], 16)]).ljust(16, b"\0")


# -- a private clone of the upper's mount (atime policy) ------------------------------------

SYS_OPEN_TREE, SYS_MOUNT_SETATTR = 428, 442  # asm-generic numbering, every architecture
OPEN_TREE_CLONE = 1
MOUNT_ATTR_NOATIME, MOUNT_ATTR_STRICTATIME, MOUNT_ATTR_ATIME_MASK = 0x10, 0x20, 0x70
MOUNT_ATTR_NODIRATIME = 0x80
ATIME_ATTRS = {"relatime": 0, "noatime": MOUNT_ATTR_NOATIME,
               "strictatime": MOUNT_ATTR_STRICTATIME}


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def clone_mount(fd: int) -> int:
    """A detached copy of the mount that ``fd`` is on, rooted at ``fd``'s directory
    (open_tree OPEN_TREE_CLONE, no submounts): a mount of our own whose flags we may set
    without touching anybody else's.  Needs CAP_SYS_ADMIN over our mount namespace."""
    return _check(_libc.syscall(SYS_OPEN_TREE, fd, b"", OPEN_TREE_CLONE | os.O_CLOEXEC
                                | AT_EMPTY_PATH), "open_tree")


def set_mount_atime(mount_fd: int, mode: str, nodiratime: bool) -> None:
    """The atime policy of a (detached) mount: ``relatime``, ``strictatime`` or
    ``noatime``, and ``nodiratime``.  EPERM for flags locked by a more privileged
    namespace."""
    attr = _MountAttr(attr_set=ATIME_ATTRS[mode] | (MOUNT_ATTR_NODIRATIME if nodiratime else 0),
                      attr_clr=MOUNT_ATTR_ATIME_MASK | MOUNT_ATTR_NODIRATIME)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, mount_fd, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                         ctypes.sizeof(attr)), "mount_setattr")


def in_initial_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


CAP_DAC_READ_SEARCH = 2


def can_open_handles() -> bool:
    """open_by_handle_at is allowed: CAP_DAC_READ_SEARCH in the initial namespace."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(ln.split()[1], 16) for ln in f if ln.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(eff >> CAP_DAC_READ_SEARCH & 1) and in_initial_userns()
