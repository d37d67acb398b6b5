"""What generic filesystem suites check beyond the overlay rules (issue 9): file handles,
O_DIRECT beside buffered I/O, atime mount options, O_TMPFILE; each compared with kernel
overlayfs over identical layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from overlay_harness import USERNS, Dir, File, PyUnionMount, mount_stack, outcome

from unionfs import stats

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
AT_FDCWD = -100
AT_HANDLE_FID = 0x200  # a handle to compare, never to open (fanotify)
MAX_HANDLE_SZ = 128


class _FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def name_to_handle(path: Path, flags: int = 0) -> _FileHandle:
    fh = _FileHandle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(AT_FDCWD, os.fsencode(str(path)), ctypes.byref(fh),
                               ctypes.byref(mount_id), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(path))
    return fh


def open_by_handle(mount: Path, fh: _FileHandle) -> int:
    mfd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = _libc.open_by_handle_at(mfd, ctypes.byref(fh), os.O_RDONLY)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd
    finally:
        os.close(mfd)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


# -- file handles ------------------------------------------------------------------------------


def test_file_handles_kernel_refuses_ours_reopen(make_pair) -> None:
    """Kernel overlayfs encodes no openable handle without nfs_export=on: EOPNOTSUPP.  A FUSE
    mount can't say that through libfuse 3.14, so our handles work instead, also after the
    kernel forgot the inode (the reconnecting lookup of "."), and a removed file's handle
    is ESTALE.  ESTALE for files that exist, what suites found, is what must not happen."""
    tree = {"f": File("lower"), "d/g": File("deep"), "gone": File("x")}
    pair = make_pair(lowers=[tree], upper={"u": File("up")})
    for name in ("f", "u", "d", "d/g", "."):
        k, o = pair.both(lambda r, n=name: name_to_handle(r / n) and None)
        assert k == ("err", "ENOTSUP"), f"test premise: the kernel gave {k}"  # EOPNOTSUPP
        assert o == ("ok", None), name
    root = pair.o.root
    handles = {n: name_to_handle(root / n) for n in ("f", "u", "d", "d/g", "gone")}
    inos = {n: os.stat(root / n).st_ino for n in handles}
    if USERNS:
        # open_by_handle_at wants CAP_DAC_READ_SEARCH in the initial user namespace
        with pytest.raises(PermissionError):
            os.close(open_by_handle(root, handles["f"]))
        return
    pair.same(lambda r: os.unlink(r / "gone"), expect="ok")
    for rnd in range(2):
        drop_caches()  # the kernel forgets the inodes: only the handles are left
        for n in ("f", "u", "d", "d/g"):
            fd = open_by_handle(root, handles[n])
            try:
                assert os.fstat(fd).st_ino == inos[n], n
                if n != "d":
                    assert os.pread(fd, 100, 0) == {"f": b"lower", "u": b"up",
                                                    "d/g": b"deep"}[n], n
            finally:
                os.close(fd)
        with pytest.raises(OSError) as e:
            os.close(open_by_handle(root, handles["gone"]))
        assert e.value.errno == errno.ESTALE, rnd
    pair.check_all()


def test_handles_open_after_the_kernel_forgot_thousands(make_stack) -> None:
    """After the kernel forgot most of 4 500 nodes the daemon gives their memory back
    (repacking what it remembers of forgotten nodes, closing cached directories): handles
    taken before still open the right files, and held files stay held.  (It remembers the
    last 4 096 forgotten: 500 files stay open so that 4 000 are forgotten.)"""
    if USERNS:
        pytest.skip("open_by_handle_at wants CAP_DAC_READ_SEARCH in the initial user namespace")
    tree = {f"d{a}/s{b}/f{c}": File(f"{a}{b}{c}") for a in range(5) for b in range(10)
            for c in range(90)}
    paths = make_stack(lowers=[tree], upper={})
    m = PyUnionMount(paths)
    held_fds: list[int] = []
    try:
        root = paths.merged
        names = {f"d{a}/s{b}/f{c}": f"{a}{b}{c}".encode() for a in range(5) for b in range(10)
                 for c in (50, 89)}
        handles = {n: name_to_handle(root / n) for n in names}
        for dirpath, _, files in os.walk(root):
            for f in files:
                os.lstat(os.path.join(dirpath, f))
        held_fds = [os.open(root / f"d{a}/s{b}/f{c}", os.O_RDONLY) for a in range(5)
                    for b in range(10) for c in range(10)]
        peak = stats.fetch(str(root))["nodes"]
        assert peak > 4500, peak
        drop_caches()
        deadline = time.monotonic() + 10
        while stats.fetch(str(root))["nodes"] > 600 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # quiet for longer than ops.SETTLE: the memory has gone back
        assert stats.fetch(str(root))["nodes"] <= 600
        assert stats.fetch(str(root))["memory_given_back"] >= 1
        for n in names:
            fd = open_by_handle(root, handles[n])
            try:
                assert os.pread(fd, 100, 0) == names[n], n
            finally:
                os.close(fd)
        assert os.pread(held_fds[-1], 100, 0) == b"499"
    finally:
        for fd in held_fds:
            os.close(fd)
        m.stop()


REMOVALS = ["unlink", "rename_over", "unlink_while_open"]


@pytest.mark.parametrize("how", REMOVALS)
@pytest.mark.parametrize("where", ["upper", "lower"])
@pytest.mark.parametrize("mode", ["read", "write"])
def test_open_after_the_last_name_went_like_kernel(make_pair, how: str, where: str,
                                                   mode: str) -> None:
    """An open the kernel sends for a file whose last name went after it was looked up (a
    racing unlink or rename over it) opens the file that was there, as on any local
    filesystem.  An O_PATH fd holds the looked-up file here without opening it; the stress
    suite's churn met the race as ESTALE (the kernel retries an ESTALE open once)."""
    f = "f" if where == "lower" else "u"
    pair = make_pair(lowers=[{"f": File("lower data"), "other": File("o")}],
                     upper={"u": File("upper data"), "other2": File("p")})

    def scenario(root: Path) -> tuple[Any, ...]:
        held = os.open(root / f, os.O_PATH)
        try:
            if how == "unlink_while_open":
                fd = os.open(root / f, os.O_RDONLY)
                os.unlink(root / f)
                os.close(fd)  # its release leaves the file held by the kernel only
            elif how == "unlink":
                os.unlink(root / f)
            else:
                os.rename(root / ("other" if where == "lower" else "other2"), root / f)
            flags = os.O_RDONLY if mode == "read" else os.O_RDWR
            fd = os.open(f"/proc/self/fd/{held}", flags)
            try:
                if mode == "write":
                    os.pwrite(fd, b"NEW", 0)
                return os.pread(fd, 100, 0), os.fstat(fd).st_nlink, sorted(os.listdir(root))
            finally:
                os.close(fd)
        finally:
            os.close(held)

    pair.same(scenario)
    pair.check_all()


