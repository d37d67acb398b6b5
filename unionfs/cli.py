"""Command line: ``pyunionfs mount|umount``, and the mount(8) helper form."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Any, NoReturn

from unionfs import __version__
from unionfs.config import MountConfig, apply_options, parse_options, split_lowerdir, split_options
from unionfs.errors import MountError

PROG = "pyunionfs"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line naming the problem, not a usage dump.
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def _add_mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (default: daemon, exit once mounted)")
    p.add_argument("-d", "--debug", action="store_true",
                   help="log every request (implies --foreground unless --log is given)")
    p.add_argument("--debug-fuse", action="store_true", help="also libfuse's own debug output")
    p.add_argument("--log", metavar="FILE", help="log to FILE (default: stderr in the "
                   "foreground, syslog in the background)")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="comma-separated options: lowerdir=, upperdir=, workdir=, "
                   "redirect_dir=, index=, metacopy=, xino=, uuid=, nfs_export=, "
                   "userxattr, whiteouts=kernel|oci, volatile, writeback, uidmapping=, "
                   "gidmapping=, "
                   "squash_to_root, squash_to_uid=, squash_to_gid=, xattr_permissions=, "
                   "fsname=, and libfuse/mount words (ro, allow_other, noatime, ...)")


@functools.cache  # built once: a warm server's workers parse with the one it built
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A userspace union filesystem with Linux kernel "
                "overlayfs semantics.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    m = sub.add_parser("mount", help="mount an overlay",
                       description="Mount LOWERS (colon-separated, leftmost on top; '\\:' "
                       "is a literal colon) with UPPER and WORK at MERGED.  With only LOWERS "
                       "and MERGED the mount is read-only.",
                       usage="%(prog)s [options] LOWER1[:LOWER2...] [UPPER WORK] MERGED, or "
                       "%(prog)s -o remount,ro|rw|noatime|... MERGED")
    _add_mount_options(m)
    m.add_argument("paths", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    u = sub.add_parser("umount", help="unmount an overlay",
                       description="Unmount MERGED; the daemon exits by itself.")
    u.add_argument("-z", "--lazy", action="store_true", help="lazy unmount (detach now)")
    u.add_argument("merged", metavar="MERGED")
    st = sub.add_parser("stats", help="requests a live mount's daemon has served",
                        description="Print the requests the pyunionfs daemon of MERGED has "
                        "served, per operation, with the time their handlers took and the "
                        "daemon's own.  Asks the daemon on a socket; never touches the mount.")
    st.add_argument("--json", action="store_true", help="the counts as JSON")
    st.add_argument("merged", metavar="MERGED")
    _add_image_commands(sub)
    return p


def _add_image_commands(sub: Any) -> None:
    lay = sub.add_parser("layer", help="apply or export a layer tar (Docker/OCI)",
                         description="Layer tars: .wh.NAME whiteouts and .wh..wh..opq opaque "
                         "marks in, overlay whiteouts and opaque xattrs out, and back.")
    lsub = lay.add_subparsers(dest="layer_cmd", required=True, parser_class=_Parser)
    a = lsub.add_parser("apply", help="unpack a layer tar into a new layer directory",
                        description="Unpack LAYER (tar, tar.gz or tar.zst) into DIR, a new or "
                        "empty directory, as an overlay layer; refuses absolute names, '..', "
                        "writes through symlinks, links to names outside the layer, duplicate "
                        "entries.  Prints the layer's diff_id.")
    a.add_argument("tar", metavar="LAYER")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("--userxattr", action="store_true",
                   help="marks in user.overlay.* even where trusted.overlay.* would work")
    a.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e = lsub.add_parser("export", help="write an upper directory as a layer tar",
                        description="Write UPPER as a layer tar (docker commit): whiteouts as "
                        ".wh.NAME, opaque directories with .wh..wh..opq, in a stable order.  "
                        "Prints the diff_id (sha256 of the tar) and the digest of the file.")
    e.add_argument("upper", metavar="UPPER")
    e.add_argument("-o", "--output", required=True, metavar="LAYER.tar[.gz|.zst]")
    e.add_argument("--compression", choices=("gzip", "zstd", "none"),
                   help="default: from the output's name (.gz, .zst), else none")
    e.add_argument("--mtime", type=int, metavar="SECONDS",
                   help="this time on every entry, for reproducible output")
    e.add_argument("--lowers", metavar="LOWER1[:LOWER2...]",
                   help="the lower layers (leftmost on top): a directory moved with "
                   "redirect_dir=on and a metacopy=on copy are written with what they show")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    d = sub.add_parser("diff", help="list the changes an upper directory holds",
                       description="List what UPPER changes in the layers below, as docker "
                       "diff does: 'A path' added, 'C path' changed, 'D path' deleted.")
    d.add_argument("upper", metavar="UPPER")
    d.add_argument("--lowers", metavar="LOWER1[:LOWER2...]",
                   help="the lower layers (leftmost on top), to tell added from changed; "
                   "without them a name with overlay.origin or a directory is changed")
    img = sub.add_parser("image", help="mount a container image archive, commit changes",
                         description="Images from 'docker save' archives and OCI layouts, "
                         "their layers applied once into a shared store.")
    isub = img.add_subparsers(dest="image_cmd", required=True, parser_class=_Parser)
    im = isub.add_parser("mount", help="mount an image archive",
                         description="Apply the layers of ARCHIVE (a docker save tar, or an "
                         "OCI image layout, a directory or a tar) into the store, those it "
                         "lacks only, each checked against its digests, and mount them at "
                         "MERGED; with no --upper, a throwaway upper in the store.")
    im.add_argument("archive", metavar="ARCHIVE")
    im.add_argument("merged", metavar="MERGED")
    im.add_argument("--upper", metavar="DIR")
    im.add_argument("--work", metavar="DIR")
    _store_args(im)
    _add_mount_options(im)
    ic = isub.add_parser("commit", help="write a mounted image with its changes as an archive",
                         description="Write the image mounted at MERGED, with its upper as a "
                         "new layer on top, as an archive that docker load, podman load and "
                         "skopeo read (docker save's manifest.json and an OCI layout).")
    ic.add_argument("merged", metavar="MERGED")
    ic.add_argument("-o", "--output", required=True, metavar="NEW.tar")
    ic.add_argument("--tag", metavar="NAME:TAG")
    _store_args(ic)
    iu = isub.add_parser("umount", help="unmount an image and drop its throwaway upper")
    iu.add_argument("merged", metavar="MERGED")
    _store_args(iu)


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR",
                   help="the layer store (default: $XDG_DATA_HOME/pyunionfs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no layer lines")


def _escape_lower(path: str) -> str:
    return path.replace(":", "\\:")


def _image_command(args: argparse.Namespace) -> int:
    # tar, digests and the store: not needed to mount a plain overlay
    from unionfs.oci import cli as oci_cli
    from unionfs.oci.image import Store
    from unionfs.oci.layer import LayerError

    if args.cmd != "image":
        if getattr(args, "lowers", None):
            args.lowers = split_lowerdir(args.lowers)  # the mount's own "\\:" escapes
        return oci_cli.run(args)
    try:
        store = Store(args.store)
        if args.image_cmd == "commit":
            digest = store.commit(args.merged, args.output, args.tag, quiet=args.quiet)
            print(f"config {digest}")
            return 0
        if args.image_cmd == "umount":
            rc = _umount(args.merged, lazy=False)
            if rc == 0:
                store.forget_mount(args.merged)
            return rc
        if (args.upper is None) != (args.work is None):
            raise MountError("--upper and --work go together")
        say = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
        imported = store.import_archive(args.archive, say=say, quiet=args.quiet)
        throwaway = None
        upper, work = args.upper, args.work
        if upper is None:
            throwaway, upper, work = store.new_container()
        lowers = ":".join(_escape_lower(p) for p in imported.lowers)
        try:
            cfg = config_from_args([lowers, upper, work, args.merged], args.options, args)
            # recorded first: in the foreground the mount ends before _mount returns
            store.record_mount(args.merged, imported, upper, work, throwaway)
            if cfg.foreground:
                say(f"mounting {len(imported.lowers)} layers at {args.merged} in the foreground")
            rc = _mount(cfg)
        except BaseException:
            store.forget_mount(args.merged)  # the throwaway upper too
            raise
        if rc != 0 or cfg.foreground:
            store.forget_mount(args.merged)
        else:
            say(f"mounted {len(imported.lowers)} layers at {args.merged} "
                f"({imported.applied} applied, {imported.shared} from the store)")
        return rc
    except (LayerError, OSError) as e:
        return oci_cli.report(e)


@functools.cache
def helper_parser() -> argparse.ArgumentParser:
    """fuse-overlayfs's command line (``PROG -o OPTS MERGED``, as containers-storage runs
    a mount_program) and mount(8)'s helper form (``PROG SOURCE MERGED -o OPTS``)."""
    p = _Parser(prog=PROG, usage=f"{PROG} [-f] [-d] -o lowerdir=...[,upperdir=...,"
                "workdir=...] [SOURCE] MOUNTPOINT")
    p.add_argument("-V", "--version", action="version", version=f"{PROG} {__version__}")
    _add_mount_options(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    return p


def config_from_args(paths: list[str], options: list[str], args: argparse.Namespace,
                     fsname: str | None = None, strict: bool = True) -> MountConfig:
    parsed = parse_options(options, strict=strict)
    ours, fuse = parsed.ours, parsed.fuse
    if parsed.unknown:
        print(f"{PROG}: warning: ignoring unknown options: {', '.join(parsed.unknown)}",
              file=sys.stderr)
    lowers = upper = work = None
    if not strict and "lowerdir" not in ours:
        raise MountError("missing option -o lowerdir=...")
    if "lowerdir" in ours:
        if len(paths) != 1:
            raise MountError("with -o lowerdir=... give only the mount point")
        lowers, merged = split_lowerdir(ours["lowerdir"]), paths[0]
        upper, work = ours.get("upperdir"), ours.get("workdir")
    elif len(paths) == 4:
        lowers, upper, work, merged = split_lowerdir(paths[0]), paths[1], paths[2], paths[3]
    elif len(paths) == 2:
        lowers, merged = split_lowerdir(paths[0]), paths[1]
    else:
        raise MountError("expected LOWERS UPPER WORK MERGED, or LOWERS MERGED for a "
                         "read-only mount")
    cfg = MountConfig(lowers=lowers, upper=upper, work=work, merged=merged,
                      foreground=args.foreground or (args.debug and not args.log),
                      debug=args.debug, debug_fuse=args.debug_fuse, log=args.log,
                      fuse_options=fuse)
    if not strict:
        # The mount-program forms speak fuse-overlayfs's dialect: containers-storage
        # writes layers with .wh. files for them and passes no option to say so.
        cfg.whiteouts = "oci"
    apply_options(cfg, ours)
    for o in fuse:
        if o.startswith("fsname="):
            cfg.fsname = o.split("=", 1)[1]
    if fsname and fsname not in ("none", ""):
        cfg.fsname = fsname
    return cfg


def _mount(cfg: MountConfig) -> int:
    from unionfs import daemon  # pyfuse3 is needed only to mount

    return daemon.mount(cfg)


def _umount(merged: str, lazy: bool) -> int:
    from unionfs.client import umount

    return umount(merged, lazy)


def _remounting(options: list[str], merged: str) -> bool:
    """``-o remount,...``: change the flags of the mount at ``merged`` (True), or nothing."""
    words = [w for group in options for w in split_options(group)]
    if "remount" not in words:
        return False
    from unionfs.remount import remount

    remount(merged, words)
    return True


def _stats(merged: str, as_json: bool) -> int:
    from unionfs import stats  # no trio, no pyfuse3: a query costs an interpreter start

    try:
        data = stats.fetch(merged)
    except stats.StatsError as e:
        raise MountError(str(e)) from None
    print(json.dumps(data, indent=1) if as_json else stats.render(data))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] not in ("mount", "umount", "stats", "layer", "diff", "image",
                                    "--version", "-h", "--help"):
            # "pyunionfs -o OPTS MERGED" (a mount_program), or mount(8) -> mount.fuse3 ->
            # "pyunionfs SOURCE MOUNTPOINT -o OPTS"
            args = helper_parser().parse_args(argv)
            if len(args.paths) > 2:
                raise MountError("expected [SOURCE] MOUNTPOINT with -o lowerdir=...")
            if _remounting(args.options, args.paths[-1]):
                return 0
            source = args.paths[0] if len(args.paths) == 2 else None
            cfg = config_from_args(args.paths[-1:], args.options, args, fsname=source,
                                   strict=False)
            return _mount(cfg)
        args = build_parser().parse_args(argv)
        if args.cmd in ("layer", "diff", "image"):
            return _image_command(args)
        if args.cmd == "umount":
            return _umount(args.merged, args.lazy)
        if args.cmd == "stats":
            return _stats(args.merged, args.json)
        if len(args.paths) == 1 and _remounting(args.options, args.paths[0]):
            return 0
        return _mount(config_from_args(args.paths, args.options, args))
    except MountError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # A reader that took what it wanted (``pyunionfs stats M | head``): no traceback,
        # and none either when Python flushes stdout on its way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
