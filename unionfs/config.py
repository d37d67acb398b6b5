"""Mount configuration: parsing the layer list and options, and the kernel's mount checks."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from unionfs.errors import MountError
from unionfs.idmap import IdMap, Owners, parse_mapping

# libfuse options that pyfuse3.init() accepts; generic mount(8) words outside this
# list ("defaults", "rw", "auto", ...) are dropped silently, as mount helpers must.
FUSE_PASSTHROUGH = {
    "allow_root", "allow_other", "auto_unmount", "ro", "suid", "nosuid", "dev", "nodev",
    "exec", "noexec", "async", "sync", "dirsync",
}
# mount(8)'s atime words, in the order given, as the kernel's do_mount reads them: the
# flag each sets or clears.  libfuse refuses all but atime/noatime, and FUSE inodes never
# update their own atime (S_NOATIME): the real file's does, on our reads, unless we open it
# O_NOATIME.  So the policy is ours to apply: kernel overlayfs's private upper mount drops
# the upper's own atime flags and takes the overlay's, and so does ours where we may clone
# the upper's mount (layers.own_upper_mount); lazytime only defers writing them back.
ATIME_WORDS: dict[str, tuple[str, bool] | None] = {
    "noatime": ("noatime", True), "atime": ("noatime", False),
    "nodiratime": ("nodiratime", True), "diratime": ("nodiratime", False),
    "strictatime": ("strictatime", True), "nostrictatime": ("strictatime", False),
    "relatime": None, "norelatime": None, "lazytime": None, "nolazytime": None,
}
FUSE_PASSTHROUGH_PREFIXES = ("fsname=",)
SILENTLY_IGNORED = {"defaults", "rw", "auto", "noauto", "user", "users", "nouser", "nofail",
                    "_netdev"}
# SELinux labels: containers-storage always passes one; a label on a FUSE mount needs
# policy support we can't assume, so, like fuse-overlayfs, we accept and ignore them.
IGNORED_PREFIXES = ("context=", "fscontext=", "defcontext=", "rootcontext=", "x-")
# fuse-overlayfs options that change nothing here (our defaults already are what they
# ask for, or they tune fuse-overlayfs internals).
PEER_NOOPS = {"static_nlink", "threaded", "fast_ino",
              "ino32_t", "plugins", "noxattrs", "debug"}
WHITEOUT_MODES = ("kernel", "oci")


@dataclass
class MountConfig:
    lowers: list[str]
    upper: str | None
    work: str | None
    merged: str
    foreground: bool = False
    debug: bool = False
    debug_fuse: bool = False
    log: str | None = None
    fuse_options: list[str] = field(default_factory=list)
    fsname: str = "pyunionfs"
    userxattr: bool = False  # user.overlay.* even where trusted.* would work
    whiteouts: str = "kernel"  # also read OCI .wh. whiteouts ("oci")
    volatile: bool = False  # fsync is a no-op
    writeback: bool = False  # the kernel's writeback cache (docs/differences.md)
    noatime: bool = False  # reads leave atimes alone (-o noatime, unless strictatime after)
    atime: str = "relatime"  # the mount's atime policy: relatime, strictatime or noatime
    nodiratime: bool = False  # listings leave directory atimes alone
    acl: bool = True  # POSIX ACLs where the upper filesystem has them (off: -o noacl)
    owners: Owners = field(default_factory=Owners)
    # The kernel's feature options (redirect_dir=, index=, metacopy=, ...), as given.
    features: dict[str, str] = field(default_factory=dict)
    xattr_permissions: int = 0  # 2: owner/mode kept in user.containers.override_stat
    # How long the kernel may cache names and attributes.  Long, because every change
    # goes through the mount (lowers are immutable); 0 for layers changed underneath.
    timeout: float = 86400.0

    @property
    def readonly(self) -> bool:
        return self.upper is None


def split_lowerdir(spec: str) -> list[str]:
    """Split ``A:B:C`` into layers, top first; ``\\:`` is a literal colon."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(spec):
        c = spec[i]
        if c == "\\" and i + 1 < len(spec) and spec[i + 1] in ":\\":
            cur.append(spec[i + 1])
            i += 2
            continue
        if c == ":":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    if any(p == "" for p in parts):
        raise MountError(f"empty layer in lowerdir '{spec}'")
    return parts


