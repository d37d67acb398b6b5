"""What an upper directory changes, as ``docker diff`` lists it: ``A`` added, ``C`` changed,
``D`` deleted, parents before their entries."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

from unionfs import sysio
from unionfs.oci.layer import LayerError, _foreign_whiteout, _opaque
from unionfs.whiteout import TRUSTED, USER, WH_OPAQUE, WH_PREFIX


def changes(upper: str, lowers: list[str] | None = None) -> list[tuple[str, str]]:
    """[(kind, path)] for ``upper`` over ``lowers`` (top first).  Without the lowers, an
    object is changed when it has an origin (a copy-up) or is a directory, else added."""
    try:
        rootfd = sysio.open_root(upper)
    except OSError as e:
        raise LayerError(f"'{upper}': {e.strerror}") from None
    lfds: list[int] = []
    try:
        for low in lowers or []:
            try:
                lfds.append(sysio.open_root(low))
            except OSError as e:
                raise LayerError(f"'{low}': {e.strerror}") from None
        return list(_changes(rootfd, "", lfds, lowers is not None))
    finally:
        os.close(rootfd)
        for fd in lfds:
            os.close(fd)


def _below(lfds: list[int], path: str) -> list[str]:
    """The names the lower layers show in directory ``path`` (whiteouts and opaque marks
    of each layer applied)."""
    shown: dict[str, bool] = {}
    hidden: set[str] = set()
    for fd in lfds:
        try:
            dfd = sysio.open_dir_beneath(fd, path)
        except OSError:
            continue
        try:
            lfd = sysio.open_dir_for_listing(dfd, ".")
            try:
                names = os.listdir(lfd)
            finally:
                os.close(lfd)
            for name in names:
                if name in shown or name in hidden or name == WH_OPAQUE:
                    continue
                if name.startswith(WH_PREFIX):
                    hidden.add(name[len(WH_PREFIX):])
                    continue
                st = sysio.lstat(dfd, name)
                if _foreign_whiteout(dfd, name, st):
                    hidden.add(name)
                else:
                    shown[name] = True
            opaque = path and _opaque_at(fd, path)
        finally:
            os.close(dfd)
        if opaque:
            break
    return sorted(shown)


def _opaque_at(fd: int, path: str) -> bool:
    parent, _, leaf = path.rpartition("/")
    try:
        pfd = sysio.open_dir_beneath(fd, parent)
    except OSError:
        return False
    try:
        return _opaque(pfd, leaf) or sysio.lstat_or_none(pfd, f"{leaf}/{WH_OPAQUE}") is not None
    finally:
        os.close(pfd)


def _changes(rootfd: int, path: str, lfds: list[int], know: bool
             ) -> Iterator[tuple[str, str]]:
    dfd = sysio.open_dir_beneath(rootfd, path)
    try:
        lfd = sysio.open_dir_for_listing(dfd, ".")
        try:
            names = sorted(os.listdir(lfd), key=os.fsencode)
        finally:
            os.close(lfd)
        below = _below(lfds, path) if know else []
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
            if know:
                kind = "C" if name in below else "A"
            else:
                has_origin = any(sysio.getxattr_or_none(dfd, name, p + "origin") is not None
                                 for p in (TRUSTED, USER))
                kind = "C" if stat.S_ISDIR(st.st_mode) or has_origin else "A"
            yield kind, "/" + child
            if stat.S_ISDIR(st.st_mode):
                if know and kind == "C" and _opaque(dfd, name):
                    # emptied and made again: what lay below is gone
                    sub = sysio.open_dir_beneath(dfd, name)
                    try:
                        inside = set(os.listdir(sysio.proc_fd(sub)))
                    finally:
                        os.close(sub)
                    for gone in _below(lfds, child):
                        if gone not in inside:
                            yield "D", f"/{child}/{gone}"
                yield from _changes(rootfd, child, lfds, know)
    finally:
        os.close(dfd)
