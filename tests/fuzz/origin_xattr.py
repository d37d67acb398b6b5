"""``overlay.origin`` as found on disk: ``struct ovl_fb`` (origin.parse), and the index
entry name made of it.  A broken value is ignored (None), as the kernel ignores it."""

from __future__ import annotations

from unionfs import origin

from .common import Finding


def one_input(data: bytes) -> None:
    got = origin.parse(data)
    if got is None:
        return
    kind, uuid, fid = got
    if len(uuid) != 16 or not 0 <= kind < 256:
        raise Finding(f"origin {data!r} parsed as {got!r}")
    flags = data[3]
    if data[:2] != bytes([origin.VERSION, origin.MAGIC]) or data[2] != len(data) or \
            flags & ~(origin.FLAG_BIG_ENDIAN | origin.FLAG_ANY_ENDIAN | origin.FLAG_PATH_UPPER):
        raise Finding(f"origin {data!r} with a bad header accepted")
    if bytes([origin.VERSION, origin.MAGIC, len(data), flags, kind]) + uuid + fid != data:
        raise Finding(f"origin {data!r} does not rebuild from its parts")


def seeds() -> list[bytes]:
    fid = bytes(range(8))
    good = bytes([0, 0xFB, origin.HEADER + len(fid), origin.CPU_ENDIAN, 1]) + bytes(16) + fid
    return [good, good[:-1], bytes([0, 0xFB, origin.HEADER, 2, 0xFF]) + b"u" * 16, b"",
            bytes([0, 0xFB, origin.HEADER, 8, 1]) + bytes(16)]
