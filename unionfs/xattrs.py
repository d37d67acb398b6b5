"""Extended attributes through the merged view (kernel xattrs.c; semantics §10).

Our own ``trusted.overlay.*`` markers are invisible; a user's names under that
prefix are stored escaped (``trusted.overlay.overlay.*``), as kernel 6.7+ does.
"""

from __future__ import annotations

import errno
import os

from unionfs import sysio, whiteout
from unionfs.attrs import open_fd
from unionfs.copyup import copy_up
from unionfs.errors import oserror
from unionfs.inodes import Inode
from unionfs.state import State


def _path(fs: State, node: Inode) -> str | int:
    """What the os.*xattr calls take for the topmost real object: a path that doesn't follow
    the object if it is a symlink, or the fd of an open file whose names are all gone."""
    if node.gone:
        return open_fd(node)
    if node.parent is None:
        return sysio.at_path(node.layer.fd, ".")
    return sysio.at_path(fs.stack.dirfd(node.layer, node.parent_path), node.name)


def _nofollow(target: str | int) -> bool:
    return isinstance(target, str)  # follow_symlinks=False is refused with an fd


def getxattr(fs: State, node: Inode, name: str) -> bytes:
    real = whiteout.to_real_xattr(name)
    try:
        target = _path(fs, node)
        return os.getxattr(target, real, follow_symlinks=not _nofollow(target))
    except OSError as e:
        # The kernel asks for ACLs on every open: "not supported" would fail the open.
        if e.errno == errno.EOPNOTSUPP:
            raise oserror(errno.ENODATA) from None
        raise


def listxattr(fs: State, node: Inode, privileged: bool = True) -> list[str]:
    try:
        target = _path(fs, node)
        names = os.listxattr(target, follow_symlinks=not _nofollow(target))
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
    if not node.gone:
        await copy_up(fs, node)
    target = _path(fs, node)
    os.setxattr(target, real, value, flags, follow_symlinks=not _nofollow(target))


async def removexattr(fs: State, node: Inode, name: str) -> None:
    fs.check_writable()
    real = whiteout.to_real_xattr(name)
    if not node.in_upper and not node.gone:
        # A name that isn't there fails before anything is copied up.
        target = _path(fs, node)
        if real not in os.listxattr(target, follow_symlinks=False):
            raise oserror(errno.ENODATA)
        await copy_up(fs, node)
    target = _path(fs, node)
    os.removexattr(target, real, follow_symlinks=not _nofollow(target))
