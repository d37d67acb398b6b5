"""Name lookup across layers (kernel fs/overlayfs/namei.c; overlay-semantics §2)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from unionfs import sysio
from unionfs.layers import Layer, LayerStack


@dataclass
class Resolution:
    layer: Layer  # the topmost layer holding the object
    st: os.stat_result
    dirs: list[Layer] = field(default_factory=list)  # a directory's merged layers, top first

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def join(relpath: str, name: str) -> str:
    return f"{relpath}/{name}" if relpath else name


def resolve(stack: LayerStack, parent_path: str, parent_dirs: list[Layer],
            name: str) -> Resolution | None:
    """Look ``name`` up in the directory ``parent_path`` whose merged layers are
    ``parent_dirs``.  None means ENOENT (absent or whited out)."""
    dialect = stack.dialect
    if dialect.hides_name(name):
        return None  # an OCI marker, not an object
    found: Resolution | None = None
    for layer in parent_dirs:
        dfd = stack.dirfd_or_none(layer, parent_path)
        if dfd is None:
            continue
        st = sysio.lstat_or_none(dfd, name)
        if st is None:
            if dialect.whited_out_by_file(dfd, name):
                break
            continue
        if dialect.is_whiteout(dfd, name, st):
            break
        is_dir = stat.S_ISDIR(st.st_mode)
        if found is None:
            found = Resolution(layer, st)
            if not is_dir:
                break  # a non-directory hides everything below it
            found.dirs.append(layer)
        elif is_dir:
            found.dirs.append(layer)
        else:
            break  # only directories in consecutive layers merge
        if dialect.is_opaque(dfd, name) or dialect.whited_out_by_file(dfd, name):
            break  # the object in this layer stays; what lies below is hidden
    return found


def root_resolution(stack: LayerStack) -> Resolution:
    top = stack.layers[0]
    return Resolution(top, os.fstat(top.fd), list(stack.layers))
