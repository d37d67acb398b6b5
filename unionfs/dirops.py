"""Namespace changes with the overlay rules (kernel fs/overlayfs/dir.c; semantics §4, §7, §8).

create/mkdir/mknod/symlink/link make the object in upper, owned by the caller;
over a whiteout they build it in WORK/work and swap it in, so the name never
shows the lower object or nothing.  unlink/rmdir/rename leave a whiteout where a
lower layer still has the name, in the same rename that removes the object.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Literal

from unionfs import acl, index, lookup, origin, sysio
from unionfs.copyup import copy_up, is_impure, mark_impure, temp_name
from unionfs.errors import oserror
from unionfs.inodes import Inode
from unionfs.lookup import Resolution
from unionfs.probe import remove_tree_at
from unionfs.readdir import LowerIndex, list_merged, resolve_indexed
from unionfs.state import State
from unionfs.whiteout import CHARDEV, NAME_MAX, OCI, WH_PREFIX

SETID = stat.S_ISUID | stat.S_ISGID


# A directory over this many lower layers gets a LowerIndex once it has been searched
# this often: a listing of every lower costs about as much as that many lookups of an
# absent name through all of them.
INDEX_MIN_LOWERS = 8
INDEX_AFTER_LOOKUPS = 64


def resolve_in(fs: State, parent: Inode, name: str) -> Resolution | None:
    paths = parent.layer_paths()
    res = _resolve_in(fs, parent, paths, name)
    if res is not None:
        identify(fs, parent, paths, name, res)
    return res


def identify(fs: State, parent: Inode, paths: list[str], name: str, res: Resolution) -> None:
    """What an upper object's own marks add to its lookup, as in the kernel's: the
    number a copy shows (its origin's; only directories holding such copies are marked
    impure, so only there is it worth asking), where a metacopy's data lies, and the
    origin a merged directory made elsewhere still lacks."""
    if not res.layer.upper:
        if fs.index is not None and res.st.st_nlink > 1 and not res.is_dir:
            _show_index(fs, parent, paths, name, res)
        return
    node = fs.inodes.live(res)
    if node is not None and node.ino not in fs.inodes.unsettled:
        # Held already: what it has is what the disk says (only we change upper).
        res.data = node.data
        return
    if res.is_dir:
        if len(res.dirs) > 1:
            _fix_origin(fs, parent, paths[0], name, res)
        return
    impure = is_impure(fs, parent)
    # A metacopy has no data blocks, and its directory is impure unless a tool other than
    # an overlay made it: a file with its data needs no look (the kernel always looks),
    # except where metacopies are ours to finish (an empty one has no blocks either).
    if stat.S_ISREG(res.st.st_mode) and (impure and fs.features.metacopy
                                         or res.st.st_blocks * 512 < res.st.st_size):
        udfd = fs.stack.dirfd(fs.upper, paths[0])
        dialect = fs.dialect
        if sysio.getxattr_or_none(udfd, name, dialect.metacopy_xattr) is not None:
            if not fs.features.metacopy:
                # Its data is below, reached as a redirect would be: refused unless
                # asked for, as the kernel refuses it.
                raise oserror(errno.EPERM)
            res.data = lookup.metacopy_data(fs.stack, paths, parent.dirs, name,
                                            dialect.redirect(udfd, name))
            if res.data is None:
                raise oserror(errno.EIO)  # a metacopy whose data is gone
    if impure:
        res.shown = lookup.origin_of(fs.stack, paths, parent.dirs, name, res.st, res.data)
        if res.shown is None and fs.index is not None and res.st.st_nlink > 1:
            # a name linked to an index entry shows the lower file's number, as all its
            # names do (the kernel's OVL_INDEX)
            value = sysio.getxattr_or_none(fs.stack.dirfd(fs.upper, paths[0]), name,
                                           fs.dialect.prefix + "origin")
            if value and index.is_entry_of(fs.index, value, res.st):
                res.shown = index.origin_number(fs.stack, value)


def _show_index(fs: State, parent: Inode, paths: list[str], name: str,
                res: Resolution) -> None:
    """A lower file with several names whose index entry exists (index=on): the name shows
    the entry, under the lower file's number, until it is linked to it."""
    assert fs.index is not None
    try:
        where = paths[parent.dirs.index(res.layer)]
    except ValueError:
        return
    found = index.find(fs.index, fs.stack.dirfd(res.layer, where), name,
                       fs.features.uuid != "off")
    if found is not None:
        res.shown = (res.st.st_dev, res.st.st_ino)
        if fs.features.metacopy and sysio.getxattr_or_none(
                fs.index.fd, found[0], fs.dialect.metacopy_xattr) is not None:
            res.data = (res.layer, where, name)  # an indexed metacopy: the data is here
        res.layer, res.st, res.paths = fs.index, found[1], [found[0]]


