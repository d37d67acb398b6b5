"""Our inodes: numbers, lookup counts and where each object lives in the layers.

An inode number is also the FUSE node id (pyfuse3 ties them), so it must be
unique among live inodes, and it must stay the same for one object for the life
of the mount, across copy-up and across the kernel forgetting it.  So it is
computed from the real object: the real st_ino where all layers share one
filesystem (as the kernel's overlay shows it), with the device's ordinal in the
high bits for a second filesystem.  Only the exceptions are remembered: a
copied-up object keeps its lower number, and two layers sharing a real inode
(`cp -al`) or a number still held by a removed object get a number of their own.
What the kernel forgets is forgotten here too, so memory follows the kernel's cache.

All names of one real file share one inode, as under the kernel, except the names
of a lower file with several links: without index the kernel keeps one inode per
name, all showing the lower number, and a copy-up breaks the one name it came
through away from the others; with index the names share one inode, yet a copy-up
links up only the name it came through.  FUSE names only the node on open/setattr,
so each such name gets a node id of its own (``split``), the number shown kept
apart from it (EntryAttributes.nodeid, scripts/pyfuse3-unionfs.patch); with index
the nodes of one file are ``siblings`` that see each other's changes.  A stock
pyfuse3 can't: copyup.py then links a copy into every name of its inode.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from unionfs.layers import Layer
from unionfs.lookup import Resolution, join

if TYPE_CHECKING:
    from unionfs.handles import FileHandle
    from unionfs.readdir import LowerIndex

ROOT_INO = 1
# A real object: its source (layer and device, as a small ordinal) in the bits above 64,
# the real st_ino below.  The layer is part of the identity: layers made with `cp -al`
# share real inodes, yet each name must be copied up from its own layer.
Key = int
INO_BITS = 48  # real inode numbers above this, or a device past the first: see number()
# Numbers for the exceptions count down from the top, above every natural number (the
# device ordinal 2**15-1 is never used for those).
TOP_INO = (1 << 63) - 1


def counted(number: int) -> bool:
    """A number counted out by this mount (an exception), not computed from a real object."""
    return number >> INO_BITS >= (1 << (63 - INO_BITS)) - 1


_NO_DIRS: list[Layer] = []  # shared by every non-directory; never changed in place
_NONE: frozenset[Any] = frozenset()  # aliases/handles until there is one
# Moves of directories so far: a remembered path older than this is stale (Inode.path).
_MOVES = [0]
# Paths of this many forgotten inodes are kept, so that a file handle (open_by_handle_at)
# can still be opened after the kernel forgot its inode (see InodeTable.recall).
RECALL = 4096


class Inode:
    __slots__ = ("ino", "parent", "name", "aliases", "mode", "layer", "dirs", "key",
                 "lookups", "handles", "_lock", "kids", "gone", "gone_st", "index",
                 "probes", "_path", "_path_gen", "lpaths", "impure", "data", "kept")

    def __init__(self, ino: int, parent: Inode | None, name: str, res: Resolution,
                 key: Key) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        # Other names of an upper hard link; a shared empty set until there is one
        # (most inodes never have one: 216 bytes each saved).
        self.aliases: set[tuple[Inode, str]] = _NONE  # type: ignore[assignment]
        self.mode = res.st.st_mode
        self.layer: Layer = res.layer
        self.dirs: list[Layer] = res.dirs or _NO_DIRS
        # A directory's real path in each of its lower layers: one string when they all
        # agree (nearly always), else one per entry of ``dirs``.  Kept apart from the
        # merged path, which a rename of any directory above changes: these never do.
        self.lpaths = lower_paths(res)
        # A directory's upper copy holds copies with an origin (overlay.impure): None
        # until asked.
        self.impure: bool | None = None
        self.data = res.data  # a metacopy's data below (layer, directory path, name)
        self.key = key
        self.lookups = 0
        self.handles: set[FileHandle[Inode]] = _NONE  # type: ignore[assignment]
        self._lock: trio.Lock | None = None
        self.kids = 0  # live children that name us as parent: keeps our path valid
        self.gone = False  # every name removed; reachable only through open handles
        self.gone_st: os.stat_result | None = None  # its attributes when the last name went
        # Gone, no handle, still held by the kernel: an fd of the real file (-1: none),
        # for an open that was on its way when the last name went (InodeTable.unlinked).
        self.kept = -1
        self.index: LowerIndex | None = None  # a many-layer directory's names (dirops)
        self.probes = 0  # lookups in this directory without an index
        # A directory's path, valid while _path_gen is _MOVES[0] (see path).
        self._path = ""
        self._path_gen = -1

    @property
    def lock(self) -> trio.Lock:
        if self._lock is None:
            self._lock = trio.Lock()
        return self._lock

    def add_alias(self, parent: Inode, name: str) -> None:
        if not self.aliases:
            self.aliases = set()
        self.aliases.add((parent, name))

    def drop_alias(self, parent: Inode, name: str) -> None:
        if self.aliases:
            self.aliases.discard((parent, name))

    def add_handle(self, fh: FileHandle[Inode]) -> None:
        if not self.handles:
            self.handles = set()
        self.handles.add(fh)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def in_upper(self) -> bool:
        return self.layer.upper

    @property
    def path(self) -> str:
        """The path below the layer roots.  Directories remember theirs until any
        directory moves: walking up from each node every time made a walk of a tree
        N deep cost N² steps.  Iterative, for trees deeper than Python's stack."""
        gen = _MOVES[0]
        chain: list[Inode] = []
        node = self
        base = ""
        while node.parent is not None:
            if node._path_gen == gen:
                base = node._path
                break
            chain.append(node)
            node = node.parent
        for n in reversed(chain):
            base = f"{base}/{n.name}" if base else n.name
            if n.is_dir:
                n._path, n._path_gen = base, gen
        return base

    @property
    def parent_path(self) -> str:
        return self.parent.path if self.parent is not None else ""

    @property
    def lowers(self) -> list[Layer]:
        """The lower layers of a directory (what lies below upper).  Upper can only be
        the first, so a slice: this runs on every lookup, over up to 500 layers."""
        dirs = self.dirs
        return dirs[1:] if dirs and dirs[0].upper else dirs

    @property
    def merged(self) -> bool:
        """A directory that shows more than one layer, or a lower layer through upper."""
        return len(self.dirs) > 1

    def child_path(self, name: str) -> str:
        return join(self.path, name)

    def layer_paths(self) -> list[str]:
        """The directory's real path in each of ``dirs``."""
        dirs, lp = self.dirs, self.lpaths
        out = [lp] * len(dirs) if isinstance(lp, str) else list(lp)
        if dirs and dirs[0].upper:
            out[0] = self.path
        return out

    def path_in(self, layer: Layer) -> str:
        """The directory's real path in ``layer``, one of its ``dirs``."""
        if layer.upper:
            return self.path
        lp = self.lpaths
        return lp if isinstance(lp, str) else lp[self.dirs.index(layer)]

    @property
    def real_parent_path(self) -> str:
        """Where the topmost real object behind us lives in ``layer``: our parent's
        copy there (its lower path, when a moved directory took us along)."""
        return self.parent.path_in(self.layer) if self.parent is not None else ""

    def real_entry(self) -> tuple[Layer, str, str]:
        """Where the topmost real object behind us lives: (layer, directory there, name).
        An index entry (index=on) has a name of its own there, kept in ``lpaths``."""
        if self.layer.entries:
            return self.layer, "", str(self.lpaths)
        return self.layer, self.real_parent_path, self.name

    def __repr__(self) -> str:
        return f"<Inode {self.ino} /{self.path} {self.layer}>"


