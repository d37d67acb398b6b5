"""``overlay.redirect`` as found on disk (a layer is untrusted; a tar can't carry one, but
an upper or lower directory copied from elsewhere can): parsed by the dialect and followed
by lookup over a stack nothing mounts (oci.merged), as ``diff`` and ``export`` do.

Clean outcomes: the lookup's errno (EINVAL for a malformed value, EACCES for ``.``/``..``,
ENAMETOOLONG, ENOENT...) or a one-line LayerError; never an exception of another kind,
never a value that names something outside the layers."""

from __future__ import annotations

import os

from unionfs import sysio
from unionfs.oci import layer, merged
from unionfs.oci.layer import LayerError
from unionfs.whiteout import KERNEL, TRUSTED

from . import common
from .common import Finding

REDIRECT = TRUSTED + "redirect"
_fixture: list[tuple[str, str, list[str]]] = []


def _stack_dirs() -> tuple[str, str, list[str]]:
    """upper/{a,b/c} over lower1/{x/y,a/f} and lower2/{x/z,p/q/r}: made once per process;
    an input only sets the redirect xattrs."""
    if _fixture:
        return _fixture[0]
    base = common.scratch("redirect")
    upper, lowers = os.path.join(base, "upper"), [os.path.join(base, "l1"),
                                                  os.path.join(base, "l2")]
    for d in ("a", "b/c"):
        os.makedirs(os.path.join(upper, d))
    for d in ("x/y", "a"):
        os.makedirs(os.path.join(lowers[0], d))
    for d in ("x/z", "p/q/r"):
        os.makedirs(os.path.join(lowers[1], d))
    for f in (os.path.join(lowers[0], "a", "f"), os.path.join(lowers[1], "p", "q", "g")):
        with open(f, "w") as out:
            out.write("data\n")
    os.setxattr(os.path.join(lowers[0], "x"), TRUSTED + "opaque", b"y")
    _fixture.append((base, upper, lowers))
    return _fixture[0]


def _check_value(raw: bytes, got: str | None) -> None:
    if got is None:
        raise Finding(f"redirect {raw!r} read as absent")
    parts = got.split("/")
    if got.startswith("/"):
        parts = parts[1:]
    elif len(parts) != 1:
        raise Finding(f"redirect {raw!r}: a relative value with a '/' accepted")
    if "\0" in got or any(p in ("", ".", "..") for p in parts):
        raise Finding(f"redirect {raw!r} accepted as {got!r}")
    if os.fsencode(got) != raw:
        raise Finding(f"redirect {raw!r} read as {got!r}")


def one_input(data: bytes) -> None:
    _base, upper, lowers = _stack_dirs()
    # The first byte picks the directory: a top-level one or a nested one.
    where = "b/c" if data[:1] == b"\x01" else "a"
    raw = data[1:] if data[:1] in (b"\x00", b"\x01") else data
    path = os.path.join(upper, where)
    try:
        os.setxattr(path, REDIRECT, raw)
    except OSError:
        return  # too big for an xattr: nothing can find it on disk
    try:
        parent, name = os.path.split(path)
        pfd = sysio.open_root(parent)
        try:
            _check_value(raw, KERNEL.redirect(pfd, name))
        except OSError as e:
            if e.errno is None:
                raise
        finally:
            os.close(pfd)
        with common.sandbox().input_dir() as work:
            try:
                stack = merged.open_stack(upper, lowers)
                try:
                    for p in (where, where + "/f", where + "/y", where + "/q/r"):
                        res = merged.resolve(stack, p)
                        if res is not None and res.is_dir:
                            merged.names_in(stack, res)
                finally:
                    stack.close()
                layer.export(upper, os.path.join(work, "out.tar"), compression=None,
                             lowers=lowers)
            except LayerError as e:
                if not str(e) or "\n" in str(e):
                    raise Finding(f"not a one-line error: {str(e)!r}") from None
            except OSError as e:
                if e.errno is None:
                    raise
    finally:
        os.removexattr(path, REDIRECT)


def seeds() -> list[bytes]:
    return [b"x", b"\x00/x", b"\x01/p/q", b"\x01q", b"/x/y", b"..", b"/a/../x", b"x/y",
            b"/" + b"d" * 300, b"\x00", b"/p//q"]
