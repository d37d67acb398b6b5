"""Attributes of merged objects, setattr with copy-up, statfs (kernel inode.c, super.c)."""

from __future__ import annotations

import errno
import functools
import os
import stat
import time
from dataclasses import dataclass

from unionfs import index, sysio
from unionfs.copyup import copy_up
from unionfs.errors import oserror
from unionfs.idmap import Caller
from unionfs.inodes import Inode
from unionfs.lookup import Resolution
from unionfs.state import State
from unionfs.whiteout import OVERRIDE_XATTRS


def real_stat(fs: State, node: Inode) -> os.stat_result:
    """lstat of the topmost real object behind ``node``."""
    if node.handles:
        # An open file is the object itself, even after its name went away (not a
        # metacopy's reader of the data below: the metadata is upper's).
        for h in node.handles:
            if h.layer is node.layer or node.gone:
                return os.fstat(h.fd)
    if node.gone and node.kept >= 0:
        return os.fstat(node.kept)  # a file the kernel still holds (dirops, release)
    if node.gone and not node.layer.upper and node.data is None:
        # A lower file hidden by a whiteout is still there, as itself (ops._reopen).
        layer, where, name = node.real_entry()
        dfd = fs.stack.dirfd_or_none(layer, where)
        st = sysio.lstat_or_none(dfd, name) if dfd is not None else None
        if st is not None:
            return st
    if node.gone:
        # fstat() of a removed directory still open (no file handle to ask): what it was.
        if node.gone_st is not None:
            return node.gone_st
        raise oserror(errno.ENOENT)
    if node.parent is None:
        return os.fstat(node.layer.fd)
    layer, where, name = node.real_entry()
    return sysio.lstat(fs.stack.dirfd(layer, where), name)


def data_blocks(fs: State, node: Inode) -> int:
    """A metacopy's blocks are its data's, below (as the kernel reports them)."""
    assert node.data is not None
    layer, path, name = node.data
    dfd = fs.stack.dirfd_or_none(layer, path)
    st = sysio.lstat_or_none(dfd, name) if dfd is not None else None
    return st.st_blocks if st is not None else 0


def nlink_of(fs: State, node: Inode, st: os.stat_result) -> int:
    if node.gone and not node.handles and node.kept < 0 and node.layer.upper:
        return 0  # removed, and only its remembered attributes are left
    # A merged directory's link count means nothing: the kernel reports 1.
    if node.is_dir:
        return 1 if node.merged else st.st_nlink
    if fs.index is not None and not node.gone and \
            (node.layer.entries or node.in_upper and st.st_nlink > 1):
        # An indexed file: the overlay's count, kept relative to the upper one
        layer, where, name = node.real_entry()
        value = sysio.getxattr_or_none(fs.stack.dirfd(layer, where), name,
                                       fs.dialect.prefix + "nlink")
        if value is not None:
            return index.parse_nlink(value, st.st_nlink, st.st_nlink) or st.st_nlink
    return st.st_nlink


def real_path(fs: State, node: Inode) -> str | int:
    """What the os.*xattr calls take for the topmost real object: a path that doesn't follow
    the object if it is a symlink, or the fd of an open file whose names are all gone."""
    if node.gone:
        return open_fd(node)
    if node.parent is None:
        return sysio.at_path(node.layer.fd, ".")
    layer, where, name = node.real_entry()
    return sysio.at_path(fs.stack.dirfd(layer, where), name)


# -- owners and modes as shown (uidmapping=, squash_to_*, xattr_permissions=) ----------



def protected_xattr(fs: State, name: str) -> bool:
    """A name the mount answers for itself: writable through it, any user could make a
    file of theirs show as setuid root.  Guarded wherever container tools may read them."""
    return (fs.override_xattr is not None or fs.dialect.oci) and \
        name in OVERRIDE_XATTRS.values()


