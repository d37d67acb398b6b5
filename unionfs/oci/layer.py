"""Layer tars (OCI image-spec layer.md, Docker's overlay2 driver): apply one into an overlay
layer directory, and export an upper directory as one.

In a tar a deleted name is an empty file ``.wh.NAME`` and an opaque directory holds a
``.wh..wh..opq`` entry; in an overlay layer they are a whiteout and an opaque mark, written
in the dialect the directory's filesystem allows (``probe.probe_dialect``: 0/0 devices and
``trusted.overlay.*`` as root, ``user.overlay.*`` and xattr whiteouts rootless).

A layer tar is untrusted.  Every name is resolved below the layer's root by directory fds
with no symlink followed (``sysio.open_dir_beneath``), so an entry can't write through a
symlink an earlier entry made; absolute names, ``..``, links to names outside the layer,
duplicate entries and overlay marks smuggled in as xattrs are refused or dropped; the layer
is built beside its final place and renamed there only when complete.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from unionfs import sysio
from unionfs.oci.errors import LayerError
from unionfs.probe import probe_dialect, remove_tree_at
from unionfs.whiteout import (
    FUSE_OVERLAYFS,
    OVERRIDE_XATTRS,
    TRUSTED,
    USER,
    WH_OPAQUE,
    WH_PREFIX,
    Dialect,
    is_whiteout_stat,
)

CHUNK = 1 << 20
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
# Marks of an overlay (ours, the kernel's, fuse-overlayfs's): never taken from a tar, where
# anyone could forge a redirect, an opaque mark or a metacopy, nor written into one.
PRIVATE_XATTRS = (TRUSTED, USER, FUSE_OVERLAYFS, *OVERRIDE_XATTRS.values())
PAX_XATTR = "SCHILY.xattr."


# -- streams -----------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Reads through, hashing every byte (a layer's digest while it streams)."""

    def __init__(self, raw: IO[bytes], progress: Callable[[int], object] | None = None):
        self.raw, self.hash, self.progress = raw, hashlib.sha256(), progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.hash.update(memoryview(b)[:n])
            if self.progress is not None:
                self.progress(n)
        return n or 0



class _HashingWriter(io.RawIOBase):
    def __init__(self, raw: IO[bytes]):
        self.raw, self.hash, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b)
        self.raw.write(view)
        self.hash.update(view)
        self.size += len(view)
        return len(view)


def digest_of(value: str) -> str:
    return value if value.startswith("sha256:") else "sha256:" + value


# -- names ---------------------------------------------------------------------------


def clean_name(name: str, what: str = "entry") -> str:
    """A member name as a path below the layer root ("" for the root itself); refused:
    absolute names and ``..`` (the classic tar escapes), NUL."""
    if "\0" in name:
        raise LayerError(f"{what} {name!r}: a NUL in the name")
    if name.startswith("/"):
        raise LayerError(f"{what} {name!r}: an absolute path")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise LayerError(f"{what} {name!r}: a '..' component leaves the layer")
        parts.append(part)
    return "/".join(parts)


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition("/")
    return parent, leaf


# -- apply -----------------------------------------------------------------------------


@dataclass
class Applied:
    diff_id: str  # sha256 of the uncompressed tar
    digest: str  # sha256 of the file as given (the blob digest)
    entries: int
    owners_kept: bool  # False: ids could not be given away (unprivileged)
    size: int  # bytes read


