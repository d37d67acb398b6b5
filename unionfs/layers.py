"""Layers: each one a directory reached only through its root fd and relative paths."""

from __future__ import annotations

import errno
import os
import resource
from collections import OrderedDict
from dataclasses import dataclass

from unionfs import sysio
from unionfs.whiteout import KERNEL, Dialect

# Directory fds kept open for fast *at() calls; bounded so that a huge tree can't
# exhaust file descriptors (fuse-overlayfs #210): a quarter of what we may open.  Too few
# and a walk of a big tree reopens every directory of every layer at each visit.
DIRFD_CACHE_MIN, DIRFD_CACHE_MAX = 256, 65536
# Paths up to this many characters go to openat2 in one piece: at 4 bytes a character
# at most they stay below PATH_MAX (4096).  Longer ones are walked (a 2000-deep tree).
SHORT_PATH = 1000


def dirfd_cache_size() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    limit = hard if soft == resource.RLIM_INFINITY else soft
    return max(DIRFD_CACHE_MIN, min(DIRFD_CACHE_MAX, limit // 4))


@dataclass(eq=False)
class Layer:
    index: int  # 0 is the top: upper when there is one, else the first lower
    path: str
    fd: int  # O_PATH fd of the layer root
    dev: int
    upper: bool
    # WORK/index (index=on): entries named by their origin, each an upper inode shown
    # for the lower names not linked to it yet; the upper's index, for one identity.
    entries: bool = False

    def __repr__(self) -> str:
        return f"<Layer {self.index} {'upper' if self.upper else 'lower'} {self.path}>"


class LayerStack:
    def __init__(self, lowers: list[str], upper: str | None, work: str | None) -> None:
        self.layers: list[Layer] = []
        paths = ([upper] if upper is not None else []) + lowers
        for i, p in enumerate(paths):
            fd = sysio.open_root(p)
            self.layers.append(Layer(i, p, fd, os.fstat(fd).st_dev,
                                     upper is not None and i == 0))
        self.upper: Layer | None = self.layers[0] if upper is not None else None
        self.lowers = self.layers[1:] if upper is not None else self.layers
        self.workroot_fd = sysio.open_root(work) if work is not None else -1
        self.work_path = work
        self.work_fd = -1  # WORK/work, set up by probe.prepare_workdir
        self.mount_fd = -1  # our private clone of UPPER's mount (own_upper_mount)
        self.claim_fds: list[int] = []  # the exclusive claim on UPPER and WORK (claim.py)
        # How markers are read and written; probe.prepare_workdir picks it for the upper.
        self.dialect: Dialect = KERNEL
        # Lookups go on where a directory's overlay.redirect points (redirect_dir= other
        # than nofollow), as the kernel's do.
        self.follow_redirects = True
        self.list_noatime = False  # -o nodiratime/noatime: listings leave dir atimes alone
        self._dirfds: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._dirfd_max = dirfd_cache_size()

    def own_upper_mount(self, atime: str, nodiratime: bool) -> str | None:
        """Reach UPPER and WORK through a private clone of their mount with the atime
        policy of ours, as the kernel's overlay does (its private upper mount drops the
        upper's own atime flags): the upper's relatime must not stand in for our
        strictatime.  Before anything else opens beneath them (a rename between WORK and
        UPPER needs both on one mount).  None when done, else why not (unprivileged:
        then the upper filesystem's own policy applies)."""
        if self.upper is None or self.workroot_fd < 0 or self.work_path is None:
            return "no upper layer"
        assert not self._dirfds and self.work_fd < 0, "nothing may be open beneath them yet"
        upper, work = os.path.realpath(self.upper.path), os.path.realpath(self.work_path)
        common = os.path.commonpath([upper, work])
        try:
            base = sysio.open_root(common)
        except OSError as e:
            return e.strerror
        try:
            mnt = sysio.clone_mount(base)
        except OSError as e:
            return e.strerror
        finally:
            os.close(base)
        opened: list[int] = []
        try:
            sysio.set_mount_atime(mnt, atime, nodiratime)
            for path, old in ((upper, self.upper.fd), (work, self.workroot_fd)):
                rel = os.path.relpath(path, common)
                opened.append(sysio.open_dir_beneath(mnt, "" if rel == "." else rel))
                a, b = os.fstat(opened[-1]), os.fstat(old)
                if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
                    raise OSError(errno.ESTALE, f"{path} changed while it was opened")
        except OSError as e:
            for fd in (*opened, mnt):
                os.close(fd)
            return e.strerror
        os.close(self.upper.fd)
        os.close(self.workroot_fd)
        self.upper.fd, self.workroot_fd = opened
        self.mount_fd = mnt
        return None

    def set_atime(self, atime: str, nodiratime: bool) -> None:
        """A remount changed our atime flags: the private upper mount follows."""
        if self.mount_fd >= 0:
            sysio.set_mount_atime(self.mount_fd, atime, nodiratime)

    def dirfd(self, layer: Layer, relpath: str) -> int:
        """O_PATH fd of directory ``relpath`` in ``layer``; owned by the cache, don't close.

        Raises ENOENT/ENOTDIR when absent, ELOOP when a component is a symlink."""
        if not relpath:
            return layer.fd
        key = (layer.index, relpath)
        fd = self._dirfds.get(key)
        if fd is not None:
            self._dirfds.move_to_end(key)
            return fd
        if len(relpath) <= SHORT_PATH:
            fd = sysio.open_dir_beneath(layer.fd, relpath)
        else:
            fd = self._open_long(layer, relpath)
        self._dirfds[key] = fd
        if len(self._dirfds) > self._dirfd_max:
            _, old = self._dirfds.popitem(last=False)
            os.close(old)
        return fd

    def _open_long(self, layer: Layer, relpath: str) -> int:
        """A directory deeper than PATH_MAX allows in one call: from its parent's cached
        fd (a walk down the tree has it), else from the root one chunk at a time."""
        parent, _, name = relpath.rpartition("/")
        pfd = self._dirfds.get((layer.index, parent))
        if pfd is not None:
            return sysio.open_dir_beneath(pfd, name)
        fd = layer.fd
        rest = relpath
        try:
            while rest:
                cut = rest.rfind("/", 0, SHORT_PATH) if len(rest) > SHORT_PATH else len(rest)
                if cut <= 0:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
                nfd = sysio.open_dir_beneath(fd, rest[:cut])
                if fd != layer.fd:
                    os.close(fd)
                fd, rest = nfd, rest[cut + 1:]
        except BaseException:
            if fd != layer.fd:
                os.close(fd)
            raise
        return fd

    def dirfd_or_none(self, layer: Layer, relpath: str) -> int | None:
        try:
            return self.dirfd(layer, relpath)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
                return None
            raise

    def forget_upper_path(self, relpath: str, subtree: bool = True) -> None:
        """Drop cached fds at and below ``relpath`` in upper (it was renamed or removed).
        ``subtree=False`` for a directory removed empty: it had no cached subdirectory
        left (each went with its own rmdir), and a scan of the whole cache per rmdir made
        `rm -rf` of a big tree quadratic."""
        if self.upper is None:
            return
        idx = self.upper.index
        if not subtree:
            fd = self._dirfds.pop((idx, relpath), None)
            if fd is not None:
                os.close(fd)
            return
        prefix = relpath + "/"
        for key in [k for k in self._dirfds
                    if k[0] == idx and (k[1] == relpath or k[1].startswith(prefix))]:
            os.close(self._dirfds.pop(key))

    def drop_dirfds(self) -> None:
        """Close every cached directory fd: the kernel forgot what it held, and their keys
        would keep the memory of a whole walk from going back (see InodeTable.compact)."""
        for fd in self._dirfds.values():
            os.close(fd)
        self._dirfds = OrderedDict()

    def close(self) -> None:
        self.drop_dirfds()
        for layer in self.layers:
            os.close(layer.fd)
        for fd in (self.work_fd, self.workroot_fd, self.mount_fd, *self.claim_fds):
            if fd >= 0:
                os.close(fd)
        self.claim_fds = []
