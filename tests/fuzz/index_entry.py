"""An origin value read from an upper file, looked up in the index (index.lookup,
index.is_entry_of, as copy-up and unlink do): an entry, or none; never an error for a
value the kernel would ignore."""

from __future__ import annotations

import os
from typing import cast

from unionfs import index, origin
from unionfs.layers import Layer

from . import common
from .common import Finding


class _Index:
    """What index.lookup reads of a Layer: the fd of WORK/index."""

    def __init__(self) -> None:
        self.path = common.scratch("index")
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fid = bytes(range(8))
        self.value = bytes([0, 0xFB, origin.HEADER + len(fid), origin.CPU_ENDIAN, 1]) + \
            bytes(16) + fid
        with open(os.path.join(self.path, index.entry_name(self.value)), "w") as f:
            f.write("entry")
        self.st = os.stat(os.path.join(self.path, index.entry_name(self.value)))


_fixture: list[_Index] = []


def one_input(data: bytes) -> None:
    if not _fixture:
        _fixture.append(_Index())
    idx = _fixture[0]
    layer = cast(Layer, idx)
    try:
        found = index.lookup(layer, data)
        is_entry = index.is_entry_of(layer, data, idx.st)
    except OSError as e:
        raise Finding(f"origin {data!r}: the index lookup failed ({e})") from None
    if (found is not None) != (data == idx.value) or is_entry != (data == idx.value):
        raise Finding(f"origin {data!r}: found {found!r}, entry {is_entry}")


def seeds() -> list[bytes]:
    fid = bytes(range(8))
    good = bytes([0, 0xFB, origin.HEADER + len(fid), origin.CPU_ENDIAN, 1]) + bytes(16) + fid
    return [good, good[:-1], b"", bytes([0, 0xFB, 100, 0, 1]) + bytes(95)]
