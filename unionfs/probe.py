"""Mount-time checks: what this process may do on the upper filesystem, which
on-disk dialect follows from that, and the workdir set-up."""

from __future__ import annotations

import errno
import os
import stat

from unionfs import acl, sysio
from unionfs.errors import MountError
from unionfs.layers import LayerStack
from unionfs.whiteout import CHARDEV, OCI, TRUSTED, USER, XATTR, Dialect

WORKDIR_NAME = "work"


def remove_tree_at(dirfd: int, name: str) -> None:
    """rm -rf of ``name`` below ``dirfd`` without following any symlink.  A loop over
    an explicit stack of directory fds: a tree may be deeper than Python's stack."""
    st = sysio.lstat_or_none(dirfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        sysio.unlink(dirfd, name)
        return
    try:
        # an empty directory goes without being read: the kernel leaves WORK/work mode 000
        # and root's, which a plain user may remove but not list
        sysio.rmdir(dirfd, name)
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    # (parent fd, name, own fd, children still to remove), one per level being emptied
    levels: list[tuple[int, str, int, list[tuple[str, int, int]]]] = []
    try:
        levels.append(_enter(dirfd, name))
        while levels:
            pfd, dname, sub, left = levels[-1]
            if not left:
                levels.pop()
                os.close(sub)
                sysio.rmdir(pfd, dname)
                continue
            child, kind, _ = left.pop()
            if not kind:
                cst = sysio.lstat_or_none(sub, child)
                if cst is None:
                    continue
                kind = stat.S_IFMT(cst.st_mode)
            if kind == stat.S_IFDIR:
                levels.append(_enter(sub, child))
            else:
                sysio.unlink(sub, child)
    finally:
        for _, _, sub, _ in levels:
            os.close(sub)


def _enter(dirfd: int, name: str) -> tuple[int, str, int, list[tuple[str, int, int]]]:
    sub = sysio.open_path(dirfd, name)
    try:
        try:
            children = sysio.scandir_fd(sub)
        except PermissionError:
            # A mode-000 work dir (the kernel's) owned by us: unprivileged, we must
            # give ourselves access before we can empty it.
            os.chmod(sysio.proc_fd(sub), 0o700)
            children = sysio.scandir_fd(sub)
    except BaseException:
        os.close(sub)
        raise
    return dirfd, name, sub, children


def supports_acl(stack: LayerStack) -> bool:
    """POSIX ACLs where new files go (upper, else the top lower): asking for a missing
    ACL answers ENODATA there, EOPNOTSUPP where the filesystem has none."""
    fd = stack.dirfd(stack.layers[0], "")
    try:
        os.getxattr(sysio.proc_fd(fd), acl.ACCESS)
    except OSError as e:
        return e.errno == errno.ENODATA
    return True


def prepare_workdir(stack: LayerStack, userxattr: bool = False,
                    whiteouts: str = "kernel") -> None:
    """Wipe and recreate WORK/work, as the kernel does at every mount, and pick the
    dialect from what the upper filesystem lets this process do."""
    oci = whiteouts == "oci"
    if stack.workroot_fd < 0:
        # Read-only: nothing to probe; read the markers this process could have written.
        trusted = not userxattr and os.geteuid() == 0 and sysio.in_initial_userns()
        stack.dialect = Dialect(TRUSTED if trusted else USER, CHARDEV, oci)
        return
    try:
        remove_tree_at(stack.workroot_fd, WORKDIR_NAME)
        # Mode 000 like the kernel's where we may still use it (root, also in a user
        # namespace); an unprivileged owner needs rwx to work in it.
        sysio.mkdir(stack.workroot_fd, WORKDIR_NAME, 0 if os.geteuid() == 0 else 0o700)
        stack.work_fd = sysio.open_dir_beneath(stack.workroot_fd, WORKDIR_NAME)
    except OSError as e:
        raise MountError(f"cannot prepare work directory '{stack.work_path}': "
                         f"{e.strerror}", e.errno or errno.EIO) from None
    try:
        stack.dialect = _probe_dialect(stack.work_fd, userxattr, oci)
    except BaseException:
        cleanup_workdir(stack)
        raise


def cleanup_workdir(stack: LayerStack) -> None:
    """After a failed mount: take WORK/work away again, so nothing is left behind."""
    if stack.work_fd >= 0:
        os.close(stack.work_fd)
        stack.work_fd = -1
    if stack.workroot_fd >= 0:
        try:
            remove_tree_at(stack.workroot_fd, WORKDIR_NAME)
        except OSError:
            pass


def probe_dialect(dirfd: int, userxattr: bool = False, oci: bool = False) -> Dialect:
    """The markers this process can write in directory ``dirfd`` (a layer being built)."""
    return _probe_dialect(dirfd, userxattr, oci)


def _probe_dialect(wfd: int, userxattr: bool, oci: bool) -> Dialect:
    """trusted.overlay.* where we may (real root), else user.overlay.* (the kernel's
    userxattr format); whiteouts as 0/0 char devices with RENAME_WHITEOUT where
    allowed (unprivileged since Linux 5.8), else the form the chosen readers know."""
    name = f"#probe{os.getpid():x}"
    try:
        sysio.mkdir(wfd, name, 0o700)
        prefix = USER
        if not userxattr:
            try:
                sysio.setxattr(wfd, name, TRUSTED + "opaque", b"y")
                prefix = TRUSTED
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EACCES, errno.EOPNOTSUPP):
                    raise
        if prefix == USER:
            try:
                sysio.setxattr(wfd, name, USER + "opaque", b"y")
            except OSError as e:
                raise MountError("upper filesystem cannot store trusted.* or user.* xattrs "
                                 f"({e.strerror}); use ext4, xfs, btrfs or tmpfs",
                                 e.errno or errno.EIO) from None
        form = CHARDEV if _whiteouts_allowed(wfd, name) else (OCI if oci else XATTR)
        forced = os.environ.get("PYUNIONFS_WRITE_WHITEOUTS")
        if forced in (XATTR, OCI):
            form = forced  # what a filesystem without 0/0 gets; for tests and OCI tooling
        if form == XATTR:
            try:
                fd = sysio.open_at(wfd, name + ".x", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   0o600)
                os.close(fd)
                sysio.setxattr(wfd, name + ".x", prefix + "whiteout", b"")
            except OSError:
                form = OCI
        # A layer we write .wh. files into must be read that way too.
        return Dialect(prefix, form, oci or form == OCI)
    except OSError as e:
        raise MountError(f"cannot probe the upper filesystem in work directory: {e.strerror}",
                         e.errno or errno.EIO) from None
    finally:
        for leftover in (name, name + ".wh", name + ".f", name + ".g", name + ".x"):
            try:
                remove_tree_at(wfd, leftover)
            except OSError:
                pass


