"""What the kernel keeps for us (issue 23: listings with FOPEN_CACHE_DIR, symlink targets with
CACHE_SYMLINKS, READDIRPLUS_AUTO) must never show an old state: each change is made after the
listing (or link) was read twice through the mount, so that it is served from the kernel's
cache if anything is, and what follows is compared with kernel overlayfs."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from overlay_harness import (
    PYTHON,
    REPO,
    USERNS,
    Dir,
    DirStream,
    File,
    Hardlink,
    PyUnionMount,
    Symlink,
    Whiteout,
)

from unionfs import stats

Change = Callable[[Path], object]


def _dir_view(m: Path, rel: str) -> list[tuple[str, str, bool]]:
    """Names, d_type and whether d_ino equals the name's st_ino, in readdir's own words."""
    with DirStream(m / rel) as ds:
        entries = ds.read_all()
    out = []
    for name, kind, ino in sorted(entries):
        if name in (".", ".."):
            continue
        out.append((name, kind, ino == os.lstat(m / rel / name).st_ino))
    return out


def _warm(m: Path, rel: str) -> list[tuple[str, str, bool]]:
    _dir_view(m, rel)
    return _dir_view(m, rel)


LAYERS = [
    {"d/lower": File("l"), "d/gone": Whiteout(), "d/sub/x": File("x"), "d/link": Symlink("lower"),
     "d/hl": File("h"), "e/moved_in": File("m")},
    {"d/gone": File("hidden"), "d/deep/y": File("y"), "d/lowerdir/z": File("z")},
]
UPPER = {"d/upper": File("u")}


def _rename_within(m: Path) -> None:
    os.rename(m / "d/lower", m / "d/renamed")


CHANGES: dict[str, Change] = {
    "create": lambda m: (m / "d/new").write_text("n"),
    "unlink-lower": lambda m: os.unlink(m / "d/lower"),
    "unlink-upper": lambda m: os.unlink(m / "d/upper"),
    "rename-in": lambda m: os.rename(m / "e/moved_in", m / "d/moved_in"),
    "rename-out": lambda m: os.rename(m / "d/lower", m / "e/out"),
    "rename-within": _rename_within,
    "copy-up": lambda m: os.chmod(m / "d/lower", 0o600),
    "copy-up-dir": lambda m: os.chmod(m / "d/sub", 0o700),
    "rmdir-lower": lambda m: (os.unlink(m / "d/lowerdir/z"), os.rmdir(m / "d/lowerdir")),
    "mkdir-over-whiteout": lambda m: os.mkdir(m / "d/gone"),
    "opaque-recreate": lambda m: (os.unlink(m / "d/deep/y"), os.rmdir(m / "d/deep"),
                                  os.mkdir(m / "d/deep")),
    "symlink-replaced": lambda m: (os.symlink("upper", m / "d/tmp"),
                                   os.rename(m / "d/tmp", m / "d/link")),
    "hard-link": lambda m: os.link(m / "d/hl", m / "d/hl2"),
    "type-change": lambda m: (os.unlink(m / "d/lower"), os.mkdir(m / "d/lower")),
}


@pytest.mark.parametrize("change", list(CHANGES), ids=list(CHANGES))
def test_cached_listing_follows_each_change_like_kernel(make_pair, change: str) -> None:
    if USERNS and change == "hard-link":
        pytest.skip("premise does not hold in a user namespace: with a null copy-up origin the "
                    "kernel shows a new hard link of a copied-up file with another st_ino")
    pair = make_pair(lowers=LAYERS, upper=UPPER)
    pair.same(lambda m: _warm(m, "d"), expect="ok")
    pair.same(lambda m: _warm(m, "e"), expect="ok")
    pair.same(lambda m: _warm(m, "d/deep"), expect="ok")
    pair.same(lambda m: [os.readlink(m / "d/link") for _ in range(2)], expect="ok")
    pair.same(CHANGES[change], expect="ok")
    for rel in ("d", "e", "d/deep"):
        pair.same(lambda m, rel=rel: _dir_view(m, rel) if (m / rel).is_dir() else None,
                  expect="ok", what=f"{change}: {rel}")
    pair.same(lambda m: os.readlink(m / "d/link"), expect="ok")
    pair.check_all()


def test_two_handles_on_a_changing_directory(make_pair) -> None:
    """One handle reads part of a listing, the directory changes, a second handle lists it
    whole, the first goes on: the second sees exactly the kernel's new state, and the first
    returns every name that was there all along exactly once (POSIX leaves the changed
    names open)."""
    names = [f"f{i:03d}" for i in range(300)]
    pair = make_pair(lowers=[{f"d/{n}": File(n) for n in names}])

    def op(m: Path) -> tuple[list[str], bool]:
        os.listdir(m / "d")  # warm: from here on the kernel may answer alone
        with DirStream(m / "d") as first:
            seen = [first.read() for _ in range(50)]
            os.unlink(m / "d/f299")
            (m / "d/new").write_text("n")
            os.rename(m / "d/f100", m / "d/f100-renamed")
            with DirStream(m / "d") as second:
                whole = sorted(e[0] for e in second.read_all() if e[0] not in (".", ".."))
            rest = first.read_all()
        got = [e[0] for e in seen if e is not None] + [e[0] for e in rest]
        steady = set(names) - {"f299", "f100"}
        once = all(got.count(n) == 1 for n in steady)
        return whole, once

    whole, once = pair.same(op, expect="ok")
    assert once and "new" in whole and "f299" not in whole
    pair.check_all()


def test_listing_and_link_under_timeout_zero_follow_the_lowers(make_stack) -> None:
    """-o timeout=0 (lowers that change underneath): nothing is kept, a listing and a link
    read twice then changed in the lower directly show the change at once."""
    paths = make_stack(lowers=[{"d/a": File("a"), "d/l": Symlink("a")}], upper={})
    m = PyUnionMount(paths, options="timeout=0")
    try:
        root = paths.merged
        for _ in range(2):
            assert sorted(os.listdir(root / "d")) == ["a", "l"]
            assert os.readlink(root / "d/l") == "a"
        (paths.lowers[0] / "d/b").write_text("b")
        os.unlink(paths.lowers[0] / "d/l")
        os.symlink("b", paths.lowers[0] / "d/l")
        assert sorted(os.listdir(root / "d")) == ["a", "b", "l"]
        assert os.readlink(root / "d/l") == "b"
    finally:
        m.stop()


def test_deep_tree_listed_twice_like_kernel(make_pair) -> None:
    """A tree listed twice (the second time from the kernel's caches where it keeps them)
    is the kernel's, down to every d_ino."""
    lowers = [{f"t/{a}/{b}/f{c}": File(f"{a}{b}{c}") for a in "ab" for b in "xyz" for c in range(5)}
              | {"t/a/x/opq": Dir(opaque=True), "t/a/gone": Whiteout()},
              {"t/a/gone/f": File("hidden"), "t/b/w/f": File("w"), "t/a/x/opq/hid": File("h"),
               "t/b/hl": File("hl"), "t/b/hl2": Hardlink("t/b/hl")}]

    def walk(m: Path) -> list[tuple[str, list[tuple[str, str, bool]]]]:
        out = []
        for dirpath, _, _ in sorted(os.walk(m / "t")):
            rel = os.path.relpath(dirpath, m)
            out.append((rel, _dir_view(m, rel)))
        return out

    pair = make_pair(lowers=lowers)
    first = pair.same(walk, expect="ok")
    assert pair.same(walk, expect="ok") == first
    pair.check_all()


def _requests(root: Path) -> int:
    return int(stats.fetch(str(root))["requests"])


def _walk_names(root: Path) -> int:
    return sum(len(files) + len(dirs) for _, dirs, files in os.walk(root))


def test_a_warm_tree_is_listed_by_the_kernel_alone(make_stack) -> None:
    """The third walk of an unchanged tree sends no request at all (listings, entries and
    attributes all kept); with -o timeout=0 every walk asks again."""
    spec = [{f"t/{a}/{b}/f{c}": File("x") for a in "abc" for b in "xyz" for c in range(20)}
            | {"t/a/l": Symlink("x")}]
    paths = make_stack(lowers=spec, upper={})
    m = PyUnionMount(paths)
    try:
        counts = []
        for _ in range(3):
            _walk_names(paths.merged / "t")
            os.readlink(paths.merged / "t/a/l")
            counts.append(_requests(paths.merged))
        assert counts[2] == counts[1], f"requests after each walk: {counts}"
    finally:
        m.stop()
    paths = make_stack(lowers=spec, upper={})
    m = PyUnionMount(paths, options="timeout=0")
    try:
        counts = []
        for _ in range(3):
            _walk_names(paths.merged / "t")
            counts.append(_requests(paths.merged))
        assert counts[2] - counts[1] > 100, f"timeout=0 must ask again: {counts}"
    finally:
        m.stop()


def test_stats_command(make_stack, tmp_path: Path) -> None:
    paths = make_stack(lowers=[{"f": File("x")}], upper={})
    m = PyUnionMount(paths)
    try:
        (paths.merged / "f").read_text()
        r = subprocess.run([PYTHON, "-m", "unionfs", "stats", str(paths.merged)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0, r.stderr
        assert "requests" in r.stdout and "lookup" in r.stdout and "us per request" in r.stdout
        assert "nodes held" in r.stdout and "files open" in r.stdout
        # a reader that stops early gets no traceback (SIGPIPE's exit status, nothing on stderr)
        r = subprocess.run(f"{PYTHON} -m unionfs stats {paths.merged} | true; "
                           "echo ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.stderr == "" and r.stdout.strip() in ("0", "141"), r
        r = subprocess.run([PYTHON, "-m", "unionfs", "stats", "--json", str(paths.merged)],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        data = json.loads(r.stdout)
        assert data["requests"] >= 2 and data["ops"]["lookup"]["calls"] >= 1
        assert data["pid"] == m.pid
        assert data["nodes"] >= 2 and data["open_files"] == 0 and data["rss_kib"] > 1000
    finally:
        m.stop()
    r = subprocess.run([PYTHON, "-m", "unionfs", "stats", str(tmp_path)],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a mount point" in r.stderr
