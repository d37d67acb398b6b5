"""Open file and directory handles, and moving file handles to upper after copy-up."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from unionfs.idmap import Caller
    from unionfs.layers import Layer
    from unionfs.readdir import Entry


class _Node(Protocol):
    def add_handle(self, fh: Any) -> None: ...


# The inode type (inodes.Inode): a parameter, so that this module never imports inodes,
# which keeps a node's handles (inodes imports this one).
N = TypeVar("N", bound=_Node)


class FileHandle(Generic[N]):
    __slots__ = ("fh", "inode", "fd", "flags", "layer", "setid_caller")

    def __init__(self, fh: int, inode: N, fd: int, flags: int, layer: Layer) -> None:
        self.fh = fh
        self.inode = inode
        self.fd = fd
        self.flags = flags
        self.layer = layer
        # Who opened it, while the first write must still drop a set-gid bit that FUSE
        # leaves alone (attrs.sgid_needs_us); None otherwise, so writes check one slot.
        self.setid_caller: Caller | None = None

    def switch(self, fd: int, layer: Layer) -> None:
        """Point this handle at the upper copy: a reader that opened the lower file
        before somebody else copied it up must see the new data (kernel file.c)."""
        old, self.fd, self.layer = self.fd, fd, layer
        os.close(old)


class DirHandle(Generic[N]):
    __slots__ = ("fh", "inode", "entries", "epoch", "paths", "dirs")

    def __init__(self, fh: int, inode: N) -> None:
        self.fh = fh
        self.inode = inode
        self.entries: list[Entry] | None = None  # built on the first read at offset 0
        self.epoch = -1  # State.epoch when they were built
        # Where they were read: entries name positions among these layers.
        self.paths: list[str] = []
        self.dirs: list[Layer] = []


class HandleTable(Generic[N]):
    def __init__(self) -> None:
        self._next = 1
        self.files: dict[int, FileHandle[N]] = {}
        self.dirs: dict[int, DirHandle[N]] = {}

    def _alloc(self) -> int:
        fh = self._next
        self._next += 1
        return fh

    def add_file(self, inode: N, fd: int, flags: int, layer: Layer) -> FileHandle[N]:
        h = FileHandle(self._alloc(), inode, fd, flags, layer)
        self.files[h.fh] = h
        inode.add_handle(h)
        return h

    def add_dir(self, inode: N) -> DirHandle[N]:
        h = DirHandle(self._alloc(), inode)
        self.dirs[h.fh] = h
        return h
