"""The image verbs of the command line (``pyunionfs layer|diff|image``): one line naming the
problem and a non-zero exit for bad input, as the mount verbs."""

from __future__ import annotations

import argparse
import os
import sys

from unionfs.oci import layer
from unionfs.oci.diff import changes

PROG = "pyunionfs"


def _compression(args: argparse.Namespace) -> str | None:
    if args.compression:
        return None if args.compression == "none" else args.compression
    out = args.output
    if out.endswith((".gz", ".tgz")):
        return "gzip"
    if out.endswith((".zst", ".zstd")):
        return "zstd"
    return None


def _size_under(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def run(args: argparse.Namespace) -> int:
    try:
        if args.cmd == "layer" and args.layer_cmd == "apply":
            update, close = layer.terminal_progress(os.path.getsize(args.tar), "apply",
                                                    args.quiet)
            try:
                done = layer.apply(args.tar, args.dir, userxattr=args.userxattr,
                                   progress=update)
            finally:
                close()
            print(done.diff_id)
            if not done.owners_kept:
                print(f"{PROG}: note: owners not kept (only root may give files away)",
                      file=sys.stderr)
            return 0
        if args.cmd == "layer" and args.layer_cmd == "export":
            quiet = args.quiet or not sys.stderr.isatty()  # no walk for a bar nobody sees
            update, close = layer.terminal_progress(0 if quiet else _size_under(args.upper),
                                                    "export", quiet)
            try:
                out = layer.export(args.upper, args.output, _compression(args), args.mtime,
                                   progress=update,
                                   lowers=args.lowers or None)
            finally:
                close()
            print(f"diff_id {out.diff_id}")
            print(f"digest {out.digest}")
            return 0
        if args.cmd == "diff":
            for kind, path in changes(args.upper, args.lowers or None):
                print(kind, path)
            return 0
    except (layer.LayerError, OSError) as e:
        return report(e)
    raise AssertionError(args)


def report(e: layer.LayerError | OSError) -> int:
    """The one line a failed image verb prints; its exit status."""
    if isinstance(e, OSError):
        where = f"'{e.filename}': " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr)
    else:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    return 1