def _fix_origin(fs: State, parent: Inode, upath: str, name: str, res: Resolution) -> None:
    """An upper directory merged with a lower one but made elsewhere (no origin): the
    kernel records its lower there on lookup (ovl_fix_origin), and so do we."""
    udfd = fs.stack.dirfd_or_none(fs.upper, upath)
    if udfd is None:
        return
    xname = fs.dialect.prefix + "origin"
    if sysio.getxattr_or_none(udfd, name, xname) is not None:
        return
    lpath, _, lname = res.paths[1].rpartition("/")
    ldfd = fs.stack.dirfd_or_none(res.dirs[1], lpath)
    if ldfd is None:
        return
    try:
        sysio.setxattr(udfd, name, xname,
                       origin.encode(ldfd, lname, with_uuid=fs.features.uuid != "off"))
        mark_impure(fs, parent, udfd)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES, errno.EROFS):
            raise


def _resolve_in(fs: State, parent: Inode, paths: list[str], name: str) -> Resolution | None:
    index = parent.index
    if index is None:
        lowers = parent.lowers
        if len(lowers) < INDEX_MIN_LOWERS or fs.timeout <= 0:
            return lookup.resolve(fs.stack, paths, parent.dirs, name)
        parent.probes += 1
        if parent.probes < INDEX_AFTER_LOOKUPS:
            return lookup.resolve(fs.stack, paths, parent.dirs, name)
        first = len(parent.dirs) - len(lowers)
        index = parent.index = LowerIndex(fs.stack, paths[first:], lowers)
    elif index.lowers != parent.lowers:  # the directory now merges other layers
        parent.index = None
        return lookup.resolve(fs.stack, paths, parent.dirs, name)
    return resolve_indexed(fs.stack, paths, parent.dirs, index, name)


def lower_has(fs: State, parent: Inode, name: str) -> bool:
    """Does a layer below upper show ``name``?  Then removing it needs a whiteout."""
    lowers = parent.lowers
    if not lowers:
        return False
    paths = parent.layer_paths()[len(parent.dirs) - len(lowers):]
    return lookup.resolve(fs.stack, paths, lowers, name) is not None


async def upper_dir(fs: State, parent: Inode) -> int:
    await copy_up(fs, parent)
    return fs.stack.dirfd(fs.upper, parent.path)


def live_inode(fs: State, parent: Inode, name: str, res: Resolution) -> Inode | None:
    return fs.inodes.live(res, parent, name)


def is_empty(fs: State, path: str, res: Resolution) -> bool:
    """Does the merged directory ``res`` (at ``path``) show nothing?"""
    paths = list(res.paths)
    if res.dirs and res.dirs[0].upper:
        paths[0] = path
    return all(e.hidden for e in list_merged(fs.stack, paths, res.dirs))


def _whiteout_object(fs: State, udfd: int, name: str) -> bool:
    """Is there a whiteout *object* at ``name`` in upper (one a rename must replace)?"""
    st = sysio.lstat_or_none(udfd, name)
    return st is not None and fs.dialect.is_whiteout(udfd, name, st)


def check_new_name(fs: State, name: str) -> None:
    if fs.dialect.hides_name(name):
        raise oserror(errno.EINVAL)  # a .wh. name would be read as a marker
    if fs.dialect.form == OCI and len(os.fsencode(name)) > NAME_MAX - len(WH_PREFIX):
        # Its whiteout could never be written, so it could never be removed
        # (fuse-overlayfs reserves the same 4 bytes; statfs says so too).
        raise oserror(errno.ENAMETOOLONG)


def set_opaque(fs: State, dfd: int, name: str) -> None:
    """The dialect's opaque mark.  Unprivileged, a directory of ours without u+w
    (mkdir -m 555) takes no user.* xattr and no file: open it for the moment."""
    sysio.as_owner(dfd, name, lambda: fs.dialect.set_opaque(dfd, name))


