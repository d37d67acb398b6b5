"""Copy-up (kernel fs/overlayfs/copy_up.c; overlay-semantics §6).

The copy is built under WORK/work and renamed into UPPER in one step, so UPPER
never holds a half-copied object, whatever happens to the daemon meanwhile.
Parents go first, each with its own metadata.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat

import trio

from unionfs import index, origin, sysio
from unionfs.errors import oserror
from unionfs.inodes import Inode
from unionfs.lookup import Resolution
from unionfs.state import State
from unionfs.whiteout import Dialect

# Below this size the copy runs inline: a thread hop costs more than the copy.
THREAD_COPY_MIN = 1 << 20
_tmp_counter = itertools.count(1)


def temp_name() -> str:
    return f"#{os.getpid():x}{next(_tmp_counter):x}"


def copy_xattrs(dialect: Dialect, src_dfd: int, src_name: str, dst_dfd: int,
                dst_name: str) -> None:
    for name in sysio.listxattr(src_dfd, src_name):
        # Markers describe the lower layer, not the copy; user names escaped under
        # the private prefix are data and travel with it.
        if dialect.is_private(name):
            continue
        try:
            value = sysio.getxattr(src_dfd, src_name, name)
            sysio.setxattr(dst_dfd, dst_name, name, value)
        except OSError as e:
            if name.startswith(("security.", "system.posix_acl")):
                raise
            if e.errno not in (errno.EOPNOTSUPP, errno.EPERM, errno.EINVAL, errno.ENODATA):
                raise


def copy_metadata(dialect: Dialect, src_dfd: int, src_name: str, dfd: int, name: str,
                  st: os.stat_result, mode_and_times: bool = True) -> None:
    """Owner first: a chown clears set-id bits and security.capability, so the
    xattrs and the mode come after it, and the times last."""
    try:
        sysio.chown(dfd, name, st.st_uid, st.st_gid)
    except OSError as e:
        if e.errno == errno.EINVAL:
            # An owner our user namespace can't map (shown as the overflow id): the
            # kernel refuses such a copy-up the same way.
            raise oserror(errno.EOVERFLOW) from None
        if e.errno != errno.EPERM:
            raise
        # Unprivileged: we can't give files away, so the copy is the mounting user's,
        # as every file such a user writes is (docs/rootless.md).
    copy_xattrs(dialect, src_dfd, src_name, dfd, name)
    if mode_and_times:
        set_mode_and_times(dfd, name, st)


def set_mode_and_times(dfd: int, name: str, st: os.stat_result) -> None:
    sysio.chmod(dfd, name, stat.S_IMODE(st.st_mode))
    sysio.utimens(dfd, name, st.st_atime_ns, st.st_mtime_ns)


def rename_into(wfd: int, tmp: str, udfd: int, name: str) -> None:
    """The final rename of a copy-up, also into a read-only upper parent of ours (the
    caller may change the child even where it may not change the parent)."""
    sysio.as_owner(udfd, ".", lambda: sysio.renameat2(wfd, tmp, udfd, name,
                                                      sysio.RENAME_NOREPLACE))


def restore_times(dirfd: int, before: os.stat_result) -> None:
    """Inserting a copied-up child must not change its parent's times (as in the kernel).
    Best effort, as the kernel's: the child is in place already, and failing here would
    leave a finished copy that the caller was told failed and that we don't know of."""
    with contextlib.suppress(OSError):
        os.utime(sysio.proc_fd(dirfd), ns=(before.st_atime_ns, before.st_mtime_ns))


def is_impure(fs: State, node: Inode) -> bool:
    if node.impure is None:
        fd = fs.stack.dirfd_or_none(fs.upper, node.path) if node.in_upper else None
        node.impure = fd is not None and \
            sysio.fd_getxattr_or_none(fd, fs.dialect.prefix + "impure") is not None
    return node.impure


def mark_impure(fs: State, node: Inode, udfd: int) -> None:
    """Directory ``node`` (upper copy ``udfd``) now holds a copy with an origin, or a
    merged directory (the kernel's ovl_set_impure: once, not at every copy-up into it)."""
    if is_impure(fs, node):
        return
    try:
        os.setxattr(sysio.proc_fd(udfd), fs.dialect.prefix + "impure", b"y")
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
            raise
    node.impure = True