OUR_KEYS = ("lowerdir", "upperdir", "workdir", "whiteouts", "uidmapping", "gidmapping",
            "squash_to_uid", "squash_to_gid", "xattr_permissions", "fsync", "timeout",
            "redirect_dir", "index", "metacopy", "xino", "nfs_export", "uuid")
OUR_FLAGS = ("userxattr", "volatile", "squash_to_root", "noacl", "writeback")


@dataclass
class Options:
    """What ``-o`` said: our own keys and flags, libfuse words, words we ignored."""

    ours: dict[str, str] = field(default_factory=dict)
    fuse: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def parse_options(opts: list[str], strict: bool = True) -> Options:
    """Split ``-o`` values into our own keys and libfuse options to pass on.  With
    ``strict`` an unknown word is an error; otherwise (fuse-overlayfs's command line)
    it is listed in ``unknown`` for a warning."""
    out = Options()
    for group in opts:
        for word in split_options(group):
            if not word:
                continue  # containers-storage may send ",,"
            key, eq, value = word.partition("=")
            if key in OUR_FLAGS:
                # "volatile=1" means volatile too; "=0" (or no, off, false) turns it off.
                if value.lower() not in ("0", "no", "off", "false") or not eq:
                    out.ours[key] = ""
                else:
                    out.ours.pop(key, None)
            elif eq and key in OUR_KEYS:
                out.ours[key] = value
            elif word in ATIME_WORDS:
                flag = ATIME_WORDS[word]
                if flag is not None and flag[1]:
                    out.ours[flag[0]] = ""
                elif flag is not None:
                    out.ours.pop(flag[0], None)
            elif word in FUSE_PASSTHROUGH or word.startswith(FUSE_PASSTHROUGH_PREFIXES):
                out.fuse.append(word)
            elif word in SILENTLY_IGNORED or word.startswith(IGNORED_PREFIXES):
                continue
            elif key in PEER_NOOPS and not strict:
                continue
            elif strict:
                raise MountError(f"unknown option '{word}'")
            else:
                out.unknown.append(word)
    return out


