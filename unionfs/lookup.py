"""Name lookup across layers (kernel fs/overlayfs/namei.c; overlay-semantics §2).

A directory's copies need not sit at the same path in every layer: a directory moved
with redirect_dir=on carries ``overlay.redirect``, the name (or, from the root, the
path) that the layers below know it by.  So a directory is found by its real path in
each of its layers, and lookup goes on below a redirect where it points.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field

from unionfs import origin, sysio
from unionfs.errors import oserror
from unionfs.layers import Layer, LayerStack


@dataclass(slots=True)
class Resolution:
    layer: Layer  # the topmost layer holding the object
    st: os.stat_result
    dirs: list[Layer] = field(default_factory=list)  # a directory's merged layers, top first
    # A directory: its real path in each of ``dirs`` below upper (upper's entry is the
    # merged path, which a rename changes: inodes never keep it).
    paths: list[str] = field(default_factory=list)
    # (st_dev, st_ino) of the object whose number the overlay shows, when not the top one:
    # a merged directory's first lower, a copy's origin (the kernel's OVL_TYPE_ORIGIN).
    shown: tuple[int, int] | None = None
    # A metadata-only copy in upper (overlay.metacopy): where its data is below, as
    # (layer, directory path, name).
    data: tuple[Layer, str, str] | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


def join(relpath: str, name: str) -> str:
    return f"{relpath}/{name}" if relpath else name


def resolve(stack: LayerStack, parent_paths: Sequence[str], parent_dirs: list[Layer],
            name: str) -> Resolution | None:
    """Look ``name`` up in the directory whose merged layers are ``parent_dirs``, at
    ``parent_paths`` in each.  None means ENOENT (absent or whited out)."""
    dialect = stack.dialect
    if dialect.hides_name(name):
        return None  # an OCI marker, not an object
    follow = stack.follow_redirects
    bottom = stack.layers[-1]
    found: Resolution | None = None
    want = name  # a name in the parent's directory of each layer, or "/a/b" from the root
    layers: Sequence[Layer] = parent_dirs
    where: Sequence[str] | None = parent_paths
    i = 0
    while i < len(layers):
        layer = layers[i]
        i += 1
        last = layer is bottom if follow else i == len(layers)
        stop = False
        if where is not None:
            dfd = stack.dirfd_or_none(layer, where[i - 1])
            leaf, real = want, join(where[i - 1], want)
        else:
            got = _walk(stack, layer, want, last)
            if got is None:
                return found  # a whiteout or a non-directory on the way: nothing below
            dfd, leaf, stop, moved = got
            real = want[1:]
            if moved is not None:
                want = moved
                if moved.startswith("/"):
                    stop = False
        if dfd is None:
            if stop:
                break
            continue
        st = sysio.lstat_or_none(dfd, leaf)
        if st is None:
            if stop or dialect.whited_out_by_file(dfd, leaf):
                break
            continue
        if dialect.is_whiteout(dfd, leaf, st):
            break
        if not stat.S_ISDIR(st.st_mode):
            if found is None:
                found = Resolution(layer, st)
            break  # a non-directory hides everything below; only directories merge
        if found is None:
            found = Resolution(layer, st, [layer], [real])
        else:  # a directory (a non-directory ended the loop)
            found.dirs.append(layer)
            found.paths.append(real)
            if found.shown is None and found.layer.upper:
                found.shown = (st.st_dev, st.st_ino)
        if last:
            stop = True
        else:
            opaque, target = dialect.dir_marks(dfd, leaf)
            if opaque or dialect.whited_out_by_file(dfd, leaf):
                stop = True  # the object in this layer stays; what lies below is hidden
            elif target is not None:
                if not follow and (target.startswith("/") or i < len(layers)):
                    # Following would be like a symlink into a lower layer without the
                    # permission checks: refused unless asked for (the kernel's EPERM,
                    # whether or not anything is there).
                    raise oserror(errno.EPERM)
                if target.startswith("/"):
                    want, stop = target, False
                    # The layers below this one, from the root (the kernel's switch to
                    # the root's lower stack).
                    layers, where, i = stack.layers[layer.index + 1:], None, 0
                elif where is None:
                    want = want.rpartition("/")[0] + "/" + target
                else:
                    want = target
        if stop:
            break
    return found


def origin_of(stack: LayerStack, parent_paths: Sequence[str], parent_dirs: list[Layer],
              name: str, st: os.stat_result,
              data: tuple[Layer, str, str] | None = None) -> tuple[int, int] | None:
    """For a non-directory ``name`` in upper: the lower object its ``overlay.origin``
    names, when that one has a single link (else the kernel shows the copy's own number).
    Found by name in the layers below, where it nearly always still is; else, where we
    may (CAP_DAC_READ_SEARCH), by opening the handle.  A copy with several names (linked
    since) only by the handle: by name, one name would find it and the others not."""
    udfd = stack.dirfd_or_none(parent_dirs[0], parent_paths[0])
    if udfd is None:
        return None
    raw = sysio.getxattr_or_none(udfd, name, stack.dialect.prefix + "origin")
    parsed = origin.parse(raw) if raw else None
    if parsed is None:
        return None
    candidates = [(layer, path, name) for layer, path in zip(parent_dirs[1:], parent_paths[1:])]
    if data is not None:
        candidates.insert(0, data)  # a metacopy's data: its origin, wherever it moved
    for layer, path, leaf in candidates if st.st_nlink == 1 else ():
        dfd = stack.dirfd_or_none(layer, path)
        if dfd is None:
            continue
        low = sysio.lstat_or_none(dfd, leaf)
        if low is not None and stat.S_IFMT(low.st_mode) == stat.S_IFMT(st.st_mode) \
                and origin.matches(parsed, dfd, leaf):
            return (low.st_dev, low.st_ino) if low.st_nlink == 1 else None
    if not origin.decodes():
        return None
    low = origin.stat_by_handle(parsed, [(layer.dev, layer.fd) for layer in stack.lowers])
    if low is not None and stat.S_IFMT(low.st_mode) == stat.S_IFMT(st.st_mode) and \
            low.st_nlink == 1:
        return low.st_dev, low.st_ino
    return None


def metacopy_data(stack: LayerStack, parent_paths: Sequence[str], parent_dirs: list[Layer],
                  name: str, target: str | None) -> tuple[Layer, str, str] | None:
    """Where the data of the metadata-only copy ``name`` lies below: the first regular
    file that is no metacopy itself, at its redirect (``target``) or its name, as the
    kernel's lookup goes on below a metacopy."""
    dialect = stack.dialect
    want = target or name
    if want.startswith("/"):
        dpath, _, leaf = want[1:].rpartition("/")
        candidates = [(layer, dpath, leaf) for layer in stack.lowers]
    else:
        candidates = [(layer, path, want)
                      for layer, path in zip(parent_dirs[1:], parent_paths[1:])]
    for layer, path, leaf in candidates:
        dfd = stack.dirfd_or_none(layer, path)
        if dfd is None:
            continue
        st = sysio.lstat_or_none(dfd, leaf)
        if st is None:
            if dialect.whited_out_by_file(dfd, leaf):
                return None
            continue
        if dialect.is_whiteout(dfd, leaf, st) or not stat.S_ISREG(st.st_mode):
            return None
        if sysio.getxattr_or_none(dfd, leaf, dialect.metacopy_xattr) is None:
            return layer, path, leaf
    return None


def _walk(stack: LayerStack, layer: Layer, want: str, last: bool
          ) -> tuple[int | None, str, bool, str | None] | None:
    """The directory holding the last component of the absolute path ``want`` in
    ``layer``, as the kernel's ovl_lookup_layer walks it: (its fd or None if absent, the
    last component, whether an opaque directory on the way stops the layers below, a new
    ``want`` from a redirect on the way).  None: a whiteout or non-directory on the way
    ends the whole lookup."""
    dialect = stack.dialect
    comps = want[1:].split("/")
    dfd: int | None = layer.fd
    stop = False
    moved: str | None = None
    prefix = ""
    for k, comp in enumerate(comps[:-1]):
        assert dfd is not None
        st = sysio.lstat_or_none(dfd, comp)
        if st is None:
            return None, comps[-1], stop, moved
        if dialect.is_whiteout(dfd, comp, st) or not stat.S_ISDIR(st.st_mode):
            return None
        if not last:
            if dialect.is_opaque(dfd, comp):
                stop = True
            else:
                target = dialect.redirect(dfd, comp)
                if target is not None:
                    post = "/".join(comps[k + 1:])
                    if target.startswith("/"):
                        moved, stop = f"{target}/{post}", False
                    else:
                        moved = f"/{join(prefix, target)}/{post}"
        prefix = join(prefix, comp)
        dfd = stack.dirfd_or_none(layer, prefix)
        if dfd is None:
            return None, comps[-1], stop, moved
    return dfd, comps[-1], stop, moved


def root_resolution(stack: LayerStack) -> Resolution:
    top = stack.layers[0]
    return Resolution(top, os.fstat(top.fd), list(stack.layers), [""] * len(stack.layers))
