"""Extended attributes through the merged view (kernel xattrs.c; semantics §10).

The dialect's own markers (``trusted.overlay.*`` or ``user.overlay.*``) are invisible;
a user's names under that prefix are stored escaped (``P.overlay.*``), as kernel 6.7+ does.
"""

from __future__ import annotations

import errno
import os
import stat

from unionfs import acl
from unionfs.attrs import (
    AttrChange,
    acl_drops_sgid,
    protected_xattr,
    real_path,
    real_stat,
    setattr,
    shown_owner,
)
from unionfs.copyup import copy_up
from unionfs.errors import oserror
from unionfs.idmap import Caller
from unionfs.inodes import Inode
from unionfs.state import State


def _nofollow(target: str | int) -> bool:
    return isinstance(target, str)  # follow_symlinks=False is refused with an fd


def _real_name(fs: State, name: str) -> str:
    """The on-disk name for ``name``; EPERM for the markers nobody may set through us."""
    if protected_xattr(fs, name):
        raise oserror(errno.EPERM)
    return fs.dialect.to_real_xattr(name)


def _read_target(fs: State, node: Inode) -> str | int:
    """real_path, or the fd of a handle open on the very object it names: the kernel asks
    getxattr(security.capability) before every write(2), and the fd spares a procfs lookup
    each time.  Not for a file whose names are gone (real_path takes only upper fds then),
    nor through a reader left on the lower copy by a copy-up (copyup._switch_handles)."""
    if not node.gone:
        for h in node.handles:
            if h.layer is node.layer:
                return h.fd
    return real_path(fs, node)


def getxattr(fs: State, node: Inode, name: str) -> bytes:
    try:
        real = _real_name(fs, name)
    except PermissionError:
        raise oserror(errno.ENODATA) from None  # a marker: hidden
    try:
        target = _read_target(fs, node)
        return os.getxattr(target, real, follow_symlinks=not _nofollow(target))
    except OSError as e:
        # The kernel asks for ACLs on every open: "not supported" would fail the open.
        if e.errno == errno.EOPNOTSUPP:
            raise oserror(errno.ENODATA) from None
        raise


def listxattr(fs: State, node: Inode, privileged: bool = True) -> list[str]:
    try:
        target = real_path(fs, node)
        names = os.listxattr(target, follow_symlinks=not _nofollow(target))
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return []
        raise
    out = []
    for real in names:
        shown = fs.dialect.to_visible_xattr(real)
        # The kernel lists trusted.* only to CAP_SYS_ADMIN; FUSE leaves that to us.
        if shown is not None and (privileged or not shown.startswith("trusted.")) \
                and not protected_xattr(fs, shown):
            out.append(shown)
    return out


async def setxattr(fs: State, node: Inode, name: str, value: bytes, flags: int = 0,
                   caller: Caller | None = None) -> None:
    fs.check_writable()
    real = _real_name(fs, name)
    if not node.gone:
        await copy_up(fs, node, meta=True)
    target = real_path(fs, node)
    # An access ACL also sets the mode: the upper filesystem does that part itself.
    os.setxattr(target, real, value, flags, follow_symlinks=not _nofollow(target))
    if name == acl.ACCESS and caller is not None:
        mode, _, gid = shown_owner(fs, node, real_stat(fs, node))
        if acl_drops_sgid(mode, gid, caller):
            await setattr(fs, node, AttrChange(mode=mode & ~stat.S_ISGID))


async def removexattr(fs: State, node: Inode, name: str) -> None:
    fs.check_writable()
    real = _real_name(fs, name)
    if not node.in_upper and not node.gone:
        # A name that isn't there fails before anything is copied up.
        target = real_path(fs, node)
        if real not in os.listxattr(target, follow_symlinks=False):
            raise oserror(errno.ENODATA)
        await copy_up(fs, node, meta=True)
    target = real_path(fs, node)
    os.removexattr(target, real, follow_symlinks=not _nofollow(target))
