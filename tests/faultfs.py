"""A fault-injecting FUSE passthrough for the tests: the filesystem *below* pyunionfs.

Mounted where pyunionfs's UPPER and WORK live (both below one faultfs mount: a copy-up's
rename from WORK into UPPER must stay on one filesystem), it passes every call through to
a backing directory and, on command, makes chosen calls fail:

* rules: ``{"op": "write" | ["write", "fsync"] | "*", "path": GLOB, "xattr": GLOB,
  "errno": "ENOSPC", "skip": N, "count": N}``: the calls of those operations whose path
  (relative to the backing directory; for rename either name) matches GLOB (fnmatch, so
  ``*`` crosses ``/``) fail with that errno, ``count`` times (-1: every time), after the
  first ``skip`` matching calls went through.  Operation names are the FUSE requests:
  lookup getattr setattr readlink mknod mkdir symlink unlink rmdir rename link open read
  write fsync fsyncdir opendir readdir statfs setxattr getxattr listxattr removexattr
  create fallocate.
* unsynced data is dropped on a "power cut", with ``track=True``: the first change to a
  file's data (write, truncate, fallocate, O_TRUNC) after its last fsync/fdatasync keeps
  its previous content in memory; fsync forgets it; ``power_cut()`` puts it back into
  every file changed since, and from then on every call fails with EIO, as a disk that
  is gone.  The model is that of a journalling filesystem in ordered mode whose data
  writeback never ran: names, modes, owners and xattrs are durable at once, file data
  only once fsynced.  FUSE sends no syncfs, so sync(2) does not count as a sync here.

Run as ``python faultfs.py BACKING MOUNTPOINT [--track]``; it prints one JSON line
``{"ready": true}`` once mounted, then reads one JSON command per line on stdin and
answers one JSON line on stdout each: ``{"cmd": "rules", "rules": [...]}`` (replaces
the rules), ``{"cmd": "stats"}`` (calls and failures per operation, what each rule
did, unsynced files and bytes), ``{"cmd": "power_cut"}``.  It ends when unmounted
(``fusermount3 -u``).  ``FaultFS`` below is the tests' side of that pipe.

It runs as whoever starts it: root (then the mount has ``allow_other``), or a plain
user through fusermount3, for rootless pyunionfs.  Each FUSE inode holds an O_PATH fd
of its backing object (the design of libfuse's passthrough_ll), so renames need no path
bookkeeping.  Everything runs on trio's one thread and never awaits inside a call, so
calls, rules and the power cut never interleave.  Limits: xattrs of symlinks are not
reachable through an O_PATH fd (EPERM to set, none listed), no O_TMPFILE.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_OMIT = (1 << 30) - 2
ENTRY_TIMEOUT = 1.0
# Flags that must not reach the backing open: the kernel positions O_APPEND writes
# itself, Python's buffers are not O_DIRECT-aligned, and the /proc link an open goes
# through is a symlink (the caller's O_NOFOLLOW was applied by the kernel's lookup).
_OPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND | os.O_DIRECT | os.O_NOFOLLOW

FAULTFS = Path(__file__).resolve()


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _check(res: int) -> None:
    if res < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Rule:
    def __init__(self, spec: dict[str, Any]) -> None:
        op = spec.get("op", "*")
        self.ops = {op} if isinstance(op, str) else set(op)
        self.path = spec.get("path", "*")
        self.xattr = spec.get("xattr", "*")
        name = spec.get("errno", "EIO")
        self.errno = int(name) if isinstance(name, int) else getattr(errno, name)
        self.skip = int(spec.get("skip", 0))
        self.count = int(spec.get("count", 1))
        self.seen = 0
        self.fired = 0

    def matches(self, op: str, paths: list[str], xattr: str | None) -> bool:
        if "*" not in self.ops and op not in self.ops:
            return False
        if self.xattr != "*" and (xattr is None or not fnmatch.fnmatchcase(xattr, self.xattr)):
            return False
        return self.path == "*" or any(fnmatch.fnmatchcase(p, self.path) for p in paths)

    def report(self) -> dict[str, Any]:
        return {"ops": sorted(self.ops), "path": self.path, "errno": errno.errorcode[self.errno],
                "seen": self.seen, "fired": self.fired}


def serve(backing: str, mountpoint: str, track: bool) -> int:
    # pyfuse3 and trio only in the filesystem's own process: the tests import this module
    # for FaultFS without them.
    import pyfuse3
    import trio

    FUSEError = pyfuse3.FUSEError

    class Node:
        __slots__ = ("fd", "nlookup", "is_link")

        def __init__(self, fd: int, is_link: bool) -> None:
            self.fd, self.nlookup, self.is_link = fd, 0, is_link

    class Ops(pyfuse3.Operations):
        setxattr_flags = True  # (scripts/pyfuse3-unionfs.patch) XATTR_CREATE/REPLACE reach us

        def __init__(self) -> None:
            super().__init__()
            self.base = os.path.realpath(backing)
            root = os.open(self.base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(root)
            self.root_key = (st.st_dev, st.st_ino)
            self.nodes: dict[int, Node] = {pyfuse3.ROOT_INODE: Node(root, False)}
            self.nodes[pyfuse3.ROOT_INODE].nlookup = 1 << 62  # never forgotten
            self.dirs: dict[int, tuple[int, list[str] | None]] = {}
            self.next_dir = 1
            self.files: dict[int, int] = {}  # fh -> node id
            self.rules: list[Rule] = []
            self.calls: dict[str, int] = {}
            self.failed: dict[str, int] = {}
            # node id -> (O_PATH fd of the file, its content at its last sync, bytes since)
            self.journal: dict[int, tuple[int, bytes, int]] = {}
            self.dead = False

        # -- bookkeeping -------------------------------------------------------------

        def nodeid(self, st: os.stat_result) -> int:
            if (st.st_dev, st.st_ino) == self.root_key:
                return pyfuse3.ROOT_INODE
            return st.st_ino

        def node(self, ino: int) -> Node:
            try:
                return self.nodes[ino]
            except KeyError:
                raise FUSEError(errno.ESTALE) from None

        def rel(self, fd: int, name: str | None = None) -> str:
            try:
                p = os.path.relpath(os.readlink(_proc(fd)), self.base)
            except OSError:
                p = "?"
            if name is not None:
                p = name if p == "." else f"{p}/{name}"
            return p

        def fault(self, op: str, where: Callable[[], list[str]],
                  xattr: str | None = None) -> None:
            self.calls[op] = self.calls.get(op, 0) + 1
            if self.dead:
                self.failed[op] = self.failed.get(op, 0) + 1
                raise FUSEError(errno.EIO)
            if not self.rules:
                return
            paths = where()
            for r in self.rules:
                if not r.matches(op, paths, xattr):
                    continue
                r.seen += 1
                if r.seen <= r.skip or (0 <= r.count <= r.fired):
                    continue
                r.fired += 1
                self.failed[op] = self.failed.get(op, 0) + 1
                raise FUSEError(r.errno)

        def entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
            e = pyfuse3.EntryAttributes()
            e.st_ino = self.nodeid(st)
            e.entry_timeout = ENTRY_TIMEOUT
            e.attr_timeout = ENTRY_TIMEOUT
            e.st_mode, e.st_nlink = st.st_mode, st.st_nlink
            e.st_uid, e.st_gid, e.st_rdev = st.st_uid, st.st_gid, st.st_rdev
            e.st_size, e.st_blksize, e.st_blocks = st.st_size, st.st_blksize, st.st_blocks
            e.st_atime_ns, e.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
            e.st_ctime_ns = st.st_ctime_ns
            return e

        def remember(self, dirfd: int, name: str, count: bool = True
                     ) -> pyfuse3.EntryAttributes:
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            st = os.fstat(fd)
            ino = self.nodeid(st)
            node = self.nodes.get(ino)
            if node is None:
                node = self.nodes[ino] = Node(fd, stat.S_ISLNK(st.st_mode))
            else:
                os.close(fd)
            if count:
                node.nlookup += 1
            return self.entry(st)

        def dirty(self, ino: int, fd: int, nbytes: int) -> None:
            """``fd`` (any open file or O_PATH fd of node ``ino``) is about to change."""
            if not track:
                return
            have = self.journal.get(ino)
            if have is not None:
                self.journal[ino] = (have[0], have[1], have[2] + nbytes)
                return
            rfd = os.open(_proc(fd), os.O_RDONLY | os.O_CLOEXEC)
            try:
                chunks = []
                while True:
                    b = os.read(rfd, 1 << 20)
                    if not b:
                        break
                    chunks.append(b)
            finally:
                os.close(rfd)
            keep = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)
            self.journal[ino] = (keep, b"".join(chunks), nbytes)

        def synced(self, ino: int) -> None:
            have = self.journal.pop(ino, None)
            if have is not None:
                os.close(have[0])

        def power_cut(self) -> dict[str, Any]:
            reverted, lost = 0, 0
            for keep, data, nbytes in self.journal.values():
                path = _proc(keep)
                st = os.stat(path)
                try:
                    wfd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                except PermissionError:
                    os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
                    wfd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                    os.chmod(path, stat.S_IMODE(st.st_mode))
                try:
                    os.ftruncate(wfd, len(data))
                    off = 0
                    while off < len(data):
                        off += os.pwrite(wfd, data[off:], off)
                finally:
                    os.close(wfd)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
                os.close(keep)
                reverted += 1
                lost += nbytes
            self.journal.clear()
            self.dead = True
            return {"reverted": reverted, "lost_bytes": lost}

        def stats(self) -> dict[str, Any]:
            return {"calls": self.calls, "failed": self.failed,
                    "rules": [r.report() for r in self.rules],
                    "unsynced_files": len(self.journal),
                    "unsynced_bytes": sum(j[2] for j in self.journal.values())}

        # -- the filesystem ----------------------------------------------------------

        async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
            p = self.node(parent_inode)
            n = os.fsdecode(name)
            self.fault("lookup", lambda: [self.rel(p.fd, n)])
            return self.remember(p.fd, n)

        async def forget(self, inode_list: Any) -> None:
            for ino, n in inode_list:
                node = self.nodes.get(ino)
                if node is None or ino == pyfuse3.ROOT_INODE:
                    continue
                node.nlookup -= n
                if node.nlookup <= 0:
                    os.close(node.fd)
                    del self.nodes[ino]

        async def getattr(self, inode: int, ctx: Any) -> Any:
            node = self.node(inode)
            self.fault("getattr", lambda: [self.rel(node.fd)])
            return self.entry(os.fstat(node.fd))

        async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                          ctx: Any) -> Any:
            node = self.node(inode)
            self.fault("setattr", lambda: [self.rel(node.fd)])
            path = _proc(node.fd)
            if fields.update_size:
                self.dirty(inode, node.fd, 0)
                if fh is not None and fh in self.files:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                _check(_libc.fchownat(node.fd, b"", uid, gid,
                                      AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
            if fields.update_mode and not node.is_link:
                os.chmod(path, stat.S_IMODE(attr.st_mode))
            if fields.update_atime or fields.update_mtime:
                times = (_Timespec * 2)()
                for i, (on, ns) in enumerate(((fields.update_atime, attr.st_atime_ns),
                                              (fields.update_mtime, attr.st_mtime_ns))):
                    times[i].tv_sec, times[i].tv_nsec = divmod(ns, 10**9) if on \
                        else (0, UTIME_OMIT)
                # an O_PATH fd names the object itself only with AT_EMPTY_PATH
                _check(_libc.utimensat(node.fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
            return self.entry(os.fstat(node.fd))

        async def readlink(self, inode: int, ctx: Any) -> bytes:
            node = self.node(inode)
            self.fault("readlink", lambda: [self.rel(node.fd)])
            return os.fsencode(os.readlink("", dir_fd=node.fd))

        async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                        ctx: Any) -> Any:
            p, n = self.node(parent_inode), os.fsdecode(name)
            self.fault("mknod", lambda: [self.rel(p.fd, n)])
            os.mknod(n, mode, rdev, dir_fd=p.fd)
            return self.remember(p.fd, n)

        async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
            p, n = self.node(parent_inode), os.fsdecode(name)
            self.fault("mkdir", lambda: [self.rel(p.fd, n)])
            os.mkdir(n, mode, dir_fd=p.fd)
            return self.remember(p.fd, n)

        async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                          ctx: Any) -> Any:
            p, n = self.node(parent_inode), os.fsdecode(name)
            self.fault("symlink", lambda: [self.rel(p.fd, n)])
            os.symlink(target, n, dir_fd=p.fd)
            return self.remember(p.fd, n)

        async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
            p, n = self.node(parent_inode), os.fsdecode(name)
            self.fault("unlink", lambda: [self.rel(p.fd, n)])
            os.unlink(n, dir_fd=p.fd)

        async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
            p, n = self.node(parent_inode), os.fsdecode(name)
            self.fault("rmdir", lambda: [self.rel(p.fd, n)])
            os.rmdir(n, dir_fd=p.fd)

        async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                         name_new: bytes, flags: int, ctx: Any) -> None:
            po, pn = self.node(parent_inode_old), self.node(parent_inode_new)
            a, b = os.fsdecode(name_old), os.fsdecode(name_new)
            self.fault("rename", lambda: [self.rel(po.fd, a), self.rel(pn.fd, b)])
            if flags:
                _check(_libc.renameat2(po.fd, name_old, pn.fd, name_new, ctypes.c_uint(flags)))
            else:
                os.rename(a, b, src_dir_fd=po.fd, dst_dir_fd=pn.fd)

        async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                       ctx: Any) -> Any:
            node, p, n = self.node(inode), self.node(new_parent_inode), os.fsdecode(new_name)
            self.fault("link", lambda: [self.rel(node.fd), self.rel(p.fd, n)])
            # through /proc: linkat(AT_EMPTY_PATH) would need CAP_DAC_READ_SEARCH
            os.link(_proc(node.fd), n, dst_dir_fd=p.fd, follow_symlinks=True)
            return self.remember(p.fd, n)

        async def open(self, inode: int, flags: int, ctx: Any) -> Any:
            node = self.node(inode)
            self.fault("open", lambda: [self.rel(node.fd)])
            if flags & os.O_TRUNC:
                self.dirty(inode, node.fd, 0)
            fd = os.open(_proc(node.fd), (flags & ~_OPEN_DROP) | os.O_CLOEXEC)
            self.files[fd] = inode
            return pyfuse3.FileInfo(fh=fd)

        async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                         ctx: Any) -> Any:
            p, n = self.node(parent_inode), os.fsdecode(name)
            self.fault("create", lambda: [self.rel(p.fd, n)])
            fd = os.open(n, (flags & ~(_OPEN_DROP & ~(os.O_CREAT | os.O_EXCL))) | os.O_CREAT
                         | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=p.fd)
            try:
                e = self.remember(p.fd, n)
            except BaseException:
                os.close(fd)
                raise
            self.files[fd] = e.st_ino
            return pyfuse3.FileInfo(fh=fd), e

        async def read(self, fh: int, off: int, size: int) -> bytes:
            self.fault("read", lambda: [self.rel(fh)])
            return os.pread(fh, size, off)

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            self.fault("write", lambda: [self.rel(fh)])
            self.dirty(self.files[fh], fh, len(buf))
            return os.pwrite(fh, buf, off)

        async def fallocate(self, fh: int, mode: int, offset: int, length: int,
                            ctx: Any) -> None:
            self.fault("fallocate", lambda: [self.rel(fh)])
            self.dirty(self.files[fh], fh, 0)
            _check(_libc.fallocate(fh, mode, ctypes.c_int64(offset), ctypes.c_int64(length)))

        async def flush(self, fh: int) -> None:
            return None

        async def release(self, fh: int) -> None:
            self.files.pop(fh, None)
            os.close(fh)

        async def fsync(self, fh: int, datasync: bool) -> None:
            self.fault("fsync", lambda: [self.rel(fh)])
            (os.fdatasync if datasync else os.fsync)(fh)
            self.synced(self.files[fh])

        async def opendir(self, inode: int, ctx: Any) -> int:
            node = self.node(inode)
            self.fault("opendir", lambda: [self.rel(node.fd)])
            fh = self.next_dir
            self.next_dir += 1
            self.dirs[fh] = (inode, None)
            return fh

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            inode, names = self.dirs[fh]
            node = self.node(inode)
            self.fault("readdir", lambda: [self.rel(node.fd)])
            if names is None or start_id == 0:
                dfd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    names = sorted(os.listdir(dfd))
                finally:
                    os.close(dfd)
                self.dirs[fh] = (inode, names)
            for i in range(start_id, len(names)):
                try:
                    e = self.remember(node.fd, names[i], count=False)
                except FileNotFoundError:
                    continue
                if not pyfuse3.readdir_reply(token, os.fsencode(names[i]), e, i + 1):
                    break
                self.nodes[e.st_ino].nlookup += 1  # readdirplus counts a lookup

        async def releasedir(self, fh: int) -> None:
            self.dirs.pop(fh, None)

        async def fsyncdir(self, fh: int, datasync: bool) -> None:
            inode, _ = self.dirs[fh]
            node = self.node(inode)
            self.fault("fsyncdir", lambda: [self.rel(node.fd)])
            dfd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

        async def statfs(self, ctx: Any) -> Any:
            self.fault("statfs", lambda: ["."])
            sv = os.statvfs(_proc(self.nodes[pyfuse3.ROOT_INODE].fd))
            out = pyfuse3.StatvfsData()
            for f in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
                setattr(out, f, getattr(sv, f))
            return out

        async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any,
                           flags: int = 0) -> None:
            node, x = self.node(inode), os.fsdecode(name)
            self.fault("setxattr", lambda: [self.rel(node.fd)], x)
            if node.is_link:
                raise FUSEError(errno.EPERM)
            os.setxattr(_proc(node.fd), x, value, flags)

        async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
            node, x = self.node(inode), os.fsdecode(name)
            self.fault("getxattr", lambda: [self.rel(node.fd)], x)
            if node.is_link:
                raise FUSEError(errno.ENODATA)
            return os.getxattr(_proc(node.fd), x)

        async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
            node = self.node(inode)
            self.fault("listxattr", lambda: [self.rel(node.fd)])
            if node.is_link:
                return []
            return [os.fsencode(n) for n in os.listxattr(_proc(node.fd))]

        async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
            node, x = self.node(inode), os.fsdecode(name)
            self.fault("removexattr", lambda: [self.rel(node.fd)], x)
            if node.is_link:
                raise FUSEError(errno.ENODATA)
            os.removexattr(_proc(node.fd), x)

        async def access(self, inode: int, mode: int, ctx: Any) -> bool:
            return True

    def guarded(ops: Ops) -> None:
        """Every handler turns OSError into its errno and anything else into a logged
        EIO: an exception leaving a handler would end pyfuse3's main loop."""
        for name in ("lookup", "forget", "getattr", "setattr", "readlink", "mknod", "mkdir",
                     "symlink", "unlink", "rmdir", "rename", "link", "open", "create", "read",
                     "write", "fallocate", "flush", "release", "fsync", "opendir", "readdir",
                     "releasedir", "fsyncdir", "statfs", "setxattr", "getxattr", "listxattr",
                     "removexattr", "access"):
            fn = getattr(ops, name)

            async def wrapper(*args: Any, _fn: Any = fn, _name: str = name) -> Any:
                try:
                    return await _fn(*args)
                except FUSEError:
                    raise
                except OSError as e:
                    raise FUSEError(e.errno or errno.EIO) from None
                except Exception as e:  # noqa: BLE001 - reported, then EIO to the caller
                    print(f"faultfs: internal error in {_name}: {e!r}", file=sys.stderr,
                          flush=True)
                    raise FUSEError(errno.EIO) from None

            setattr(ops, name, wrapper)

    async def control(ops: Ops) -> None:
        stream = trio.lowlevel.FdStream(os.dup(0))
        buf = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return  # the test went away: keep serving until unmounted
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    cmd = json.loads(line)
                    what = cmd.get("cmd")
                    if what == "rules":
                        ops.rules = [Rule(r) for r in cmd.get("rules", [])]
                        reply: dict[str, Any] = {"ok": True}
                    elif what == "stats":
                        reply = ops.stats()
                    elif what == "power_cut":
                        reply = ops.power_cut()
                    else:
                        reply = {"error": f"unknown command {what!r}"}
                except Exception as e:  # noqa: BLE001 - a bad command is answered, not fatal
                    reply = {"error": repr(e)}
                os.write(1, json.dumps(reply).encode() + b"\n")

    os.umask(0)  # the kernel applied the caller's umask already
    ops = Ops()
    guarded(ops)
    opts = {"fsname=faultfs", "subtype=faultfs", "default_permissions"}
    if os.geteuid() == 0:
        opts.add("allow_other")
    pyfuse3.init(ops, mountpoint, opts)
    os.write(1, b'{"ready": true}\n')

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(control, ops)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)
    return 0


