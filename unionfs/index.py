"""index=on: the names of a lower hard link stay one file across copy-up (kernel
fs/overlayfs/namei.c ovl_lookup_index, copy_up.c ovl_link_up, util.c ovl_set_nlink_*,
super.c ovl_get_indexdir; semantics §6.6).

The first copy-up of a lower file with several links goes to ``WORK/index/<hex of its
origin>`` and is linked into the changed name.  Every other name of the file finds that
entry when it is looked up and shows it (its data and metadata, the lower's number), and
is linked to it in turn when it changes.  ``overlay.nlink`` on the entry keeps the
overlay's link count relative to the upper one ("U+1": one name more than upper links,
the index entry counted among those), which the kernel reads back.  The upper root
records the lowest layer's root (``overlay.origin``) and the index directory the upper
root (``overlay.upper``): mounting the upper over other lowers is refused, as the kernel
refuses it, since the index names handles of those lowers.

Index entries need file handles that we may open (CAP_DAC_READ_SEARCH): without them,
as the kernel does, index=on falls back to off.

At mount the index is checked as the kernel's ovl_indexdir_cleanup checks it (``cleanup``):
leftovers of an interrupted change (``#...``) and entries whose origin no longer resolves go,
an entry whose names are all gone goes too (with nfs_export=on it becomes a whiteout, which
makes the file's handle stale for good), and a malformed entry refuses the mount: an index
we don't understand must not be changed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable

from unionfs import origin, sysio
from unionfs.errors import MountError
from unionfs.layers import Layer, LayerStack
from unionfs.probe import remove_tree_at

log = logging.getLogger(__name__)

INDEX_NAME = "index"


def prepare(stack: LayerStack, with_uuid: bool) -> Layer | None:
    """At mount: WORK/index and the marks tying the upper to its lowers; the index as a
    layer of entries (None: handles can't be opened, index falls back to off)."""
    upper = stack.upper
    assert upper is not None and stack.workroot_fd >= 0
    if not origin.decodes():
        log.warning("index=on: file handles can't be opened here (no CAP_DAC_READ_SEARCH), "
                    "falling back to index=off, as the kernel does")
        return None
    prefix = stack.dialect.prefix
    try:
        if sysio.lstat_or_none(stack.workroot_fd, INDEX_NAME) is None:
            sysio.mkdir(stack.workroot_fd, INDEX_NAME, 0 if os.geteuid() == 0 else 0o700)
        fd = sysio.open_dir_beneath(stack.workroot_fd, INDEX_NAME)
    except OSError as e:
        raise MountError(f"cannot prepare index directory '{stack.work_path}/{INDEX_NAME}': "
                         f"{e.strerror}", e.errno or errno.EIO) from None
    try:
        root_origin = origin.encode(stack.lowers[0].fd, "", with_uuid=with_uuid)
        _verify_or_set(upper.fd, prefix + "origin", root_origin,
                       "failed to verify upper root origin (the upper was made over other "
                       "lower layers; mount it with those, or with index=off)")
        upper_fh = origin.encode(upper.fd, "", with_uuid=with_uuid, flags=origin.FLAG_PATH_UPPER)
        _verify_or_set(fd, prefix + "upper", upper_fh,
                       "failed to verify index dir 'upper' xattr (the work directory belongs "
                       "to another upper directory)")
    except BaseException:
        os.close(fd)
        raise
    return Layer(upper.index, f"{stack.work_path}/{INDEX_NAME}", fd, upper.dev, upper=False,
                 entries=True)


def cleanup(stack: LayerStack, index: Layer, nfs_export: bool) -> dict[str, int]:
    """Check every entry of WORK/index at mount; counts of what was done, by kind.  All
    entries are judged before any is touched, so a malformed one (which refuses the mount)
    leaves the index as it was."""
    where = f"{stack.work_path}/{INDEX_NAME}"
    verdicts: list[tuple[str, str, str, int]] = []  # (name, kind, why, inode)
    kept = 0
    try:
        for name, _, _ in sysio.scandir_fd(index.fd):
            st = sysio.lstat_or_none(index.fd, name)
            if st is None:
                continue
            if name.startswith("#"):
                verdicts.append((name, "leftover", "of an interrupted change", st.st_ino))
                continue
            verdict = _verify(stack, index, name, st, nfs_export, where)
            if verdict is None:
                kept += 1
            else:
                verdicts.append((name, *verdict, st.st_ino))
    except OSError as e:
        raise MountError(f"index=on: cannot check '{where}': {e.strerror}",
                         e.errno or errno.EIO) from None
    done = {"kept": kept, "leftover": 0, "stale": 0, "orphan": 0}
    for name, kind, why, ino in verdicts:
        whiteout = kind == "orphan" and nfs_export
        if kind != "leftover":
            log.warning("index=on: %s index entry '%s/%s' (%s): %s", kind, where, name, why,
                        "whited out" if whiteout else "removed")
        try:
            if whiteout:
                # the file's handle must stay stale, not come back as ENOENT's lookup
                tmp = f"#orphan.{ino:x}"
                remove_tree_at(index.fd, tmp)  # a cleanup killed here before
                sysio.renameat2(index.fd, name, index.fd, tmp, sysio.RENAME_WHITEOUT)
                remove_tree_at(index.fd, tmp)
            else:
                remove_tree_at(index.fd, name)
        except OSError as e:
            raise MountError(f"index=on: cannot clean {kind} index entry '{where}/{name}': "
                             f"{e.strerror}", e.errno or errno.EIO) from None
        done[kind] += 1
    return done


_HEX = frozenset("0123456789abcdefABCDEF")


def _verify(stack: LayerStack, index: Layer, name: str, st: os.stat_result,
            nfs_export: bool, where: str) -> tuple[str, str] | None:
    """None for a sound entry, else ("stale"|"orphan", why); raises for a malformed one
    (ovl_verify_index: every answer but ESTALE and ENOENT aborts the kernel's mount)."""
    def malformed(why: str, code: int = errno.EINVAL) -> MountError:
        return MountError(f"index=on: malformed index entry '{where}/{name}' ({why}); remove "
                          "it or mount with index=off", code)

    # As the kernel reads a name: pairs of hex digits (an odd last one ignored), a handle
    # whose own length fits in them (more may follow).
    if not _HEX.issuperset(name):
        raise malformed("its name is not a hex file handle")
    value = bytes.fromhex(name[:len(name) // 2 * 2])
    if len(value) < origin.HEADER or value[1] != origin.MAGIC or value[2] > len(value) \
            or origin.parse(value[:value[2]]) is None:
        raise malformed("its name is not a valid file handle")
    value = value[:value[2]]
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return None  # a whiteout: the handle of a removed file, stale on purpose
    if stat.S_ISDIR(st.st_mode):
        if not nfs_export:
            return None  # the kernel verifies directory entries only for nfs_export
        upper_fh = sysio.getxattr_or_none(index.fd, name, stack.dialect.prefix + "upper")
        parsed = origin.parse(upper_fh) if upper_fh else None
        if parsed is None:
            return "stale", "no valid 'upper' handle"
        assert stack.upper is not None
        fd = origin.open_origin(parsed, stack.upper.fd, strict=True)
        if fd is None:
            return "orphan", "its upper directory is gone"
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise malformed("its 'upper' handle names no directory", errno.EIO)
            have = sysio.fd_getxattr_or_none(fd, stack.dialect.prefix + "origin")
        finally:
            os.close(fd)
        return _compare_origin(have, value, malformed)
    have = sysio.getxattr_or_none(index.fd, name, stack.dialect.prefix + "origin")
    verdict = _compare_origin(have, value, malformed)
    if verdict is not None or st.st_nlink != 1:
        return verdict  # (upper names are linked to a sound one)
    parsed = origin.parse(value)
    assert parsed is not None
    found = origin.stat_by_handle(parsed, [(layer.dev, layer.fd) for layer in stack.lowers],
                                  strict=True)
    if found is None or found.st_nlink == 0:
        return "stale", "its origin no longer resolves in the lower layers"
    if stat.S_IFMT(found.st_mode) != stat.S_IFMT(st.st_mode):
        raise malformed("its origin is of another file type", errno.EIO)
    nlink = None
    if found.st_nlink > 1:
        nlink = parse_nlink(sysio.getxattr_or_none(index.fd, name,
                                                   stack.dialect.prefix + "nlink"),
                            st.st_nlink, found.st_nlink)
    if nlink is None:
        return "orphan", "all its names are gone"
    return None


def _compare_origin(have: bytes | None, value: bytes,
                    malformed: Callable[[str, int], MountError]) -> tuple[str, str] | None:
    """An entry's (or its upper directory's) ``overlay.origin`` against the handle its name
    holds (ovl_verify_fh): none or unreadable refuses the mount, another one is stale."""
    if have is None or origin.parse(have) is None:
        raise malformed("it has no valid origin", errno.ENODATA)
    if have != value:
        return "stale", "its origin is not the one its name holds"
    return None


def _verify_or_set(fd: int, attr: str, value: bytes, why: str) -> None:
    try:
        have = sysio.fd_getxattr_or_none(fd, attr)
        if have is None:
            os.setxattr(sysio.proc_fd(fd), attr, value)
            return
    except OSError as e:
        raise MountError(f"index=on: cannot record {attr}: {e.strerror}",
                         e.errno or errno.EIO) from None
    if have != value:
        raise MountError(f"index=on: {why}", errno.ESTALE)


def entry_name(origin_value: bytes) -> str:
    """An index entry is named by its origin, in hex (ovl_get_index_name_fh)."""
    return origin_value.hex()


def find(index: Layer, ldfd: int, name: str, with_uuid: bool
         ) -> tuple[str, os.stat_result] | None:
    """The index entry of lower file ``name`` (in ``ldfd``), if its names were copied up."""
    try:
        value = origin.encode(ldfd, name, with_uuid=with_uuid)
    except OSError:
        return None
    return lookup(index, value)


def lookup(index: Layer, value: bytes) -> tuple[str, os.stat_result] | None:
    """The index entry for an origin value, if there is one."""
    if not _names_an_entry(value):
        return None
    hexname = entry_name(value)
    st = sysio.lstat_or_none(index.fd, hexname)
    if st is None or stat.S_ISDIR(st.st_mode):
        return None
    return hexname, st


def origin_number(stack: LayerStack, value: bytes) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the lower object an origin names, found by its handle."""
    parsed = origin.parse(value)
    st = origin.stat_by_handle(parsed, [(layer.dev, layer.fd) for layer in stack.lowers]) \
        if parsed is not None else None
    return (st.st_dev, st.st_ino) if st is not None else None


def is_entry_of(index: Layer, origin_value: bytes | None, st: os.stat_result) -> bool:
    """Is the upper file ``st``, with this origin, the index entry of its lower file?"""
    if not origin_value or not _names_an_entry(origin_value):
        return False
    got = sysio.lstat_or_none(index.fd, entry_name(origin_value))
    return got is not None and (got.st_dev, got.st_ino) == (st.st_dev, st.st_ino)


def _names_an_entry(value: bytes) -> bool:
    """Could an origin value name an entry?  One we can't decode (as the kernel ignores
    it), or one whose hex name would pass NAME_MAX (ENAMETOOLONG to the caller), can't."""
    return bool(value) and len(value) * 2 <= NAME_MAX and origin.parse(value) is not None


NAME_MAX = 255
INT_MAX = (1 << 31) - 1


def parse_nlink(value: bytes | None, upper_nlink: int, lower_nlink: int) -> int | None:
    """The overlay's link count from ``overlay.nlink`` ("U+1", "L-1"; ovl_get_nlink):
    relative to the upper inode's links (U) or to the lower's (L, written by the kernel
    while a link or unlink is under way).  None if absent or broken (the kernel then
    falls back to the real count).  Read as the kernel reads it: at most 12 bytes into a C
    string, then kstrtoint of what follows the letter (a sign, ASCII digits, one optional
    newline, a 32-bit int); a count of 0 or less, or past an int, is broken."""
    if not value or len(value) > 12:
        return None
    value = value.split(b"\0", 1)[0]
    if value[:1] not in (b"U", b"L") or value[1:2] not in (b"+", b"-"):
        return None
    negative = value[1:2] == b"-"
    digits = value[2:]  # (kstrtoll hands "5" of "-5" to _kstrtoull, which takes no "+")
    if digits.endswith(b"\n"):
        digits = digits[:-1]
    if not digits or not digits.isdigit():
        return None
    diff = -int(digits) if negative else int(digits)
    if not -INT_MAX - 1 <= diff <= INT_MAX:
        return None
    n = (upper_nlink if value[:1] == b"U" else lower_nlink) + diff
    return n if 0 < n <= INT_MAX else None


def nlink_value(overlay_nlink: int, upper_nlink: int) -> bytes:
    """``overlay.nlink`` as the kernel writes it (ovl_set_nlink_upper: "U%+i")."""
    return b"U%+d" % (overlay_nlink - upper_nlink)
