"""On-disk markers: whiteouts, opaque directories and the private xattr namespace.

All of it is one ``Dialect``, chosen once at mount (probe.py) and used by
lookup, readdir, copy-up and dirops alike, so no module tests a prefix of its own.

- The private prefix: ``trusted.overlay.`` (the kernel's default, needs
  CAP_SYS_ADMIN) or ``user.overlay.`` (the kernel's ``userxattr`` format, for
  rootless mounts).  User names under it are stored escaped with one more
  ``overlay.`` (kernel 6.7+), so they can never be mistaken for our markers.
- How we write a whiteout: a 0/0 char device (the kernel's form; mknod of 0/0 is
  unprivileged since Linux 5.8), else the kernel's xattr whiteout (an empty file
  with ``P.whiteout``; kernels 6.7+ read it), else an OCI ``.wh.NAME`` file.
- What we read: the kernel's forms in the dialect's prefix, and with ``oci``
  also every form container tools write: ``.wh.NAME``, ``.wh..wh..opq`` and the
  opaque marks of the other prefix and of fuse-overlayfs.  The kernel ignores
  those, so ``oci`` is off where kernel-exact behaviour is asked for.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field

from unionfs import sysio
from unionfs.errors import oserror

TRUSTED = "trusted.overlay."
USER = "user.overlay."
FUSE_OVERLAYFS = "user.fuseoverlayfs."
XATTR_NAME_MAX = 255
NAME_MAX = 255

WH_PREFIX = ".wh."
WH_OPAQUE = ".wh..wh..opq"  # in a directory: the directory is opaque
# Where xattr_permissions=1|2 keeps owner and mode (fuse-overlayfs's names): marks a mount
# answers for itself, never data (attrs.protected_xattr, oci.layer).
OVERRIDE_XATTRS = {1: "security.fuseoverlayfs.override_stat", 2: "user.containers.override_stat"}

# How a whiteout is written (Dialect.form).
CHARDEV, XATTR, OCI = "chardev", "xattr", "oci"


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# One 0/0 device in WORK/work that new whiteouts are hard links of, as the kernel
# does (ovl_whiteout): a link is a directory entry, a mknod a new inode (10 vs 100 µs).
SHARED_WHITEOUT = "#whiteout"


def _link_shared_whiteout(workfd: int, dirfd: int, name: str) -> None:
    for _ in range(2):
        try:
            sysio.link(workfd, SHARED_WHITEOUT, dirfd, name)
            return
        except FileNotFoundError:
            pass  # none yet (WORK/work is new at every mount)
        except OSError as e:
            if e.errno != errno.EMLINK:
                break  # links not allowed here: a device of its own
            sysio.unlink(workfd, SHARED_WHITEOUT)  # full: start another
        try:
            sysio.mknod(workfd, SHARED_WHITEOUT, stat.S_IFCHR, 0)
        except OSError:
            break
    sysio.mknod(dirfd, name, stat.S_IFCHR, 0)


def drop_shared_whiteout(workfd: int) -> None:
    if workfd >= 0:
        try:
            sysio.unlink(workfd, SHARED_WHITEOUT)
        except OSError:
            pass  # never made, or WORK already gone: the next mount wipes it anyway


@dataclass(frozen=True)
class Dialect:
    prefix: str = TRUSTED
    form: str = CHARDEV
    oci: bool = False  # read .wh. files and the other tools' opaque marks
    # The private namespaces whose names are markers, never data shown to users.
    foreign: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        other = USER if self.prefix == TRUSTED else TRUSTED
        object.__setattr__(self, "foreign", (other, FUSE_OVERLAYFS) if self.oci else ())

    @property
    def opaque(self) -> str:
        return self.prefix + "opaque"

    @property
    def xattr_whiteout(self) -> str:
        return self.prefix + "whiteout"

    @property
    def escaped(self) -> str:
        return self.prefix + "overlay."

    def describe(self) -> str:
        wh = {CHARDEV: "0/0 char devices", XATTR: f"empty files with {self.xattr_whiteout}",
              OCI: ".wh.NAME files"}[self.form]
        return (f"xattrs {self.prefix}*, whiteouts written as {wh}, reading "
                + ("OCI .wh. whiteouts too" if self.oci else "kernel formats only"))

    # -- reading -------------------------------------------------------------------
    def hides_name(self, name: str) -> bool:
        """A name that is a marker in this dialect: never shown, never creatable."""
        return self.oci and name.startswith(WH_PREFIX)

    def is_whiteout(self, dirfd: int, name: str, st: os.stat_result) -> bool:
        """Is the object ``name`` (already lstat'ed) itself a whiteout?"""
        if is_whiteout_stat(st):
            return True
        if stat.S_ISREG(st.st_mode) and st.st_size == 0:
            if sysio.getxattr_or_none(dirfd, name, self.xattr_whiteout) is not None:
                return True
            return bool(self.foreign) and \
                sysio.getxattr_or_none(dirfd, name, self.foreign[0] + "whiteout") is not None
        return False

    def whited_out_by_file(self, dirfd: int, name: str) -> bool:
        """An OCI ``.wh.NAME`` beside ``name`` hides it in the layers below."""
        if not self.oci or len(os.fsencode(name)) + len(WH_PREFIX) > NAME_MAX:
            return False  # no .wh. name can exist for it
        return sysio.lstat_or_none(dirfd, WH_PREFIX + name) is not None

    def is_opaque(self, dirfd: int, name: str) -> bool:
        """Does directory ``name`` hide the directories below it?"""
        if not self.oci:
            return sysio.getxattr_or_none(dirfd, name, self.opaque) == b"y"
        names = sysio.listxattr(dirfd, name)
        for attr in (self.opaque, *(p + "opaque" for p in self.foreign)):
            if attr in names:
                value = sysio.getxattr_or_none(dirfd, name, attr) or b""
                if value == b"y" or (attr.startswith(FUSE_OVERLAYFS) and value[:1] == b"y"):
                    return True
        sub = sysio.open_path(dirfd, name)
        try:
            return sysio.lstat_or_none(sub, WH_OPAQUE) is not None
        finally:
            os.close(sub)

    @property
    def metacopy_xattr(self) -> str:
        return self.prefix + "metacopy"

    @property
    def redirect_xattr(self) -> str:
        return self.prefix + "redirect"

    def redirect(self, dirfd: int, name: str) -> str | None:
        """Where the layers below keep directory ``name`` (``overlay.redirect``): a name
        in the same parent, or a path from the root when it starts with "/".  A malformed
        one fails the lookup (EINVAL, as the kernel); "." and ".." would leave the layer."""
        raw = sysio.getxattr_or_none(dirfd, name, self.redirect_xattr)
        if raw is None:
            return None
        parts = raw.split(b"/")
        if raw.startswith(b"/"):
            parts = parts[1:]
        elif len(parts) > 1:
            parts = []
        if not parts or b"" in parts or b"\0" in raw:
            raise oserror(errno.EINVAL)
        if b"." in parts or b".." in parts:
            raise oserror(errno.EACCES)  # lookup_one() refuses them so
        return os.fsdecode(raw)

    def dir_marks(self, dirfd: int, name: str) -> tuple[bool, str | None]:
        """(is it opaque, its redirect) for directory ``name``: one listxattr where both
        are absent (nearly always), instead of a getxattr for each."""
        if self.oci:
            opaque = self.is_opaque(dirfd, name)
            return opaque, None if opaque else self.redirect(dirfd, name)
        names = sysio.listxattr(dirfd, name)
        if self.opaque in names and self.is_opaque(dirfd, name):
            return True, None
        return False, self.redirect(dirfd, name) if self.redirect_xattr in names else None

    def set_redirect(self, dirfd: int, name: str, value: str) -> None:
        sysio.setxattr(dirfd, name, self.redirect_xattr, os.fsencode(value))

    def lists_xattr_whiteouts(self, dirfd: int) -> bool:
        """The kernel hides xattr whiteouts from a listing only below ``opaque=x``."""
        return sysio.fd_getxattr_or_none(dirfd, self.opaque) == b"x"

    # -- writing -------------------------------------------------------------------
    def make_whiteout(self, dirfd: int, name: str, workfd: int, tmp: str) -> None:
        """A whiteout at ``name``, where nothing is (``tmp`` is a free name in work)."""
        if self.form == CHARDEV:
            _link_shared_whiteout(workfd, dirfd, name)
        elif self.form == XATTR:
            self._xattr_whiteout_in(workfd, tmp)
            try:
                sysio.renameat2(workfd, tmp, dirfd, name, sysio.RENAME_NOREPLACE)
            except BaseException:
                sysio.unlink(workfd, tmp)
                raise
            self._mark_xattr_whiteouts(dirfd)
        else:
            self._oci_whiteout(dirfd, name)

    def write_whiteout(self, dirfd: int, name: str) -> None:
        """A whiteout at ``name`` in a layer being built, which nothing reads yet: made in
        place, with no work directory (oci.layer)."""
        if self.form == CHARDEV:
            sysio.mknod(dirfd, name, stat.S_IFCHR, 0)
        elif self.form == XATTR:
            self._xattr_whiteout_in(dirfd, name)
            self._mark_xattr_whiteouts(dirfd)
        else:
            self._oci_whiteout(dirfd, name)

    def replace_with_whiteout(self, dirfd: int, name: str, workfd: int, tmp: str) -> None:
        """Move the object at ``name`` to ``tmp`` in work, leaving a whiteout at ``name``
        with no moment where the layers below show through."""
        if self.form == CHARDEV:
            sysio.renameat2(dirfd, name, workfd, tmp, sysio.RENAME_WHITEOUT)
        elif self.form == XATTR:
            self._xattr_whiteout_in(workfd, tmp)
            sysio.renameat2(workfd, tmp, dirfd, name, sysio.RENAME_EXCHANGE)
            self._mark_xattr_whiteouts(dirfd)
        else:
            self._oci_whiteout(dirfd, name)  # first: NAME is hidden from here on
            sysio.renameat2(dirfd, name, workfd, tmp)

    def upper_whiteout(self, dirfd: int, name: str) -> bool:
        """Is ``name`` whited out in this (upper) directory, in any form we read?"""
        st = sysio.lstat_or_none(dirfd, name)
        if st is not None:
            return self.is_whiteout(dirfd, name, st)
        return self.whited_out_by_file(dirfd, name)

    def drop_file_whiteout(self, dirfd: int, name: str) -> None:
        """After a new ``name`` went in: an OCI ``.wh.NAME`` beside it must go too, or
        the name would vanish again under a reader that applies it (fuse-overlayfs #279)."""
        if self.oci or self.form == OCI:
            try:
                sysio.unlink(dirfd, WH_PREFIX + name)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise

    def set_opaque(self, dirfd: int, name: str) -> None:
        sysio.setxattr(dirfd, name, self.opaque, b"y")
        if self.form == OCI:
            # Readers of .wh. files (containers-storage) may not read our xattr.
            sub = sysio.open_dir_beneath(dirfd, name)
            try:
                self._oci_file(sub, WH_OPAQUE)
            finally:
                os.close(sub)

    def _xattr_whiteout_in(self, workfd: int, tmp: str) -> None:
        # Mode 000 only after the xattr: without privileges a user.* xattr needs write access.
        fd = sysio.open_at(workfd, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.setxattr(sysio.proc_fd(fd), self.xattr_whiteout, b"")
            os.fchmod(fd, 0)
        finally:
            os.close(fd)

    def _mark_xattr_whiteouts(self, dirfd: int) -> None:
        # "x" keeps the kernel from listing the whiteout; it must not override "y".
        if sysio.fd_getxattr_or_none(dirfd, self.opaque) is None:
            os.setxattr(sysio.proc_fd(dirfd), self.opaque, b"x")

    def _oci_whiteout(self, dirfd: int, name: str) -> None:
        if len(os.fsencode(name)) + len(WH_PREFIX) > NAME_MAX:
            raise oserror(errno.ENAMETOOLONG, name)
        self._oci_file(dirfd, WH_PREFIX + name)

    @staticmethod
    def _oci_file(dirfd: int, name: str) -> None:
        try:
            os.close(sysio.open_at(dirfd, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0))
        except FileExistsError:
            pass

    # -- private xattr names -----------------------------------------------------------
    def is_private(self, real: str) -> bool:
        """A marker (ours or another tool's), not data: never copied up, never shown."""
        if real.startswith(self.escaped):
            return False
        return real.startswith(self.prefix) or real.startswith(self.foreign)

    def to_real_xattr(self, name: str) -> str:
        """The on-disk name for an xattr name given through the mount."""
        if name.startswith(self.prefix):
            real = self.escaped + name[len(self.prefix):]
            if len(os.fsencode(real)) > XATTR_NAME_MAX:
                raise oserror(errno.EOPNOTSUPP)
            return real
        if self.foreign and name.startswith(self.foreign):
            raise oserror(errno.EPERM)  # another tool's marker: not ours to change
        return name

    def to_visible_xattr(self, real: str) -> str | None:
        """The name shown through the mount for an on-disk xattr, None if private."""
        if real.startswith(self.escaped):
            return self.prefix + real[len(self.escaped):]
        if self.is_private(real):
            return None
        return real


KERNEL = Dialect()