def apply_options(cfg: MountConfig, ours: dict[str, str]) -> None:
    """Our own option keys onto ``cfg``; bad values are one-line errors."""
    if "userxattr" in ours:
        cfg.userxattr = True
    if "whiteouts" in ours:
        if ours["whiteouts"] not in WHITEOUT_MODES:
            raise MountError(f"whiteouts={ours['whiteouts']}: expected one of "
                             + ", ".join(WHITEOUT_MODES))
        cfg.whiteouts = ours["whiteouts"]
    # strictatime clears noatime whatever the order (do_mount)
    cfg.noatime = "noatime" in ours and "strictatime" not in ours
    cfg.nodiratime = cfg.noatime or "nodiratime" in ours
    cfg.atime = "strictatime" if "strictatime" in ours else "noatime" if cfg.noatime \
        else "relatime"
    if "noacl" in ours:
        cfg.acl = False
    if "volatile" in ours or ours.get("fsync") == "0":
        cfg.volatile = True
    if "writeback" in ours:
        cfg.writeback = True
    if "uidmapping" in ours:
        cfg.owners.uid = IdMap(parse_mapping(ours["uidmapping"], "uidmapping"))
    if "gidmapping" in ours:
        cfg.owners.gid = IdMap(parse_mapping(ours["gidmapping"], "gidmapping"))
    # squash_to_uid/gid take precedence over squash_to_root, as in fuse-overlayfs.
    for key, idmap, default in (("squash_to_uid", cfg.owners.uid, 0),
                                ("squash_to_gid", cfg.owners.gid, 0)):
        value = ours.get(key)
        if value is None and "squash_to_root" in ours:
            value = str(default)
        if value is not None:
            if not value.isdigit():
                raise MountError(f"{key}={value}: expected a number")
            idmap.squash = int(value)
    if "timeout" in ours:
        try:
            cfg.timeout = float(ours["timeout"])
        except ValueError:
            cfg.timeout = -1.0
        if not 0 <= cfg.timeout < 1e9:
            raise MountError(f"timeout={ours['timeout']}: expected seconds (0 = cache nothing)")
    if cfg.writeback and cfg.timeout == 0:
        # The kernel would keep a regular file's first size and times for as long as it
        # holds the node: a lower changed underneath would never show its new ones.
        raise MountError("writeback needs a timeout above 0 (layers changed underneath "
                         "would keep their old sizes)")
    for key in FEATURE_VALUES:
        if key in ours:
            if ours[key] not in FEATURE_VALUES[key]:
                # the kernel's words (fs_parser's "Bad value for '%s'")
                raise MountError(f"bad value for '{key}': {ours[key]} (expected "
                                 + "|".join(FEATURE_VALUES[key]) + ")")
            cfg.features[key] = ours[key]
    if "xattr_permissions" in ours:
        value = ours["xattr_permissions"]
        if value not in ("0", "1", "2"):
            raise MountError(f"xattr_permissions={value}: expected 0, 1 or 2")
        cfg.xattr_permissions = int(value)


# -- the kernel's feature options (overlay-semantics §1.5; fs/overlayfs/params.c) ---------

FEATURE_VALUES = {
    "redirect_dir": ("on", "follow", "nofollow", "off"),
    "index": ("on", "off"), "metacopy": ("on", "off"), "nfs_export": ("on", "off"),
    "xino": ("on", "off", "auto"), "uuid": ("on", "off", "null", "auto"),
}
MODULE_PARAMETERS = "/sys/module/overlay/parameters"
# The kernel's built-in defaults (CONFIG_OVERLAY_FS_*), where the module says nothing.
BUILTIN_DEFAULTS = {"redirect_dir": False, "redirect_always_follow": True, "index": False,
                    "metacopy": False, "xino_auto": False, "nfs_export": False}
REDIRECT_MAX = 256  # the longest absolute redirect (module parameter redirect_max)


@dataclass(frozen=True)
class Features:
    """What the mount does, once defaults and dependencies are resolved as the kernel
    resolves them.  ``redirect``: "on" (write and follow), "follow", "nofollow"."""

    redirect: str = "follow"
    index: bool = False
    metacopy: bool = False
    xino: str = "off"
    nfs_export: bool = False
    uuid: str = "auto"
    redirect_max: int = REDIRECT_MAX

    @property
    def follow(self) -> bool:
        return self.redirect != "nofollow"

    @property
    def moves_dirs(self) -> bool:
        return self.redirect == "on"

    @property
    def offline_changes(self) -> bool:
        """May the lowers change between mounts?  Only while none of the features that
        record lower identities is on (the kernel's ovl_allow_offline_changes)."""
        return not (self.index or self.metacopy or self.redirect == "on" or self.xino == "on")

    def words(self) -> list[str]:
        """The options as /proc/mounts would list them (our log line says them)."""
        out = [f"redirect_dir={self.redirect}", f"index={'on' if self.index else 'off'}",
               f"metacopy={'on' if self.metacopy else 'off'}", f"xino={self.xino}"]
        if self.nfs_export:
            out.append("nfs_export=on")
        return out


def module_redirect_max(root: str = MODULE_PARAMETERS) -> int:
    try:
        with open(os.path.join(root, "redirect_max")) as f:
            return max(1, int(f.read().strip()))
    except (OSError, ValueError):
        return REDIRECT_MAX