async def create_object(fs: State, parent: Inode, name: str, mode: int, uid: int, gid: int,
                        make: Callable[[int, str, int], None], umask: int = 0) -> Resolution:
    """Make a new object with ``make(dirfd, name, mode)`` where ``name`` is free in
    the merged view; returns its resolution in upper.  ``umask`` is the caller's, when the
    kernel left it to us (DONT_MASK): a default ACL of the parent takes its place."""
    fs.check_writable()
    check_new_name(fs, name)
    if resolve_in(fs, parent, name) is not None:
        raise oserror(errno.EEXIST)
    udfd = await upper_dir(fs, parent)
    dialect = fs.dialect
    is_dir = stat.S_ISDIR(mode)
    pst = os.fstat(udfd)
    if pst.st_mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
        gid = pst.st_gid
        if is_dir:
            mode |= stat.S_ISGID
    mode, acls = _new_mode(fs, udfd, mode, umask)
    perm = stat.S_IMODE(mode)
    whited_out = dialect.upper_whiteout(udfd, name)
    if whited_out and sysio.lstat_or_none(udfd, name) is not None:
        wfd, tmp = fs.stack.work_fd, temp_name()
        # Unprivileged, a directory without u+w can't move to another parent (its ".."
        # changes): it gets its mode once it is in place.
        late = is_dir and os.geteuid() != 0 and perm & 0o300 != 0o300
        make(wfd, tmp, perm | 0o700 if late else perm)
        try:
            # Made in WORK, away from the parent's default ACL: given it here, as the
            # upper filesystem does for an object made in place (and, a directory
            # without u+w, once it has moved).
            if not late:
                _set_acls(wfd, tmp, acls)
            _finish(wfd, tmp, perm | 0o700 if late else perm, uid, gid, is_dir)
            if is_dir:
                # A new directory over a whiteout must not merge with what the
                # whiteout hid: opaque, and swapped in (rename can't replace a
                # whiteout with a directory).
                set_opaque(fs, wfd, tmp)
                sysio.renameat2(wfd, tmp, udfd, name, sysio.RENAME_EXCHANGE)
                sysio.unlink(wfd, tmp)
            else:
                sysio.renameat2(wfd, tmp, udfd, name)
        except BaseException:
            remove_tree_at(wfd, tmp)
            raise
        if late:
            _set_acls(udfd, name, acls)
            sysio.chmod(udfd, name, perm)
    else:
        make(udfd, name, perm)
        try:
            _finish(udfd, name, perm, uid, gid, is_dir)
            if whited_out and is_dir:  # an OCI .wh.NAME hid the name: no object to swap
                set_opaque(fs, udfd, name)
        except BaseException:
            remove_tree_at(udfd, name)
            raise
        if is_dir and not whited_out and parent.lowers and not fs.features.offline_changes:
            # As the kernel: nothing below can show through a directory made here, unless
            # the lowers change offline, which these features rule out; an opaque mark
            # spares every later lookup in it the layers below.  Allowed to fail.
            try:
                set_opaque(fs, udfd, name)
            except OSError:
                pass
    if whited_out:
        dialect.drop_file_whiteout(udfd, name)
    st = sysio.lstat(udfd, name)
    return Resolution(fs.upper, st, [fs.upper] if is_dir else [])


ACLs = tuple[bytes | None, bytes | None]  # access, default


def _new_mode(fs: State, udfd: int, mode: int, umask: int) -> tuple[int, ACLs]:
    """The mode of a new object in the upper directory ``udfd``, and the ACLs that the
    upper filesystem gives it when it is made there (acl.inherit): the parent's default
    ACL, if it has one, stands in for the umask."""
    if stat.S_ISLNK(mode):
        return mode, (None, None)
    default = sysio.fd_getxattr_or_none(udfd, acl.DEFAULT) if fs.acl else None
    if default is None:
        return mode & ~(umask & 0o777), (None, None)
    try:
        mode, access, default = acl.inherit(default, mode)
    except acl.BadACL:
        raise oserror(errno.EIO) from None
    return mode, (access, default)


def _set_acls(dfd: int, name: str, acls: ACLs) -> None:
    for xname, value in zip(acl.NAMES, acls):
        if value is not None:
            sysio.setxattr(dfd, name, xname, value)


def _finish(dfd: int, name: str, perm: int, uid: int, gid: int, is_dir: bool) -> None:
    try:
        sysio.chown(dfd, name, uid, gid)
    except OSError as e:
        # Unprivileged, an owner other than ourselves is not ours to give; the
        # object stays the mounting user's (docs/rootless.md).
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise
    if perm & SETID or (is_dir and perm & stat.S_ISVTX):
        sysio.chmod(dfd, name, perm)  # chown cleared the set-id bits


