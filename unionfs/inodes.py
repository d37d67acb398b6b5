"""Our inodes: numbers, lookup counts and where each object lives in the layers.

An inode number is also the FUSE node id (pyfuse3 ties them), so it must be
unique among live inodes and should stay the same for one object for the life
of the mount, across copy-up and across the kernel forgetting it.  We map the
real object (device, inode) to our number and remember the mapping until the
object is deleted.  Numbers are never reused, so the generation stays 0.

All names of one real file share one inode, as under the kernel.  FUSE names
only the node on open/setattr, so when a lower file with several names the
kernel knows of is copied up, copyup.py links the copy into all those names.
"""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import trio

from unionfs.layers import Layer
from unionfs.lookup import Resolution, join

if TYPE_CHECKING:
    from unionfs.handles import FileHandle

ROOT_INO = 1
Key = tuple[int, int, int]


class Inode:
    __slots__ = ("ino", "parent", "name", "aliases", "mode", "layer", "dirs", "key",
                 "lookups", "handles", "_lock", "kids", "gone", "gone_st", "__weakref__")

    def __init__(self, ino: int, parent: Inode | None, name: str, res: Resolution,
                 key: Key) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.aliases: set[tuple[Inode, str]] = set()  # other names of an upper hard link
        self.mode = res.st.st_mode
        self.layer: Layer = res.layer
        self.dirs: list[Layer] = res.dirs
        self.key = key
        self.lookups = 0
        self.handles: set[FileHandle] = set()
        self._lock: trio.Lock | None = None
        self.kids = 0  # live children that name us as parent: keeps our path valid
        self.gone = False  # every name removed; reachable only through open handles
        self.gone_st: os.stat_result | None = None  # its attributes when the last name went

    @property
    def lock(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def in_upper(self) -> bool:
        return self.layer.upper

    @property
    def path(self) -> str:
        names: list[str] = []
        node: Inode | None = self
        while node is not None and node.parent is not None:
            names.append(node.name)
            node = node.parent
        return "/".join(reversed(names))

    @property
    def parent_path(self) -> str:
        return self.parent.path if self.parent is not None else ""

    @property
    def lowers(self) -> list[Layer]:
        """The lower layers of a directory (what lies below upper)."""
        return [d for d in self.dirs if not d.upper]

    @property
    def merged(self) -> bool:
        """A directory that shows more than one layer, or a lower layer through upper."""
        return len(self.dirs) > 1

    def child_path(self, name: str) -> str:
        return join(self.path, name)

    def __repr__(self) -> str:
        return f"<Inode {self.ino} /{self.path} {self.layer}>"


def object_key(res: Resolution) -> Key:
    # The layer is part of the identity: layers made with `cp -al` share real inodes, yet each
    # name must be copied up from its own layer.
    return (res.layer.index, res.st.st_dev, res.st.st_ino)


class InodeTable:
    def __init__(self, root: Resolution) -> None:
        self.inodes: dict[int, Inode] = {}
        self.ino_of: dict[Key, int] = {}
        self._next = ROOT_INO + 1
        self.root = Inode(ROOT_INO, None, "", root, object_key(root))
        self.root.lookups = 1  # the kernel never forgets the root
        self.inodes[ROOT_INO] = self.root
        self.ino_of[self.root.key] = ROOT_INO

    def __getitem__(self, ino: int) -> Inode:
        return self.inodes[ino]

    def get(self, ino: int) -> Inode | None:
        return self.inodes.get(ino)

    def bind(self, parent: Inode, name: str, res: Resolution) -> Inode:
        """The inode for ``name`` in ``parent`` as just resolved (no lookup counted)."""
        key = object_key(res)
        ino = self.ino_of.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self.ino_of[key] = ino
        node = self.inodes.get(ino)
        if node is None:
            node = Inode(ino, parent, name, res, key)
            parent.kids += 1
            self.inodes[ino] = node
            return node
        # Refresh what may have changed since (copy-up, a new layer below a dir).
        node.layer, node.dirs, node.mode = res.layer, res.dirs, res.st.st_mode
        if node.gone:
            self._move(node, parent, name)  # its old name went away; this one is live
            if (parent, name) in node.aliases:
                node.aliases.discard((parent, name))
                parent.kids -= 1
        elif node.parent is not parent or node.name != name:
            if node.is_dir:
                self._move(node, parent, name)  # a directory has exactly one name
            elif (parent, name) not in node.aliases:
                node.aliases.add((parent, name))  # another name of the same file
                parent.kids += 1
        node.gone = False
        return node

    def _move(self, node: Inode, parent: Inode, name: str) -> None:
        if node.parent is not None:
            node.parent.kids -= 1
        parent.kids += 1
        node.parent, node.name = parent, name

    def rekey(self, node: Inode, res: Resolution) -> None:
        """The object now lives elsewhere (copy-up): same number, new real object."""
        old = node.key
        node.key = object_key(res)
        node.layer, node.mode = res.layer, res.st.st_mode
        if res.dirs:
            node.dirs = res.dirs
        self.ino_of[node.key] = node.ino
        if old != node.key and self.ino_of.get(old) == node.ino:
            del self.ino_of[old]

    def renamed(self, node: Inode, old_parent: Inode, old_name: str, new_parent: Inode,
                new_name: str) -> None:
        if node.parent is old_parent and node.name == old_name:
            self._move(node, new_parent, new_name)
        elif (old_parent, old_name) in node.aliases:
            node.aliases.discard((old_parent, old_name))
            node.aliases.add((new_parent, new_name))
            old_parent.kids -= 1
            new_parent.kids += 1

    def unlinked(self, node: Inode, parent: Inode, name: str, last_link: bool,
                 st: os.stat_result | None = None) -> None:
        """``name`` no longer leads to ``node``; when the real object is gone too, its
        number must not be handed to a new object that reuses the real inode."""
        if (parent, name) in node.aliases:
            node.aliases.discard((parent, name))
            parent.kids -= 1
        elif node.aliases:
            # Promote another name so that path-based calls keep working.
            new_parent, new_name = node.aliases.pop()
            self._move(node, new_parent, new_name)
            new_parent.kids -= 1  # _move counted it a second time
        else:
            node.gone = True
            node.gone_st = st
        if last_link and self.ino_of.get(node.key) == node.ino:
            del self.ino_of[node.key]

    def forget(self, ino: int, n: int) -> None:
        node = self.inodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= n
        self._maybe_drop(node)

    def _maybe_drop(self, node: Inode) -> None:
        while node.lookups <= 0 and node.kids <= 0 and not node.handles \
                and node.ino != ROOT_INO:
            del self.inodes[node.ino]
            parent = node.parent
            for p, _ in node.aliases:
                p.kids -= 1
                self._maybe_drop(p)
            if parent is None:
                return
            parent.kids -= 1
            node = parent

    def drop_if_unused(self, node: Inode) -> None:
        self._maybe_drop(node)

    def release_handle(self, node: Inode, fh: FileHandle) -> None:
        node.handles.discard(fh)
        self._maybe_drop(node)
