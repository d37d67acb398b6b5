"""What the speed work (issue 7) must not change: kernel caching with -o timeout=, the
listing's carried knowledge, shared whiteouts, inode numbers that survive forget, and
memory handed back.  Behaviour is checked against the kernel where it has an answer."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest
from overlay_harness import (
    PYTHON,
    REPO,
    USERNS,
    Dir,
    File,
    KernelMount,
    PyUnionMount,
    Whiteout,
    snapshot_merged,
)


def _listing(m: Path, rel: str) -> list[tuple[str, str, int]]:
    out = []
    for name in sorted(os.listdir(m / rel)):
        st = os.lstat(m / rel / name)
        out.append((name, stat.filemode(st.st_mode), st.st_size))
    return out


def test_listing_over_many_layers_matches_kernel(make_pair):
    """readdirplus answers from the listing: merges through several layers, stops at an
    opaque directory and at a non-directory, hides whiteouts, as lookup does."""
    lowers = [
        {"d/a": File("top"), "d/gone": Whiteout(), "d/sub/x": File("x0"),
         "d/opq": Dir(opaque=True), "d/opq/new": File("n")},
        {"d/b": File("mid"), "d/sub/y": File("y1"), "d/opq/old": File("hidden"),
         "d/file_over_dir": File("f")},
        {"d/a": File("bottom"), "d/gone": File("hidden"), "d/sub/z": File("z2"),
         "d/opq/older": File("hidden"), "d/file_over_dir/inner": File("hidden")},
    ]
    pair = make_pair(lowers=lowers, upper={"d/u": File("upper")})
    assert pair.same(lambda m: _listing(m, "d")) == [
        ("a", "-rw-r--r--", 3), ("b", "-rw-r--r--", 3), ("file_over_dir", "-rw-r--r--", 1),
        ("opq", "drwxr-xr-x", pair.same(lambda m: os.lstat(m / "d/opq").st_size)),
        ("sub", "drwxr-xr-x", pair.same(lambda m: os.lstat(m / "d/sub").st_size)),
        ("u", "-rw-r--r--", 5)]
    assert pair.same(lambda m: sorted(os.listdir(m / "d/sub"))) == ["x", "y", "z"]
    assert pair.same(lambda m: sorted(os.listdir(m / "d/opq"))) == ["new"]
    pair.check_all()


def _mount_py(make_stack, lowers, upper=None, options=""):
    paths = make_stack(lowers=lowers, upper=upper)
    return paths, PyUnionMount(paths, options=options)


def test_timeout_zero_sees_lower_changes_at_once(make_stack):
    """-o timeout=0: the kernel caches nothing, for layers that change underneath."""
    paths, m = _mount_py(make_stack, [{"d/a": File("a")}], upper={}, options="timeout=0")
    try:
        assert os.listdir(paths.merged / "d") == ["a"]
        with pytest.raises(FileNotFoundError):
            os.stat(paths.merged / "d/late")
        (paths.lowers[0] / "d/late").write_text("late")
        assert (paths.merged / "d/late").read_text() == "late"
        (paths.lowers[0] / "d/a").write_text("changed")
        assert os.stat(paths.merged / "d/a").st_size == len("changed")
    finally:
        m.stop()


def test_absent_name_cached_then_created(make_stack):
    """A negative entry (the default timeout) does not hide a name created through the mount."""
    paths, m = _mount_py(make_stack, [{"d/a": File("a")}], upper={})
    try:
        for _ in range(2):
            with pytest.raises(FileNotFoundError):
                os.stat(paths.merged / "d/new")
        (paths.merged / "d/new").write_text("n")
        assert (paths.merged / "d/new").read_text() == "n"
        os.unlink(paths.merged / "d/new")
        with pytest.raises(FileNotFoundError):
            os.stat(paths.merged / "d/new")
        os.mkdir(paths.merged / "d/new")
        assert stat.S_ISDIR(os.stat(paths.merged / "d/new").st_mode)
    finally:
        m.stop()


def test_copy_up_shows_upper_attributes_at_once(make_stack):
    """A copy-up changes ctime behind the kernel's cached attributes: it is invalidated."""
    paths, m = _mount_py(make_stack, [{"f": File("data")}], upper={})
    try:
        before = os.stat(paths.merged / "f")
        os.close(os.open(paths.merged / "f", os.O_WRONLY))  # copy-up, no data change
        assert paths.upper is not None
        real = os.lstat(paths.upper / "f")
        after = os.stat(paths.merged / "f")
        assert after.st_ctime_ns == real.st_ctime_ns != before.st_ctime_ns
        assert after.st_ino == before.st_ino  # one object, one number, across copy-up
    finally:
        m.stop()