async def mknod(fs: State, parent: Inode, name: str, mode: int, rdev: int, uid: int,
                gid: int, umask: int = 0) -> Resolution:
    if stat.S_ISCHR(mode) and rdev == 0:
        raise oserror(errno.EPERM)  # that is a whiteout: not creatable through the overlay
    kind = stat.S_IFMT(mode)
    return await create_object(fs, parent, name, mode, uid, gid,
                               lambda d, n, p: sysio.mknod(d, n, kind | p, rdev), umask)


async def mkdir(fs: State, parent: Inode, name: str, mode: int, uid: int,
                gid: int, umask: int = 0) -> Resolution:
    return await create_object(fs, parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid,
                               lambda d, n, p: sysio.mkdir(d, n, p), umask)


async def symlink(fs: State, parent: Inode, name: str, target: str, uid: int,
                  gid: int) -> Resolution:
    return await create_object(fs, parent, name, stat.S_IFLNK | 0o777, uid, gid,
                               lambda d, n, p: sysio.symlink(target, d, n))


async def create(fs: State, parent: Inode, name: str, mode: int, flags: int, uid: int,
                 gid: int, umask: int = 0) -> tuple[Resolution, int]:
    fds: list[int] = []
    access = flags & os.O_ACCMODE

    opener = sysio.open_noatime if fs.noatime else sysio.open_at

    def make(d: int, n: str, p: int) -> None:
        fds.append(opener(d, n, os.O_CREAT | os.O_EXCL | access, p))

    try:
        res = await create_object(fs, parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid,
                                  gid, make, umask)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return res, fds[0]


async def link(fs: State, node: Inode, new_parent: Inode, new_name: str) -> Resolution:
    fs.check_writable()
    if node.is_dir:
        raise oserror(errno.EPERM)
    check_new_name(fs, new_name)
    if resolve_in(fs, new_parent, new_name) is not None:
        raise oserror(errno.EEXIST)
    await copy_up(fs, node, meta=True)
    udfd = await upper_dir(fs, new_parent)
    if node.data is not None and node.parent is not None:
        # A metacopy with a second name: each name must find the data, by path from
        # the root (the kernel's ovl_set_link_redirect).
        _set_redirect(fs, node.parent, node.name, absolute=True)
    sdfd = fs.stack.dirfd(fs.upper, node.parent_path)
    udfd = fs.stack.dirfd(fs.upper, new_parent.path)  # cached fds may rotate at an await
    if _whiteout_object(fs, udfd, new_name):
        wfd, tmp = fs.stack.work_fd, temp_name()
        sysio.link(sdfd, node.name, wfd, tmp)
        try:
            sysio.renameat2(wfd, tmp, udfd, new_name)
        except BaseException:
            sysio.unlink(wfd, tmp)
            raise
    else:
        sysio.link(sdfd, node.name, udfd, new_name)
    fs.dialect.drop_file_whiteout(udfd, new_name)
    res = Resolution(fs.upper, sysio.lstat(udfd, new_name), data=node.data)
    if _shows_other(fs, node, res):
        mark_impure(fs, new_parent, udfd)  # it shows its origin's number: say so here
        fs.inodes.same_number(res, node)
    return res


def _shows_other(fs: State, node: Inode | None, res: Resolution) -> bool:
    """Does the object show another one's number (a merged directory, a copy with its
    origin)?  Then a directory it moves into must say so (overlay.impure)."""
    if res.shown is not None:
        return True
    return node is not None and node.ino != fs.inodes.natural_of(res)


async def settle(fs: State, parent: Inode, name: str,
                 res: Resolution | None | Literal[False] = False) -> bool:
    """Wait for a copy-up of ``name`` in flight: removing or replacing the name under it
    would make its final rename fail (the kernel holds the name locked meanwhile).
    ``res``: the name's resolution when the caller has it.  True if it waited."""
    if res is False:
        res = resolve_in(fs, parent, name)
    node = live_inode(fs, parent, name, res) if res is not None else None
    if node is not None and node.lock.locked():
        async with node.lock:
            pass
        return True
    return False


def _check_remove(fs: State, parent: Inode, name: str, is_dir: bool) -> Resolution:
    res = resolve_in(fs, parent, name)
    if res is None:
        raise oserror(errno.ENOENT)
    if res.is_dir != is_dir:
        raise oserror(errno.ENOTDIR if is_dir else errno.EISDIR)
    if is_dir and not is_empty(fs, parent.child_path(name), res):
        raise oserror(errno.ENOTEMPTY)
    return res