def test_changes_through_an_fd_after_the_last_name_went_like_kernel(make_pair) -> None:
    """A lower file open read-only whose name was removed: changing its metadata through the
    fd needs a copy-up with no name left to copy it up to; the kernel says EEXIST."""
    pair = make_pair(lowers=[{"f": File("lower data")}], upper={})
    changes = {
        "fchmod": lambda fd: os.fchmod(fd, 0o600),
        "futimes": lambda fd: os.utime(fd, (1, 1)),
        "fsetxattr": lambda fd: os.setxattr(fd, "user.k", b"v"),
    }

    def scenario(root: Path) -> dict[str, str]:
        fd = os.open(root / "f", os.O_RDONLY)
        try:
            os.unlink(root / "f")
            out = {}
            for what, change in changes.items():
                try:
                    change(fd)
                    out[what] = "ok"
                except OSError as e:
                    out[what] = errno.errorcode[e.errno]
            return out
        finally:
            os.close(fd)

    pair.same(scenario)
    pair.check_all()


@pytest.mark.parametrize("where", ["upper", "lower", "lower-read-before"])
def test_changes_through_o_path_after_the_last_name_went_like_kernel(make_pair,
                                                                       where: str) -> None:
    """Held without being open (an O_PATH descriptor, as a chmod on its way holds it), a file
    whose last name went is changed through /proc/self/fd: the upper file itself takes the
    change, as in the kernel; a lower one would need a copy-up to a name that's gone: EEXIST
    (also when a reader had it open across the unlink, whose fd the daemon then keeps: that
    fd is the lower file itself, never to be changed)."""
    pair = make_pair(lowers=[{"lf": File("lower data")}], upper={"uf": File("upper data")})
    name = "uf" if where == "upper" else "lf"

    def scenario(root: Path) -> dict[str, Any]:
        fd = os.open(root / name, os.O_PATH)
        link = f"/proc/self/fd/{fd}"
        try:
            if where == "lower-read-before":
                reader = os.open(root / name, os.O_RDONLY)
                os.unlink(root / name)
                os.close(reader)
            else:
                os.unlink(root / name)
            out: dict[str, Any] = {}
            for what, change in (("chmod", lambda: os.chmod(link, 0o600)),
                                 ("utime", lambda: os.utime(link, ns=(10**18, 10**18))),
                                 ("truncate", lambda: os.truncate(link, 3))):
                try:
                    change()
                    out[what] = "ok"
                except OSError as e:
                    out[what] = errno.errorcode[e.errno]
            st = os.stat(link)
            out["after"] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink)
            return out
        finally:
            os.close(fd)

    pair.same(scenario, expect="ok")
    pair.check_all()