def test_bad_timeout_is_one_line_error(make_stack):
    paths = make_stack(lowers=[{"a": File("a")}], upper={})
    assert paths.upper is not None and paths.work is not None
    r = subprocess.run([PYTHON, "-m", "unionfs", "mount", "-o", "timeout=soon", str(paths.lowers[0]),
                        str(paths.upper), str(paths.work), str(paths.merged)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and "timeout=soon" in r.stderr, r.stderr


def test_lower_inside_lower_is_refused(tmp_path: Path):
    outer, inner = tmp_path / "outer", tmp_path / "outer/inner"
    inner.mkdir(parents=True)
    (tmp_path / "m").mkdir()
    r = subprocess.run([PYTHON, "-m", "unionfs", "mount", f"{inner}:{outer}",
                        str(tmp_path / "m")], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode != 0
    assert f"'{inner}' is inside lower directory '{outer}'" in r.stderr, r.stderr


def test_whiteouts_share_one_device_and_the_kernel_reads_them(make_stack):
    """Whiteouts are links of one 0/0 device (as the kernel makes them); the kernel hides the
    names, and WORK/work is left empty at unmount."""
    names = [f"f{i}" for i in range(20)]
    paths, m = _mount_py(make_stack, [{f"d/{n}": File(n) for n in names} | {"keep": File("k")}],
                         upper={})
    try:
        for n in names:
            os.unlink(paths.merged / "d" / n)
        assert os.listdir(paths.merged / "d") == []
    finally:
        m.stop()
    assert paths.upper is not None and paths.work is not None
    links = set()
    for n in names:
        st = os.lstat(paths.upper / "d" / n)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        links.add(st.st_ino)
    if not USERNS:
        assert len(links) == 1, "whiteouts are not links of one device"
    assert os.listdir(paths.work / "work") == []
    if USERNS or os.geteuid() != 0:
        return
    with KernelMount(paths) as k:
        assert os.listdir(k.root / "d") == []
        assert set(snapshot_merged(k.root).nodes) - {"."} == {"d", "keep"}


def test_inode_numbers_survive_forget(make_stack):
    """Numbers come from the real object: the same after the kernel forgot the inode, and
    the real st_ino where all layers are on one filesystem."""
    files = {f"d/f{i}": File(str(i)) for i in range(50)}
    paths, m = _mount_py(make_stack, [files], upper={})
    try:
        first = {n: os.lstat(paths.merged / n).st_ino for n in files}
        assert first["d/f0"] == os.lstat(paths.lowers[0] / "d/f0").st_ino
        if os.geteuid() == 0 and not USERNS:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("2\n")
        again = {n: os.lstat(paths.merged / n).st_ino for n in files}
        assert again == first
        assert len(set(first.values())) == len(first)
    finally:
        m.stop()


def test_unlinked_open_file_keeps_its_number_apart(make_stack):
    """A removed file still open keeps its number; a new file that reuses its real inode
    must get another one (the kernel still holds the first)."""
    paths, m = _mount_py(make_stack, [{"x": File("x")}], upper={})
    try:
        p = paths.merged / "a"
        p.write_text("one")
        fd = os.open(p, os.O_RDONLY)
        try:
            ino = os.fstat(fd).st_ino
            os.unlink(p)
            numbers = set()
            for i in range(20):  # ext4 and tmpfs hand a freed inode out again soon
                q = paths.merged / f"b{i}"
                q.write_text("two")
                numbers.add(os.lstat(q).st_ino)
            assert ino not in numbers
            assert os.read(fd, 10) == b"one"
            assert os.fstat(fd).st_ino == ino
        finally:
            os.close(fd)
    finally:
        m.stop()


def test_missing_name_errno(make_stack):
    paths, m = _mount_py(make_stack, [{"d/a": File("a")}], upper={})
    try:
        with pytest.raises(OSError) as e:
            os.lstat(paths.merged / "d/a/b")
        assert e.value.errno == errno.ENOTDIR
    finally:
        m.stop()


def test_file_inode_numbers_match_the_kernels(make_pair):
    """With every layer on one filesystem the kernel shows a file's real inode number, and
    keeps the lower one across copy-up: so do we (each side against its own layers)."""
    pair = make_pair(lowers=[{"low": File("l"), "d/deep": File("d")}], upper={"up": File("u")})

    def numbers(m: Path) -> list[bool]:
        lower, upper = m.parent / "lower0", m.parent / "upper"
        before = os.lstat(m / "low").st_ino
        with open(m / "low", "a") as f:
            f.write("+")  # copy-up
        return [before == os.lstat(lower / "low").st_ino,
                os.lstat(m / "low").st_ino == before,
                os.lstat(m / "d/deep").st_ino == os.lstat(lower / "d/deep").st_ino,
                os.lstat(m / "up").st_ino == os.lstat(upper / "up").st_ino]

    assert pair.same(numbers) == [True, True, True, True]
    pair.check_all()
