"""Merged directory listings (kernel fs/overlayfs/readdir.c; overlay-semantics §5).

A listing reads every layer of the directory once, and keeps what it learned about
each name (the topmost layer holding it, its type, the lower layers where it is a
directory too), so that readdirplus can give each entry its attributes with one
lstat instead of a lookup through every layer again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from unionfs import sysio
from unionfs.layers import Layer, LayerStack
from unionfs.lookup import Resolution, join, resolve
from unionfs.whiteout import WH_PREFIX, is_whiteout_stat


@dataclass(slots=True)
class Entry:
    name: str
    layer: Layer  # the topmost layer holding the name
    hidden: bool  # a whiteout: keeps its slot so offsets stay put, never shown
    kind: int = 0  # S_IFMT from d_type (or lstat); 0 when unknown
    st: os.stat_result | None = None  # when the listing had to lstat it
    # A directory: the layers below where the name is a directory too, up to the
    # first one where it is not (the opaque marks are read when it is resolved), as
    # positions in the listed directory's layers.
    below: list[int] | None = None
    pos: int = 0  # where ``layer`` is among the listed directory's layers
    merging: bool = False  # still collecting ``below`` while the listing runs
    uncertain: bool = False  # the layers below could not be told from d_type: look it up
    checked: bool = False  # ``hidden`` already says whether lookup takes it for a whiteout
    ino: int = 0  # d_ino, the real object's inode number


def list_merged(stack: LayerStack, paths: Sequence[str], dirs: list[Layer]) -> list[Entry]:
    """Entries of the merged directory (at ``paths`` in its layers ``dirs``) in the
    kernel's order: the lowest layer's entries first, then those that appear only in
    higher layers, top down.  The first occurrence of a name wins; whiteouts stay in
    as hidden slots."""
    dialect = stack.dialect
    first: dict[str, Entry] = {}
    per_layer: list[list[Entry]] = []
    for pos, layer in enumerate(dirs):
        dfd = stack.dirfd_or_none(layer, paths[pos])
        if dfd is None:
            per_layer.append([])
            continue
        # Xattr whiteouts are hidden from listings only below an opaque="x" marker
        # (kernel rule); a reader of OCI forms hides them everywhere, as lookup does.
        xwhiteouts = dialect.oci or dialect.lists_xattr_whiteouts(dfd)
        new: list[Entry] = []
        listing = sysio.scandir_fd(dfd, noatime=stack.list_noatime)
        stoppers: set[str] = set()  # names whose merge ends in this layer (OCI .wh.NAME)
        if dialect.oci:
            # ".wh.NAME" hides NAME below this layer, as a whiteout would; the marker
            # files themselves never show.  The layer's own NAME (if any) still counts.
            names = {n for n, _, _ in listing}
            for name, _, _ in listing:
                if name.startswith(WH_PREFIX):
                    first.setdefault(name, Entry(name, layer, True, pos=pos))
            for name, _, _ in listing:
                target = name[len(WH_PREFIX):]
                if not name.startswith(WH_PREFIX) or not target or target.startswith(WH_PREFIX):
                    continue
                stoppers.add(target)
                if target not in first and target not in names:
                    marker = Entry(target, layer, True, pos=pos)
                    first[target] = marker
                    new.append(marker)
        for name, kind, d_ino in listing:
            e = first.get(name)
            if e is not None:
                if e.merging:  # the same name lower down: does the directory merge on?
                    if kind == stat.S_IFDIR:
                        assert e.below is not None
                        e.below.append(pos)
                    else:
                        e.merging = False
                        e.uncertain = kind == 0  # maybe a whiteout, maybe not: look it up
                continue
            st = None
            hidden = False
            if kind == 0 or (xwhiteouts and kind == stat.S_IFREG):
                st = sysio.lstat_or_none(dfd, name)
                hidden = st is None or (dialect.is_whiteout(dfd, name, st) if xwhiteouts
                                        else is_whiteout_stat(st))
                if st is not None:
                    kind = stat.S_IFMT(st.st_mode)
            entry = Entry(name, layer, hidden, kind, st, checked=st is not None and xwhiteouts,
                          pos=pos, ino=d_ino)
            if kind == stat.S_IFDIR and not hidden:
                entry.below, entry.merging = [], True
            first[name] = entry
            new.append(entry)
        for name in stoppers:
            if (stopped := first.get(name)) is not None:
                stopped.merging = False
        per_layer.append(new)
    if len(per_layer) == 1:
        return per_layer[0]
    out = per_layer[-1]
    for chunk in per_layer[:-1]:
        out.extend(chunk)
    return out


def resolve_entry(stack: LayerStack, paths: Sequence[str], dirs: list[Layer], e: Entry,
                  known: Callable[[Layer, os.stat_result], bool] | None = None
                  ) -> Resolution | None | Literal[False]:
    """What a lookup of a listed name would give, from what the listing (of the
    directory at ``paths``) learned: a Resolution, None when the name turns out absent,
    or False when the listing can't tell (the caller looks the name up).
    ``known(layer, st)``: is it an object already looked up (then it is no whiteout: no
    need to read its xattrs again)."""
    if e.uncertain:
        return False
    dialect = stack.dialect
    dfd = stack.dirfd_or_none(e.layer, paths[e.pos])
    if dfd is None:
        return False
    st = e.st if e.st is not None else sysio.lstat_or_none(dfd, e.name)
    if st is None:
        return None
    if stat.S_IFMT(st.st_mode) != e.kind:
        return False  # changed since it was listed
    if e.kind != stat.S_IFDIR:
        if not e.checked and (e.kind == stat.S_IFREG and st.st_size == 0
                              or e.kind == stat.S_IFCHR) \
                and (known is None or not known(e.layer, st)):
            if dialect.is_whiteout(dfd, e.name, st):
                return None  # an xattr whiteout the listing was told to show: lookup hides it
        return Resolution(e.layer, st)
    res = Resolution(e.layer, st, [e.layer], [join(paths[e.pos], e.name)])
    chain = e.below or ()
    bottom = stack.layers[-1]
    layer, ldfd = e.layer, dfd
    for k in range(len(chain) + 1):
        if layer is bottom:
            break
        opaque, target = dialect.dir_marks(ldfd, e.name)
        if opaque and chain:
            break
        if target is not None:
            return False  # the layers below keep it elsewhere: the long way
        if k == len(chain):
            break
        pos = chain[k]
        layer = dirs[pos]
        res.dirs.append(layer)
        res.paths.append(join(paths[pos], e.name))
        got = stack.dirfd_or_none(layer, paths[pos])
        if got is None:
            return False
        ldfd = got
        if k == 0 and e.layer.upper:  # a merged directory shows its first lower's number
            low = sysio.lstat_or_none(ldfd, e.name)
            if low is None:
                return False
            res.shown = (low.st_dev, low.st_ino)
    return res


class LowerIndex:
    """Which lower layer holds each name of one merged directory, from one listing of
    them.  Lowers never change under the mount, so it holds for the directory's life;
    a lookup then costs an lstat in upper and one in the right lower, not one per layer."""

    __slots__ = ("lowers", "paths", "entries")

    def __init__(self, stack: LayerStack, paths: list[str], lowers: list[Layer]) -> None:
        self.lowers = lowers
        self.paths = paths
        self.entries = {e.name: e for e in list_merged(stack, paths, lowers)}


def resolve_indexed(stack: LayerStack, paths: list[str], dirs: list[Layer],
                    index: LowerIndex, name: str) -> Resolution | None:
    """lookup.resolve(), with the lower layers answered by ``index``."""
    dialect = stack.dialect
    if dialect.hides_name(name):
        return None
    found: Resolution | None = None
    top = dirs[0]
    if top.upper:
        dfd = stack.dirfd_or_none(top, paths[0])
        if dfd is not None:
            st = sysio.lstat_or_none(dfd, name)
            if st is None:
                if dialect.whited_out_by_file(dfd, name):
                    return None
            else:
                if dialect.is_whiteout(dfd, name, st):
                    return None
                if not stat.S_ISDIR(st.st_mode):
                    return Resolution(top, st)
                found = Resolution(top, st, [top], [join(paths[0], name)])
                opaque, target = dialect.dir_marks(dfd, name)
                if opaque or dialect.whited_out_by_file(dfd, name):
                    return found
                if target is not None:
                    return resolve(stack, paths, dirs, name)  # below, it is elsewhere
    e = index.entries.get(name)
    if e is None or e.hidden:
        return found
    low = resolve_entry(stack, index.paths, index.lowers, e)
    if low is False:
        return resolve(stack, paths, dirs, name)  # the index can't tell: the long way
    if low is None or found is None:
        return low if found is None else found
    if low.is_dir:
        found.dirs.extend(low.dirs)  # only directories in consecutive layers merge
        found.paths.extend(low.paths)
        found.shown = (low.st.st_dev, low.st.st_ino)
    return found