@pytest.mark.skipif(USERNS, reason="open_by_handle_at wants CAP_DAC_READ_SEARCH in the initial "
                                   "user namespace")
def test_handles_of_removed_open_files_like_kernel(make_stack, mounter) -> None:
    """xfstests generic/467: a file whose names are gone opens by its handle while somebody
    still has it open, also after the kernel dropped its caches, and is ESTALE once closed.
    The kernel's overlay gives handles only with nfs_export=on, so it runs with that; ours
    gives them always (docs/differences.md)."""
    spec = ([{"lf": File("lower"), "x": File("x")}], {"uf": File("upper")})
    kernel = mount_stack(make_stack(*spec), "kernel", options="index=on,nfs_export=on")
    try:
        ours = mounter(make_stack(*spec))

        def run(root: Path) -> list[Any]:
            (root / "nf").write_text("new")
            names = ("lf", "uf", "nf")
            handles = {n: name_to_handle(root / n) for n in names}
            fds = [os.open(root / n, os.O_RDONLY) for n in names]
            out: list[Any] = []
            for n in names:
                os.unlink(root / n)

            def reopen_all() -> None:
                for n in names:
                    try:
                        fd = open_by_handle(root, handles[n])
                    except OSError as e:
                        out.append((n, errno.errorcode[e.errno]))
                    else:
                        out.append((n, os.pread(fd, 20, 0)))
                        os.close(fd)

            reopen_all()
            drop_caches()
            reopen_all()
            for fd in fds:
                os.close(fd)
            # The kernel's FORGETs reach a FUSE daemon after drop_caches has returned: until
            # they have, it still knows the nodes (a moment, not a state).
            settled = len(out)
            for _ in range(40):
                drop_caches()
                del out[settled:]
                reopen_all()
                if all(r[1] == "ESTALE" for r in out[settled:]):
                    break
                time.sleep(0.05)
            return out

        k, o = outcome(run, kernel.root), outcome(run, ours.root)
        assert k[0] == "ok" and k[1][:3] == [("lf", b"lower"), ("uf", b"upper"),
                                             ("nf", b"new")], f"test premise: {k}"
        assert k == o
    finally:
        kernel.stop()