# --------------------------------------------------------------------------------------------------
# The tests' side
# --------------------------------------------------------------------------------------------------


def _mounted(path: str) -> bool:
    from unionfs import mounttable
    return mounttable.is_mounted(path)


class FaultFS:
    """A running faultfs over ``backing`` at ``mountpoint``; ``wrap`` prefixes the command
    (``as_user(...)`` for a plain user).  Use as a context manager, or call ``stop()``."""

    TIMEOUT = 15.0

    def __init__(self, backing: Path, mountpoint: Path, track: bool = False,
                 wrap: Callable[[list[str]], list[str]] | None = None,
                 python: str = sys.executable, unmount: list[str] | None = None) -> None:
        self.backing, self.mountpoint = backing, mountpoint
        self.unmount_cmd = unmount or ["fusermount3", "-u"]
        self.wrap = wrap or (lambda argv: argv)
        self.stderr_path = mountpoint.parent / f"{mountpoint.name}.faultfs.log"
        self._err = open(self.stderr_path, "w+b")  # noqa: SIM115 - closed in stop()
        argv = [python, str(FAULTFS), str(backing), str(mountpoint), *(["--track"] if track
                                                                      else [])]
        self.proc = subprocess.Popen(self.wrap(argv), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err,
                                     start_new_session=True)
        try:
            ready = self._reply()
            if not ready.get("ready") or not _mounted(str(mountpoint)):
                raise AssertionError(f"faultfs did not mount: {ready}")
        except BaseException:
            self.stop()
            raise

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], self.TIMEOUT)
        if not r:
            raise AssertionError(f"faultfs: no answer in {self.TIMEOUT}s\n{self.log()}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"faultfs exited ({self.proc.poll()}):\n{self.log()}")
        return dict(json.loads(line))

    def command(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        self.proc.stdin.flush()
        reply = self._reply()
        if "error" in reply:
            raise AssertionError(f"faultfs: {reply['error']}")
        return reply

    def rules(self, *rules: dict[str, Any]) -> None:
        self.command({"cmd": "rules", "rules": list(rules)})

    @contextlib.contextmanager
    def failing(self, *rules: dict[str, Any]) -> Iterator[None]:
        self.rules(*rules)
        try:
            yield
        finally:
            self.rules()

    def stats(self) -> dict[str, Any]:
        return self.command({"cmd": "stats"})

    def power_cut(self) -> dict[str, Any]:
        return self.command({"cmd": "power_cut"})

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""


    def stop(self) -> None:
        """Unmount (the caller stops what uses the mount first) and wait for the process;
        a lazy unmount and SIGKILL of our own process are the fallbacks.  Idempotent."""
        mp = str(self.mountpoint)
        if _mounted(mp):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                subprocess.run(self.wrap([*self.unmount_cmd, mp]), capture_output=True,
                               timeout=self.TIMEOUT, check=False)
        if _mounted(mp):
            for cmd in (["fusermount3", "-uz", mp], ["umount", "-l", mp]):
                with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                    subprocess.run(cmd, capture_output=True, timeout=self.TIMEOUT, check=False)
        try:
            self.proc.wait(timeout=self.TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=self.TIMEOUT)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if not self._err.closed:
            self._err.close()

    def __enter__(self) -> FaultFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_gone(path: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _mounted(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--track"]
    if len(args) != 2:
        sys.exit("usage: faultfs.py BACKING MOUNTPOINT [--track]")
    sys.exit(serve(args[0], args[1], "--track" in sys.argv[1:]))
