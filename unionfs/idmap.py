"""Owner translation at the edge of the filesystem (fuse-overlayfs's ``uidmapping=``,
``gidmapping=``, ``squash_to_*``): ids on disk are shown translated, and ids that
come in (the caller's, a chown's) are stored translated back.

``uidmapping=DISK:SHOWN:LEN[:DISK:SHOWN:LEN...]``: an on-disk id in
[DISK, DISK+LEN) is shown as SHOWN + (id - DISK).  containers-storage writes the
list with a leading colon (``uidmapping=:0:100000:65536``); empty fields are skipped.
An on-disk id outside every range is shown as the overflow id 65534.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from unionfs.errors import MountError, oserror

OVERFLOW_ID = 65534


@dataclass(frozen=True)
class Caller:
    """Who asks, with ids as the mount sees them (before any uidmapping=): what the
    set-id rules (attrs.setid_kept) need of a request's context."""

    pid: int
    uid: int
    gid: int


def parse_mapping(spec: str, what: str) -> list[tuple[int, int, int]]:
    fields = [f for f in spec.split(":") if f != ""]
    if len(fields) % 3 or not fields:
        raise MountError(f"{what}={spec}: expected DISK:SHOWN:LEN triples")
    try:
        nums = [int(f) for f in fields]
    except ValueError:
        raise MountError(f"{what}={spec}: ids must be numbers") from None
    out = [(nums[i], nums[i + 1], nums[i + 2]) for i in range(0, len(nums), 3)]
    if any(n < 0 for n in nums) or any(length == 0 for _, _, length in out):
        raise MountError(f"{what}={spec}: ids and lengths must be positive")
    return out


@dataclass
class IdMap:
    ranges: list[tuple[int, int, int]] = field(default_factory=list)
    squash: int | None = None  # every object shown with this id; changes ignored

    @property
    def identity(self) -> bool:
        return not self.ranges and self.squash is None

    def shown(self, disk: int) -> int:
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return disk
        for d, s, n in self.ranges:
            if d <= disk < d + n:
                return s + disk - d
        return OVERFLOW_ID

    def disk(self, shown: int, strict: bool = True) -> int:
        """The on-disk id for ``shown``; ``strict`` (a chown) refuses an id outside the
        map with EINVAL, otherwise (a new object's owner) it is stored as overflow."""
        if not self.ranges:
            return shown
        for d, s, n in self.ranges:
            if s <= shown < s + n:
                return d + shown - s
        if strict:
            raise oserror(errno.EINVAL)
        return OVERFLOW_ID


@dataclass
class Owners:
    """The uid and gid maps of one mount."""

    uid: IdMap = field(default_factory=IdMap)
    gid: IdMap = field(default_factory=IdMap)

    @property
    def identity(self) -> bool:
        return self.uid.identity and self.gid.identity

    @property
    def squashed(self) -> bool:
        return self.uid.squash is not None or self.gid.squash is not None
