"""Merged directory listings (kernel fs/overlayfs/readdir.c; overlay-semantics §5)."""

from __future__ import annotations

import stat
from dataclasses import dataclass

from unionfs import sysio
from unionfs.layers import Layer, LayerStack
from unionfs.whiteout import WH_PREFIX, is_whiteout_stat


@dataclass(slots=True)
class Entry:
    name: str
    layer: Layer
    hidden: bool  # a whiteout: keeps its slot so offsets stay put, never shown


def list_merged(stack: LayerStack, path: str, dirs: list[Layer]) -> list[Entry]:
    """Entries of the merged directory in the kernel's order: the lowest layer's
    entries first, then those that appear only in higher layers, top down.
    The first occurrence of a name wins; whiteouts stay in as hidden slots."""
    dialect = stack.dialect
    seen: set[str] = set()
    per_layer: list[list[Entry]] = []
    for layer in dirs:
        dfd = stack.dirfd_or_none(layer, path)
        if dfd is None:
            per_layer.append([])
            continue
        # Xattr whiteouts are hidden from listings only below an opaque="x" marker
        # (kernel rule); a reader of OCI forms hides them everywhere, as lookup does.
        xwhiteouts = dialect.oci or dialect.lists_xattr_whiteouts(dfd)
        new: list[Entry] = []
        listing = sysio.scandir_fd(dfd)
        if dialect.oci:
            # ".wh.NAME" hides NAME below this layer, as a whiteout would; the marker
            # files themselves never show.  The layer's own NAME (if any) still counts.
            for name, _, _ in listing:
                if name.startswith(WH_PREFIX):
                    seen.add(name)
            names = {n for n, _, _ in listing}
            for name, _, _ in listing:
                target = name[len(WH_PREFIX):]
                if name.startswith(WH_PREFIX) and target and target not in seen \
                        and target not in names and not target.startswith(WH_PREFIX):
                    seen.add(target)
                    new.append(Entry(target, layer, True))
        for name, kind, _ in listing:
            if name in seen:
                continue
            seen.add(name)
            hidden = False
            if kind == 0 or (xwhiteouts and kind == stat.S_IFREG):
                st = sysio.lstat_or_none(dfd, name)
                hidden = st is None or (dialect.is_whiteout(dfd, name, st) if xwhiteouts
                                        else is_whiteout_stat(st))
            new.append(Entry(name, layer, hidden))
        per_layer.append(new)
    if len(per_layer) == 1:
        return per_layer[0]
    out = per_layer[-1]
    for chunk in per_layer[:-1]:
        out.extend(chunk)
    return out

