"""Extended attributes through the merged view (kernel xattrs.c; semantics §10).

Our own ``trusted.overlay.*`` markers are invisible; a user's names under that
prefix are stored escaped (``trusted.overlay.overlay.*``), as kernel 6.7+ does.
"""

from __future__ import annotations

import errno
import os

from unionfs import sysio, whiteout
from unionfs.copyup import copy_up
from unionfs.errors import oserror
from unionfs.inodes import Inode
from unionfs.state import State


def _where(fs: State, node: Inode) -> tuple[int, str]:
    """(dirfd, name) for the topmost real object; the root is reached through its fd."""
    if node.parent is None:
        return node.layer.fd, "."
    return fs.stack.dirfd(node.layer, node.parent_path), node.name


def _path(fs: State, node: Inode) -> str:
    dfd, name = _where(fs, node)
    return sysio.proc_fd(dfd) if name == "." else sysio.at_path(dfd, name)


def getxattr(fs: State, node: Inode, name: str) -> bytes:
    real = whiteout.to_real_xattr(name)
    try:
        return os.getxattr(_path(fs, node), real, follow_symlinks=False)
    except OSError as e:
        # The kernel asks for ACLs on every open: "not supported" would fail the open.
        if e.errno == errno.EOPNOTSUPP:
            raise oserror(errno.ENODATA) from None
        raise


def listxattr(fs: State, node: Inode, privileged: bool = True) -> list[str]:
    try:
        names = os.listxattr(_path(fs, node), follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return []
        raise
    out = []
    for real in names:
        shown = whiteout.to_visible_xattr(real)
        # The kernel lists trusted.* only to CAP_SYS_ADMIN; FUSE leaves that to us.
        if shown is not None and (privileged or not shown.startswith("trusted.")):
            out.append(shown)
    return out


async def setxattr(fs: State, node: Inode, name: str, value: bytes, flags: int = 0) -> None:
    fs.check_writable()
    real = whiteout.to_real_xattr(name)
    await copy_up(fs, node)
    os.setxattr(_path(fs, node), real, value, flags, follow_symlinks=False)


async def removexattr(fs: State, node: Inode, name: str) -> None:
    fs.check_writable()
    real = whiteout.to_real_xattr(name)
    if not node.in_upper:
        # A name that isn't there fails before anything is copied up.
        if real not in os.listxattr(_path(fs, node), follow_symlinks=False):
            raise oserror(errno.ENODATA)
        await copy_up(fs, node)
    os.removexattr(_path(fs, node), real, follow_symlinks=False)