def module_defaults(root: str = MODULE_PARAMETERS) -> dict[str, bool]:
    """The running kernel's overlay module parameters, so that a mount without options
    does what `mount -t overlay` does on this host; built-in defaults where unreadable."""
    out = dict(BUILTIN_DEFAULTS)
    for key in out:
        try:
            with open(os.path.join(root, key)) as f:
                out[key] = f.read().strip() in ("Y", "1")
        except OSError:
            pass
    return out


def resolve_features(given: dict[str, str], userxattr: bool, upper: bool,
                     defaults: dict[str, bool] | None = None) -> Features:
    """The kernel's ovl_fs_params_verify: defaults, what implies what, and the conflicts
    it refuses, with its messages."""
    d = module_defaults() if defaults is None else defaults
    follow_default = "follow" if d["redirect_always_follow"] else "nofollow"
    redirect = given.get("redirect_dir") or ("on" if d["redirect_dir"] else follow_default)
    if redirect == "off":
        redirect = follow_default  # off: not written, followed as the module says
    index = given.get("index", "on" if d["index"] else "off") == "on"
    metacopy = given.get("metacopy", "on" if d["metacopy"] else "off") == "on"
    nfs_export = given.get("nfs_export", "on" if d["nfs_export"] else "off") == "on"
    xino = given.get("xino") or ("auto" if d["xino_auto"] else "off")
    uuid = given.get("uuid", "auto")
    set_redirect, set_metacopy = "redirect_dir" in given, "metacopy" in given
    set_index, set_nfs = "index" in given, "nfs_export" in given

    def conflict(words: str) -> MountError:
        return MountError(f"conflicting options: {words}", errno.EINVAL)

    if not upper:
        index = False
        if redirect == "follow":
            redirect = "on"  # only read: the same thing, and simpler below (as the kernel)
    if metacopy and redirect != "on":
        if set_metacopy and set_redirect:
            raise conflict(f"metacopy=on,redirect_dir={redirect}")
        if set_redirect:
            metacopy = False
        else:
            redirect = "on"
    if nfs_export and not index:
        if not upper and redirect != "nofollow":
            nfs_export = False
        elif set_nfs and set_index:
            raise conflict("nfs_export=on,index=off")
        elif set_index:
            nfs_export = False
        else:
            index = True
    if nfs_export and metacopy:
        if set_nfs and set_metacopy:
            raise conflict("nfs_export=on,metacopy=on")
        if set_metacopy:
            nfs_export = False
        else:
            metacopy = False
    if userxattr:
        # Redirects and metacopy in user.* xattrs could be forged by any user who can
        # write the layer: the kernel refuses to trust them there.
        if set_redirect and redirect != "nofollow":
            raise conflict(f"userxattr,redirect_dir={redirect}")
        if metacopy and set_metacopy:
            raise conflict("userxattr,metacopy=on")
        redirect, metacopy = "nofollow", False
    if not upper and redirect == "on":
        redirect = "follow"
    return Features(redirect, index, metacopy, xino, nfs_export, uuid,
                    module_redirect_max() if defaults is None else REDIRECT_MAX)


# Features the kernel has that we don't do yet: refused rather than accepted and ignored.
NOT_YET: dict[str, str] = {}


def check_supported(f: Features) -> None:
    for key, why in NOT_YET.items():
        if getattr(f, key):
            raise MountError(why, errno.EOPNOTSUPP)


def split_options(s: str) -> list[str]:
    # A lowerdir value may itself hold an escaped comma ("\,"), and a quoted value
    # (containers-storage's context="a,b") commas of its own.
    out, cur, i, quoted = [], [], 0, False
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] == ",":
            cur.append(",")
            i += 2
            continue
        # A quote opens only right after "=" (context="a,b") and closes at the end of
        # that value: a '"' inside a path is just a character.
        if c == '"' and (quoted or (cur and cur[-1] == "=")):
            quoted = not quoted
        if c == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _resolve_dir(path: str, what: str) -> tuple[str, os.stat_result]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{what} '{path}' does not exist", errno.ENOENT) from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"{what} '{path}' is a stale FUSE mount (its daemon is gone); "
                             f"run 'pyunionfs umount {path}'", e.errno) from None
        raise MountError(f"failed to resolve {what} '{path}': {e.strerror}",
                         e.errno or errno.EIO) from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"{what} '{path}' is not a directory", errno.ENOTDIR)
    return os.path.realpath(path), st