async def unlink(fs: State, parent: Inode, name: str) -> None:
    await _remove(fs, parent, name, is_dir=False)


async def rmdir(fs: State, parent: Inode, name: str) -> None:
    await _remove(fs, parent, name, is_dir=True)
    fs.stack.forget_upper_path(parent.child_path(name), subtree=False)


async def _remove(fs: State, parent: Inode, name: str, is_dir: bool) -> None:
    fs.check_writable()
    res = _check_remove(fs, parent, name, is_dir)  # errors first: nothing is copied up for them
    waited = await settle(fs, parent, name, res)
    if not parent.in_upper:
        await upper_dir(fs, parent)
        waited = True
    if waited:
        # Checked again with no await left before the change: the awaits let others run.
        res = _check_remove(fs, parent, name, is_dir)
    node = live_inode(fs, parent, name, res)
    if node is not None and _index_first(fs, res):
        await copy_up(fs, node, meta=True)
        res = _check_remove(fs, parent, name, is_dir)
        node = live_inode(fs, parent, name, res)
    entry = _index_entry(fs, parent, name, res)
    udfd = fs.stack.dirfd(fs.upper, parent.path)
    # A name found in a lower layer obviously needs hiding; one found in upper only if
    # a lower layer has it too.
    needs_whiteout = not res.layer.upper or lower_has(fs, parent, name)
    kept = _keep_removed(node, res, udfd, name)
    try:
        if res.layer.upper:
            if needs_whiteout or res.is_dir:
                _retire(fs, udfd, name, needs_whiteout, res.is_dir)
            else:
                sysio.unlink(udfd, name)
        else:
            fs.dialect.make_whiteout(udfd, name, fs.stack.work_fd, temp_name())
    except BaseException:
        if kept >= 0:
            os.close(kept)
        raise
    if entry is not None:
        _release_entry(fs, entry)
    if node is not None:
        last = res.layer.upper and (res.is_dir or res.st.st_nlink <= 1)
        fs.inodes.unlinked(node, parent, name, last, res.st, kept)


def _index_first(fs: State, res: Resolution) -> bool:
    """index=on: a name of a lower file with several links is linked to the file's index
    entry before it goes, so that the entry holds the overlay's count (ovl_nlink_start)."""
    return fs.index is not None and not res.is_dir and not res.layer.upper and \
        (res.layer.entries or res.st.st_nlink > 1)


def _index_entry(fs: State, parent: Inode, name: str, res: Resolution) -> str | None:
    """The index entry an upper name is linked to, if any."""
    if fs.index is None or res.is_dir or not res.layer.upper or res.st.st_nlink < 2:
        return None
    value = sysio.getxattr_or_none(fs.stack.dirfd(fs.upper, parent.path), name,
                                   fs.dialect.prefix + "origin")
    if not value or not index.is_entry_of(fs.index, value, res.st):
        return None
    return index.entry_name(value)


def _release_entry(fs: State, entry: str) -> None:
    """After a name of an indexed file went: the last one takes the entry along
    (ovl_cleanup_index)."""
    assert fs.index is not None
    st = sysio.lstat_or_none(fs.index.fd, entry)
    if st is None:
        return
    value = sysio.getxattr_or_none(fs.index.fd, entry, fs.dialect.prefix + "nlink")
    # no name left (the count says 0) and no upper link but the entry's own
    if st.st_nlink == 1 and value is not None and \
            index.parse_nlink(value, st.st_nlink, st.st_nlink) is None:
        sysio.unlink(fs.index.fd, entry)


def _retire(fs: State, udfd: int, name: str, leave_whiteout: bool, is_dir: bool) -> None:
    """Move an upper object out of the way into WORK/work and delete it there; with
    ``leave_whiteout`` the same rename leaves the whiteout, so the lower object
    never shows through."""
    if is_dir and not leave_whiteout:
        try:
            sysio.rmdir(udfd, name)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:  # holds only whiteouts: move it out whole
                raise
    wfd, tmp = fs.stack.work_fd, temp_name()
    if leave_whiteout:
        fs.dialect.replace_with_whiteout(udfd, name, wfd, tmp)
    else:
        sysio.renameat2(udfd, name, wfd, tmp)
    remove_tree_at(wfd, tmp)


def _pure_upper(res: Resolution) -> bool:
    return res.layer.upper and len(res.dirs) <= 1


