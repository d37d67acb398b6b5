"""What every filesystem operation works on: the layers, the inodes, the open handles."""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from unionfs.config import Features
from unionfs.errors import oserror
from unionfs.export import ExportLog
from unionfs.handles import HandleTable
from unionfs.idmap import Owners
from unionfs.inodes import Inode, InodeTable
from unionfs.layers import Layer, LayerStack
from unionfs.stats import Stats
from unionfs.whiteout import Dialect


@dataclass
class State:
    stack: LayerStack
    inodes: InodeTable
    handles: HandleTable[Inode] = field(default_factory=lambda: HandleTable())
    owners: Owners = field(default_factory=Owners)  # id translation at the edge
    stats: Stats = field(default_factory=Stats)  # requests counted (pyunionfs stats)
    volatile: bool = False  # fsync does nothing, copy-ups are not synced either
    # -o writeback: the kernel keeps written pages, sizes and times and sends them later.
    writeback: bool = False
    # POSIX ACLs are the kernel's to enforce (FUSE_POSIX_ACL) and ours to inherit: on where
    # the upper filesystem (or the top lower, read-only) has them, unless -o noacl.
    acl: bool = False
    noatime: bool = False  # -o noatime: upper files are opened O_NOATIME too (lowers always)
    atime: str = "relatime"  # our mount's atime policy: relatime, strictatime or noatime
    override_xattr: str | None = None  # owner/mode kept in this xattr (xattr_permissions)
    features: Features = field(default_factory=Features)  # redirect_dir=, index=, ...
    index: Layer | None = None  # WORK/index with index=on (unionfs/index.py)
    export: ExportLog | None = None  # nfs_export=on: where forgotten nodes were (export.py)
    epoch: int = 0  # moved on by every request that may change the layers (ops._guard)
    unmounted_here: bool = False  # our mount left our namespace's table (daemon._follow...)
    # Seconds the kernel may trust names and attributes (-o timeout=).  What changes
    # through the mount reaches the kernel in our replies; what changes behind a reply
    # (a copy-up's new ctime and blocks) is told with ``attrs_changed``.
    timeout: float = 86400.0
    attrs_changed: Callable[[int], None] = field(default=lambda ino: None)

    @property
    def dialect(self) -> Dialect:
        return self.stack.dialect

    @property
    def upper(self) -> Layer:
        if self.stack.upper is None:
            raise oserror(errno.EROFS)
        return self.stack.upper

    def check_writable(self) -> None:
        if self.stack.upper is None:
            raise oserror(errno.EROFS)
