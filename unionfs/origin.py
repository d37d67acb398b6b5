"""``overlay.origin``: the file handle of the lower object a copy came from (kernel
fs/overlayfs/copy_up.c ovl_encode_real_fh, namei.c ovl_check_fb_len; semantics §6.5).

Written on every copy of a directory and of a file with one link, in the kernel's
format, so that the kernel (and we, after a remount) still show the lower inode
number for it.  The value is ``struct ovl_fb``: version 0, magic 0xfb, its length,
flags, the handle type, the 16-byte uuid of the lower filesystem, the handle.
"""

from __future__ import annotations

import errno
import os
import sys

from unionfs import sysio

VERSION, MAGIC = 0, 0xFB
FLAG_BIG_ENDIAN, FLAG_ANY_ENDIAN, FLAG_PATH_UPPER = 1, 2, 4
HEADER = 5 + 16
CPU_ENDIAN = FLAG_BIG_ENDIAN if sys.byteorder == "big" else 0
NULL_UUID = bytes(16)

_uuids: dict[int, bytes] = {}  # st_dev -> s_uuid, asked once per filesystem


def fs_uuid(dirfd: int) -> bytes:
    dev = os.fstat(dirfd).st_dev
    got = _uuids.get(dev)
    if got is None:
        got = _uuids[dev] = sysio.fs_uuid(dirfd) or NULL_UUID
    return got


_decodes: list[bool] = []


def decodes() -> bool:
    """May we open file handles?  The kernel records an origin's handle only then (its
    ovl_can_decode_fh asks for CAP_DAC_READ_SEARCH), an empty origin otherwise."""
    if not _decodes:
        _decodes.append(sysio.can_open_handles())
    return _decodes[0]


def encode(dirfd: int, name: str, with_uuid: bool = True, flags: int = 0) -> bytes:
    """The origin value for ``name`` in ``dirfd``: empty where the filesystem can't
    make file handles or we may not open them, as the kernel stores it then.
    ``with_uuid``: not with uuid=off.  ``flags``: FLAG_PATH_UPPER for an upper object's
    handle (the index directory's ``overlay.upper``)."""
    if not decodes():
        return b""
    try:
        kind, fid = sysio.name_to_handle(dirfd, name)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EOVERFLOW):
            return b""
        raise
    uuid = fs_uuid(dirfd) if with_uuid else NULL_UUID
    return bytes([VERSION, MAGIC, HEADER + len(fid), CPU_ENDIAN | flags, kind]) + uuid + fid


def parse(value: bytes) -> tuple[int, bytes, bytes] | None:
    """(handle type, uuid, handle) of a valid origin; None for an empty or broken one,
    which the kernel ignores too."""
    if len(value) < HEADER or value[0] != VERSION or value[1] != MAGIC or \
            value[2] != len(value) or value[3] & ~(FLAG_BIG_ENDIAN | FLAG_ANY_ENDIAN
                                                  | FLAG_PATH_UPPER):
        return None
    if not value[3] & FLAG_ANY_ENDIAN and value[3] & FLAG_BIG_ENDIAN != CPU_ENDIAN:
        return None
    return value[4], value[5:HEADER], value[HEADER:]


def matches(parsed: tuple[int, bytes, bytes], dirfd: int, name: str) -> bool:
    """Is ``name`` in ``dirfd`` the object the origin names?"""
    kind, uuid, fid = parsed
    try:
        got_kind, got_fid = sysio.name_to_handle(dirfd, name)
    except OSError:
        return False
    return (got_kind, got_fid) == (kind, fid) and uuid in (NULL_UUID, fs_uuid(dirfd))


def open_origin(parsed: tuple[int, bytes, bytes], mount_fd: int, strict: bool = False
                ) -> int | None:
    """An O_PATH fd for the origin on the filesystem of ``mount_fd``, or None (gone, or
    not ours to open: open_by_handle_at needs CAP_DAC_READ_SEARCH).  ``strict``: only a
    handle that is gone (ESTALE, ENOENT) or of another filesystem is None, any other
    failure raises, as the kernel's ovl_decode_real_fh passes it on."""
    kind, uuid, fid = parsed
    if uuid not in (NULL_UUID, fs_uuid(mount_fd)):
        return None
    try:
        # open_by_handle_at takes no O_PATH fd for the filesystem
        fs_fd = os.open(sysio.proc_fd(mount_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if strict:
            raise
        return None
    try:
        return sysio.open_by_handle(fs_fd, kind, fid)
    except OSError as e:
        if strict and e.errno not in (errno.ESTALE, errno.ENOENT):
            raise
        return None
    finally:
        os.close(fs_fd)


def stat_by_handle(parsed: tuple[int, bytes, bytes], roots: list[tuple[int, int]],
                   strict: bool = False) -> os.stat_result | None:
    """The stat of the object an origin names, opened by its handle on the first of the
    filesystems of ``roots`` ((st_dev, fd) of layer roots, each filesystem tried once)
    where it opens (``strict``: as open_origin's)."""
    tried: set[int] = set()
    for dev, root in roots:
        if dev in tried:
            continue
        tried.add(dev)
        fd = open_origin(parsed, root, strict)
        if fd is None:
            continue
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)
    return None