def _movable(fs: State, res: Resolution) -> bool:
    """Without redirect_dir=on only directories that live in upper alone can move."""
    return not res.is_dir or _pure_upper(res) or fs.features.moves_dirs


def _check_rename(fs: State, old_parent: Inode, old_name: str, new_parent: Inode,
                  new_name: str, flags: int
                  ) -> tuple[Resolution, Resolution | None] | None:
    """The errors rename must give before changing anything; None when it is a no-op."""
    exchange = bool(flags & sysio.RENAME_EXCHANGE)
    src = resolve_in(fs, old_parent, old_name)
    if src is None:
        raise oserror(errno.ENOENT)
    dst = resolve_in(fs, new_parent, new_name)
    if old_parent is new_parent and old_name == new_name:
        return None
    if dst is not None and src.layer.upper and dst.layer.upper and \
            (src.st.st_dev, src.st.st_ino) == (dst.st.st_dev, dst.st.st_ino):
        return None  # two names of one upper file: rename(2) does nothing
    if dst is not None and flags & sysio.RENAME_NOREPLACE:
        raise oserror(errno.EEXIST)
    if exchange and dst is None:
        raise oserror(errno.ENOENT)
    if not _movable(fs, src) or (exchange and dst is not None and not _movable(fs, dst)):
        raise oserror(errno.EXDEV)
    old_path = old_parent.child_path(old_name)
    new_path = new_parent.child_path(new_name)
    if src.is_dir and (new_path + "/").startswith(old_path + "/"):
        raise oserror(errno.EINVAL)
    if dst is not None and not exchange:
        if src.is_dir and not dst.is_dir:
            raise oserror(errno.ENOTDIR)
        if not src.is_dir and dst.is_dir:
            raise oserror(errno.EISDIR)
        # A pure upper target is left to the upper fs to refuse, after the source
        # got its opaque mark, as in the kernel; a merged one we check ourselves.
        if dst.is_dir and not _pure_upper(dst) and not is_empty(fs, new_path, dst):
            raise oserror(errno.ENOTEMPTY)
    if exchange and dst is not None and dst.is_dir and \
            (old_path + "/").startswith(new_path + "/"):
        raise oserror(errno.EINVAL)
    return src, dst


async def rename(fs: State, old_parent: Inode, old_name: str, new_parent: Inode,
                 new_name: str, flags: int) -> None:
    fs.check_writable()
    if flags & ~(sysio.RENAME_NOREPLACE | sysio.RENAME_EXCHANGE) or \
            flags == sysio.RENAME_NOREPLACE | sysio.RENAME_EXCHANGE:
        raise oserror(errno.EINVAL)
    exchange = bool(flags & sysio.RENAME_EXCHANGE)
    check_new_name(fs, new_name)
    checked = _check_rename(fs, old_parent, old_name, new_parent, new_name, flags)
    if checked is None:
        return
    src, dst = checked
    await settle(fs, old_parent, old_name)
    await settle(fs, new_parent, new_name)

    src_node = live_inode(fs, old_parent, old_name, src)
    dst_node = live_inode(fs, new_parent, new_name, dst) if dst is not None else None
    if src_node is not None:
        await copy_up(fs, src_node, meta=True)
    elif not src.layer.upper:
        raise oserror(errno.ESTALE)  # the kernel looked it up before renaming
    if exchange and dst is not None:
        if dst_node is not None:
            await copy_up(fs, dst_node, meta=True)
        elif not dst.layer.upper:
            raise oserror(errno.ESTALE)
    elif dst is not None and dst_node is not None and _index_first(fs, dst):
        await copy_up(fs, dst_node, meta=True)  # replaced: its entry keeps the count (ovl_nlink_start)
    await upper_dir(fs, old_parent)
    await upper_dir(fs, new_parent)
    # Checked again with no await left before the change: the awaits let others run.
    checked = _check_rename(fs, old_parent, old_name, new_parent, new_name, flags)
    if checked is None:
        return
    src, dst = checked
    src_node = live_inode(fs, old_parent, old_name, src)
    dst_node = live_inode(fs, new_parent, new_name, dst) if dst is not None else None
    replaced = _index_entry(fs, new_parent, new_name, dst) \
        if dst is not None and not exchange else None
    old_udfd = fs.stack.dirfd(fs.upper, old_parent.path)
    new_udfd = fs.stack.dirfd(fs.upper, new_parent.path)
    old_path = old_parent.child_path(old_name)
    new_path = new_parent.child_path(new_name)
    samedir = old_parent is new_parent
    # A directory with layers below keeps finding them through a redirect, and so does
    # a metacopy its data; a directory of upper alone must not merge with what lies
    # below its new name.
    if _redirected(src):
        _set_redirect(fs, old_parent, old_name, _needs_absolute(fs, src, samedir))
    if exchange and dst is not None and _redirected(dst):
        _set_redirect(fs, new_parent, new_name, _needs_absolute(fs, dst, samedir))
    if not samedir:
        # A copy with an origin, or a merged directory, now lives here too.
        if _shows_other(fs, src_node, src):
            mark_impure(fs, new_parent, new_udfd)
        if exchange and dst is not None and _shows_other(fs, dst_node, dst):
            mark_impure(fs, old_parent, old_udfd)
    kept = -1 if exchange or dst_node is src_node else \
        _keep_removed(dst_node, dst, new_udfd, new_name)
    try:
        _rename_in_upper(fs, old_parent, old_name, new_parent, new_name, src, dst,
                         old_udfd, new_udfd, exchange)
    except BaseException:
        if kept >= 0:
            os.close(kept)
        raise
    if src.is_dir:
        fs.stack.forget_upper_path(old_path)
    if dst is not None and dst.is_dir:
        fs.stack.forget_upper_path(new_path)
    if exchange:
        if src_node is not None:
            fs.inodes.renamed(src_node, old_parent, old_name, new_parent, new_name)
        if dst_node is not None:
            fs.inodes.renamed(dst_node, new_parent, new_name, old_parent, old_name)
        return
    if replaced is not None:
        _release_entry(fs, replaced)
    if dst_node is not None and dst_node is not src_node:
        fs.inodes.unlinked(dst_node, new_parent, new_name,
                           dst is not None and dst.layer.upper
                           and (dst.is_dir or dst.st.st_nlink <= 1),
                           dst.st if dst is not None else None, kept)
    elif kept >= 0:
        os.close(kept)
    if src_node is not None:
        fs.inodes.renamed(src_node, old_parent, old_name, new_parent, new_name)


