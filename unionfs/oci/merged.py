"""The merged view of an upper over its lowers, read by the filesystem's own rules (lookup,
readdir) on a stack that nothing mounts: what an exported layer must hold where the upper
only points below, a directory moved with redirect_dir=on (``overlay.redirect``) and a
metadata-only copy (``overlay.metacopy``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from unionfs import lookup, sysio
from unionfs.layers import LayerStack
from unionfs.lookup import Resolution
from unionfs.oci.errors import LayerError
from unionfs.readdir import list_merged
from unionfs.whiteout import TRUSTED, USER, Dialect


def open_stack(upper: str, lowers: list[str], with_upper: bool = True) -> LayerStack:
    """The stack (``with_upper``: upper over the lowers, else the lowers alone) read in
    the dialect the upper was written in."""
    try:
        top = sysio.open_root(upper)
        try:
            names = sysio.listxattr(top, "")
        finally:
            os.close(top)
        stack = LayerStack(lowers, upper if with_upper else None, None)
    except OSError as e:
        raise LayerError(f"'{e.filename}': {e.strerror}") from None
    prefix = USER if any(n.startswith(USER) for n in names) else TRUSTED
    stack.dialect = Dialect(prefix)
    stack.follow_redirects = True
    return stack


def names_in(stack: LayerStack, res: Resolution) -> list[str]:
    """What the merged directory ``res`` shows."""
    return [e.name for e in list_merged(stack, res.paths, res.dirs) if not e.hidden]


def resolve(stack: LayerStack, path: str) -> Resolution | None:
    res: Resolution | None = lookup.root_resolution(stack)
    for part in filter(None, path.split("/")):
        if res is None or not res.is_dir:
            return None
        res = lookup.resolve(stack, res.paths, res.dirs, part)
    return res


def real(stack: LayerStack, parent: Resolution, name: str, res: Resolution
         ) -> tuple[int, str, tuple[int, str] | None]:
    """(directory fd, name) of the real object behind ``res``, found in ``parent``, and for
    a metadata-only copy the (directory fd, name) of the file holding its data."""
    if res.is_dir:
        where, _, leaf = res.paths[res.dirs.index(res.layer)].rpartition("/")
        return stack.dirfd(res.layer, where), leaf, None
    dfd = stack.dirfd(res.layer, parent.paths[parent.dirs.index(res.layer)])
    return dfd, name, data_of(stack, parent, name, res, dfd)


def data_of(stack: LayerStack, parent: Resolution, name: str, res: Resolution, dfd: int
            ) -> tuple[int, str] | None:
    if not res.layer.upper or \
            sysio.getxattr_or_none(dfd, name, stack.dialect.metacopy_xattr) is None:
        return None
    data = lookup.metacopy_data(stack, parent.paths, parent.dirs, name,
                                stack.dialect.redirect(dfd, name))
    if data is None:
        raise LayerError(f"metacopy '{name}': its data is in none of the lowers")
    layer, dpath, leaf = data
    return stack.dirfd(layer, dpath), leaf


def walk(stack: LayerStack, dir_res: Resolution, path: str
         ) -> Iterator[tuple[str, int, str, tuple[int, str] | None]]:
    """(path, directory fd, name, where a metacopy's data is) of everything the merged
    directory at ``path`` shows, recursively, sorted, parents first."""
    entries = sorted(names_in(stack, dir_res), key=os.fsencode)
    subdirs = []
    for name in entries:
        res = lookup.resolve(stack, dir_res.paths, dir_res.dirs, name)
        if res is None:
            continue
        child = f"{path}/{name}"
        dfd, leaf, data = real(stack, dir_res, name, res)
        yield child, dfd, leaf, data
        if res.is_dir:
            subdirs.append((child, res))
    for child, res in subdirs:
        yield from walk(stack, res, child)