EXPORT_FILES = 5000  # more than the daemon remembers without nfs_export (inodes.RECALL)


def _take_handles(root: Path) -> dict[str, bytes]:
    """Objects of every kind, and their handles: lower, upper, copied up, in a moved
    directory, made through the mount, and one removed after its handle was taken."""
    (root / "lf").chmod(0o600)  # copied up
    (root / "nd").mkdir()
    (root / "nd/h").write_text("in a moved dir")
    (root / "many").mkdir()
    for i in range(EXPORT_FILES):
        (root / f"many/f{i}").write_text(str(i))
    (root / "gone").write_text("gone")
    names = ["lf", "uf", "ld", "ld/g", "lx", "nd", "nd/h", "many", "gone",
             *(f"many/f{i}" for i in range(0, EXPORT_FILES, 7))]
    out = {n: bytes(name_to_handle(root / n)) for n in names}
    os.rename(root / "nd", root / "nd2")
    os.unlink(root / "gone")
    return {n.replace("nd", "nd2", 1) if n.startswith("nd") else n: h for n, h in out.items()}


def _open_handles(root: Path, handles: dict[str, bytes]) -> dict[str, Any]:
    drop_caches()
    out: dict[str, Any] = {}
    for name, raw in handles.items():
        try:
            fd = open_by_handle(root, _FileHandle.from_buffer_copy(raw))
        except OSError as e:
            out[name] = errno.errorcode[e.errno]
            continue
        try:
            st = os.fstat(fd)
            out[name] = "dir" if stat.S_ISDIR(st.st_mode) else os.pread(fd, 100, 0)
        finally:
            os.close(fd)
    return out


@pytest.mark.skipif(USERNS, reason="open_by_handle_at wants CAP_DAC_READ_SEARCH in the initial "
                                   "user namespace; rootless, index=on and so nfs_export=on "
                                   "fall back to off (docs/differences.md)")
def test_nfs_export_handles_outlive_memory_and_remount_like_kernel(make_stack) -> None:
    """xfstests generic/426, 467, 477, 756: with nfs_export=on, handles of thousands of files
    open after the kernel forgot every inode and after the mount was cycled (and a directory
    renamed after that), a removed file's is ESTALE; the same on the kernel's overlay."""
    spec = ([{"lf": File("lower"), "ld/g": File("deep"), "lx/a": File("a")}],
            {"uf": File("upper")})
    opts = "index=on,nfs_export=on"
    seen = {}
    for impl in ("kernel", "pyunionfs"):
        paths = make_stack(*spec)
        m = mount_stack(paths, impl, options=opts)
        try:
            handles = _take_handles(paths.merged)
            first = _open_handles(paths.merged, handles)
        finally:
            m.stop()
        m = mount_stack(paths, impl, options=opts)
        try:
            # generic/477: a directory renamed after the cycle, before its files' handles
            os.rename(paths.merged / "nd2", paths.merged / "nd3")
            seen[impl] = (first, _open_handles(paths.merged, handles))
        finally:
            m.stop()
    k, o = seen["kernel"], seen["pyunionfs"]
    assert k[0]["gone"] == k[1]["gone"] == "ESTALE" and k[0]["nd2/h"] == b"in a moved dir" \
        and k[1]["many/f7"] == b"7" and k[0] == k[1], f"test premise: {k}"
    assert o == k


def _handle_of_reused_number(root: Path) -> tuple[bool, str]:
    """A file's handle, the file removed, new files made until one has its number (ext4
    hands freed inode numbers out again); then the old handle is opened."""
    (root / "a").write_text("A")
    number = os.stat(root / "a").st_ino
    handle = name_to_handle(root / "a")
    os.unlink(root / "a")
    drop_caches()
    reused = False
    for i in range(2000):
        (root / f"b{i}").write_text("B")
        if os.stat(root / f"b{i}").st_ino == number:
            reused = True
            break
    drop_caches()
    try:
        os.close(open_by_handle(root, handle))
    except OSError as e:
        return reused, errno.errorcode[e.errno]
    return reused, "opened"


