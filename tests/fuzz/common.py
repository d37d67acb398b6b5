"""What the targets share: the per-input sandbox that proves nothing was written outside
it, the test of what counts as a clean error, and tar building for the seeds."""

from __future__ import annotations

import atexit
import hashlib
import io
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

T = 1_600_000_000


class Finding(AssertionError):
    """A broken invariant (not an exception the code under test raised)."""


def clean_os_error(e: BaseException) -> bool:
    """An OSError the image verbs print as one line (oci.cli.report): one with an errno.
    Without one (gzip's BadGzipFile, a bare OSError) the line would be a Python message."""
    return isinstance(e, OSError) and e.errno is not None


def scratch(prefix: str) -> str:
    """A temporary directory for this process, removed when it exits (libFuzzer ends a
    run with exit(), which still runs atexit handlers)."""
    path = tempfile.mkdtemp(prefix=f"pyunionfs-fuzz-{prefix}-")
    atexit.register(_remove_if_there, path)
    return path


# -- the sandbox ----------------------------------------------------------------------


def _tree(path: str) -> dict[str, tuple[int, int, int, int]]:
    """What a check compares: every entry below ``path`` by (mode, size, mtime, nlink),
    walked without following a symlink."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                             st.st_nlink)
    st = os.lstat(path)
    out["."] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink)
    return out


class Sandbox:
    """A root with a sentinel tree beside each input's fresh directory.  Relative escapes
    from a layer (``../../sentinel``) land in the sentinel; after every input the root
    must hold only the sentinel and that directory, the sentinel unchanged."""

    SENTINEL = "sentinel"

    def __init__(self) -> None:
        self.root = scratch("sandbox")
        s = os.path.join(self.root, self.SENTINEL)
        os.makedirs(os.path.join(s, "etc"))
        for name in ("canary", "etc/passwd"):
            with open(os.path.join(s, name), "w") as f:
                f.write("untouched\n")
        os.symlink("etc", os.path.join(s, "link"))
        self.before = _tree(s)
        self.root_mtime = os.lstat(self.root).st_mtime_ns

    @contextmanager
    def input_dir(self) -> Iterator[str]:
        """A fresh directory for one input; checked and removed afterwards (also when the
        input raised, so that a finding is reported with the state it left)."""
        work = tempfile.mkdtemp(dir=self.root)
        try:
            yield work
        finally:
            self.check(work)
            _remove(work)

    def check(self, work: str) -> None:
        names = set(os.listdir(self.root))
        extra = names - {self.SENTINEL, os.path.basename(work)}
        if extra:
            for name in extra:
                _remove(os.path.join(self.root, name))
            raise Finding(f"written outside the input's directory: {sorted(extra)}")
        after = _tree(os.path.join(self.root, self.SENTINEL))
        if after != self.before:
            changed = sorted(k for k in set(after) | set(self.before)
                             if after.get(k) != self.before.get(k))
            raise Finding(f"the sentinel beside the input's directory changed: {changed}")


def _remove(path: str) -> None:
    # layers hold mode-000 directories and files: make everything writable first
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o700)
    os.chmod(path, 0o700)
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            p = os.path.join(root, name)
            if os.path.islink(p):
                os.unlink(p)
            else:
                os.rmdir(p)
    os.rmdir(path)


def _remove_if_there(path: str) -> None:
    if os.path.isdir(path):
        _remove(path)


_sandbox: list[Sandbox] = []


def sandbox() -> Sandbox:
    """One per process: the sentinel is made once, not per input."""
    if not _sandbox:
        _sandbox.append(Sandbox())
    return _sandbox[0]


# -- a layer directory, compared after a round trip -------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: int
    mode: int
    owner: tuple[int, int]
    data: str  # sha256 of a file, a symlink's target, a device's numbers
    xattrs: tuple[tuple[str, bytes], ...]
    mtime: int  # seconds: a tar (ours out, PAX in) keeps no more
    link_group: int  # hard links: the first path of the group, by number


def layer_snapshot(path: str, skip_xattr_prefixes: tuple[str, ...] = ()) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    first_of: dict[tuple[int, int], int] = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, path)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = hashlib.sha256(f.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                data = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            else:
                data = ""
            xattrs: list[tuple[str, bytes]] = []
            if not stat.S_ISLNK(st.st_mode):
                for x in os.listxattr(p, follow_symlinks=False):
                    if not x.startswith(skip_xattr_prefixes):
                        xattrs.append((x, os.getxattr(p, x, follow_symlinks=False)))
            group = 0
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                group = first_of.setdefault((st.st_dev, st.st_ino), len(first_of) + 1)
            # a whiteout (0/0) is made when the layer is applied: its time is that moment's,
            # not the layer's (nothing reads it), so it can't survive a round trip
            whiteout = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
            out[rel] = Entry(kind, stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid), data,
                             tuple(sorted(xattrs)), 0 if whiteout else st.st_mtime_ns // 10**9,
                             group)
    return out


# -- tars for the seeds -----------------------------------------------------------------


def tar_bytes(entries: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]],
              fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            if isinstance(e, tuple):
                info, data = e
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                t.addfile(e)
    return buf.getvalue()


def info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **kw: object
         ) -> tarfile.TarInfo:
    i = tarfile.TarInfo(name)
    i.type, i.mode, i.mtime, i.uid, i.gid = kind, mode, T, 0, 0
    for k, v in kw.items():
        setattr(i, k, v)
    return i


def sample_layer() -> bytes:
    """A layer as docker builds them: directories, files with PAX xattrs, a symlink, a hard
    link, a fifo, whiteouts of both kinds and an opaque directory."""
    xattr = {"SCHILY.xattr.user.mime": "text/plain",
             "SCHILY.xattr.trusted.app": "\x01\x00\x00\x02"}
    return tar_bytes([
        info("etc/", tarfile.DIRTYPE, 0o755),
        (info("etc/motd", pax_headers=xattr, uid=1000, gid=1000), b"hello\n"),
        info("etc/motd.link", tarfile.LNKTYPE, linkname="etc/motd"),
        info("etc/alt", tarfile.SYMTYPE, 0o777, linkname="motd"),
        info("etc/.wh.old"),
        info("var/", tarfile.DIRTYPE, 0o1777),
        info("var/cache/", tarfile.DIRTYPE, 0o700),
        info("var/cache/.wh..wh..opq"),
        info("run/fifo", tarfile.FIFOTYPE, 0o600),
        (info("bin/tool", mode=0o4755), b"\x7fELF" + bytes(60)),
        info("dev/gone", tarfile.CHRTYPE, 0, devmajor=0, devminor=0),
        info("./usr/./share/", tarfile.DIRTYPE, 0o755),
    ])
