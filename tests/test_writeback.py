"""``-o writeback`` (issue 23): the kernel keeps written pages, sizes and times and sends them
later, in fewer, larger writes.  Each scenario runs on kernel overlayfs (which has no such option:
it is the oracle) and on pyunionfs with the writeback cache, and the views and uppers must agree.
What writeback changes by design is listed in docs/differences.md."""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import overlay_harness
import pytest
from overlay_harness import PYTHON, REPO, File, PyUnionMount, mount_stack

from unionfs import stats

LAYERS = [{"d/lower": File("lower data\n" * 50), "d/small": File("ab"),
           "d/held": File("held\n")}]
UPPER = {"d/upper": File("upper\n")}


def _view(m: Path, rel: str) -> tuple[bytes, int, int, int]:
    st = os.stat(m / rel)
    return (m / rel).read_bytes(), st.st_size, st.st_nlink, st.st_mode


def _small_writes(m: Path) -> object:
    fd = os.open(m / "d/new", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(300):
            os.write(fd, b"%03d:" % i + b"x" * 20)
    finally:
        os.close(fd)
    return _view(m, "d/new")


def _appends_from_two_fds(m: Path) -> object:
    a = os.open(m / "d/lower", os.O_WRONLY | os.O_APPEND)
    b = os.open(m / "d/lower", os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(50):
            os.write(a if i % 2 else b, b"line %d\n" % i)
    finally:
        os.close(a)
        os.close(b)
    return _view(m, "d/lower")


def _partial_page_write_only(m: Path) -> object:
    # The kernel must read the rest of the page through a write-only handle.
    fd = os.open(m / "d/lower", os.O_WRONLY)
    try:
        os.pwrite(fd, b"XYZ", 5)
        os.pwrite(fd, b"end", 4096 + 7)
    finally:
        os.close(fd)
    return _view(m, "d/lower")


def _truncates(m: Path) -> object:
    fd = os.open(m / "d/small", os.O_RDWR)
    try:
        os.ftruncate(fd, 10000)
        os.pwrite(fd, b"mid", 5000)
        os.ftruncate(fd, 5001)
        os.write(fd, b"!")
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return size, _view(m, "d/small")


def _rename_over_held(m: Path) -> object:
    fd = os.open(m / "d/held", os.O_RDONLY)
    try:
        (m / "d/tmp").write_bytes(b"new\n")
        os.rename(m / "d/tmp", m / "d/held")
        st = os.fstat(fd)
        return os.pread(fd, 100, 0), st.st_nlink, st.st_size, _view(m, "d/held")
    finally:
        os.close(fd)


def _write_after_unlink(m: Path) -> object:
    fd = os.open(m / "d/upper", os.O_RDWR)
    try:
        os.unlink(m / "d/upper")
        os.pwrite(fd, b"still here", 0)
        st = os.fstat(fd)
        return os.pread(fd, 100, 0), st.st_nlink, st.st_size, os.path.exists(m / "d/upper")
    finally:
        os.close(fd)


def _mmap_write(m: Path) -> object:
    fd = os.open(m / "d/lower", os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[0:4] = b"MMAP"
            mm.flush()
    finally:
        os.close(fd)
    return _view(m, "d/lower")


def _chmod_utimes_lower(m: Path) -> object:
    os.chmod(m / "d/lower", 0o600)
    os.utime(m / "d/small", ns=(1_500_000_000 * 10**9, 1_600_000_000 * 10**9))
    return [(os.stat(m / n).st_mode, os.stat(m / n).st_mtime_ns) for n in ("d/lower", "d/small")]


def _unlink_lower_untouched(m: Path) -> object:
    # The kernel sends back the times of an unlinked file: no copy-up may follow.
    os.unlink(m / "d/small")
    return sorted(os.listdir(m / "d"))


SCENARIOS: dict[str, Callable[[Path], object]] = {
    "small-writes": _small_writes,
    "appends-from-two-fds": _appends_from_two_fds,
    "partial-page-write-only": _partial_page_write_only,
    "truncates": _truncates,
    "rename-over-held": _rename_over_held,
    "write-after-unlink": _write_after_unlink,
    "mmap-write": _mmap_write,
    "chmod-utimes-lower": _chmod_utimes_lower,
    "unlink-lower": _unlink_lower_untouched,
}


@pytest.fixture
def writeback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pyunionfs mount of the test with -o writeback (the kernel has no such option)."""
    monkeypatch.setattr(overlay_harness, "OUR_OPTIONS", "writeback")


@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_writeback_scenario_like_kernel(make_pair, writeback: None, scenario: str) -> None:
    pair = make_pair(lowers=LAYERS, upper=UPPER)
    pair.same(SCENARIOS[scenario], expect="ok")
    # after the kernel forgot everything: what reached the upper, not what it still keeps
    for side in pair.sides:
        side.stop()
        side.mount = mount_stack(side.paths, side.impl, options=pair.options)
    pair.same(lambda m: sorted((p.name, _view(m, f"d/{p.name}")) for p in (m / "d").iterdir()),
              expect="ok", what=f"{scenario}: after a remount")
    pair.check_all()


def _xattrs(path: Path) -> list[str]:
    return os.listxattr(path, follow_symlinks=False)


def _writes_served(merged: Path) -> int:
    return int(stats.fetch(str(merged))["ops"].get("write", {}).get("calls", 0))


def test_writeback_sends_fewer_larger_writes(make_stack) -> None:
    """2000 writes of 100 bytes: one request each without the cache, a few with it."""
    counts = {}
    for options in ("", "writeback"):
        paths = make_stack(lowers=[{}], upper={})
        m = PyUnionMount(paths, options=options)
        try:
            with open(paths.merged / "f", "wb", buffering=0) as f:
                for _ in range(2000):
                    f.write(b"y" * 100)
            counts[options] = _writes_served(paths.merged)
            assert (paths.upper / "f").stat().st_size == 200_000
        finally:
            m.stop()
    assert counts[""] >= 2000, counts
    assert counts["writeback"] <= 10, counts


@pytest.mark.parametrize("options, says", [
    ("writeback,timeout=0", "writeback needs a timeout above 0"),
    ("writeback,index=on", "writeback can't be combined with index=on"),
    ("writeback,nfs_export=on", "writeback can't be combined with index=on"),  # implies it
])
def test_writeback_refused_where_it_would_show_stale_sizes(make_stack, options: str,
                                                           says: str) -> None:
    paths = make_stack(lowers=[{"f": File("x")}], upper={})
    assert paths.upper is not None
    upper_before = paths.upper.stat().st_mtime_ns
    r = subprocess.run([PYTHON, "-m", "unionfs", "mount", "-o", options, str(paths.lowers[0]),
                        str(paths.upper), str(paths.work), str(paths.merged)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
    assert not os.path.ismount(paths.merged)
    assert paths.upper is not None and not list(paths.upper.iterdir())
    assert paths.upper.stat().st_mtime_ns == upper_before and not _xattrs(paths.upper)