def _rename_in_upper(fs: State, old_parent: Inode, old_name: str, new_parent: Inode,
                     new_name: str, src: Resolution, dst: Resolution | None, old_udfd: int,
                     new_udfd: int, exchange: bool) -> None:
    """rename's change itself, in upper (both parents are there by now)."""
    if exchange:
        sysio.renameat2(old_udfd, old_name, new_udfd, new_name, sysio.RENAME_EXCHANGE)
        _opaque_if_moved_into_merge(fs, new_parent, new_udfd, new_name, src)
        _opaque_if_moved_into_merge(fs, old_parent, old_udfd, old_name, dst)
        return
    leave_whiteout = lower_has(fs, old_parent, old_name)
    if dst is not None and dst.is_dir and dst.layer.upper and not _pure_upper(dst):
        # An upper dir holding whiteouts can't be renamed over: swap in an
        # empty one first (the kernel's ovl_clear_empty).
        wfd = fs.stack.work_fd
        tmp = temp_name()
        sysio.mkdir(wfd, tmp, 0o700)
        set_opaque(fs, wfd, tmp)
        sysio.renameat2(wfd, tmp, new_udfd, new_name, sysio.RENAME_EXCHANGE)
        remove_tree_at(wfd, tmp)
    _opaque_if_moved_into_merge(fs, new_parent, old_udfd, old_name, src)
    onto_whiteout = dst is None and _whiteout_object(fs, new_udfd, new_name)
    if onto_whiteout and src.is_dir:
        # rename(2) can't put a directory over a char device: swap the two,
        # and the whiteout lands at the old name, where it may be needed.
        sysio.renameat2(old_udfd, old_name, new_udfd, new_name, sysio.RENAME_EXCHANGE)
        if not leave_whiteout:
            sysio.unlink(old_udfd, old_name)
        # else the swapped-in whiteout stays where it is needed, whatever form we
        # write: every reader understands a 0/0 device
    else:
        _rename_leaving(fs, old_udfd, old_name, new_udfd, new_name, leave_whiteout,
                        0 if dst is not None or onto_whiteout else sysio.RENAME_NOREPLACE)
    if dst is None:
        fs.dialect.drop_file_whiteout(new_udfd, new_name)


