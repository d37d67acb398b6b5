"""Mount-time checks of what the upper filesystem can do, and the workdir set-up."""

from __future__ import annotations

import errno
import os
import stat

from unionfs import sysio
from unionfs.errors import MountError
from unionfs.layers import LayerStack
from unionfs.whiteout import OPAQUE

WORKDIR_NAME = "work"


def remove_tree_at(dirfd: int, name: str) -> None:
    """rm -rf of ``name`` below ``dirfd`` without following any symlink."""
    st = sysio.lstat_or_none(dirfd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        sysio.unlink(dirfd, name)
        return
    sub = sysio.open_path(dirfd, name)
    try:
        for child, _, _ in sysio.scandir_fd(sub):
            remove_tree_at(sub, child)
    finally:
        os.close(sub)
    sysio.rmdir(dirfd, name)


def prepare_workdir(stack: LayerStack) -> None:
    """Wipe and recreate WORK/work, as the kernel does at every mount."""
    if stack.workroot_fd < 0:
        return
    try:
        remove_tree_at(stack.workroot_fd, WORKDIR_NAME)
        # Mode 000 like the kernel's: nobody but us has business in there.
        sysio.mkdir(stack.workroot_fd, WORKDIR_NAME, 0)
        stack.work_fd = sysio.open_dir_beneath(stack.workroot_fd, WORKDIR_NAME)
    except OSError as e:
        raise MountError(f"cannot prepare work directory '{stack.layers[0].path}': "
                         f"{e.strerror}", e.errno or errno.EIO) from None
    _check_upper_features(stack)


def _check_upper_features(stack: LayerStack) -> None:
    """The upper must hold trusted.* xattrs and 0/0 char devices, or the UPPER we
    write would not mean the same thing to the kernel."""
    name = "#probe"
    wfd = stack.work_fd
    try:
        sysio.mkdir(wfd, name, 0o700)
        try:
            sysio.setxattr(wfd, name, OPAQUE, b"y")
        except OSError as e:
            raise MountError("upper filesystem cannot store trusted.* xattrs "
                             f"({e.strerror}); run as root on ext4, xfs, btrfs or tmpfs",
                             e.errno) from None
        try:
            sysio.mknod(wfd, name + ".wh", stat.S_IFCHR, 0)
        except OSError as e:
            raise MountError(f"upper filesystem refuses whiteouts (mknod 0/0: {e.strerror})",
                             e.errno) from None
    finally:
        remove_tree_at(wfd, name)
        remove_tree_at(wfd, name + ".wh")
