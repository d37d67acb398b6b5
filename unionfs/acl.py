"""POSIX ACLs of new objects: a directory's default ACL in place of the umask.

With FUSE_POSIX_ACL the kernel leaves inheritance to the filesystem (with DONT_MASK it even
leaves the umask off the mode).  An object made straight in its upper directory inherits from
the upper filesystem itself; one made in WORK and renamed over a whiteout gets what
``inherit`` computes, the kernel's posix_acl_create (fs/posix_acl.c), set explicitly as
ovl_create_over_whiteout does.  Values are the xattr form: little-endian version 2, then
(tag u16, perm u16, id u32) entries.
"""

from __future__ import annotations

import stat
import struct

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"
NAMES = (ACCESS, DEFAULT)

VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")


class BadACL(ValueError):
    """Not an ACL xattr we can read: the kernel answers EIO for one."""


def parse(raw: bytes) -> list[list[int]]:
    """[tag, perm, id] entries (lists: ``inherit`` masks them in place)."""
    if len(raw) < _HEADER.size or (len(raw) - _HEADER.size) % _ENTRY.size:
        raise BadACL("bad ACL xattr size")
    if _HEADER.unpack_from(raw)[0] != VERSION:
        raise BadACL("unknown ACL xattr version")
    return [list(_ENTRY.unpack_from(raw, off)) for off in range(_HEADER.size, len(raw),
                                                                 _ENTRY.size)]


def pack(entries: list[list[int]]) -> bytes:
    return _HEADER.pack(VERSION) + b"".join(_ENTRY.pack(*e) for e in entries)


def inherit(default: bytes, mode: int) -> tuple[int, bytes | None, bytes | None]:
    """What a new object of ``mode`` (type bits included) gets in a directory whose default
    ACL is ``default``: its mode, its access ACL (None when the mode says it all) and, for a
    directory, its own default ACL.  The umask plays no part (POSIX 1003.1e)."""
    entries = parse(default)
    perm = mode & 0o777
    group_obj = mask = None
    extended = False
    for e in entries:
        tag = e[0]
        if tag == USER_OBJ:
            e[1] &= (perm >> 6) & 7
            perm &= (e[1] << 6) | ~0o700
        elif tag == OTHER:
            e[1] &= perm & 7
            perm &= e[1] | ~0o007
        elif tag == GROUP_OBJ:
            group_obj = e
        elif tag == MASK:
            mask = e
            extended = True
        elif tag in (USER, GROUP):
            extended = True
        else:
            raise BadACL(f"unknown ACL tag {tag:#x}")
    masked = mask if mask is not None else group_obj
    if masked is None:
        raise BadACL("ACL without a group entry")
    masked[1] &= (perm >> 3) & 7
    perm &= (masked[1] << 3) | ~0o070
    new_mode = (mode & ~0o777) | (perm & 0o777)
    access = pack(entries) if extended else None
    return new_mode, access, default if stat.S_ISDIR(mode) else None