def _whiteouts_allowed(wfd: int, name: str) -> bool:
    try:
        sysio.mknod(wfd, name + ".wh", stat.S_IFCHR, 0)
        os.close(sysio.open_at(wfd, name + ".f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        sysio.renameat2(wfd, name + ".f", wfd, name + ".g", sysio.RENAME_WHITEOUT)
    except OSError as e:
        if e.errno in (errno.EPERM, errno.EACCES, errno.EINVAL, errno.EOPNOTSUPP):
            return False
        raise
    return True


def init_uuid(stack: LayerStack, mode: str) -> None:
    """The overlay's own uuid on the upper root (``overlay.uuid``; the kernel's
    ovl_init_uuid_xattr): kept once there; with uuid=auto made only for a new overlay,
    one whose root is not impure yet (an old one stays without, as under the kernel)."""
    upper = stack.upper
    if upper is None or stack.workroot_fd < 0 or mode not in ("on", "auto"):
        return
    prefix = stack.dialect.prefix
    have = sysio.fd_getxattr_or_none(upper.fd, prefix + "uuid")
    if have is not None and len(have) == 16:
        return
    if mode == "auto" and sysio.fd_getxattr_or_none(upper.fd, prefix + "impure") is not None:
        return
    try:
        os.setxattr(sysio.proc_fd(upper.fd), prefix + "uuid", os.urandom(16))
    except OSError:
        pass  # the kernel goes on without it too (a filesystem that takes no such xattr)