def _check_not_stale(path: str) -> None:
    """A FUSE mount whose daemon died answers stat() from the kernel's attribute cache
    for as long as the daemon asked (a day, by default): statfs is never cached, so it
    reaches the dead connection and gets ENOTCONN every time."""
    try:
        os.statvfs(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(f"mount point '{path}' is a stale FUSE mount (its daemon is "
                             f"gone); run 'pyunionfs umount {path}'", e.errno) from None
        raise MountError(f"mount point '{path}': {e.strerror}", e.errno or errno.EIO) from None


def _inside(child: str, parent: str) -> bool:
    return child != parent and os.path.commonpath([child, parent]) == parent


def validate(cfg: MountConfig) -> None:
    """The kernel's mount checks (overlay-semantics §1.5), with one-line messages."""
    if not cfg.lowers:
        raise MountError("missing lower directory")
    if cfg.upper is None and len(cfg.lowers) < 2:
        # As the kernel: a one-layer read-only overlay would just be a bind mount.
        raise MountError("a read-only mount needs at least 2 lower directories")
    if cfg.upper is not None and cfg.work is None:
        raise MountError("missing work directory (an upper directory needs one)")
    lowers = [_resolve_dir(p, "lower directory") for p in cfg.lowers]
    upper = _resolve_dir(cfg.upper, "upper directory") if cfg.upper is not None else None
    work = _resolve_dir(cfg.work, "work directory") if cfg.work is not None else None
    _resolve_dir(cfg.merged, "mount point")
    _check_not_stale(cfg.merged)

    if upper and work:
        if upper[1].st_dev != work[1].st_dev:
            raise MountError(f"work directory '{cfg.work}' and upper directory '{cfg.upper}' "
                             "must be on the same filesystem")
        if upper[0] == work[0] or _inside(work[0], upper[0]) or _inside(upper[0], work[0]):
            raise MountError(f"work directory '{cfg.work}' and upper directory '{cfg.upper}' "
                             "must be separate subtrees", errno.EINVAL)
    seen: dict[tuple[int, int], str] = {}
    for (real, st), given in zip(lowers, cfg.lowers):
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise MountError(f"lower directory '{given}' is given twice", errno.ELOOP)
        seen[key] = given
        for other, name, other_given in ((upper, "upper", cfg.upper), (work, "work", cfg.work)):
            if other is None:
                continue
            if (other[1].st_dev, other[1].st_ino) == key:
                raise MountError(f"lower directory '{given}' is also the {name} directory",
                                 errno.ELOOP)
            if _inside(real, other[0]):
                raise MountError(f"lower directory '{given}' overlaps the {name} directory",
                                 errno.ELOOP)
            if _inside(other[0], real):
                # The kernel refuses a workdir there and takes an upper, to answer ELOOP
                # inside: either way the "read-only" lower would change under the mount.
                raise MountError(f"{name} directory '{other_given}' is inside lower directory "
                                 f"'{given}'", errno.ELOOP)
    # Each lower's ancestors against the set of lowers: O(layers x depth), not layers²
    # (500 lowers took 2 s of commonpath).
    by_path = {real: given for (real, _), given in zip(lowers, cfg.lowers)}
    for (a, _), ga in zip(lowers, cfg.lowers):
        up = os.path.dirname(a)
        while up != a:
            if up in by_path:
                raise MountError(f"lower directory '{ga}' is inside lower directory "
                                 f"'{by_path[up]}'", errno.ELOOP)
            a, up = up, os.path.dirname(up)
