"""POSIX ACL xattrs as found on disk (a lower directory's default ACL): acl.parse and
what a new object inherits (acl.inherit).  The clean error is BadACL (the kernel's EIO)."""

from __future__ import annotations

import stat
import struct

from unionfs import acl

from .common import Finding


def one_input(data: bytes) -> None:
    mode = (stat.S_IFDIR if data[:1] == b"d" else stat.S_IFREG) | 0o777
    raw = data[1:]
    try:
        entries = acl.parse(raw)
    except acl.BadACL:
        return
    if acl.pack(entries) != raw:
        raise Finding(f"ACL {raw!r} does not pack back to itself")
    for m in (mode, mode & ~0o022, mode & ~0o777):
        try:
            new_mode, access, default = acl.inherit(raw, m)
        except acl.BadACL:
            continue
        if stat.S_IFMT(new_mode) != stat.S_IFMT(m) or new_mode & 0o777 & ~m:
            raise Finding(f"ACL {raw!r}: mode {m:o} became {new_mode:o}")
        if access is not None:
            acl.parse(access)
        if (default is not None) != stat.S_ISDIR(m):
            raise Finding(f"ACL {raw!r}: a default ACL for mode {m:o} is {default!r}")


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", acl.VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def seeds() -> list[bytes]:
    minimal = _acl((acl.USER_OBJ, 7, 0), (acl.GROUP_OBJ, 5, 0), (acl.OTHER, 5, 0))
    full = _acl((acl.USER_OBJ, 7, 0), (acl.USER, 6, 1000), (acl.GROUP_OBJ, 5, 0),
                (acl.GROUP, 4, 100), (acl.MASK, 7, 0), (acl.OTHER, 0, 0))
    return [b"d" + minimal, b"f" + full, b"d" + full, b"f" + _acl((acl.OTHER, 7, 0)),
            b"d" + _acl((0x40, 7, 0)), b"f\x02\x00\x00"]
