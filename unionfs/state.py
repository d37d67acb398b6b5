"""What every filesystem operation works on: the layers, the inodes, the open handles."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from unionfs.errors import oserror
from unionfs.handles import HandleTable
from unionfs.inodes import InodeTable
from unionfs.layers import Layer, LayerStack


@dataclass
class State:
    stack: LayerStack
    inodes: InodeTable
    handles: HandleTable = field(default_factory=lambda: HandleTable())

    @property
    def upper(self) -> Layer:
        if self.stack.upper is None:
            raise oserror(errno.EROFS)
        return self.stack.upper

    def check_writable(self) -> None:
        if self.stack.upper is None:
            raise oserror(errno.EROFS)
