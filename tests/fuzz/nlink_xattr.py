"""``overlay.nlink`` as found on an index entry ("U+1", "L-1"): index.parse_nlink against
the kernel's reading of it (ovl_get_nlink: at most 12 bytes, then kstrtoint of what
follows the letter: an optional sign, decimal digits, an optional newline, a 32-bit
int; a count of 0 or less is broken).  A broken value gives None (the real count)."""

from __future__ import annotations

import re

from unionfs import index

from .common import Finding

# "-5": _kstrtoull of "5" (no "+" taken); "+5": kstrtoull, which takes the "+" itself
_KSTRTOINT = re.compile(rb"(-|\+)([0-9]+)\n?")
INT_MAX = (1 << 31) - 1


def kernel_nlink(value: bytes | None, upper: int, lower: int) -> int | None:
    """The kernel's answer; None where it falls back to the real count."""
    if not value or len(value) > 12:
        return None  # getxattr into char buf[13] with size 12: ERANGE
    value = value.split(b"\0", 1)[0]  # buf is a C string
    if value[:1] not in (b"U", b"L") or value[1:2] not in (b"+", b"-"):
        return None
    m = _KSTRTOINT.fullmatch(value[1:])
    if m is None:
        return None
    n = int(m.group(2))
    diff = -n if m.group(1) == b"-" else n
    if not -INT_MAX - 1 <= diff <= INT_MAX:
        return None
    total = (upper if value[:1] == b"U" else lower) + diff
    return total if 0 < total <= INT_MAX else None


def one_input(data: bytes) -> None:
    upper, lower = (data[0] if data else 1), (data[1] if len(data) > 1 else 1)
    value = data[2:]
    got = index.parse_nlink(value, upper, lower)
    want = kernel_nlink(value, upper, lower)
    if got != want:
        raise Finding(f"overlay.nlink {value!r} (upper {upper}, lower {lower} links): "
                      f"{got!r}, the kernel reads {want!r}")


def seeds() -> list[bytes]:
    return [b"\x02\x02U+1", b"\x03\x01L-1", b"\x01\x01U-5", b"\x01\x01U+1\n", b"\x02\x02U",
            b"\x02\x02X+1", b"\x01\x01U+2147483646",
            b"\x01\x01L-+1"]
