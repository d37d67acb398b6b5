"""Merged directory listings (kernel fs/overlayfs/readdir.c; overlay-semantics §5)."""

from __future__ import annotations

import stat
from dataclasses import dataclass

from unionfs import sysio, whiteout
from unionfs.layers import Layer, LayerStack


@dataclass(slots=True)
class Entry:
    name: str
    layer: Layer
    hidden: bool  # a whiteout: keeps its slot so offsets stay put, never shown


def list_merged(stack: LayerStack, path: str, dirs: list[Layer]) -> list[Entry]:
    """Entries of the merged directory in the kernel's order: the lowest layer's
    entries first, then those that appear only in higher layers, top down.
    The first occurrence of a name wins; whiteouts stay in as hidden slots."""
    seen: set[str] = set()
    per_layer: list[list[Entry]] = []
    for layer in dirs:
        dfd = stack.dirfd_or_none(layer, path)
        if dfd is None:
            per_layer.append([])
            continue
        # Xattr whiteouts are hidden from listings only below an opaque="x" marker.
        xwhiteouts = sysio.fd_getxattr_or_none(dfd, whiteout.OPAQUE) == b"x"
        new: list[Entry] = []
        for name, kind, _ in sysio.scandir_fd(dfd):
            if name in seen:
                continue
            seen.add(name)
            hidden = False
            if kind == 0 or (xwhiteouts and kind == stat.S_IFREG):
                st = sysio.lstat_or_none(dfd, name)
                hidden = st is None or (whiteout.is_whiteout(dfd, name, st) if xwhiteouts
                                        else whiteout.is_whiteout_stat(st))
            new.append(Entry(name, layer, hidden))
        per_layer.append(new)
    if len(per_layer) == 1:
        return per_layer[0]
    out = per_layer[-1]
    for chunk in per_layer[:-1]:
        out.extend(chunk)
    return out