def lower_paths(res: Resolution) -> str | tuple[str, ...]:
    """Inode.lpaths for a resolution: upper's entry is never read (the merged path)."""
    paths, dirs = res.paths, res.dirs
    if not dirs:
        return paths[0] if res.layer.entries else ""
    first = 1 if dirs[0].upper else 0
    if first >= len(dirs):
        return ""  # upper alone
    if len(paths) != len(dirs):
        raise ValueError(f"{len(dirs)} layers, {len(paths)} paths")
    one = paths[first]
    if all(p == one for p in paths[first + 1:]):
        return one
    return tuple(paths)


class InodeTable:
    def __init__(self, root: Resolution, devices: Iterable[int] = ()) -> None:
        self.inodes: dict[int, Inode] = {}
        # Called with each inode the kernel forgets (nfs_export=on: ops records where it
        # was, export.py); the recall map serves otherwise.
        self.forgotten: Callable[[Inode], None] | None = None
        # Numbers that are not the natural one (see number()): copied-up objects, clashes.
        self.ino_of: dict[Key, int] = {}
        self._sources: dict[tuple[int, int], int] = {}  # (layer index, st_dev) -> ordinal
        self._devices: dict[int, int] = {}  # st_dev -> ordinal, 0 for the first one seen
        self._next = TOP_INO  # numbers handed out for the exceptions, downwards
        self._peak = 0  # most inodes held since the last compact()
        self._recall: dict[int, str] = {}  # forgotten number -> its path then, oldest first
        # Live inodes whose number comes from another object (Resolution.shown: a merged
        # directory's lower, a copy's origin), by key: what a lookup learned once holds
        # while the kernel keeps the inode, so it isn't asked of the disk again.
        self._shown: dict[Key, int] = {}
        # Bound by a listing although their lookup failed (ops.readdirplus): the next lookup
        # must read their marks again instead of trusting what the inode holds.
        self.unsettled: set[int] = set()
        # Files written with O_DIRECT since an open last dropped their page cache: the
        # kernel's FUSE client leaves pages stale after an asynchronous direct write.
        self.dio_written: set[int] = set()
        # One node per name for the names of a lower file with several links (see the module
        # docstring), when set: node id -> (number shown, its entry in _names or None once
        # copied up); (key, parent node id, name) -> node id.
        self.split = False
        self.shown_as: dict[int, tuple[int, tuple[Key, int, str] | None]] = {}
        self._names: dict[tuple[Key, int, str], int] = {}
        self._by_key: dict[Key, set[int]] = {}  # such nodes, by the real object they show
        # Device ordinals in layer order (the root's first), not in the order objects are
        # met: the same layers give every object the same number at every mount.
        for dev in (root.st.st_dev, *devices):
            self._devices.setdefault(dev, len(self._devices))
        self.root = Inode(ROOT_INO, None, "", root, self.key_of(root))
        self.root.lookups = 1  # the kernel never forgets the root
        self.inodes[ROOT_INO] = self.root
        self.ino_of[self.root.key] = ROOT_INO

    def key_of(self, res: Resolution) -> Key:
        return self._key(res.layer.index, res.st.st_dev, res.st.st_ino)

    def _key(self, layer_index: int, dev: int, ino: int) -> Key:
        src = (layer_index, dev)
        sid = self._sources.get(src)
        if sid is None:
            sid = self._sources[src] = len(self._sources) + 1
        return sid << 64 | ino

    def _natural(self, key: Key, dev: int) -> int:
        """The number an object gets unless it is an exception: its real st_ino on the
        first device, the device's ordinal above bit 48 on others; 0 if none fits."""
        return self._natural_ino(key & ((1 << 64) - 1), dev)

    def natural_of(self, res: Resolution) -> int:
        """The natural number of what the overlay shows for ``res``: the object itself,
        or the one it shows the number of (a merged directory's lower, a copy's origin)."""
        if res.shown is not None:
            return self._natural_ino(res.shown[1], res.shown[0])
        return self._natural_ino(res.st.st_ino, res.st.st_dev)

    def _natural_ino(self, ino: int, dev: int) -> int:
        dno = self._devices.get(dev)
        if dno is None:
            dno = self._devices[dev] = len(self._devices)
        if ino >= 1 << INO_BITS or dno >= (1 << (63 - INO_BITS)) - 1 or ino <= ROOT_INO:
            return 0
        return dno << INO_BITS | ino

    def number(self, res: Resolution) -> tuple[Key, int, Inode | None]:
        """(key, number, live inode or None) for a resolved object."""
        key = self.key_of(res)
        ino, node = self._known(key, self.natural_of(res))
        if not ino:
            ino = self._next
            self._next -= 1
            self.ino_of[key] = ino
        return key, ino, node

    def _known(self, key: Key, natural: int) -> tuple[int, Inode | None]:
        """The number the object of ``key`` shows (an exception remembered, else its
        ``natural`` one) and its live inode; (0, None) where that number is taken: by the
        same real inode in another layer, or by a removed object still open whose real
        inode was reused (number() then gives it a number of its own, kept)."""
        ino = self.ino_of.get(key) or self._shown.get(key) or natural
        node = self.inodes.get(ino) if ino else None
        if node is not None and node.key != key:
            return 0, None
        return ino, node

    def shown_number(self, res: Resolution) -> int:
        """The st_ino the object of ``res`` shows, binding no node (a plain READDIR's
        d_ino); 0 where only a node of its own tells (a name of a lower file with several
        links)."""
        if self.split and res.st.st_nlink > 1 and not res.layer.upper and not res.is_dir:
            return 0
        _key, ino, node = self.number(res)
        return ino if node is None else self.number_of(node)

    def lower_number(self, layer: Layer, ino: int) -> int:
        """The st_ino a lower layer's object with real inode ``ino`` shows, from its d_ino
        alone (a plain READDIR entry's), or 0 where more must be known."""
        return self._known(self._key(layer.index, layer.dev, ino),
                           self._natural_ino(ino, layer.dev))[0]

    def same_number(self, res: Resolution, node: Inode) -> None:
        """``res`` is another name of ``node`` (a new hard link): the same number."""
        self.ino_of[self.key_of(res)] = node.ino

    def holds(self, layer: Layer, st: os.stat_result) -> bool:
        """Is this real object one of our live inodes (so it is known not to be a whiteout)?"""
        sid = self._sources.get((layer.index, st.st_dev))
        return sid is not None and self._held(sid << 64 | st.st_ino, st.st_dev) is not None

    def live(self, res: Resolution, parent: Inode | None = None, name: str = ""
             ) -> Inode | None:
        """The inode the kernel holds for this resolved object, if any (for a name of a lower
        file with several links, the one of ``name`` in ``parent``)."""
        key = self.key_of(res)
        if self._names and parent is not None and res.st.st_nlink > 1 and not res.is_dir:
            nid = self._names.get((key, parent.ino, name))
            if nid is not None:
                node = self.inodes.get(nid)
                return node if node is not None and node.key == key else None
        ino = self.ino_of.get(key) or self._shown.get(key) or self.natural_of(res)
        node = self.inodes.get(ino) if ino else None
        return node if node is not None and node.key == key else None

    def _held(self, key: Key, dev: int) -> Inode | None:
        ino = self.ino_of.get(key) or self._natural(key, dev)
        node = self.inodes.get(ino) if ino else None
        return node if node is not None and node.key == key else None

    def __getitem__(self, ino: int) -> Inode:
        return self.inodes[ino]

    def get(self, ino: int) -> Inode | None:
        return self.inodes.get(ino)

    def number_of(self, node: Inode) -> int:
        """The st_ino a node shows: its node id, unless it is one of several names."""
        if self.shown_as:
            shown = self.shown_as.get(node.ino)
            if shown is not None:
                return shown[0]
        return node.ino

    def _bind_name(self, parent: Inode, name: str, res: Resolution) -> Inode:
        """A name of a lower file with several links: a node of its own, kept for the name."""
        key = self.key_of(res)
        entry = (key, parent.ino, name)
        nid = self._names.get(entry)
        node = self.inodes.get(nid) if nid else None
        if node is not None and node.key == key:
            node.layer, node.mode, node.data = res.layer, res.st.st_mode, res.data
            node.lpaths = lower_paths(res)
            node.gone = False
            return node
        nid = self._next
        self._next -= 1
        node = Inode(nid, parent, name, res, key)
        parent.kids += 1
        self.inodes[nid] = node
        self._names[entry] = nid
        self.shown_as[nid] = (self.natural_of(res) or nid, entry)
        self._by_key.setdefault(key, set()).add(nid)
        return node

    def siblings(self, node: Inode) -> list[Inode]:
        """The other nodes showing the same real object as ``node`` (names of an indexed
        hard link not linked up yet): what changes through one changes for them."""
        nids = set(self._by_key.get(node.key, ())) if self._by_key else set()
        for held in (self.ino_of.get(node.key), self._shown.get(node.key)):
            if held is not None:
                nids.add(held)
        nids.discard(node.ino)
        return [self.inodes[n] for n in nids if n in self.inodes]

    def keep_cache(self, node: Inode) -> bool:
        """Whether an open of ``node`` (its handle added already) may keep the kernel's
        page cache.  Not while anyone holds it open for direct writes, nor at the first
        open after: an asynchronous direct write (AIO, io_uring) doesn't invalidate the
        pages a buffered reader may have filled meanwhile (xfstests generic/451)."""
        if any(h.flags & os.O_DIRECT and h.flags & os.O_ACCMODE != os.O_RDONLY
               for h in node.handles):
            self.dio_written.add(node.ino)
            return False
        if self.dio_written and node.ino in self.dio_written:
            self.dio_written.discard(node.ino)
            return False
        return True

    def has_siblings(self, node: Inode) -> bool:
        """siblings(node) is not empty, without building it (asked at every write)."""
        if not self._by_key:
            return False
        nids = self._by_key.get(node.key)
        if nids and (len(nids) > 1 or node.ino not in nids):
            return True
        return bool(nids) and any(held not in (None, node.ino) for held in (
            self.ino_of.get(node.key), self._shown.get(node.key)))

    def repoint(self, old: Key, res: Resolution) -> list[Inode]:
        """The lower file behind ``old`` got an index entry (``res``): the nodes of its
        other names show that now (index=on)."""
        nids = self._by_key.pop(old, None) if self._by_key else None
        if not nids:
            return []
        key = self.key_of(res)
        moved = []
        for nid in nids:
            node = self.inodes.get(nid)
            shown = self.shown_as.get(nid)
            if node is None or shown is None or shown[1] is None:
                continue
            node.key, node.layer, node.mode = key, res.layer, res.st.st_mode
            node.lpaths, node.data = lower_paths(res), res.data
            if self._names.get(shown[1]) == nid:
                del self._names[shown[1]]
            entry = (key, shown[1][1], shown[1][2])
            self._names[entry] = nid
            self.shown_as[nid] = (shown[0], entry)
            self._by_key.setdefault(key, set()).add(nid)
            moved.append(node)
        return moved

    def bind(self, parent: Inode, name: str, res: Resolution) -> Inode:
        """The inode for ``name`` in ``parent`` as just resolved (no lookup counted)."""
        if self.split and res.st.st_nlink > 1 and not res.layer.upper and not res.is_dir:
            return self._bind_name(parent, name, res)
        key, ino, node = self.number(res)
        if node is None:
            node = Inode(ino, parent, name, res, key)
            parent.kids += 1
            self.inodes[ino] = node
            if res.shown is not None:
                self._shown[key] = ino
            if self._recall:
                self._recall.pop(ino, None)
            return node
        if self.unsettled:
            self.unsettled.discard(ino)
        # Refresh what may have changed since (copy-up, a new layer below a dir).
        node.layer, node.dirs, node.mode = res.layer, res.dirs or _NO_DIRS, res.st.st_mode
        node.lpaths = lower_paths(res)
        node.data = res.data
        if node.gone:
            self._move(node, parent, name)  # its old name went away; this one is live
            if (parent, name) in node.aliases:
                node.drop_alias(parent, name)
                parent.kids -= 1
        elif node.parent is not parent or node.name != name:
            if node.is_dir:
                self._move(node, parent, name)  # a directory has exactly one name
            elif (parent, name) not in node.aliases:
                node.add_alias(parent, name)  # another name of the same file
                parent.kids += 1
        node.gone = False
        return node

    def _move(self, node: Inode, parent: Inode, name: str) -> None:
        if node.parent is not None:
            node.parent.kids -= 1
        parent.kids += 1
        node.parent, node.name = parent, name
        if node.is_dir:
            _MOVES[0] += 1  # every remembered path below it is wrong now

    def rekey(self, node: Inode, res: Resolution, keep_number: bool = False) -> None:
        """The object now lives elsewhere (copy-up): same number, new real object
        (``keep_number``: also for one of several names, an index entry linked up)."""
        old = node.key
        node.key = self.key_of(res)
        node.layer, node.mode = res.layer, res.st.st_mode
        node.data = res.data
        if res.dirs:
            node.dirs = res.dirs
            node.lpaths = lower_paths(res)
        if old != node.key:
            if self.ino_of.get(old) == node.ino:
                del self.ino_of[old]
            shown = self.shown_as.get(node.ino) if self.shown_as else None
            if shown is not None:
                # One name broken away from the others: the copy's own number (without
                # index the kernel uses no origin for a file with several links), or,
                # linked to an index entry, the lower number all its names show.
                if shown[1] is not None and self._names.get(shown[1]) == node.ino:
                    del self._names[shown[1]]
                self._unlist(old, node.ino)
                # still listed by what it shows: other names may show it too (index=on)
                self._by_key.setdefault(node.key, set()).add(node.ino)
                number = shown[0] if keep_number else self.natural_of(res) or node.ino
                self.shown_as[node.ino] = (number, None)
                self.ino_of[node.key] = node.ino
                return
            # Remembered also when the copy names its origin: a lookup that can't follow the
            # origin (renamed since, not ours to open) must still find this number.
            if res.shown is not None or self.natural_of(res) != node.ino:
                self.ino_of[node.key] = node.ino

    def renamed(self, node: Inode, old_parent: Inode, old_name: str, new_parent: Inode,
                new_name: str) -> None:
        if node.parent is old_parent and node.name == old_name:
            self._move(node, new_parent, new_name)
        elif (old_parent, old_name) in node.aliases:
            node.drop_alias(old_parent, old_name)
            node.add_alias(new_parent, new_name)
            old_parent.kids -= 1
            new_parent.kids += 1

    def unlinked(self, node: Inode, parent: Inode, name: str, last_link: bool,
                 st: os.stat_result | None = None, kept: int = -1) -> None:
        """``name`` no longer leads to ``node``; when the real object is gone too, its
        number must not be handed to a new object that reuses the real inode.  ``kept``:
        an fd of the real file taken before the name went (dirops._keep_removed), which the node
        keeps if this was its last name."""
        if (parent, name) in node.aliases:
            node.drop_alias(parent, name)
            parent.kids -= 1
        elif node.aliases:
            # Promote another name so that path-based calls keep working.
            new_parent, new_name = node.aliases.pop()
            self._move(node, new_parent, new_name)
            new_parent.kids -= 1  # _move counted it a second time
        else:
            node.gone = True
            node.gone_st = st
            if kept >= 0 and node.kept < 0:
                node.kept, kept = kept, -1
        if kept >= 0:
            os.close(kept)
        if last_link:
            if self.ino_of.get(node.key) == node.ino:
                del self.ino_of[node.key]
            if self._shown.get(node.key) == node.ino:
                del self._shown[node.key]
            if node.gone:
                # The real inode may be reused by a new object: that one is not this.
                node.key = -node.ino

    def forget(self, ino: int, n: int) -> None:
        node = self.inodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups -= n
        self._maybe_drop(node)

    def compact(self, before: int) -> bool:
        """After the kernel forgot most of what it held (memory pressure, drop_caches):
        a dict never shrinks by itself, so copy it.  True if it did.  ``before``: the size
        before this batch of forgets (one batch may forget almost everything)."""
        size = len(self.inodes)
        self._peak = max(self._peak, before)
        if self._peak < 4096 or size > self._peak // 4:
            self._peak = max(self._peak, size)
            return False
        self.inodes = dict(self.inodes)
        self._peak = size
        return True

    def repack(self) -> None:
        """Once the kernel's forgetting is over: Python gives an arena of small objects
        back only when all of it is free, and each path remembered (and its number) was
        made during the walk that filled the arenas, so a few thousand of them kept most
        of the walk's memory.  So they go through one bytes object (outside those arenas)
        and come back once the old ones are freed, packed together."""
        blob = b"\0".join(b"%d\0%s" % (ino, os.fsencode(path))
                          for ino, path in self._recall.items())
        self._recall = {}
        if blob:
            parts = iter(blob.split(b"\0"))
            self._recall = {int(ino): os.fsdecode(path) for ino, path in zip(parts, parts)}

    def recall(self, ino: int) -> str | None:
        """Where a forgotten inode was when the kernel let it go: the kernel asks for "."
        in it to open a file handle.  Only a hint (it may have moved since): the caller
        checks that the path still leads to the same number."""
        return self._recall.get(ino)

    def natural_number(self, st: os.stat_result) -> int:
        """The number a real object would show as its own (0: it can't, see number())."""
        return self._natural_ino(st.st_ino, st.st_dev)

    def _remember(self, node: Inode) -> None:
        recall = self._recall
        if len(recall) >= RECALL:
            del recall[next(iter(recall))]
        recall[node.ino] = node.path

    def _maybe_drop(self, node: Inode) -> None:
        while node.lookups <= 0 and node.kids <= 0 and not node.handles \
                and node.ino != ROOT_INO:
            del self.inodes[node.ino]
            if node.kept >= 0:
                os.close(node.kept)
                node.kept = -1
            if self.unsettled:
                self.unsettled.discard(node.ino)
            if self.dio_written:
                self.dio_written.discard(node.ino)  # forgotten: its page cache went too
            if self.shown_as:
                self._drop_name(node)
            if self._shown and self._shown.get(node.key) == node.ino:
                del self._shown[node.key]
            parent = node.parent
            if self.forgotten is not None:
                self.forgotten(node)
            elif not node.gone and parent is not None:
                self._remember(node)
            for p, _ in node.aliases:
                p.kids -= 1
                self._maybe_drop(p)
            if parent is None:
                return
            parent.kids -= 1
            node = parent

    def _unlist(self, key: Key, nid: int) -> None:
        nids = self._by_key.get(key)
        if nids is not None:
            nids.discard(nid)
            if not nids:
                del self._by_key[key]

    def _drop_name(self, node: Inode) -> None:
        shown = self.shown_as.pop(node.ino, None)
        if shown is None:
            return
        self._unlist(node.key, node.ino)
        entry = shown[1]
        if entry is not None and self._names.get(entry) == node.ino:
            del self._names[entry]
        if self.ino_of.get(node.key) == node.ino:
            del self.ino_of[node.key]

    def drop_if_unused(self, node: Inode) -> None:
        self._maybe_drop(node)

    def release_handle(self, node: Inode, fh: FileHandle[Inode]) -> bool:
        """Done with ``fh``, whose fd its caller closes, unless the node keeps it: gone,
        its last handle, and still held by the kernel, which may have an open on its way
        (True)."""
        if node.handles:
            node.handles.discard(fh)
        keep = node.gone and node.lookups > 0 and not node.handles and node.kept < 0 \
            and fh.layer is node.layer and node.data is None
        if keep:
            node.kept = fh.fd
        self._maybe_drop(node)
        return keep
