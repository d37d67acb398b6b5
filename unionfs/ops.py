"""The pyfuse3 adapter: argument translation only; the overlay rules live below.

Only FUSEError may leave a handler (anything else kills pyfuse3's main loop and
leaves a dead mount), so every handler goes through ``_guard``.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter_ns
from typing import Any, TypeVar

import pyfuse3
import trio

from unionfs import attrs, dirops, export, lookup, sysio, xattrs
from unionfs.copyup import copy_up, is_impure
from unionfs.handles import DirHandle
from unionfs.idmap import Caller
from unionfs.inodes import Inode, counted
from unionfs.lookup import Resolution
from unionfs.readdir import Entry, list_merged, resolve_entry
from unionfs.state import State
from unionfs.whiteout import OCI, WH_PREFIX

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])

# Handlers that change nothing in the layers.  Every other one moves State.epoch on,
# before it starts and when it ends, so that what a listing learned is trusted only
# while nothing has changed since (a handler may wait half-way, in a copy-up).
READ_ONLY = frozenset({"lookup", "getattr", "readlink", "statfs", "opendir", "readdir",
                       "releasedir", "fsyncdir", "read", "flush", "fsync", "release",
                       "getxattr", "listxattr"})

# Listings kept for readers without a handle (no_opendir) while they are read: dropped by
# the read that finds the end; beyond the most recent ones, a reader whose snapshot went on
# reads a fresh one from where it was.
MAX_SNAPSHOTS = 64

# Quiet seconds after the kernel forgot most nodes before their memory is given back.
SETTLE = 0.5

# What we pass on to the real file: the kernel does O_APPEND positioning itself,
# and O_DIRECT would demand aligned buffers Python doesn't give.
OPEN_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_SYNC | os.O_DSYNC | os.O_NONBLOCK


def _guard(fn: F) -> F:
    name = fn.__name__
    changes = name not in READ_ONLY

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        if self.debug:
            log.debug("-> %s%r", name, args[:-1] if name not in ("read", "write") else args[:2])
        fs = self.fs
        if changes:
            fs.epoch += 1
        t0 = perf_counter_ns()
        failed = True
        try:
            res = await fn(self, *args)
            failed = False
        except pyfuse3.FUSEError as e:
            if self.debug:
                log.debug("<- %s: %s", name, errno.errorcode.get(e.errno, e.errno))
            raise
        except OSError as e:
            code = e.errno or errno.EIO
            if self.debug:
                log.debug("<- %s: %s", name, errno.errorcode.get(code, code))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            log.exception("internal error in %s%r", name, args[:-1])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            if changes:
                fs.epoch += 1
            fs.stats.record(name, perf_counter_ns() - t0, failed)
        return res

    return wrapper  # type: ignore[return-value]


_PLAIN_KINDS = (stat.S_IFREG, stat.S_IFLNK)


def _plain_entry(token: pyfuse3.ReaddirToken, name: str, number: int, mode: int,
                 off: int) -> bool:
    """A plain READDIR entry (a name, a d_ino, a type): no node, no lookup counted."""
    e = pyfuse3.EntryAttributes()
    e.st_ino = number
    e.st_mode = mode
    return pyfuse3.readdir_reply(token, os.fsencode(name), e, off)


def _invalidate_attrs(ino: int) -> None:
    # Attributes only: that never waits for page locks, so it is safe inside a handler.
    try:
        pyfuse3.invalidate_inode(ino, attr_only=True)
    except OSError:
        pass  # the kernel doesn't hold the inode: nothing cached to drop


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


# What scripts/pyfuse3-unionfs.patch a built pyfuse3 has (0: stock, which ignores the
# Operations attributes the patch reads and lacks the FileInfo fields it adds).
PATCH_LEVEL: int = getattr(pyfuse3, "UNIONFS_PATCH_LEVEL", 0)


def _file_info(fh: int, keep_cache: bool, writeback: bool = False) -> pyfuse3.FileInfo:
    # Our flush does nothing: close() needs no round trip (FOPEN_NOFLUSH).  Unless the
    # kernel keeps written pages: its FLUSH writes them back first and close() reports
    # what that met (a full disk), as a local filesystem's close() never needs to.
    if PATCH_LEVEL >= 5 and not writeback:
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, noflush=True)
    return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)


def _times_only(fields: pyfuse3.SetattrFields) -> bool:
    """An mtime (with the ctime the kernel adds) and nothing else."""
    return fields.update_mtime and not (fields.update_size or fields.update_mode
                                        or fields.update_uid or fields.update_gid
                                        or fields.update_atime)


def _open_wide(opener: Callable[[int], int], flags: int) -> int:
    """Read-write underneath a write-only open where we may: with the writeback cache the
    kernel reads the rest of a page that a write covers in part through whichever handle
    wrote.  Where we may not (mode 0200, no CAP_DAC_OVERRIDE: rootless) such a write then
    fails with EACCES (read)."""
    try:
        return opener(_wide(flags))
    except PermissionError:
        return opener(flags)


def _wide(flags: int) -> int:
    """A write-only open, read-write: with the writeback cache the kernel reads the rest
    of a page that a write covers in part through whichever handle wrote."""
    if flags & os.O_ACCMODE == os.O_WRONLY:
        return flags & ~os.O_ACCMODE | os.O_RDWR
    return flags


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False
    # FUSE_EXPORT_SUPPORT: a file handle whose inode the kernel has forgotten is opened by
    # a lookup of "." in its node id (_reconnect).  libfuse 3.14 can't declare handles
    # unsupported (FUSE_NO_EXPORT_SUPPORT), as kernel overlayfs does without nfs_export=on,
    # and without this lookup they would give ESTALE for files that exist.
    supports_dot_lookup = True
    # XATTR_CREATE/XATTR_REPLACE reach setxattr (scripts/pyfuse3-unionfs.patch), which
    # applies them after the copy-up, as the kernel does; a stock pyfuse3 checks them with
    # a getxattr before calling us, and a refused call then copies nothing up.
    setxattr_flags = True
    # Requests are read with read(2), not spliced through a pipe (two more system calls
    # for each request that is no write), and the next one before waiting on trio.
    splice_read = False
    eager_read = True
    # A caller that waits for each reply (stat, open, small writes in a loop) sends its next
    # request within microseconds: looking again for 20 us before trio's wait made a getattr
    # round trip 54 -> 16 us here, at no cost while idle.  Only with a second CPU to run the
    # caller meanwhile.
    eager_spin = 20e-6 if len(os.sched_getaffinity(0)) > 1 else 0.0

    def __init__(self, fs: State, debug: bool = False) -> None:
        super().__init__()
        self.fs = fs
        self.debug = debug
        self.timeout = fs.timeout
        # Read by pyfuse3 at init.  With ACLs on, the kernel also leaves the umask to us
        # (DONT_MASK, scripts/pyfuse3-unionfs.patch): a default ACL replaces it.
        self.enable_acl = self.enable_dont_mask = fs.acl
        self.enable_writeback_cache = fs.writeback
        if fs.timeout > 0:
            fs.attrs_changed = _invalidate_attrs
        # The kernel may keep listings (FOPEN_CACHE_DIR) where names may be trusted at all:
        # every change made through the mount resets its copy; with timeout=0 the lowers
        # may change underneath, unseen.
        self.cache_listings = fs.timeout > 0 and PATCH_LEVEL >= 5
        # A plain READDIR beside READDIRPLUS: the kernel asks PLUS only where the names'
        # attributes will be used (READDIRPLUS_AUTO), and symlink targets stay in its page
        # cache (a replaced link is a new node; timeout=0 trusts nothing).
        self.readdirplus_auto = PATCH_LEVEL >= 5
        self.cache_symlinks = fs.timeout > 0
        # No OPENDIR/RELEASEDIR round trips at all (per mount, so only where listings may
        # be kept): listings are then snapshots found by their offsets (_snapshot).
        self.no_opendir = self.cache_listings
        self._snapshots: OrderedDict[int, DirHandle] = OrderedDict()
        # When forgetting has settled; not None while a give-back waits (_give_back).
        self._settle: float | None = None
        self._gen = 0
        if fs.export is not None:
            fs.inodes.forgotten = self._forgotten
        # Generations of live nodes made in upper (nfs_export=on, export.generation).
        self._gens: dict[int, int] = {}

    # -- helpers -------------------------------------------------------------
    def _node(self, ino: int) -> Inode:
        node = self.fs.inodes.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _named(self, ino: int) -> Inode:
        """A node reached by its name: one whose names are all gone has none to use."""
        node = self._node(ino)
        if node.gone:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def _attrs(self, node: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        number = self.fs.inodes.number_of(node)
        e.st_ino = number
        if number != node.ino:
            e.nodeid = node.ino  # one of several names of a lower file (inodes.py)
        e.generation = 0 if self.fs.export is None else self._generation(node, number, st)
        e.entry_timeout = self.timeout
        e.attr_timeout = self.timeout
        e.st_nlink = attrs.nlink_of(self.fs, node, st)
        e.st_mode, e.st_uid, e.st_gid = attrs.shown_owner(self.fs, node, st)
        e.st_rdev = st.st_rdev
        e.st_size = st.st_size
        e.st_blksize = st.st_blksize
        e.st_blocks = st.st_blocks if node.data is None else attrs.data_blocks(self.fs, node)
        e.st_atime_ns = st.st_atime_ns
        e.st_mtime_ns = st.st_mtime_ns
        e.st_ctime_ns = st.st_ctime_ns
        return e

    def _absent(self) -> pyfuse3.EntryAttributes:
        """A negative entry (inode 0): the kernel remembers the name is absent."""
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.timeout
        return e

    def _caller(self, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """The caller's ids as stored on disk."""
        owners = self.fs.owners
        return owners.uid.disk(ctx.uid, strict=False), owners.gid.disk(ctx.gid, strict=False)

    def _created(self, parent: Inode, name: str, res: lookup.Resolution,
                 ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.fs.override_xattr is not None:
            attrs.record_owner(self.fs, parent, name, res, *self._caller(ctx),
                               res.st.st_mode)
        return self._entry(parent, name, res)

    def _entry(self, parent: Inode, name: str, res: lookup.Resolution) -> pyfuse3.EntryAttributes:
        node = self.fs.inodes.bind(parent, name, res)
        node.lookups += 1
        return self._attrs(node, res.st)

    def _forgotten(self, node: Inode) -> None:
        self._gens.pop(node.ino, None)
        if not node.gone and node.parent is not None and self.fs.export is not None:
            self.fs.export.record(node.ino, node.parent.ino, node.name)

    def _generation(self, node: Inode, number: int, st: os.stat_result) -> int:
        """nfs_export=on: what tells a reused number from its first owner (export.py)."""
        if counted(number):
            return self.fs.export.counted_gen if self.fs.export is not None else 0
        if not node.layer.upper or number != self.fs.inodes.natural_number(st) or node.gone:
            return self._gens.get(node.ino, 0)  # a lower's number: never reused
        gen = self._gens.get(node.ino)
        if gen is None:
            assert node.parent is not None
            gen = self._gens[node.ino] = export.generation(
                self.fs.stack.dirfd(self.fs.upper, node.parent.path), node.name)
        return gen

    # -- lookup and attributes -------------------------------------------------
    @_guard
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
                     ) -> pyfuse3.EntryAttributes:
        sname = _name(name)
        parent = self.fs.inodes.get(parent_inode)
        if parent is None:
            # A file handle the kernel opens after forgetting its inode: "." in it, and
            # ".." to connect a directory to the root.
            if sname not in (".", "..") or sname == ".." and self.fs.export is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            parent = self._reconnect(parent_inode)
        if sname in (".", ".."):
            node = parent if sname == "." or parent.parent is None else parent.parent
            node.lookups += 1
            return self._attrs(node, attrs.real_stat(self.fs, node))
        res = dirops.resolve_in(self.fs, parent, sname)
        if res is None:
            if self.timeout > 0:
                return self._absent()
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._entry(parent, sname, res)

    def _reconnect(self, ino: int) -> Inode:
        """The inode of a file handle the kernel opens after forgetting it: found again
        by where it was then (nfs_export=on: the records of export.py, else the path the
        inode table recalls), if that still leads to the same number."""
        if self.fs.export is not None:
            node, steps = self._recorded(ino)
        else:
            path = self.fs.inodes.recall(ino)
            if not path:
                raise pyfuse3.FUSEError(errno.ESTALE)
            *above, last = path.split("/")
            node = self.fs.inodes.root
            steps = [(name, None) for name in above] + [(last, ino)]
        for name, number in steps:
            res = dirops.resolve_in(self.fs, node, name) if node.is_dir else None
            if res is None:
                self.fs.inodes.drop_if_unused(node)
                raise pyfuse3.FUSEError(errno.ESTALE)
            child = self.fs.inodes.bind(node, name, res)
            if number is not None and child.ino != number:
                self.fs.inodes.drop_if_unused(child)
                raise pyfuse3.FUSEError(errno.ESTALE)
            node = child
        return node

    def _recorded(self, ino: int) -> tuple[Inode, list[tuple[str, int | None]]]:
        """nfs_export=on: the recorded (parent, name) pairs up to a node we hold, and the
        (name, number) steps down from it, each lookup to show its recorded number."""
        steps: list[tuple[str, int | None]] = []
        want = ino
        while (node := self.fs.inodes.get(want)) is None:
            where = self.fs.export.where(want) if self.fs.export is not None else None
            if where is None or len(steps) > 4096:  # a loop of stale records
                raise pyfuse3.FUSEError(errno.ESTALE)
            steps.append((where[1], want))
            want = where[0]
        return node, steps[::-1]

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext
                      ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        return self._attrs(node, attrs.real_stat(self.fs, node))

    @_guard
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if self.fs.writeback and fields.update_ctime and _times_only(fields):
            st = attrs.real_stat(self.fs, node)
            if attr.st_mtime_ns == st.st_mtime_ns:
                # The kernel sending back times it keeps (writeback), also after a rename
                # or an unlink moved its ctime, also for a lower file: a time the file has
                # already changes nothing and must not copy it up.  A caller's own utimes
                # can't be told apart: one setting the mtime a lower file has anyway is
                # not copied up (the kernel's overlay would).
                if node.gone:
                    # An unlink or a rename over it dropped the kernel's link count, and
                    # the kernel takes no attributes from this reply: ask it to ask again.
                    self.fs.attrs_changed(node.ino)
                return self._attrs(node, st)
        owners = self.fs.owners
        ch = attrs.AttrChange(
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            uid=owners.uid.disk(attr.st_uid) if fields.update_uid else None,
            gid=owners.gid.disk(attr.st_gid) if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        h = self.fs.handles.files.get(fh) if fh is not None else None
        if h is not None and h.flags & os.O_ACCMODE != os.O_RDONLY:
            ch.fd = h.fd
        if ch.size is not None and not node.is_dir:
            # FUSE adds the mode change for set-uid and a g+x set-gid, not for a caller
            # outside the group: the whole rule, on what it sent or what the file has.
            kept = attrs.setid_change(self.fs, node, Caller(ctx.pid, ctx.uid, ctx.gid),
                                      ch.mode)
            if kept is not None:
                ch.mode = kept
        await attrs.setattr(self.fs, node, ch)
        if self.fs.index is not None:
            self._siblings_changed(node)
        return self._attrs(node, attrs.real_stat(self.fs, node))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._named(inode)
        layer, where, name = node.real_entry()
        return os.fsencode(sysio.readlink(self.fs.stack.dirfd(layer, where), name))

    # Not async, unlike the stub: pyfuse3 calls forget without awaiting when it returns
    # None, so the counts drop at once instead of in a task scheduled for later.
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        self.fs.stats.record("forget", 0, False)
        try:
            inodes = self.fs.inodes
            before = len(inodes.inodes)
            for ino, n in inode_list:
                inodes.forget(ino, n)
            if inodes.compact(before) or self._settle is not None:
                if self._settle is None:  # no give-back waiting yet
                    trio.lowlevel.spawn_system_task(self._give_back)
                self._settle = trio.current_time() + SETTLE
        except Exception:  # forget must never raise
            log.exception("forget")

    async def _give_back(self) -> None:
        """After the kernel forgot most of what it held (memory pressure, drop_caches) and
        has been quiet for SETTLE seconds: the memory goes back to the system."""
        try:
            while self._settle is not None and trio.current_time() < self._settle:
                await trio.sleep_until(self._settle)
            self._settle = None  # from here on no await: no forget comes in between
            gc.collect()  # cycles left by the nodes let go: they pin arenas too
            self.fs.stack.drop_dirfds()  # their keys too are the walk's
            self.fs.inodes.repack()
            sysio.release_free_memory()
            self.fs.stats.given_back += 1
        except Exception:
            log.exception("giving memory back")
        finally:
            self._settle = None

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = attrs.statfs(self.fs)
        d = pyfuse3.StatvfsData()
        for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
            setattr(d, f, getattr(sv, f))
        if self.fs.dialect.form == OCI:
            d.f_namemax -= len(WH_PREFIX)  # room for the ".wh." of a whiteout
        return d

    # -- directories -------------------------------------------------------------
    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if self.no_opendir:
            # The kernel stops sending OPENDIR/RELEASEDIR for good and keeps every listing
            # (FOPEN_CACHE_DIR|FOPEN_KEEP_CACHE); readdir then comes with fh 0.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self.fs.handles.add_dir(node).fh
        if self.cache_listings:
            return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)  # type: ignore[return-value]
        return fh

    def _snapshot(self, node: Inode, start_id: int) -> tuple[DirHandle, int]:
        """Without opendir: the listing a reader is in, and the offsets' high half naming
        it.  A read at offset 0 takes a new snapshot; a later one finds its own by the
        offset, so that a reader whose directory changes meanwhile goes on in what it
        started with (each name there all along exactly once), as with a handle."""
        gen = start_id >> 32
        h = self._snapshots.get(gen) if start_id else None
        if h is None or h.inode is not node:
            self._gen = gen = self._gen % 0x7FFF_FFFF + 1
            h = DirHandle(0, node)
            self._snapshots[gen] = h
            if len(self._snapshots) > MAX_SNAPSHOTS:
                del self._snapshots[next(iter(self._snapshots))]
        else:
            self._snapshots.move_to_end(gen)
        return h, gen << 32

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh:
            h, base = self.fs.handles.dirs[fh], 0
        else:
            h, base = self._snapshot(self._node(token.inode), start_id)
        node = h.inode
        stack = self.fs.stack
        plus = getattr(token, "plus", True)  # READDIRPLUS_AUTO: the kernel's choice
        pos = start_id & 0xFFFF_FFFF
        if pos == 0 or h.entries is None:
            # Built once per pass; a rewind (offset 0) picks up changes, as in the kernel.
            h.paths, h.dirs = node.layer_paths(), node.dirs
            h.entries = list_merged(stack, h.paths, h.dirs)
            h.epoch = self.fs.epoch
        entries = h.entries
        # What the listing learned holds until something changes; after that each name
        # is looked up afresh, since it may have been removed or copied up meanwhile.
        fresh = h.epoch == self.fs.epoch
        if not fh and pos >= len(entries) + 2:
            # the read that finds the end (the kernel's copy is complete): not needed again
            self._snapshots.pop(base >> 32, None)
        while pos < len(entries) + 2:
            if pos < 2:
                target = node if pos == 0 or node.parent is None else node.parent
                if not pyfuse3.readdir_reply(token, b"." if pos == 0 else b"..",
                                             self._attrs(target,
                                                         attrs.real_stat(self.fs, target)),
                                             base | pos + 1):
                    return
                pos += 1
                continue
            e = entries[pos - 2]
            pos += 1
            if e.hidden:
                continue
            if not plus and fresh and e.st is None and e.kind in _PLAIN_KINDS \
                    and not e.layer.upper and not e.uncertain and self.fs.index is None:
                # A lower file or symlink in a plain READDIR: what the listing shows (the
                # kernel lists it with its own d_ino too, looking nothing up), no lstat.
                number = self.fs.inodes.lower_number(e.layer, e.ino)
                if number:
                    if not _plain_entry(token, e.name, number, e.kind, base | pos):
                        return
                    continue
            refused = False
            try:
                res = resolve_entry(stack, h.paths, h.dirs, e, self.fs.inodes.holds) \
                    if fresh else False
                if res is False:
                    res = lookup.resolve(stack, node.layer_paths(), node.dirs, e.name)
                if res is not None:
                    dirops.identify(self.fs, node, node.layer_paths(), e.name, res)
            except OSError:
                # Listed, but a lookup fails (a redirect not followed, a bad one, a metacopy
                # without metacopy=on): the name shows, as in the kernel's listing, and the
                # kernel asks again for it at once (no caching), to get the lookup's error.
                res = self._listed_only(node, h, e)
                refused = True
            if res is None and fresh and e.kind == stat.S_IFREG and not e.layer.upper:
                # An xattr whiteout where the listing shows it (its directory lacks
                # opaque=x): listed, its lookup ENOENT, as in the kernel's listing.
                res = self._listed_only(node, h, e)
                refused = True
            if res is None:
                continue
            if not plus and not refused:
                # A plain READDIR entry is a name, a d_ino and a type: no node for it.
                number = self.fs.inodes.shown_number(res)
                if number:
                    if not _plain_entry(token, e.name, number, res.st.st_mode, base | pos):
                        return
                    continue
            child = self.fs.inodes.bind(node, e.name, res)
            attrs_out = self._attrs(child, res.st)
            if refused:
                attrs_out.entry_timeout = attrs_out.attr_timeout = 0
                self.fs.inodes.unsettled.add(child.ino)
            if not pyfuse3.readdir_reply(token, os.fsencode(e.name), attrs_out, base | pos):
                self.fs.inodes.drop_if_unused(child)
                return
            if plus:
                child.lookups += 1
            else:  # a plain READDIR: the kernel made no node of it
                self.fs.inodes.drop_if_unused(child)

    def _listed_only(self, node: Inode, h: DirHandle, e: Entry) -> Resolution | None:
        """The object a listing saw, alone, for a name whose lookup fails; None where the
        kernel leaves the name out: it looks up an upper entry of an impure merged directory
        to compute its d_ino (ovl_calc_d_ino), and drops it as stale when that fails."""
        if e.layer.upper and node.merged and is_impure(self.fs, node):
            return None
        dfd = self.fs.stack.dirfd_or_none(e.layer, h.paths[e.pos])
        st = sysio.lstat_or_none(dfd, e.name) if dfd is not None else None
        if st is None:
            return None
        return Resolution(e.layer, st, [e.layer] if stat.S_ISDIR(st.st_mode) else [],
                          [lookup.join(h.paths[e.pos], e.name)])

    @_guard
    async def releasedir(self, fh: int) -> None:
        self.fs.handles.dirs.pop(fh, None)

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_guard
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, sname = self._node(parent_inode), _name(name)
        res = await dirops.mkdir(self.fs, parent, sname, mode, *self._caller(ctx), ctx.umask)
        return self._created(parent, sname, res, ctx)

    @_guard
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, sname = self._node(parent_inode), _name(name)
        res = await dirops.mknod(self.fs, parent, sname, mode, rdev, *self._caller(ctx),
                                 ctx.umask)
        return self._created(parent, sname, res, ctx)

    @_guard
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent, sname = self._node(parent_inode), _name(name)
        res = await dirops.symlink(self.fs, parent, sname, os.fsdecode(target),
                                   *self._caller(ctx))
        return self._created(parent, sname, res, ctx)

    @_guard
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, parent, sname = self._named(inode), self._node(new_parent_inode), _name(new_name)
        res = await dirops.link(self.fs, node, parent, sname)
        return self._entry(parent, sname, res)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await dirops.unlink(self.fs, self._node(parent_inode), _name(name))

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await dirops.rmdir(self.fs, self._node(parent_inode), _name(name))

    @_guard
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await dirops.rename(self.fs, self._node(parent_inode_old), _name(name_old),
                            self._node(parent_inode_new), _name(name_new), flags)

    # -- files -----------------------------------------------------------------------
    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext
                   ) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if node.gone:
            return self._reopen(node, flags, bool(writing))
        if writing:
            self.fs.check_writable()
            await copy_up(self.fs, node, data=not flags & os.O_TRUNC)
        oflags = flags & OPEN_FLAGS
        layer, where, name = node.data or node.real_entry()
        dfd = self.fs.stack.dirfd(layer, where)
        setid_caller = None
        if node.in_upper and node.data is None:
            opener = sysio.open_noatime if self.fs.noatime else sysio.open_at
            if self.fs.writeback and writing:
                fd = _open_wide(lambda f: opener(dfd, node.name, f), oflags)
            else:
                fd = opener(dfd, node.name, oflags)
            if self.fs.noatime:
                oflags |= os.O_NOATIME  # so that a switched or copied handle keeps it
            if writing and os.fstat(fd).st_mode & (stat.S_ISUID | stat.S_ISGID):
                setid_caller = await self._setid_after_open(node, fd, oflags, ctx)
            elif not writing and stat.S_ISREG(node.mode):
                self._accessed(node, fd)
        else:
            fd = sysio.open_noatime(dfd, name, oflags)  # a lower file stays untouched
            if not writing:
                # The kernel's readahead asks us 128 KiB at a time: let the lower file's
                # own readahead run further ahead of those reads.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        # O_DIRECT stays in the handle's flags (never on the real file) for keep_cache.
        h = self.fs.handles.add_file(node, fd, oflags & ~os.O_TRUNC | flags & os.O_DIRECT,
                                     layer)
        h.setid_caller = setid_caller
        # The names of an index entry are nodes of their own, each with its page cache:
        # one written through another is read afresh from the next open on.
        keep = (self.fs.index is None or not self.fs.inodes.has_siblings(node)) \
            and self.fs.inodes.keep_cache(node)
        return _file_info(h.fh, keep, self.fs.writeback)

    def _reopen(self, node: Inode, flags: int, writing: bool) -> pyfuse3.FileInfo:
        """A file whose names are all gone, opened again: by a file handle
        (open_by_handle_at, /proc/PID/fd), or by an open that was on its way when its last
        name went (the kernel looked the name up before).  Another open of the same real
        file, as a local filesystem gives; a lower file that lost its name stays read-only."""
        sources = [(h.fd, h.layer) for h in node.handles]
        if node.kept >= 0:
            sources.append((node.kept, node.layer))
        for fd, layer in sources:
            if layer.upper or not writing:
                noatime = self.fs.noatime or not layer.upper
                if self.fs.writeback and writing:
                    new = _open_wide(functools.partial(sysio.reopen, fd, noatime=noatime),
                                     flags & OPEN_FLAGS)
                else:
                    new = sysio.reopen(fd, flags & OPEN_FLAGS, noatime)
                break
        else:
            if writing and not node.layer.upper:
                # A lower file is copied up to its name, which is taken by now (a
                # whiteout or what was renamed there): the kernel's copy-up says EEXIST.
                raise pyfuse3.FUSEError(errno.EEXIST)
            if writing or node.layer.upper or node.data is not None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            # Hidden by a whiteout meanwhile: the lower file itself is still there.
            layer, where, name = node.real_entry()
            dfd = self.fs.stack.dirfd_or_none(layer, where)
            if dfd is None:
                raise pyfuse3.FUSEError(errno.ESTALE)
            new, noatime = sysio.open_noatime(dfd, name, flags & OPEN_FLAGS), True
        nh = self.fs.handles.add_file(
            node, new, flags & OPEN_FLAGS & ~os.O_TRUNC | flags & os.O_DIRECT
            | (os.O_NOATIME if noatime else 0), layer)
        return _file_info(nh.fh, self.fs.inodes.keep_cache(node), self.fs.writeback)

    def _accessed(self, node: Inode, fd: int) -> None:
        """An upper file opened for reading: the reads to come may all be served from the
        page cache (keep_cache), which FUSE never tells us of, so its atime moves now
        where the mount's policy says it is due, by one byte read through our clone of
        the upper's mount (which applies that policy), and the kernel hears of it."""
        if attrs.atime_due(os.fstat(fd), self.fs.atime):
            os.pread(fd, 1, 0)
            self.fs.attrs_changed(node.ino)

    async def _setid_after_open(self, node: Inode, fd: int, oflags: int,
                                ctx: pyfuse3.RequestContext) -> Caller | None:
        """A truncating open drops set-id bits here (we truncated, as root); otherwise
        the caller that a first write must check for a set-gid bit FUSE won't drop."""
        caller = Caller(ctx.pid, ctx.uid, ctx.gid)
        if oflags & os.O_TRUNC:
            await attrs.drop_setid(self.fs, node, caller, fd)
            return None
        mode, _, gid = attrs.shown_owner(self.fs, node, os.fstat(fd))
        return caller if attrs.sgid_needs_us(mode, gid, caller) else None

    @_guard
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent, sname = self._node(parent_inode), _name(name)
        res, fd = await dirops.create(self.fs, parent, sname, mode,
                                      _wide(flags) if self.fs.writeback else flags,
                                      *self._caller(ctx), ctx.umask)
        entry = self._created(parent, sname, res, ctx)
        node = self.fs.inodes[entry.st_ino]
        h = self.fs.handles.add_file(node, fd, flags & (os.O_ACCMODE | os.O_DIRECT)
                                     | (os.O_NOATIME if self.fs.noatime else 0), node.layer)
        return _file_info(h.fh, self.fs.inodes.keep_cache(node), self.fs.writeback), entry

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.fs.handles.files[fh]
        try:
            return os.pread(h.fd, size, off)
        except OSError as e:
            if e.errno == errno.EBADF and self.fs.writeback \
                    and h.flags & os.O_ACCMODE == os.O_WRONLY:
                # The writeback cache reading around a partial page through a handle that
                # we could only open write-only (mode 0200 and no CAP_DAC_OVERRIDE): the
                # caller's write meets the permission it lacks.
                raise pyfuse3.FUSEError(errno.EACCES) from None
            raise

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.fs.handles.files[fh]
        if h.setid_caller is not None:
            caller, h.setid_caller = h.setid_caller, None
            await attrs.drop_setid(self.fs, h.inode, caller, h.fd)
        fd = h.fd
        done = os.pwrite(fd, buf, off)  # one call, no memoryview: most writes are small
        if done < len(buf):
            view = memoryview(buf)
            while done < len(buf):
                done += os.pwrite(fd, view[done:], off + done)
        if self.fs.index is not None and self.fs.inodes.has_siblings(h.inode):
            self._siblings_changed(h.inode)
        return done

    def _siblings_changed(self, node: Inode) -> None:
        """Other nodes of the same real file (the names of an index entry) cache its
        attributes too: the kernel must ask again."""
        for other in self.fs.inodes.siblings(node):
            self.fs.attrs_changed(other.ino)

    @_guard
    async def flush(self, fh: int) -> None:
        return None

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        if self.fs.volatile:
            return  # -o volatile: the caller gave up durability for speed
        # A dup: a copy-up may switch (and close) the handle's fd while the thread runs.
        fd = os.dup(self.fs.handles.files[fh].fd)
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    @_guard
    async def release(self, fh: int) -> None:
        h = self.fs.handles.files.pop(fh, None)
        if h is not None and not self.fs.inodes.release_handle(h.inode, h):
            os.close(h.fd)

    # -- xattrs --------------------------------------------------------------------
    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return xattrs.getxattr(self.fs, self._node(inode), _name(name))

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in xattrs.listxattr(self.fs, self._node(inode),
                                                                 privileged=ctx.uid == 0)]

    @_guard
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext, flags: int = 0) -> None:
        await xattrs.setxattr(self.fs, self._node(inode), _name(name), value, flags,
                              caller=Caller(ctx.pid, ctx.uid, ctx.gid))

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await xattrs.removexattr(self.fs, self._node(inode), _name(name))

    # -- fallocate -----------------------------------------------------------------------
    # Called only by a pyfuse3 with a fallocate handler (scripts/pyfuse3-unionfs.patch,
    # built by scripts/install-deps.sh); with a stock pyfuse3 the kernel answers EOPNOTSUPP.
    @_guard
    async def fallocate(self, fh: int, mode: int, offset: int, length: int,
                        ctx: pyfuse3.RequestContext | None = None) -> None:
        h = self.fs.handles.files[fh]
        if not h.layer.upper:
            # Opened read-only on a lower (an open for writing copies up first): the kernel
            # already gives EBADF for a file not open for writing; never touch a lower.
            raise pyfuse3.FUSEError(errno.EBADF)
        # Every mode, KEEP_SIZE and hole punching too, is a change of data (file_modified):
        # the kernel drops set-uid itself but leaves a set-gid bit without g+x to us.
        # Patch level 3 passed no ctx: then the opener stands in for the caller.
        caller = Caller(ctx.pid, ctx.uid, ctx.gid) if ctx is not None else h.setid_caller
        if caller is not None:
            await attrs.drop_setid(self.fs, h.inode, caller, h.fd)
        # In a thread (preallocating gigabytes on tmpfs takes a while), on a dup: a copy-up
        # may switch (and close) the handle's fd meanwhile.
        fd = os.dup(h.fd)
        try:
            await trio.to_thread.run_sync(sysio.fallocate, fd, mode, offset, length)
        finally:
            os.close(fd)