def _keep_removed(node: Inode | None, res: Resolution | None, udfd: int, name: str) -> int:
    """An fd (O_PATH) of an upper file whose last name is about to go while the kernel
    holds its node with no handle open, or -1.  The kernel may have looked the name up
    and sent an open that we have not read yet: that open then still opens the file,
    as on a local filesystem (ops._reopen), instead of failing with ESTALE.  The node
    keeps the fd until the kernel forgets it, which follows the removal at once unless
    a process holds the file."""
    if node is None or res is None or not res.layer.upper or not stat.S_ISREG(res.st.st_mode) \
            or node.handles or node.lookups <= 0 or node.aliases or node.data is not None:
        return -1
    try:
        return sysio.open_path(udfd, name)
    except OSError:
        return -1


def _rename_leaving(fs: State, old_udfd: int, old_name: str, new_udfd: int, new_name: str,
                    leave_whiteout: bool, flags: int) -> None:
    """rename(2) in upper that leaves a whiteout at the old name when asked."""
    dialect = fs.dialect
    if not leave_whiteout or dialect.form == CHARDEV:
        sysio.renameat2(old_udfd, old_name, new_udfd, new_name,
                        flags | (sysio.RENAME_WHITEOUT if leave_whiteout else 0))
        return
    # No rename flag for these forms: the object goes via work, leaving the whiteout in
    # the same step, so the lower object never shows; a refused second step is undone.
    wfd, tmp = fs.stack.work_fd, temp_name()
    had_marker = dialect.whited_out_by_file(old_udfd, old_name)
    dialect.replace_with_whiteout(old_udfd, old_name, wfd, tmp)
    try:
        sysio.renameat2(wfd, tmp, new_udfd, new_name, flags)
    except BaseException:
        if dialect.form == OCI:
            sysio.renameat2(wfd, tmp, old_udfd, old_name, sysio.RENAME_NOREPLACE)
            if not had_marker:
                dialect.drop_file_whiteout(old_udfd, old_name)
        else:
            sysio.renameat2(wfd, tmp, old_udfd, old_name, sysio.RENAME_EXCHANGE)
            sysio.unlink(wfd, tmp)
        raise


def _opaque_if_moved_into_merge(fs: State, parent: Inode, udfd: int, name: str,
                                res: Resolution | None) -> None:
    """A directory of upper alone landing in a merged directory must not merge with
    what lies below its new name (kernel: ovl_set_opaque in ovl_rename)."""
    if res is not None and res.is_dir and _pure_upper(res) and parent.lowers and \
            not fs.dialect.is_opaque(udfd, name):
        set_opaque(fs, udfd, name)


def _redirected(res: Resolution) -> bool:
    """Does the object find what lies below through its name (the kernel's
    ovl_type_merge_or_lower after copy-up)?"""
    return (res.is_dir and not _pure_upper(res)) or res.data is not None


def _needs_absolute(fs: State, res: Resolution, samedir: bool) -> bool:
    """Within its parent a name will do, unless it is a metacopy whose data has other
    names (two upper names could sit in different directories)."""
    if not samedir:
        return True
    if res.data is None:
        return False
    layer, path, leaf = res.data
    dfd = fs.stack.dirfd_or_none(layer, path)
    st = sysio.lstat_or_none(dfd, leaf) if dfd is not None else None
    return st is None or st.st_nlink > 1


def _set_redirect(fs: State, parent: Inode, name: str, absolute: bool) -> None:
    """Before ``name`` (copied up, with layers below) moves: record where the layers
    below keep it (kernel ovl_set_redirect).  Within its parent, its name there;
    elsewhere, its path from the root, each component replaced by the redirect it
    already has, up to an absolute one.  A redirect already right stays."""
    dialect = fs.dialect
    udfd = fs.stack.dirfd(fs.upper, parent.path)
    current = dialect.redirect(udfd, name)
    if current is not None and (not absolute or current.startswith("/")):
        return
    if not absolute:
        value = name
    else:
        parts = [current or name]
        node: Inode | None = parent
        while not parts[-1].startswith("/") and node is not None and node.parent is not None:
            pdfd = fs.stack.dirfd(fs.upper, node.parent_path)
            parts.append(dialect.redirect(pdfd, node.name) or node.name)
            node = node.parent
        value = "/".join(reversed(parts))
        if not value.startswith("/"):
            value = "/" + value
        if len(os.fsencode(value)) > fs.features.redirect_max:
            raise oserror(errno.EXDEV)  # too long to record: mv copies instead
    try:
        dialect.set_redirect(udfd, name, value)
    except OSError:
        raise oserror(errno.EXDEV) from None
