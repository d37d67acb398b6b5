"""Mount options as the command line, fstab or a container engine give them: ``-o`` groups
(``\\,`` escapes, quoted values, lowerdir's ``\\:``), the mount-program form, the
feature options and what they imply.  The only clean error is a one-line MountError."""

from __future__ import annotations

import argparse
import math

from unionfs.cli import config_from_args
from unionfs.config import BUILTIN_DEFAULTS, resolve_features, split_lowerdir, split_options
from unionfs.errors import MountError

from .common import Finding

_ARGS = argparse.Namespace(foreground=False, debug=False, debug_fuse=False, log=None)


def _check(cfg_groups: list[str], strict: bool) -> None:
    paths = ["/m"] if any("lowerdir=" in g for g in cfg_groups) or not strict \
        else ["/l1:/l2", "/u", "/w", "/m"]
    try:
        cfg = config_from_args(paths, cfg_groups, _ARGS, strict=strict)
        features = resolve_features(cfg.features, cfg.userxattr, cfg.upper is not None,
                                    dict(BUILTIN_DEFAULTS))
    except MountError as e:
        if not str(e) or "\n" in str(e):
            raise Finding(f"not a one-line error: {str(e)!r}") from None
        return
    if not cfg.lowers or any(not p for p in cfg.lowers):
        raise Finding(f"accepted an empty layer: {cfg.lowers!r}")
    if not (0 <= cfg.timeout < 1e9) or math.isnan(cfg.timeout):
        raise Finding(f"accepted timeout {cfg.timeout!r}")
    for idmap in (cfg.owners.uid, cfg.owners.gid):
        if idmap.squash is not None and not 0 <= idmap.squash < 1 << 32:
            raise Finding(f"accepted squash id {idmap.squash}")
        for d, s, n in idmap.ranges:
            if min(d, s) < 0 or n <= 0:
                raise Finding(f"accepted id range {(d, s, n)}")
    if cfg.xattr_permissions not in (0, 1, 2) or cfg.whiteouts not in ("kernel", "oci"):
        raise Finding("accepted a bad xattr_permissions= or whiteouts=")
    if features.redirect not in ("on", "follow", "nofollow"):
        raise Finding(f"redirect resolved to {features.redirect!r}")


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    strict = not text.startswith("!")  # "!": fuse-overlayfs's (mount program's) form
    groups = text.lstrip("!").split("\n")
    for group in groups:
        words = split_options(group)
        if not words:
            raise Finding(f"split_options({group!r}) gave nothing")
    try:
        layers = split_lowerdir(groups[0])
        if any(not p for p in layers):
            raise Finding(f"split_lowerdir({groups[0]!r}) gave an empty layer")
    except MountError:
        pass
    _check(groups, strict)


def seeds() -> list[bytes]:
    return [s.encode() for s in (
        "lowerdir=/a\\:b:/c,upperdir=/u,workdir=/w",
        "redirect_dir=on,index=on,metacopy=on,nfs_export=off,xino=auto,uuid=null",
        "userxattr,volatile=0,noatime,strictatime,nodiratime,lazytime",
        "uidmapping=:0:100000:65536,gidmapping=0:1:2:3:4:5,squash_to_root",
        "squash_to_uid=7,squash_to_gid=8,xattr_permissions=2,timeout=0.5,writeback",
        'context="system_u:object_r:container_file_t:s0:c1,c2",allow_other,fsname=x',
        "!lowerdir=/l,upperdir=/u,workdir=/w,fast_ino,threaded=1,plugins=,x-systemd.a",
        "ro,nodev\nwhiteouts=oci,fsync=0,noacl",
        "defaults,,rw,\\,,timeout=nan,index=off",
    )]
