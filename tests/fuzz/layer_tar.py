"""A layer tar (untrusted) applied into a fresh directory (``pyunionfs layer apply``).

Clean outcomes: the layer, or a LayerError of one line with nothing left behind.  A
layer that applies must also survive the round trip the image commands make of it:
``diff`` reads it, ``export`` writes it out and applying that gives the same tree."""

from __future__ import annotations

import errno
import gzip
import os
import tarfile

from unionfs.oci import layer
from unionfs.oci.diff import changes
from unionfs.oci.layer import LayerError

from . import common
from .common import Finding, info, sample_layer, tar_bytes

# What the machine lacks, not what the tar says: never a finding.
ENVIRONMENT = (errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def _one_line(e: Exception) -> None:
    text = str(e)
    if not text or "\n" in text or "\r" in text:
        raise Finding(f"not a one-line error: {text!r}")


def apply_checked(src: str, dest: str) -> layer.Applied | None:
    """layer.apply, with its errors held to the contract: None for a clean refusal."""
    work = os.path.dirname(dest)
    before = set(os.listdir(work))
    try:
        return layer.apply(src, dest)
    except LayerError as e:
        _one_line(e)
    except OSError as e:
        if e.errno not in ENVIRONMENT:
            raise
    left = set(os.listdir(work)) - before
    if left:
        raise Finding(f"a refused layer left {sorted(left)} behind")
    return None


def one_input(data: bytes) -> None:
    box = common.sandbox()
    with box.input_dir() as work:
        src = os.path.join(work, "in.tar")
        with open(src, "wb") as f:
            f.write(data)
        dest = os.path.join(work, "layer")
        if apply_checked(src, dest) is None:
            return
        try:
            changes(dest)
        except LayerError as e:
            _one_line(e)
        out = os.path.join(work, "out.tar")
        layer.export(dest, out, compression=None)
        again = os.path.join(work, "again")
        if apply_checked(out, again) is None:
            raise Finding("our own export of an applied layer is refused")
        a, b = common.layer_snapshot(dest), common.layer_snapshot(again)
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise Finding(f"apply -> export -> apply changed {diff[:5]}: "
                          f"{[(a.get(k), b.get(k)) for k in diff[:2]]}")


def seeds() -> list[bytes]:
    plain = sample_layer()
    gnu = tar_bytes([info("a/", tarfile.DIRTYPE, 0o755), (info("a/" + "n" * 120), b"long"),
                     info("a/.wh.b"), info("l", tarfile.LNKTYPE, linkname="a/" + "n" * 120)],
                    fmt=tarfile.GNU_FORMAT)
    ustar = tar_bytes([info("./", tarfile.DIRTYPE, 0o755), info(".wh..wh..opq"),
                       (info("x"), b"x"), info("d", tarfile.BLKTYPE, 0o600, devmajor=7,
                                                devminor=0)],
                      fmt=tarfile.USTAR_FORMAT)
    hostile = tar_bytes([info("esc", tarfile.SYMTYPE, 0o777, linkname="../../sentinel"),
                         (info("esc/canary"), b"pwned"),
                         info("../up"), info("/abs"),
                         info("h", tarfile.LNKTYPE, linkname="../../sentinel/canary"),
                         (info("x", pax_headers={"SCHILY.xattr.trusted.overlay.opaque": "y",
                                                 "SCHILY.xattr.user.a": "\udcff"}), b"")])
    return [plain, gzip.compress(plain, mtime=0), gnu, ustar, hostile]