@pytest.mark.skipif(USERNS, reason="open_by_handle_at wants CAP_DAC_READ_SEARCH in the initial "
                                   "user namespace")
def test_nfs_export_reused_number_is_stale_like_kernel(make_stack) -> None:
    """The number of a removed upper file, given to a new one: the old handle is ESTALE, not
    the new file (the generation, a digest of the real handle, differs)."""
    got = {}
    for impl in ("kernel", "pyunionfs"):
        paths = make_stack([{"x": File("x")}], {})
        m = mount_stack(paths, impl, options="index=on,nfs_export=on")
        try:
            got[impl] = _handle_of_reused_number(paths.merged)
        finally:
            m.stop()
    if not got["pyunionfs"][0]:
        pytest.skip("the upper filesystem gave no freed inode number out again")
    assert got["kernel"][1] == got["pyunionfs"][1] == "ESTALE", got


@pytest.mark.skipif(not USERNS, reason="runs in the userns suite (test_rootless)")
def test_nfs_export_falls_back_rootless(make_stack) -> None:
    """Rootless, index=on falls back to off (no file handles to open), and nfs_export=on,
    which needs it, with it: the mount works, says so in its log, and keeps no records."""
    paths = make_stack([{"f": File("lower")}], {})
    m = mount_stack(paths, "pyunionfs", options="index=on,nfs_export=on")
    try:
        assert (paths.merged / "f").read_text() == "lower"
        assert "falling back to nfs_export=off" in m.log_tail()  # type: ignore[attr-defined]
    finally:
        m.stop()
    assert not (paths.work / "pyunionfs-export.sqlite").exists()


def test_fid_handles_identify_objects(make_pair) -> None:
    """AT_HANDLE_FID (fanotify) handles: given by both, equal for one object, and stable."""
    pair = make_pair(lowers=[{"f": File("lower"), "g": File("x")}], upper={"u": File("up")})

    def fids(root: Path) -> tuple[bool, bool, bool]:
        a1 = bytes(name_to_handle(root / "f", AT_HANDLE_FID).f_handle)
        drop_caches()
        a2 = bytes(name_to_handle(root / "f", AT_HANDLE_FID).f_handle)
        b = bytes(name_to_handle(root / "g", AT_HANDLE_FID).f_handle)
        u = bytes(name_to_handle(root / "u", AT_HANDLE_FID).f_handle)
        return a1 == a2, a1 != b, u != b

    assert pair.same(fids, expect="ok") == (True, True, True)


# -- O_DIRECT and the page cache --------------------------------------------------------------

BLOCK = 4096
SIZE = 16 * BLOCK


def _aligned(data: bytes) -> mmap.mmap:
    buf = mmap.mmap(-1, len(data))  # page-aligned, as O_DIRECT wants
    buf.write(data)
    return buf


def _direct_then_buffered(root: Path) -> list[str]:
    """Buffered reads cache the pages; O_DIRECT writes at several offsets (inside, at the end,
    past it); each buffered read after must see them."""
    p = root / "f"
    seen = []
    with open(p, "rb") as f:
        f.read()  # the whole file in the page cache
    rfd = os.open(p, os.O_RDONLY)
    dfd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        for i, off in enumerate((0, 5 * BLOCK, SIZE - BLOCK, SIZE, SIZE + 3 * BLOCK)):
            os.pread(rfd, SIZE, 0)  # cached again
            buf = _aligned(bytes([0x41 + i]) * BLOCK)
            os.pwritev(dfd, [buf], off)
            back = os.pread(rfd, BLOCK, off)
            seen.append(f"{off}: {back[:1]!r}x{len(back)} size={os.fstat(rfd).st_size}")
    finally:
        os.close(dfd)
        os.close(rfd)
    return seen