async def copy_up(fs: State, node: Inode, data: bool = True, meta: bool = False) -> None:
    """Make sure ``node`` lives in upper.  ``data=False`` (an O_TRUNC open or a
    truncate to 0) copies everything but the file contents.  ``meta``: a change of
    metadata only, for which metacopy=on copies a regular file's metadata alone
    (``overlay.metacopy``), its data staying below until a write needs it."""
    if not node.in_upper:
        await _copy_up_chain(fs, node, data, meta)
    if node.data is not None and not meta:
        # a metacopy (or a name just linked to an indexed one): its data comes now
        async with node.lock:
            if node.data is not None:
                await _copy_data(fs, node, data)


async def _copy_up_chain(fs: State, node: Inode, data: bool, meta: bool) -> None:
    fs.check_writable()
    if node.gone:
        # No name left to copy up to: the kernel's copy-up finds it taken (a whiteout,
        # or what was renamed there), as after a copy that lost its name (_copy_one).
        raise oserror(errno.EEXIST)
    # Parents first, top down; a loop, not a recursion: a tree may be thousands deep.
    chain: list[Inode] = []
    n = node
    while not n.in_upper:
        if n.parent is None:
            raise oserror(errno.EIO)
        chain.append(n)
        n = n.parent
    metacopy = meta and fs.features.metacopy and stat.S_ISREG(node.mode)
    for n in reversed(chain):
        async with n.lock:
            if n.in_upper:
                continue
            await _copy_one(fs, n, data or n is not node, metacopy and n is node)
            if n.aliases:
                await _link_aliases(fs, n)