def _override(fs: State, target: str | int) -> tuple[int, int, int] | None:
    assert fs.override_xattr is not None
    try:
        raw = os.getxattr(target, fs.override_xattr, follow_symlinks=isinstance(target, int))
    except OSError:
        return None
    fields = raw.decode("ascii", "replace").split(":")
    try:
        return int(fields[0]), int(fields[1]), int(fields[2], 8)
    except (IndexError, ValueError):
        return None  # a damaged value: show the real owner rather than fail


def shown_owner(fs: State, node: Inode, st: os.stat_result) -> tuple[int, int, int]:
    """(st_mode, st_uid, st_gid) as the mount shows them."""
    mode, uid, gid = st.st_mode, st.st_uid, st.st_gid
    if fs.override_xattr is not None and (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        try:
            found = _override(fs, real_path(fs, node))
        except OSError:
            found = None
        if found is not None:
            uid, gid = found[0], found[1]
            mode = stat.S_IFMT(mode) | stat.S_IMODE(found[2])
    owners = fs.owners
    if not owners.identity:
        uid, gid = owners.uid.shown(uid), owners.gid.shown(gid)
    return mode, uid, gid


def _write_override(fs: State, target: str | int, uid: int, gid: int, mode: int) -> None:
    assert fs.override_xattr is not None
    os.setxattr(target, fs.override_xattr, f"{uid}:{gid}:{stat.S_IMODE(mode):o}".encode(),
                follow_symlinks=isinstance(target, int))


def record_owner(fs: State, parent: Inode, name: str, res: Resolution, uid: int, gid: int,
                 mode: int) -> None:
    """xattr_permissions: a new object's owner and mode live in the override xattr."""
    if not (res.is_dir or stat.S_ISREG(res.st.st_mode)):
        return
    target = sysio.at_path(fs.stack.dirfd(fs.upper, parent.path), name)
    _write_override(fs, target, uid, gid, mode)


@dataclass
class AttrChange:
    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    fd: int | None = None  # the caller's open handle, if the change came through one

    @property
    def any_change(self) -> bool:
        return any(v is not None for v in (self.size, self.mode, self.uid, self.gid,
                                           self.atime_ns, self.mtime_ns))


# -- atime ---------------------------------------------------------------------------------

DAY_NS = 24 * 3600 * 10**9


def atime_due(st: os.stat_result, policy: str) -> bool:
    """Whether a read now moves the atime of a file with ``st`` under the mount's atime
    ``policy`` (fs/inode.c, atime_needs_update and relatime_need_update)."""
    if policy == "noatime":
        return False
    if policy == "strictatime":
        return True
    atime = st.st_atime_ns
    return atime <= st.st_mtime_ns or atime <= st.st_ctime_ns \
        or time.time_ns() - atime >= DAY_NS


# -- set-id bits after a change of data (kernel fs/attr.c, setattr_should_drop_suidgid) --------

CAP_FSETID = 4


@functools.cache
def _initial_userns() -> bool:
    return sysio.in_initial_userns()


def _proc_status(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field):
                    return line[len(field):].strip()
    except OSError:
        pass
    return None


def keeps_setid(caller: Caller) -> bool:
    """CAP_FSETID in the initial user namespace, which the kernel asks with capable(): so
    root of a user namespace (a rootless container's root) has it nowhere."""
    if caller.uid != 0 or not _initial_userns():
        return False
    caps = _proc_status(caller.pid, "CapEff:")
    # Gone already (or no procfs): it was uid 0, so most likely a full-powered root.
    return caps is None or bool(int(caps, 16) >> CAP_FSETID & 1)


@functools.cache
def _own_userns() -> int:
    return os.stat("/proc/self/ns/user").st_ino


def _in_group_or_capable(caller: Caller, gid: int) -> bool:
    """The kernel's in_group_or_capable: the caller's group or one of its supplementary
    groups (which FUSE doesn't pass: its /proc status has them), or CAP_FSETID in its own
    user namespace with the group mapped there, which a caller of the daemon's namespace
    (root of a rootless container) has for every group the daemon sees."""
    if caller.gid == gid:
        return True
    groups = _proc_status(caller.pid, "Groups:")
    if groups is not None and str(gid) in groups.split():
        return True
    caps = _proc_status(caller.pid, "CapEff:")
    if caps is None or not int(caps, 16) >> CAP_FSETID & 1:
        return False
    try:
        return os.stat(f"/proc/{caller.pid}/ns/user").st_ino == _own_userns()
    except OSError:
        return False


def setid_kept(mode: int, gid: int, caller: Caller) -> int:
    """The mode of a regular file of ``mode`` and group ``gid`` once ``caller`` changed its
    data: set-uid goes, and set-gid where it means "run as the group" (g+x) or where the
    caller isn't in the group, unless the caller has CAP_FSETID."""
    if not stat.S_ISREG(mode) or not mode & (stat.S_ISUID | stat.S_ISGID):
        return mode
    drop = mode & stat.S_ISUID
    if mode & stat.S_ISGID and (mode & stat.S_IXGRP or not _in_group_or_capable(caller, gid)):
        drop |= stat.S_ISGID
    if drop and not keeps_setid(caller):
        return mode & ~drop
    return mode


def sgid_needs_us(mode: int, gid: int, caller: Caller) -> bool:
    """A set-gid bit that a write by ``caller`` must drop and FUSE won't: the kernel asks
    us to drop set-uid, and set-gid with g+x, but not set-gid for a caller outside the
    group (fs/fuse/dir.c, fuse_setattr)."""
    return stat.S_ISREG(mode) and mode & (stat.S_ISGID | stat.S_IXGRP) == stat.S_ISGID \
        and setid_kept(mode, gid, caller) != mode


def acl_drops_sgid(mode: int, gid: int, caller: Caller) -> bool:
    """Setting an access ACL drops set-gid for a caller outside the object's group without
    CAP_FSETID (posix_acl_update_mode).  The kernel tells FUSE so with a setxattr flag that
    libfuse 3.14 doesn't pass on: the rule is ours to apply."""
    return bool(mode & stat.S_ISGID) and not _in_group_or_capable(caller, gid) \
        and not keeps_setid(caller)


def setid_change(fs: State, node: Inode, caller: Caller, mode: int | None = None
                 ) -> int | None:
    """The mode ``node`` must take once ``caller`` changed its data (setid_kept, on ``mode``
    if given, else on what the file shows), or None when it keeps its own."""
    shown, _, gid = shown_owner(fs, node, real_stat(fs, node))
    if mode is None:
        mode = shown
    kept = setid_kept(mode, gid, caller)
    return kept if kept != mode else None


async def drop_setid(fs: State, node: Inode, caller: Caller, fd: int | None = None) -> None:
    """Apply setid_kept() to ``node`` after ``caller`` changed its data: a truncating open,
    which FUSE leaves wholly to us (atomic O_TRUNC), or a write FUSE only half covers."""
    kept = setid_change(fs, node, caller)
    if kept is not None:
        await setattr(fs, node, AttrChange(mode=kept, fd=fd))
        fs.attrs_changed(node.ino)


def open_fd(node: Inode, writable: bool = False) -> int:
    """The fd of an open handle: the only way left to an upper file whose names are gone."""
    for h in node.handles:
        if h.layer.upper and (not writable or h.flags & os.O_ACCMODE != os.O_RDONLY):
            return h.fd
    # A lower file's change needs a copy-up to its name, which is taken by now (the
    # kernel's copy-up says EEXIST).
    raise oserror(errno.ENOENT if node.layer.upper else errno.EEXIST)


def _setattr_fd(fd: int | str, ch: AttrChange) -> None:
    """The change on an open file, or on what a /proc magic link leads to (an O_PATH fd
    has no fchmod)."""
    if ch.size is not None:
        os.truncate(fd, ch.size)
    if ch.uid is not None or ch.gid is not None:
        os.chown(fd, -1 if ch.uid is None else ch.uid, -1 if ch.gid is None else ch.gid)
    if ch.mode is not None:
        os.chmod(fd, stat.S_IMODE(ch.mode))
    if ch.atime_ns is not None or ch.mtime_ns is not None:
        st = os.stat(fd)
        os.utime(fd, ns=(st.st_atime_ns if ch.atime_ns is None else ch.atime_ns,
                         st.st_mtime_ns if ch.mtime_ns is None else ch.mtime_ns))


async def setattr(fs: State, node: Inode, ch: AttrChange) -> None:
    fs.check_writable()
    if node.gone:
        # fchmod(fd) after unlink: the change belongs to the open file, not to whatever
        # has that name now.
        if ch.fd is None and node.kept >= 0 and node.layer.upper \
                and not any(h.layer.upper for h in node.handles):
            # No handle, but the kernel held the file when its last name went (a chmod on
            # its way, an O_PATH descriptor): through the fd kept for that (dirops).
            _setattr_fd(sysio.proc_fd(node.kept), ch)
            return
        _setattr_fd(ch.fd if ch.fd is not None else open_fd(node, ch.size is not None), ch)
        return
    # Even a change of nothing (chown(f, -1, -1)) copies up, as in the kernel.
    await copy_up(fs, node, data=ch.size != 0, meta=ch.size is None)
    if fs.owners.squashed:
        ch.uid = ch.gid = None  # squashed owners can't be changed, and don't fail
    if fs.override_xattr is not None and (ch.uid is not None or ch.gid is not None
                                          or ch.mode is not None) \
            and (node.is_dir or stat.S_ISREG(node.mode)):
        target = real_path(fs, node)
        st = real_stat(fs, node)
        cur = _override(fs, target) or (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        _write_override(fs, target, cur[0] if ch.uid is None else ch.uid,
                        cur[1] if ch.gid is None else ch.gid,
                        cur[2] if ch.mode is None else ch.mode)
        ch.uid = ch.gid = ch.mode = None  # kept in the xattr, not on the real file
    if not ch.any_change:
        return
    dfd = fs.stack.dirfd(fs.upper, node.parent_path) if node.parent is not None else None
    if ch.size is not None:
        if ch.fd is not None:
            os.ftruncate(ch.fd, ch.size)
        else:
            fd = _open_self(fs, node, dfd, os.O_WRONLY)
            try:
                os.ftruncate(fd, ch.size)
            finally:
                os.close(fd)
    if ch.uid is not None or ch.gid is not None:
        uid = -1 if ch.uid is None else ch.uid
        gid = -1 if ch.gid is None else ch.gid
        if dfd is None:
            os.chown(sysio.proc_fd(node.layer.fd), uid, gid)
        else:
            sysio.chown(dfd, node.name, uid, gid)
    if ch.mode is not None:
        if dfd is None:
            os.chmod(sysio.proc_fd(node.layer.fd), stat.S_IMODE(ch.mode))
        else:
            sysio.chmod(dfd, node.name, stat.S_IMODE(ch.mode))
    if ch.atime_ns is not None or ch.mtime_ns is not None:
        if dfd is None:
            st = os.fstat(node.layer.fd)
            os.utime(sysio.proc_fd(node.layer.fd),
                     ns=(ch.atime_ns if ch.atime_ns is not None else st.st_atime_ns,
                         ch.mtime_ns if ch.mtime_ns is not None else st.st_mtime_ns))
        else:
            sysio.utimens(dfd, node.name, ch.atime_ns, ch.mtime_ns)


def _open_self(fs: State, node: Inode, dfd: int | None, flags: int) -> int:
    if dfd is None:
        return os.open(sysio.proc_fd(node.layer.fd), flags)
    return sysio.open_at(dfd, node.name, flags)


def statfs(fs: State) -> os.statvfs_result:
    return os.statvfs(sysio.proc_fd(fs.stack.layers[0].fd))