def _buffered_then_direct(root: Path) -> list[str]:
    p = root / "f"
    seen = []
    wfd = os.open(p, os.O_WRONLY)
    dfd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    buf = _aligned(b"\0" * BLOCK)
    try:
        for i, off in enumerate((0, 7 * BLOCK, SIZE)):
            os.pwrite(wfd, bytes([0x61 + i]) * BLOCK, off)
            n = os.preadv(dfd, [buf], off)
            seen.append(f"{off}: {buf[:1]!r}x{n}")
    finally:
        os.close(dfd)
        os.close(wfd)
    return seen


def _mmap_then_direct(root: Path) -> list[str]:
    """A shared mapping sees an O_DIRECT write made through another descriptor."""
    p = root / "f"
    fd = os.open(p, os.O_RDWR)
    dfd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        m = mmap.mmap(fd, SIZE)
        first = m[2 * BLOCK:2 * BLOCK + 1]
        os.pwritev(dfd, [_aligned(b"Z" * BLOCK)], 2 * BLOCK)
        after = m[2 * BLOCK:2 * BLOCK + 1]
        m.close()
    finally:
        os.close(dfd)
        os.close(fd)
    return [repr(first), repr(after)]


def _mmap_write_then_direct(root: Path) -> list[bytes]:
    """Dirty pages of a shared mapping reach an O_DIRECT read, and an O_DIRECT write the
    mapping."""
    p = root / "f"
    fd = os.open(p, os.O_RDWR)
    dfd = os.open(p, os.O_RDWR | os.O_DIRECT)
    out = []
    try:
        m = mmap.mmap(fd, SIZE)
        for off in (0, 3 * BLOCK, SIZE - BLOCK):
            m[off:off + BLOCK] = b"M" * BLOCK
            buf = _aligned(b"\0" * BLOCK)
            os.preadv(dfd, [buf], off)
            out.append(bytes(buf[:4]))
            os.pwritev(dfd, [_aligned(b"D" * BLOCK)], off)
            out.append(m[off:off + 4])
        m.close()
    finally:
        os.close(dfd)
        os.close(fd)
    return out


