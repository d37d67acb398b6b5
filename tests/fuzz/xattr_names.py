"""xattr names as found on disk and as given through the mount: the dialect's escaping
(``P.overlay.*``) must round-trip, and a marker must never be shown or be settable."""

from __future__ import annotations

import os

from unionfs.whiteout import TRUSTED, USER, XATTR_NAME_MAX, Dialect

from .common import Finding

DIALECTS = [Dialect(TRUSTED), Dialect(USER), Dialect(TRUSTED, oci=True),
            Dialect(USER, oci=True)]


def one_input(data: bytes) -> None:
    name = os.fsdecode(data.replace(b"\0", b""))
    on_disk = len(os.fsencode(name)) <= XATTR_NAME_MAX  # longer: no filesystem lists it
    for d in DIALECTS:
        shown = d.to_visible_xattr(name) if on_disk else None  # ``name`` as on disk
        if shown is None:
            if on_disk and not d.is_private(name):
                raise Finding(f"{d.prefix} oci={d.oci}: {name!r} hidden but not private")
        else:
            if d.is_private(name):
                raise Finding(f"{d.prefix} oci={d.oci}: marker {name!r} shown as {shown!r}")
            try:
                back = d.to_real_xattr(shown)
            except OSError as e:
                raise Finding(f"{d.prefix} oci={d.oci}: {name!r} shown as {shown!r}, "
                              f"which can't be named back ({e})") from None
            if back != name:
                raise Finding(f"{d.prefix} oci={d.oci}: {name!r} -> {shown!r} -> {back!r}")
        try:
            real = d.to_real_xattr(name)  # ``name`` as given through the mount
        except OSError:
            continue
        if d.is_private(real) or d.to_visible_xattr(real) != name:
            raise Finding(f"{d.prefix} oci={d.oci}: {name!r} stored as {real!r}, which "
                          f"reads back as {d.to_visible_xattr(real)!r}")


def seeds() -> list[bytes]:
    return [b"user.mime", b"trusted.overlay.opaque", b"trusted.overlay.overlay.x",
            b"user.overlay.redirect", b"user.overlay.overlay.", b"user.fuseoverlayfs.opaque",
            b"security.capability", b"user.overlay." + b"x" * 250, b"trusted.overlay.\xff"]