class _Dirs:
    """O_PATH fds of the layer's directories, by path, made as needed: every open goes
    below the root with no symlink followed."""

    def __init__(self, rootfd: int) -> None:
        self.rootfd = rootfd
        self.fds: dict[str, int] = {"": rootfd}
        self.made: set[str] = set()  # made for a child before (or without) their own entry

    def get(self, path: str, entry: str) -> int:
        fd = self.fds.get(path)
        if fd is not None:
            return fd
        try:
            fd = sysio.open_dir_beneath(self.rootfd, path)
        except FileNotFoundError:
            parent, leaf = _split(path)
            pfd = self.get(parent, entry)
            try:
                sysio.mkdir(pfd, leaf, 0o755)
            except FileExistsError:
                pass
            self.made.add(path)
            return self.get(path, entry)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                raise LayerError(f"entry {entry!r}: '{path}' is not a directory of the "
                                 "layer (a symlink or a file): refused, it would write "
                                 "through it") from None
            raise
        self.fds[path] = fd
        return fd

    def trim(self) -> None:
        """Between entries (never while one holds fds): the oldest half of a big cache."""
        if len(self.fds) > 512:
            for k in [k for k in self.fds if k][:256]:
                os.close(self.fds.pop(k))

    def close(self) -> None:
        for k, fd in self.fds.items():
            if k:
                os.close(fd)
        self.fds = {"": self.rootfd}