def _aio_direct_then_buffered(root: Path) -> list[str]:
    """Asynchronous O_DIRECT writes (libaio, through fio), which FUSE completes out of line,
    then buffered reads of pages that were cached before."""
    p = root / "f"
    out = []
    for i, off in enumerate((0, 2 * BLOCK, SIZE - BLOCK, SIZE)):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.pread(fd, 2 * SIZE, 0)
            pattern = "0x" + f"{0x41 + i:02x}" * 4
            r = subprocess.run(["fio", "--name=w", f"--filename={p}", "--rw=write", "--bs=4k",
                                "--size=4k", f"--offset={off}", "--ioengine=libaio",
                                "--direct=1", f"--buffer_pattern={pattern}", "--iodepth=1",
                                "--output=/dev/null"], capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, r.stderr
            out.append(f"{off}: {os.pread(fd, 4, off)!r} size={os.fstat(fd).st_size}")
        finally:
            os.close(fd)
    return out


CASES = [_direct_then_buffered, _buffered_then_direct, _mmap_then_direct, _mmap_write_then_direct]
if shutil.which("fio"):
    CASES.append(_aio_direct_then_buffered)


@pytest.mark.parametrize("where", ["lower", "upper"])
@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__.strip("_"))
def test_direct_io_coherent_with_page_cache(make_pair, where: str, case) -> None:
    """Kernel overlayfs is coherent here; so is FUSE as we use it (no FOPEN_DIRECT_IO, so
    O_DIRECT takes the kernel's generic path, which invalidates the cached range)."""
    data = File(b"0123456789abcdef" * (SIZE // 16))
    lowers, upper = ([{"f": data}], {}) if where == "lower" else ([{"x": File("x")}], {"f": data})
    pair = make_pair(lowers=lowers, upper=upper)
    pair.same(case, expect="ok")
    pair.same(lambda r: os.stat(r / "f").st_size, expect="ok")
    pair.check_all()


# -- O_TMPFILE --------------------------------------------------------------------------------


def test_o_tmpfile_refused_cleanly(make_pair) -> None:
    """The kernel's overlay makes O_TMPFILE files (6.6+).  FUSE passes the request on only
    to a daemon that registers a tmpfile handler, which libfuse 3.14 and pyfuse3 can't: the
    open fails with EOPNOTSUPP, which programs (glibc's tmpfile(), systemd) take as their cue
    to fall back to a named file, and nothing is left in upper or work."""
    pair = make_pair(lowers=[{"d/x": File("x")}], upper={})

    def tmpfile(root: Path) -> str:
        fd = os.open(root / "d", os.O_TMPFILE | os.O_RDWR, 0o600)
        os.close(fd)
        return "made"

    k, o = pair.both(tmpfile)
    assert k == ("ok", "made"), f"test premise: the kernel makes O_TMPFILE files, gave {k}"
    assert o == ("err", "ENOTSUP")  # errno.errorcode names EOPNOTSUPP (== ENOTSUP) so
    assert sorted(os.listdir(pair.o.upper)) == []
    assert os.listdir(pair.o.paths.work / "work") == []


# -- atime mount options ----------------------------------------------------------------------

OLD = 1_500_000_000  # atime before mtime: relatime updates it on the first access
ATIME_OPTIONS = ["", "relatime", "norelatime", "strictatime", "nostrictatime", "noatime", "atime",
                 "nodiratime", "diratime", "lazytime", "nolazytime", "relatime,nodiratime",
                 "noatime,lazytime"]


def _atime_layers() -> tuple[list, dict]:
    prog = Path("/bin/true").read_bytes()
    lower = {"l": File("lower", atime=OLD), "ld/x": File("x"), "md/a": File("a"),
             "lx": Dir(atime=OLD), "lx/z": File("z"),
             "lprog": File(prog, mode=0o755, atime=OLD)}
    upper = {"u": File("upper", atime=OLD), "ud/y": File("y"), "md/b": File("b"),
             "uprog": File(prog, mode=0o755, atime=OLD)}
    return [lower], upper


def _touch_atimes(root: Path) -> dict[str, bool]:
    """Read, exec and list things; which atimes moved (seen through the mount)."""
    for d in ("ld", "ud", "md", "."):
        os.utime(root / d, (OLD, os.stat(root / d).st_mtime))  # copies ld and md up
    names = ("l", "u", "lprog", "uprog", "ld", "ud", "md", ".")
    before = {n: os.stat(root / n).st_atime_ns for n in names}
    for n in ("l", "u"):
        (root / n).read_bytes()
    for n in ("lprog", "uprog"):
        subprocess.run([str(root / n)], check=True, timeout=30)
    for d in ("ld", "ud", "md", ".", "lx"):
        os.listdir(root / d)
    drop_caches()
    return {n: os.stat(root / n).st_atime_ns != before[n] for n in names}


@pytest.mark.parametrize("options", ATIME_OPTIONS, ids=lambda o: o or "default")
def test_atime_options_like_kernel(make_pair, options: str) -> None:
    """Every atime word mount(8) may pass is accepted, and does what it does on the kernel's
    overlay: noatime and nodiratime keep atimes still, the others let them move as the
    upper filesystem's own policy says (relatime here)."""
    lowers, upper = _atime_layers()
    pair = make_pair(lowers=lowers, upper=upper, options=options)
    moved = pair.same(_touch_atimes, expect="ok")
    if "noatime" in options:
        assert not any(moved.values()), moved
    elif "nodiratime" in options:
        assert moved["u"] and not moved["ud"], moved
    else:
        assert moved["u"] and moved["ud"], moved
    assert not moved["l"], "reading a lower file never touches its atime"
    pair.assert_lowers_untouched()
    # a lower directory's own atime, listed through the mount
    k, o = (os.stat(side.paths.lowers[0] / "lx").st_atime_ns != OLD * 10**9
            for side in pair.sides)
    assert k == o, f"listing a lower dir: its atime moved on kernel: {k}, ours: {o}"


INHERITED_ATIME = (
    "a user namespace can't change the atime flags of a mount it inherited (the layers'), so "
    "our strictatime falls back to the upper filesystem's relatime (docs/differences.md)")


def _reads_move_atime(root: Path) -> list[bool]:
    """xfstests generic/003's file steps: a file made through the mount, read three times
    with a pause before each read; which reads moved its atime (read anew through the
    mount each time, after dropping the caches: what the kernel shows)."""
    f = root / "d/f"
    f.parent.mkdir()
    f.write_text("aaa")
    moved = []
    for _ in range(3):
        before = os.stat(f).st_atime_ns
        time.sleep(0.02)
        f.read_bytes()
        drop_caches()
        moved.append(os.stat(f).st_atime_ns != before)
    before = os.stat(f.parent).st_atime_ns
    time.sleep(0.02)
    os.listdir(f.parent)
    drop_caches()
    moved.append(os.stat(f.parent).st_atime_ns != before)
    return moved


@pytest.mark.parametrize("options", ["", "relatime", "strictatime", "noatime", "nodiratime",
                                     "strictatime,nodiratime", "relatime,nostrictatime"],
                         ids=lambda o: o or "default")
def test_atime_of_repeated_reads_like_kernel(make_pair, options: str) -> None:
    """Repeated reads of one file (xfstests generic/003): under relatime the first read of a
    new file moves its atime and later ones don't; under strictatime every read does, though
    the upper filesystem is mounted relatime (the kernel's overlay takes its own mount's
    policy, and so do we through a private clone of the upper's mount); the page cache
    serves the later reads, so the atime moves when the file is opened."""
    strict = "strictatime" in options.split(",")
    if strict and USERNS:
        pytest.skip(INHERITED_ATIME)
    pair = make_pair(lowers=[{"x": File("x")}], options=options)
    moved = pair.same(_reads_move_atime, expect="ok")
    assert moved[:3] == ([False] * 3 if "noatime" in options else [True] * 3 if strict
                         else [True, False, False]), f"test premise: {moved}"
    if "noatime" in options:
        assert not moved[3], f"test premise: {moved}"
    pair.check_all()



# -- a mount inside UPPER ------------------------------------------------------------------------


@pytest.mark.skipif(USERNS, reason="a user namespace may not change the flags of the upper's "
                                   "inherited mount: the daemon then reaches UPPER through it, "
                                   "submounts and all (docs/differences.md)")
def test_mount_inside_upper_is_not_crossed_like_kernel(make_pair) -> None:
    """A filesystem mounted on a directory of UPPER: the kernel's overlay works on its private
    clone of the upper's mount, which holds no submounts, so it shows and changes the directory
    underneath; so do we, through our own clone (layers.own_upper_mount)."""
    pair = make_pair(lowers=[{"x": File("x")}], upper={"sub/under": File("under")})
    covered = []
    try:
        for side in pair.sides:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                str(side.upper / "sub")], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0, r.stderr
            covered.append(side.upper / "sub")
            (side.upper / "sub/ontop").write_text("on top")

        def view(root: Path) -> list[str]:
            (root / "sub/new").write_text("new")
            return sorted(os.listdir(root / "sub"))

        assert pair.same(view, "ok") == ["new", "under"]
    finally:
        for path in covered:
            subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
    pair.check_all()
