"""What an upper directory changes, as ``docker diff`` lists it: ``A`` added, ``C`` changed,
``D`` deleted, parents before their entries.  What lies below is read by the filesystem's own
lookup and readdir over the lowers (oci.merged), so whiteouts, opaque directories and
redirects of every lower count as they do in a mount."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from unionfs import sysio
from unionfs.layers import LayerStack
from unionfs.oci import merged
from unionfs.oci.layer import LayerError, _foreign_whiteout, _opaque
from unionfs.whiteout import TRUSTED, USER, WH_OPAQUE, WH_PREFIX


def changes(upper: str, lowers: list[str] | None = None) -> list[tuple[str, str]]:
    """[(kind, path)] for ``upper`` over ``lowers`` (top first).  Without the lowers, an
    object is changed when it has an origin (a copy-up) or is a directory, else added."""
    try:
        rootfd = sysio.open_root(upper)
    except OSError as e:
        raise LayerError(f"'{upper}': {e.strerror}") from None
    stack = merged.open_stack(upper, lowers, with_upper=False) if lowers else None
    try:
        return list(_changes(rootfd, "", stack))
    finally:
        os.close(rootfd)
        if stack is not None:
            stack.close()


def _changes(rootfd: int, path: str, stack: LayerStack | None) -> Iterator[tuple[str, str]]:
    dfd = sysio.open_dir_beneath(rootfd, path)
    try:
        names = sorted((n for n, _, _ in sysio.scandir_fd(dfd)), key=os.fsencode)
        below_dir = merged.resolve(stack, path) if stack is not None else None
        below = set(merged.names_in(stack, below_dir)) \
            if stack is not None and below_dir is not None and below_dir.is_dir else set()
        for name in names:
            if name == WH_OPAQUE:
                continue
            child = f"{path}/{name}" if path else name
            if name.startswith(WH_PREFIX):
                yield "D", "/" + (f"{path}/" if path else "") + name[len(WH_PREFIX):]
                continue
            st = sysio.lstat(dfd, name)
            if _foreign_whiteout(dfd, name, st):
                yield "D", "/" + child
                continue
            if stack is not None:
                kind = "C" if name in below else "A"
            else:
                has_origin = any(sysio.getxattr_or_none(dfd, name, p + "origin") is not None
                                 for p in (TRUSTED, USER))
                kind = "C" if stat.S_ISDIR(st.st_mode) or has_origin else "A"
            yield kind, "/" + child
            if stat.S_ISDIR(st.st_mode):
                if stack is not None and kind == "C" and _opaque(dfd, name):
                    # emptied and made again: what lay below is gone
                    sub = sysio.open_dir_beneath(dfd, name)
                    try:
                        inside = {n for n, _, _ in sysio.scandir_fd(sub)}
                    finally:
                        os.close(sub)
                    lower = merged.resolve(stack, child)
                    for gone in sorted(merged.names_in(stack, lower) if lower else []):
                        if gone not in inside:
                            yield "D", f"/{child}/{gone}"
                yield from _changes(rootfd, child, stack)
    finally:
        os.close(dfd)