async def _copy_one(fs: State, node: Inode, data: bool, metacopy: bool = False) -> None:
    stack, upper = fs.stack, fs.upper
    if node.layer.entries:
        _link_up(fs, node, str(node.lpaths))  # another name of an indexed file
        return
    ppath, name = node.parent_path, node.name
    lppath = node.real_parent_path  # elsewhere when a moved directory took it along
    ldfd = stack.dirfd(node.layer, lppath)
    udfd = stack.dirfd(upper, ppath)
    wfd = stack.work_fd
    st = sysio.lstat(ldfd, name)
    kind = stat.S_IFMT(st.st_mode)
    # index=on: a file with several names is copied to WORK/index, once, and each name
    # that changes is linked to that entry (the kernel's ovl_need_index)
    value = b""
    if fs.index is not None and kind != stat.S_IFDIR and st.st_nlink > 1:
        value = origin.encode(ldfd, name, with_uuid=fs.features.uuid != "off")
        found = index.lookup(fs.index, value)
        if found is not None:
            _link_up(fs, node, found[0])
            return
    # (no handle for it: copied as without index, as the kernel falls back)
    indexed = bool(value)
    pst = os.fstat(udfd)
    tmp = temp_name()
    try:
        if kind == stat.S_IFDIR:
            sysio.mkdir(wfd, tmp, 0o700)
        elif kind == stat.S_IFREG:
            dst = sysio.open_at(wfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if metacopy:
                    os.ftruncate(dst, st.st_size)  # the size, no blocks: data stays below
                elif data and st.st_size:
                    src = sysio.open_noatime(ldfd, name, os.O_RDONLY)
                    try:
                        if st.st_size >= THREAD_COPY_MIN:
                            await trio.to_thread.run_sync(sysio.copy_file_data, src, dst,
                                                          st.st_size)
                        else:
                            sysio.copy_file_data(src, dst, st.st_size)
                    finally:
                        os.close(src)
                    if not fs.volatile:
                        # As the kernel (ovl_copy_up_file): the data is on disk before the
                        # name is, or a power cut could leave the name with missing data.
                        await trio.to_thread.run_sync(os.fsync, dst)
            finally:
                os.close(dst)
        elif kind == stat.S_IFLNK:
            sysio.symlink(sysio.readlink(ldfd, name), wfd, tmp)
        else:
            sysio.mknod(wfd, tmp, kind | 0o600, st.st_rdev)
        # The data copy awaited: meanwhile an unlink or a rename may have taken the name
        # (the node is gone; the kernel's copy-up then finds the name taken, as does an
        # open for writing that comes after: EEXIST) or moved a directory above it;
        # cached fds may have rotated.
        if node.gone:
            raise oserror(errno.EEXIST)
        ppath = node.parent_path
        ldfd = stack.dirfd(node.layer, lppath)
        udfd = stack.dirfd(upper, ppath)
        # Unprivileged, a directory without u+w can't be moved (its ".." changes):
        # the mode of such a one, and its times, go on after the rename.  Only then: a
        # daemon killed in between leaves a directory in neither its old state nor its new.
        late = kind == stat.S_IFDIR and os.geteuid() != 0 and not st.st_mode & stat.S_IWUSR
        copy_metadata(fs.dialect, ldfd, name, wfd, tmp, st, mode_and_times=not late)
        # Where it came from, as the kernel records it: not for a file with other names
        # whose link is broken here (a new file, with a number of its own), but for one
        # that goes to the index, whose entry is named by it.
        keeps_number = kind == stat.S_IFDIR or st.st_nlink == 1 or indexed
        if keeps_number:
            _set_origin(fs, ldfd, name, wfd, tmp)
        if metacopy:
            sysio.setxattr(wfd, tmp, fs.dialect.metacopy_xattr, b"")
        if node.parent is not None:
            mark_impure(fs, node.parent, udfd)
        entry = None
        if indexed:
            # the overlay's names (the lower's count) against the entry and this name
            sysio.setxattr(wfd, tmp, fs.dialect.prefix + "nlink",
                           index.nlink_value(st.st_nlink, 2))
            entry = _into_index(fs, wfd, tmp, udfd, name, value)
            if entry is None:  # another name of the file made the entry meanwhile
                _discard(wfd, tmp)
                _link_up(fs, node, index.entry_name(value))
                return
        else:
            rename_into(wfd, tmp, udfd, name)
    except BaseException:
        _discard(wfd, tmp)
        raise
    # The copy is in UPPER now: whatever fails from here on, the node must learn where it
    # is (else every later change tries the copy-up again and gets EEXIST until a remount).
    unfinished: OSError | None = None
    if late:
        try:
            set_mode_and_times(udfd, name, st)
        except OSError as e:
            unfinished = e
    restore_times(udfd, pst)
    new_st = sysio.lstat(udfd, name)
    if kind == stat.S_IFDIR:
        res = Resolution(upper, new_st, [upper, *node.dirs], [node.path, *node.layer_paths()])
    else:
        res = Resolution(upper, new_st)
    if keeps_number:
        res.shown = (st.st_dev, st.st_ino)
    if metacopy:
        res.data = (node.layer, lppath, name)
    old_key = node.key
    fs.inodes.rekey(node, res)
    fs.attrs_changed(node.ino)
    if kind == stat.S_IFREG and not metacopy:  # (readers of a metacopy read below still)
        _switch_handles(node, udfd)
    if entry is not None:
        assert fs.index is not None
        shown = Resolution(fs.index, new_st, [], [entry], data=res.data)
        for other in fs.inodes.repoint(old_key, shown):
            fs.attrs_changed(other.ino)
    if unfinished is not None:
        raise unfinished


def _into_index(fs: State, wfd: int, tmp: str, udfd: int, name: str, value: bytes
                ) -> str | None:
    """The finished copy ``tmp`` becomes the index entry named by its origin ``value``,
    then the name's upper link; None if the entry exists already (two names of the file
    copied up at once: their nodes have locks of their own)."""
    assert fs.index is not None
    entry = index.entry_name(value)
    try:
        sysio.renameat2(wfd, tmp, fs.index.fd, entry, sysio.RENAME_NOREPLACE)
    except FileExistsError:
        return None
    try:
        sysio.as_owner(udfd, ".", lambda: sysio.link(fs.index.fd, entry, udfd, name))  # type: ignore[union-attr]
    except BaseException:
        sysio.unlink(fs.index.fd, entry)
        raise
    return entry


def _link_up(fs: State, node: Inode, entry: str) -> None:
    """A name of an indexed file changes: its index entry is linked into the name
    (ovl_link_up), one more upper link for the same overlay count."""
    idx = fs.index
    assert idx is not None and node.parent is not None
    stack = fs.stack
    udfd = stack.dirfd(fs.upper, node.parent_path)
    pst = os.fstat(udfd)
    ist = sysio.lstat(idx.fd, entry)
    attr = fs.dialect.prefix + "nlink"
    count = index.parse_nlink(sysio.getxattr_or_none(idx.fd, entry, attr), ist.st_nlink,
                              ist.st_nlink) or ist.st_nlink
    mark_impure(fs, node.parent, udfd)
    sysio.as_owner(udfd, ".", lambda: sysio.link(idx.fd, entry, udfd, node.name))
    sysio.setxattr(udfd, node.name, attr, index.nlink_value(count, ist.st_nlink + 1))
    restore_times(udfd, pst)
    res = Resolution(fs.upper, sysio.lstat(udfd, node.name), data=node.data)
    fs.inodes.rekey(node, res, keep_number=True)
    fs.attrs_changed(node.ino)
    for other in fs.inodes.siblings(node):
        fs.attrs_changed(other.ino)  # their nlink xattr changed


async def _copy_data(fs: State, node: Inode, data: bool) -> None:
    """The data of a metadata-only copy, on the first open for writing (kernel
    ovl_copy_up_meta_inode_data): copied into the upper file itself, then the metacopy
    mark goes.  Until then a crash leaves the mark, and reads still go below."""
    assert node.data is not None
    layer, dpath, leaf = node.data
    stack = fs.stack
    udfd = stack.dirfd(fs.upper, node.parent_path)
    if data:
        src = sysio.open_noatime(stack.dirfd(layer, dpath), leaf, os.O_RDONLY)
        try:
            dst = _open_to_fill(udfd, node.name)
            try:
                before = os.fstat(dst)
                size = min(before.st_size, os.fstat(src).st_size)
                if size:
                    if size >= THREAD_COPY_MIN:
                        await trio.to_thread.run_sync(sysio.copy_file_data, src, dst, size)
                    else:
                        sysio.copy_file_data(src, dst, size)
                    if not fs.volatile:
                        await trio.to_thread.run_sync(os.fsync, dst)
                os.utime(dst, ns=(before.st_atime_ns, before.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
    udfd = stack.dirfd(fs.upper, node.parent_path)  # cached fds may rotate at an await
    sysio.removexattr(udfd, node.name, fs.dialect.metacopy_xattr)
    node.data = None
    fs.attrs_changed(node.ino)
    _switch_handles(node, udfd)
    for other in fs.inodes.siblings(node):
        # the other names of an indexed metacopy: the same upper inode has the data now
        other.data = None
        fs.attrs_changed(other.ino)


async def _link_aliases(fs: State, node: Inode) -> None:
    """The kernel has seen other names of this lower file, and FUSE didn't say
    which one is being changed: link the copy into all of them, so that every
    name it knows shows the same file (docs/differences.md)."""
    upper = fs.upper
    for parent, name in list(node.aliases):
        await copy_up(fs, parent)
        udfd = fs.stack.dirfd(upper, parent.path)
        if sysio.lstat_or_none(udfd, name) is not None:
            continue
        pst = os.fstat(udfd)
        sysio.link(fs.stack.dirfd(upper, node.parent_path), node.name, udfd, name)
        restore_times(udfd, pst)


def _open_to_fill(udfd: int, name: str) -> int:
    """The upper file opened for writing its data in.  Unprivileged, a file of ours
    without u+w (mode 0444) refuses it where the kernel would go ahead: for the moment
    of the open, give ourselves u+w."""
    try:
        return sysio.open_at(udfd, name, os.O_WRONLY)
    except PermissionError:
        st = sysio.lstat(udfd, name)
        if st.st_uid != os.geteuid():
            raise
    sysio.chmod(udfd, name, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
    try:
        return sysio.open_at(udfd, name, os.O_WRONLY)
    finally:
        sysio.chmod(udfd, name, stat.S_IMODE(st.st_mode))


def _set_origin(fs: State, ldfd: int, name: str, wfd: int, tmp: str) -> None:
    value = origin.encode(ldfd, name, with_uuid=fs.features.uuid != "off")
    try:
        sysio.setxattr(wfd, tmp, fs.dialect.prefix + "origin", value)
    except OSError as e:
        # A filesystem or a symlink that takes no such xattr: the copy keeps its own
        # number after a remount, nothing worse.
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
            raise


def _discard(wfd: int, tmp: str) -> None:
    try:
        st = sysio.lstat_or_none(wfd, tmp)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            sysio.rmdir(wfd, tmp)
        else:
            sysio.unlink(wfd, tmp)
    except OSError:
        pass  # WORK/work is wiped at the next mount anyway


def _switch_handles(node: Inode, udfd: int) -> None:
    for h in list(node.handles):
        if h.layer is node.layer:
            continue
        flags = h.flags & (os.O_ACCMODE | os.O_NONBLOCK)
        opener = sysio.open_noatime if h.flags & os.O_NOATIME else sysio.open_at
        try:
            fd = opener(udfd, node.name, flags)
        except OSError:
            continue  # keeps reading the lower copy: better than failing the reader
        h.switch(fd, node.layer)
