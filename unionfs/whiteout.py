"""On-disk markers: whiteouts, opaque directories and the private xattr namespace.

The formats are the kernel's (overlay-semantics §3, §4, §10), so that an UPPER
written here mounts under kernel overlayfs and the reverse.
"""

from __future__ import annotations

import errno
import os
import stat

from unionfs import sysio
from unionfs.errors import oserror

PRIVATE = "trusted.overlay."
OPAQUE = PRIVATE + "opaque"
XATTR_WHITEOUT = PRIVATE + "whiteout"
# Names a user sets under the private prefix are stored with one more "overlay."
# (kernel 6.7+), so they can never be mistaken for our own markers.
ESCAPED = PRIVATE + "overlay."
XATTR_NAME_MAX = 255


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_whiteout(dirfd: int, name: str, st: os.stat_result) -> bool:
    """A 0/0 char device, or (read-only support, kernel 6.7+) an empty regular
    file carrying ``trusted.overlay.whiteout``."""
    if is_whiteout_stat(st):
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return sysio.getxattr_or_none(dirfd, name, XATTR_WHITEOUT) is not None
    return False


def opaque_value(dirfd: int, name: str) -> bytes | None:
    return sysio.getxattr_or_none(dirfd, name, OPAQUE)


def is_opaque(dirfd: int, name: str) -> bool:
    return opaque_value(dirfd, name) == b"y"


def make_whiteout(dirfd: int, name: str) -> None:
    sysio.mknod(dirfd, name, stat.S_IFCHR, 0)


def set_opaque(dirfd: int, name: str) -> None:
    sysio.setxattr(dirfd, name, OPAQUE, b"y")


def is_private(real_name: str) -> bool:
    return real_name.startswith(PRIVATE)


def to_real_xattr(name: str) -> str:
    """The on-disk name for an xattr name given through the mount."""
    if name.startswith(PRIVATE):
        real = ESCAPED + name[len(PRIVATE):]
        if len(os.fsencode(real)) > XATTR_NAME_MAX:
            raise oserror(errno.EOPNOTSUPP)
        return real
    return name


def to_visible_xattr(real: str) -> str | None:
    """The name shown through the mount for an on-disk xattr, None if private."""
    if real.startswith(ESCAPED):
        return PRIVATE + real[len(ESCAPED):]
    if real.startswith(PRIVATE):
        return None
    return real