def _xattrs_of(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith(PAX_XATTR):
            name = key[len(PAX_XATTR):]
            if not name.startswith(PRIVATE_XATTRS):
                out.append((name, value.encode("utf-8", "surrogateescape")))
    return out


class _Applier:
    def __init__(self, rootfd: int, dialect: Dialect) -> None:
        self.rootfd, self.dialect = rootfd, dialect
        self.dirs = _Dirs(rootfd)
        self.seen: set[str] = set()  # names this layer has an entry for
        self.dir_meta: dict[str, tarfile.TarInfo] = {}
        self.opaque: set[str] = set()
        self.owners = os.geteuid() == 0
        self.owners_kept = True
        self.entries = 0

    def _claim(self, path: str, kind: str) -> None:
        if path in self.seen and not (kind == "dir" and path in self.dir_meta):
            raise LayerError(f"entry {path!r}: a second entry for the same name")
        self.seen.add(path)

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        self.dirs.trim()
        path = clean_name(m.name)
        self.entries += 1
        for what, value, top in (("owner", m.uid, 1 << 32), ("group", m.gid, 1 << 32),
                                 ("time", m.mtime, 1 << 62), ("device", m.devmajor, 1 << 32),
                                 ("device", m.devminor, 1 << 32)):
            if not 0 <= value < top:
                raise LayerError(f"entry {m.name!r}: {what} {value} out of range")
        if not path:
            if m.isdir():
                self.dir_meta[""] = m
                return
            raise LayerError(f"entry {m.name!r}: the layer root must be a directory")
        parent, leaf = _split(path)
        above = [p for p in parent.split("/") if p.startswith(WH_PREFIX)]
        if any(p.startswith(WH_PREFIX + WH_PREFIX) for p in above):
            return  # inside AUFS bookkeeping (.wh..wh.plnk/...): not content
        if above:
            # a directory named .wh.X would be a whiteout of X to the next reader (our
            # export, an OCI reader of the layer): a whiteout holds nothing
            raise LayerError(f"entry {m.name!r}: below the whiteout name {above[0]!r}")
        if leaf == WH_OPAQUE:
            self.dirs.get(parent, m.name)
            self.opaque.add(parent)
            return
        if leaf.startswith(WH_PREFIX + WH_PREFIX):
            return  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
        pfd = self.dirs.get(parent, m.name)
        if leaf.startswith(WH_PREFIX):
            target = leaf[len(WH_PREFIX):]
            if target in ("", ".", ".."):
                raise LayerError(f"entry {m.name!r}: a whiteout of no name")
            self._claim(f"{parent}/{target}" if parent else target, "whiteout")
            self._whiteout(pfd, target, m.name)
            return
        if m.isdir():
            self._claim(path, "dir")
            st = sysio.lstat_or_none(pfd, leaf)
            if st is None:
                sysio.mkdir(pfd, leaf, 0o700)
            elif not stat.S_ISDIR(st.st_mode):
                raise LayerError(f"entry {m.name!r}: a directory where the layer has "
                                 "another entry")
            self.dir_meta[path] = m
            return
        self._claim(path, "file")
        if m.isreg():
            try:
                fd = sysio.open_at(pfd, leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                raise self._taken(m, path) from None
            try:
                self._file(tar, m, fd)
                self._meta(fd, None, m)
            finally:
                os.close(fd)
            return
        if sysio.lstat_or_none(pfd, leaf) is not None:
            raise self._taken(m, path)
        if m.issym():
            sysio.symlink(m.linkname, pfd, leaf)  # data: never followed
        elif m.islnk():
            self._hardlink(m, pfd, leaf)
            return  # the target's metadata is the file's
        elif m.ischr() or m.isblk():
            if m.ischr() and (m.devmajor, m.devminor) == (0, 0):
                self._whiteout(pfd, leaf, m.name)  # a whiteout stored as such
                return
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            try:
                sysio.mknod(pfd, leaf, kind | 0o600, os.makedev(m.devmajor, m.devminor))
            except PermissionError:
                raise LayerError(f"entry {m.name!r}: a device node ({m.devmajor}:{m.devminor}), "
                                 "which only root may make: refused") from None
        elif m.isfifo():
            sysio.mknod(pfd, leaf, stat.S_IFIFO | 0o600)
        else:
            raise LayerError(f"entry {m.name!r}: an entry of unknown type {m.type!r}")
        self._meta(pfd, leaf, m, symlink=m.issym())

    def _whiteout(self, pfd: int, name: str, entry: str) -> None:
        if sysio.lstat_or_none(pfd, name) is not None:
            raise LayerError(f"entry {entry!r}: a whiteout of a name the layer has")
        self.dialect.write_whiteout(pfd, name)

    def _taken(self, m: tarfile.TarInfo, path: str) -> LayerError:
        if path in self.dirs.made:
            return LayerError(f"entry {m.name!r}: not a directory, but an earlier entry lies "
                              "below it")
        return LayerError(f"entry {m.name!r}: a second entry for the same name")

    @staticmethod
    def _file(tar: tarfile.TarFile, m: tarfile.TarInfo, fd: int) -> None:
        if not m.size:
            return
        src = tar.extractfile(m)
        assert src is not None
        if m.size <= CHUNK:
            data = memoryview(src.read())  # most files: one read, one write
            while data:
                data = data[os.write(fd, data):]
            return
        with os.fdopen(os.dup(fd), "wb", buffering=0) as out:
            shutil.copyfileobj(src, out, CHUNK)

    def _hardlink(self, m: tarfile.TarInfo, pfd: int, leaf: str) -> None:
        target = clean_name(m.linkname, "hard link target of")
        tparent, tleaf = _split(target)
        if not tleaf or target not in self.seen:
            raise LayerError(f"entry {m.name!r}: a hard link to {m.linkname!r}, which is not "
                             "an earlier entry of the layer")
        tfd = self.dirs.get(tparent, m.name)
        st = sysio.lstat_or_none(tfd, tleaf)
        if st is None or stat.S_ISDIR(st.st_mode) or is_whiteout_stat(st):
            raise LayerError(f"entry {m.name!r}: a hard link to {m.linkname!r}, which is "
                             "not a file of the layer")
        sysio.link(tfd, tleaf, pfd, leaf)

    def _meta(self, dfd: int, leaf: str | None, m: tarfile.TarInfo,
              symlink: bool = False) -> None:
        """Owner first (a chown drops set-id bits and capabilities), then xattrs, the
        mode, the times.  ``leaf`` None: ``dfd`` is the object itself, open (a file)."""
        if self.owners:
            try:
                if leaf is None:
                    os.fchown(dfd, m.uid, m.gid)
                else:
                    sysio.chown(dfd, leaf, m.uid, m.gid)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EINVAL):
                    raise
                self.owners_kept = False  # an id this user namespace doesn't map
        else:
            self.owners_kept = False
        if m.pax_headers:
            for name, value in _xattrs_of(m):
                try:
                    if leaf is None:
                        os.setxattr(dfd, name, value)
                    else:
                        sysio.setxattr(dfd, leaf, name, value)
                except OSError as e:
                    # security.* or trusted.* need privileges; user.* can't go on a symlink
                    if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                        raise LayerError(f"entry {m.name!r}: xattr {name!r}: "
                                         f"{e.strerror}") from None
        ns = int(m.mtime * 1e9)
        if leaf is None:
            os.fchmod(dfd, m.mode & 0o7777)
            os.utime(dfd, ns=(ns, ns))
            return
        if not symlink:
            sysio.chmod(dfd, leaf, m.mode & 0o7777)
        sysio.utimens(dfd, leaf, ns, ns)

    def finish(self) -> None:
        """Directories last, deepest first: their modes might refuse the entries inside,
        and each entry made in them changed their times."""
        for path in sorted(set(self.dir_meta) | self.opaque | self.dirs.made,
                           key=lambda p: (-p.count("/"), p)):
            parent, leaf = _split(path)
            if not path:
                fd, name = self.rootfd, "."
            else:
                fd, name = self.dirs.get(parent, path), leaf
            if path in self.opaque:
                if path:
                    self.dialect.set_opaque(fd, name)
                else:
                    os.setxattr(sysio.proc_fd(fd), self.dialect.opaque, b"y")
            m = self.dir_meta.get(path)
            if m is not None:
                self._meta(fd, name, m)
        if "" not in self.dir_meta:
            os.chmod(sysio.proc_fd(self.rootfd), 0o755)  # no entry for it: as a fresh dir
        self.dirs.close()


def apply(src: str, dest: str, userxattr: bool = False,
          progress: Callable[[int], object] | None = None) -> Applied:
    """Unpack layer tar ``src`` (plain, gzip or zstd) into a new layer directory ``dest``."""
    dest = os.path.abspath(dest)
    parent, name = os.path.split(dest)
    try:
        if os.path.lexists(dest):
            if not os.path.isdir(dest) or os.listdir(dest):
                raise LayerError(f"'{dest}' exists and is not an empty directory")
            os.rmdir(dest)
        pfd = sysio.open_root(parent)
    except OSError as e:
        raise LayerError(f"'{dest}': {e.strerror}") from None
    stage = f".{name}.partial-{os.getpid()}"
    try:
        sysio.mkdir(pfd, stage, 0o700)
        rootfd = sysio.open_dir_beneath(pfd, stage)
        try:
            applier = _Applier(rootfd, probe_dialect(rootfd, userxattr))
            with open(src, "rb", buffering=0) as f:
                raw = _HashingReader(f, progress)
                buffered = io.BufferedReader(raw, CHUNK)
                stream = _decompressor_for(buffered)  # type: ignore[arg-type]
                # uncompressed, the two digests are one: hashed once
                plain = _HashingReader(stream) if stream is not buffered else None
                try:
                    with tarfile.open(fileobj=plain or buffered, mode="r|") as tar:
                        for m in tar:
                            try:
                                applier.add(tar, m)
                            except OSError as e:
                                if e.errno is None:
                                    raise  # the stream's, below: a corrupt one
                                # what the filesystem refused of this entry (a long
                                # name, an xattr value it can't take): name the entry
                                raise LayerError(f"entry {m.name!r}: {e.strerror}") \
                                    from None
                        # tarfile takes a damaged header for the end: only zeros may
                        # follow (read through tarfile's stream, which buffers ahead)
                        while chunk := tar.fileobj.read(CHUNK):
                            if chunk.strip(b"\0"):
                                raise LayerError(f"'{src}': corrupt after entry "
                                                 f"{applier.entries} (a damaged header, or "
                                                 "data past the end)")
                    while buffered.read(CHUNK):  # the blob digest covers the whole file
                        pass
                except tarfile.TarError as e:
                    first = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise LayerError(f"'{src}': not a layer tar ({first})") from None
                except LayerError:
                    raise
                except OSError as e:
                    if e.errno is not None:
                        raise
                    raise LayerError(f"'{src}': truncated or corrupt ({e})") from None
                except Exception as e:  # noqa: BLE001 - zlib, zstandard, EOF: a bad stream
                    raise LayerError(f"'{src}': truncated or corrupt "
                                     f"({type(e).__name__}: {e})") from None
            applier.finish()
        finally:
            os.close(rootfd)
        sysio.renameat2(pfd, stage, pfd, name, sysio.RENAME_NOREPLACE)
    except BaseException:
        _remove_quietly(pfd, stage)
        raise
    finally:
        os.close(pfd)
    digest = "sha256:" + raw.hash.hexdigest()
    return Applied("sha256:" + plain.hash.hexdigest() if plain else digest, digest,
                   applier.entries, applier.owners_kept, os.path.getsize(src))


def _decompressor_for(buffered: io.BufferedReader) -> IO[bytes]:
    head = buffered.peek(4)[:4]
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(
            buffered, read_across_frames=True)
    return buffered


def remove_tree(path: str) -> None:
    """Remove a layer or upper of ours, whatever its modes (best effort)."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        pfd = sysio.open_root(parent)
    except OSError:
        return
    try:
        _remove_quietly(pfd, name)
    finally:
        os.close(pfd)


def _remove_quietly(pfd: int, name: str) -> None:
    try:
        remove_tree_at(pfd, name)
    except OSError:
        pass


# -- export ----------------------------------------------------------------------------


@dataclass
class Exported:
    diff_id: str
    digest: str
    size: int  # bytes written
    entries: int


def _foreign_whiteout(dfd: int, name: str, st: os.stat_result) -> bool:
    if is_whiteout_stat(st):
        return True
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        return any(sysio.getxattr_or_none(dfd, name, p + "whiteout") is not None
                   for p in (TRUSTED, USER))
    return False


def _opaque(dfd: int, name: str) -> bool:
    return any(sysio.getxattr_or_none(dfd, name, p + "opaque") == b"y"
               for p in (TRUSTED, USER)) or \
        sysio.getxattr_or_none(dfd, name, FUSE_OVERLAYFS + "opaque") is not None


def _visible_xattrs(dfd: int, name: str, names: list[str]) -> dict[str, str]:
    """The xattrs a layer carries; none under an overlay's prefixes, not even a user's
    names escaped there (a tar applier drops them all: any could be a forged mark)."""
    out = {}
    for attr in names:
        if attr.startswith(PRIVATE_XATTRS):
            continue
        value = sysio.getxattr_or_none(dfd, name, attr)
        if value is not None:
            out[PAX_XATTR + attr] = value.decode("utf-8", "surrogateescape")
    return out


def _walk(rootfd: int, prune: set[str] | None = None
          ) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """(path, parent fd, name, lstat) of every entry below the root, sorted, parents
    first; by directory fds, never following a symlink.  Directories the consumer adds to
    ``prune`` meanwhile are not entered."""
    stack: list[tuple[str, int]] = [("", os.dup(rootfd))]
    try:
        while stack:
            path, dfd = stack.pop()
            try:
                names = sorted((n for n, _, _ in sysio.scandir_fd(dfd)), key=os.fsencode)
                subdirs = []
                for name in names:
                    st = sysio.lstat(dfd, name)
                    child = f"{path}/{name}" if path else name
                    yield child, dfd, name, st
                    if stat.S_ISDIR(st.st_mode):
                        subdirs.append((child, name))
                for child, name in reversed(subdirs):
                    if prune is None or child not in prune:
                        stack.append((child, sysio.open_dir_beneath(dfd, name)))
            finally:
                os.close(dfd)
    finally:
        for _, fd in stack:
            os.close(fd)


def export(upper: str, out: str, compression: str | None = "gzip",
           mtime: int | None = None,
           progress: Callable[[int], object] | None = None,
           lowers: list[str] | None = None) -> Exported:
    """Write upper directory ``upper`` as a layer tar at ``out`` (docker commit): whiteouts
    as ``.wh.NAME``, opaque directories with ``.wh..wh..opq``; sorted, numeric owners,
    ``mtime`` (when given) on every entry, so the same upper gives the same bytes.  With
    the ``lowers`` (top first) what the upper only points to is written out: a moved
    directory (redirect_dir=on) as an opaque one with all it shows, a metadata-only copy
    (metacopy=on) with its data."""
    try:
        rootfd = sysio.open_root(upper)
    except OSError as e:
        raise LayerError(f"'{upper}': {e.strerror}") from None
    out = os.path.abspath(out)
    tmp = f"{out}.partial-{os.getpid()}"
    entries = 0
    try:
        with open(tmp, "xb") as f:
            packed = _HashingWriter(f)
            comp: BinaryIO
            if compression == "gzip":
                comp = gzip.GzipFile(fileobj=packed, mode="wb", mtime=0,  # type: ignore[assignment]
                                     compresslevel=6)
            elif compression == "zstd":
                import zstandard

                comp = zstandard.ZstdCompressor(level=3).stream_writer(
                    packed, closefd=False)  # type: ignore[arg-type]
            else:
                comp = packed  # type: ignore[assignment]
            # uncompressed, the two digests are one: hashed once
            plain = _HashingWriter(comp) if comp is not packed else packed
            # tarfile's own record size: its stream buffer grows by copying, so a large one
            # costs a copy of the whole buffer per small write
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                links: dict[tuple[int, int], str] = {}
                resolver = _Resolver(upper, lowers) if lowers is not None else None
                prune: set[str] = set()
                try:
                    for path, dfd, name, st in _walk(rootfd, prune):
                        entries += 1
                        _add_entries(tar, _entries(path, dfd, name, st, links, mtime,
                                                   resolver, prune), progress)
                finally:
                    if resolver is not None:
                        resolver.stack.close()
            if comp is not packed:
                comp.close()
        # renamed into place only when whole; not fsynced, as tar, docker save and skopeo
        # don't: a crash may lose the file, never leave half of one under its name
        os.rename(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(rootfd)
    return Exported("sha256:" + plain.hash.hexdigest(), "sha256:" + packed.hash.hexdigest(),
                    packed.size, entries)


def _add_entries(tar: tarfile.TarFile, entries: Iterator[tuple[tarfile.TarInfo, int | None]],
                 progress: Callable[[int], object] | None) -> None:
    for info, data in entries:
        if data is None:
            tar.addfile(info)
            continue
        # unbuffered: a 1 MiB buffer per small file is 256 page faults
        with os.fdopen(data, "rb", buffering=0) as fobj:
            tar.addfile(info, fobj)
        if progress is not None:
            progress(info.size)


def _info(path: str, st: os.stat_result, mtime: int | None, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = mtime if mtime is not None else st.st_mtime_ns // 10**9
    return info


class _Resolver:
    """The merged view, for what an upper only points to (oci.merged)."""

    def __init__(self, upper: str, lowers: list[str]) -> None:
        from unionfs.oci import merged

        self.merged = merged
        self.stack = merged.open_stack(upper, lowers)

    def data(self, path: str, dfd: int, name: str) -> tuple[int, str] | None:
        parent = self.merged.resolve(self.stack, path.rpartition("/")[0])
        res = self.merged.resolve(self.stack, path)
        if parent is None or res is None:
            raise LayerError(f"'{path}': not in the merged view")
        data = self.merged.data_of(self.stack, parent, name, res, dfd)
        if data is None:  # marked in another dialect than the stack reads
            raise LayerError(f"'{path}': a metacopy whose data the lowers don't hold")
        return data

    def tree(self, path: str) -> Iterator[tuple[str, int, str, tuple[int, str] | None]]:
        res = self.merged.resolve(self.stack, path)
        if res is None or not res.is_dir:
            raise LayerError(f"'{path}': not a directory in the merged view")
        return self.merged.walk(self.stack, res, path)


def _entries(path: str, dfd: int, name: str, st: os.stat_result,
             links: dict[tuple[int, int], str], mtime: int | None,
             resolver: _Resolver | None = None, prune: set[str] | None = None,
             data_at: tuple[int, str] | None = None, flat: bool = False
             ) -> Iterator[tuple[tarfile.TarInfo, int | None]]:
    parent = path.rpartition("/")[0]
    if not flat and _foreign_whiteout(dfd, name, st):
        info = _info(f"{parent}/{WH_PREFIX}{name}" if parent else WH_PREFIX + name, st, mtime,
                     tarfile.REGTYPE)
        info.mode, info.size = 0o644, 0
        yield info, None
        return
    names = sysio.listxattr(dfd, name)  # one call answers every mark below
    moved = False
    for marker in ("metacopy", "redirect"):
        if not flat and (TRUSTED + marker in names or USER + marker in names):
            if resolver is None:
                raise LayerError(f"'{path}' carries overlay.{marker} (a mount with "
                                 f"{'metacopy' if marker == 'metacopy' else 'redirect_dir'}"
                                 "=on): its content lies in the lower layers; give them "
                                 "with --lowers")
            if marker == "metacopy" and stat.S_ISREG(st.st_mode):
                data_at = resolver.data(path, dfd, name)
            elif marker == "redirect" and stat.S_ISDIR(st.st_mode):
                moved = True
    if moved:
        assert resolver is not None and prune is not None
        # a moved directory: opaque, with everything it shows, from wherever it lies
        info = _info(path, st, mtime, tarfile.DIRTYPE)
        info.pax_headers = _visible_xattrs(dfd, name, names) if names else {}
        yield info, None
        opq = _info(f"{path}/{WH_OPAQUE}", st, mtime, tarfile.REGTYPE)
        opq.mode, opq.size = 0o644, 0
        yield opq, None
        prune.add(path)
        for child, cdfd, cname, cdata in resolver.tree(path):
            yield from _entries(child, cdfd, cname, sysio.lstat(cdfd, cname), links, mtime,
                                data_at=cdata, flat=True)
        return
    xattrs = _visible_xattrs(dfd, name, names) if names and not stat.S_ISLNK(st.st_mode) \
        else {}
    if stat.S_ISDIR(st.st_mode):
        info = _info(path, st, mtime, tarfile.DIRTYPE)
        info.pax_headers = xattrs
        yield info, None
        if not flat and names and _opaque(dfd, name):
            opq = _info(f"{path}/{WH_OPAQUE}", st, mtime, tarfile.REGTYPE)
            opq.mode, opq.size = 0o644, 0
            yield opq, None
        return
    if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
        first = links.get((st.st_dev, st.st_ino))
        if first is not None:
            info = _info(path, st, mtime, tarfile.LNKTYPE)
            info.linkname = first
            yield info, None
            return
        links[(st.st_dev, st.st_ino)] = path
    if stat.S_ISREG(st.st_mode):
        info = _info(path, st, mtime, tarfile.REGTYPE)
        info.size = st.st_size
        info.pax_headers = xattrs
        src_dfd, src_name = data_at or (dfd, name)  # a metacopy's data lies below
        yield info, sysio.open_at(src_dfd, src_name, os.O_RDONLY)
    elif stat.S_ISLNK(st.st_mode):
        info = _info(path, st, mtime, tarfile.SYMTYPE)
        info.linkname = sysio.readlink(dfd, name)
        yield info, None
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info = _info(path, st, mtime, tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode)
                     else tarfile.BLKTYPE)
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        info.pax_headers = xattrs
        yield info, None
    elif stat.S_ISFIFO(st.st_mode):
        info = _info(path, st, mtime, tarfile.FIFOTYPE)
        info.pax_headers = xattrs
        yield info, None
    # sockets: not content (tar can't hold them either)


def terminal_progress(total: int, what: str, quiet: bool = False
                      ) -> tuple[Callable[[int], object] | None, Callable[[], None]]:
    """A progress bar on a terminal (tqdm), nothing in a pipe or with ``quiet``."""
    if quiet or not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm  # type: ignore[import-untyped]

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=what, leave=False)
    return bar.update, bar.close

