"""readdir (overlay-semantics §5): merged, deduplicated, whiteouts hidden, '.'/'..' present, right
d_type and d_ino, telldir/seekdir stable on one handle, large dirs.

Entry order is not compared: it is filesystem-specific and no program may rely on it."""

from __future__ import annotations

import os
import random
from pathlib import Path

from overlay_harness import Device, Dir, DirStream, Fifo, File, Hardlink, Symlink, Whiteout


def _entries(rel: str = "."):
    """Every name readdir returns on one handle, with duplicates kept (sorted for comparison)."""

    def op(m: Path) -> list[str]:
        with DirStream(m / rel) as d:
            return sorted(name for name, _, _ in d.read_all())

    op.__name__ = f"readdir {rel}"
    return op


MERGE_STACK = dict(
    upper={"d/u": File("u"), "d/both": File("upper"), "d/gone": Whiteout()},
    lowers=[
        {"d/l0": File("l0"), "d/both": File("l0"), "d/sub/x": File("x"), "d/gone": File("g"),
         "d/wh": Whiteout()},
        {"d/l1": File("l1"), "d/both": File("l1"), "d/sub/y": File("y"), "d/wh": File("w"),
         "d/gone": File("g1")},
    ],
)


def test_merged_listing_dedup_whiteouts_dots(make_pair):
    pair = make_pair(**MERGE_STACK)
    names = pair.same(_entries("d"))
    # each name exactly once; whiteouts and the names they cover are gone; . and .. present
    assert names == [".", "..", "both", "l0", "l1", "sub", "u"]
    assert pair.same(_entries("d/sub")) == [".", "..", "x", "y"]
    assert ".." in pair.same(_entries("."))
    pair.check_all()


def test_d_type_of_every_kind(make_pair):
    pair = make_pair(
        upper={"d/up_file": File(), "d/up_dir": Dir()},
        lowers=[{"d/file": File("f"), "d/dir/x": File(), "d/link": Symlink("file"),
                 "d/fifo": Fifo(), "d/chr": Device("c", 1, 3), "d/blk": Device("b", 7, 0)},
                {"d/file": Dir(), "d/deep_dir": Dir()}],  # a lower dir shadowed by an L0 file
    )

    def dtypes(m: Path) -> dict[str, str]:
        with DirStream(m / "d") as d:
            return {name: t for name, t, _ in d.read_all()}

    got = pair.same(dtypes)
    assert got["file"] == "file" and got["dir"] == "dir" and got["link"] == "symlink"
    assert got["fifo"] == "fifo" and got["chr"] == "chr" and got["blk"] == "blk"
    assert got["up_dir"] == "dir" and got["deep_dir"] == "dir"

    def scandir_kinds(m: Path) -> dict[str, tuple[bool, bool, bool]]:
        with os.scandir(m / "d") as it:
            return {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                             e.is_symlink()) for e in it}

    kinds = pair.same(scandir_kinds)
    assert kinds["link"] == (False, False, True)
    pair.check_all()


def test_d_ino_matches_st_ino(make_pair):
    # same-fs overlays report d_ino == st_ino for every entry, copied-up ones included (find/ls -i
    # and `du` hard-link accounting depend on it)
    pair = make_pair(upper={"d/u": File()},
                     lowers=[{"d/a": File("a"), "d/b": File("b"), "d/s": Dir(), "d/l": Symlink("a")},
                             {"d/c": File("c"), "d/s/t": File()}])
    pair.same(lambda m: os.chmod(m / "d/a", 0o600), expect="ok", what="copy up d/a")

    def mismatches(m: Path) -> list[str]:
        bad = []
        with DirStream(m / "d") as d:
            for name, _, ino in d.read_all():
                if name == "..":
                    continue
                if os.lstat(m / "d" / name).st_ino != ino:
                    bad.append(name)
        return bad

    assert pair.same(mismatches) == []
    pair.check_all()


def test_d_ino_matches_st_ino_past_the_first_batch(make_pair):
    """The kernel asks READDIRPLUS for a listing's first batch and plain READDIR after it
    (READDIRPLUS_AUTO), whose entries we answer without a node: their d_ino must still be
    each name's st_ino, for every kind of number (a lower's, a copy's origin, a merged
    directory's, a name of a lower file with two links, an upper's)."""
    n = 400
    top = {f"d/a{i:04}": File(f"a{i}") for i in range(n)} | \
        {f"d/m{i:04}/x": File() for i in range(n // 4)} | \
        {f"d/h{i:04}": File(f"h{i}") for i in range(n // 4)} | \
        {f"d/k{i:04}": Hardlink(f"d/h{i:04}") for i in range(n // 4)}
    bottom = {f"d/b{i:04}": File(f"b{i}") for i in range(n)} | \
        {f"d/m{i:04}/y": File() for i in range(n // 4)}
    pair = make_pair(upper={f"d/u{i:04}": File() for i in range(n)}, lowers=[top, bottom])

    def copy_up(m: Path) -> None:
        for i in range(0, n, 3):
            os.chmod(m / f"d/a{i:04}", 0o600)
            os.chmod(m / f"d/b{i:04}", 0o600)

    pair.same(copy_up, expect="ok")

    def mismatches(m: Path) -> tuple[int, list[str]]:
        bad, count = [], 0
        with DirStream(m / "d") as d:
            for name, _, ino in d.read_all():
                count += 1
                if name not in (".", "..") and os.lstat(m / "d" / name).st_ino != ino:
                    bad.append(name)
        return count, bad

    count, bad = pair.same(mismatches)
    assert count == 2 + 3 * n + n // 4 * 3 and bad == []
    pair.check_all()


def test_scandir_of_pure_upper_and_pure_lower_dirs(make_pair):
    pair = make_pair(upper={"onlyup/a": File(), "onlyup/b": Dir()},
                     lowers=[{"onlylow/c": File(), "onlylow/d": Symlink("c")}])
    assert pair.same(_entries("onlyup")) == [".", "..", "a", "b"]
    assert pair.same(_entries("onlylow")) == [".", "..", "c", "d"]
    pair.check_all()


def test_dir_with_only_whiteouts_lists_empty(make_pair):
    pair = make_pair(upper={"d/a": Whiteout(), "d/b": Whiteout()},
                     lowers=[{"d/a": File(), "d/b": File()}])
    assert pair.same(_entries("d")) == [".", ".."]


def _big_stack(n_upper: int = 500, n_l0: int = 800, n_l1: int = 900) -> dict:
    # 2000+ visible entries spread over three layers, overlapping names and some whiteouts
    upper = {f"big/u{i:04d}": File() for i in range(n_upper)}
    upper.update({f"big/s{i:04d}": File("up") for i in range(0, 200, 2)})
    l0 = {f"big/m{i:04d}": File() for i in range(n_l0)}
    l0.update({f"big/s{i:04d}": Whiteout() for i in range(1, 100, 2)})
    l1 = {f"big/b{i:04d}": File() for i in range(n_l1)}
    l1.update({f"big/s{i:04d}": File("low") for i in range(200)})
    return dict(upper=upper, lowers=[l0, l1])


def test_large_merged_dir(make_pair):
    pair = make_pair(**_big_stack())
    names = pair.same(_entries("big"))
    # 500 u + 800 m + 900 b + s0000..s0199 minus 50 whited out = 2350 (+ . and ..)
    assert len(names) == 2 + 500 + 800 + 900 + 150
    assert len(set(names)) == len(names)
    assert pair.same(lambda m: len(os.listdir(m / "big"))) == 2350
    pair.check_all()


def test_telldir_seekdir_stable_on_one_handle(make_pair):
    pair = make_pair(**_big_stack())

    def seek_check(m: Path) -> tuple[int, int, list[str]]:
        with DirStream(m / "big") as d:
            positions: list[int] = []
            names: list[str] = []
            while True:
                pos = d.tell()
                ent = d.read()
                if ent is None:
                    break
                positions.append(pos)
                names.append(ent[0])
            bad = []
            order = list(range(len(names)))
            random.Random(1234).shuffle(order)
            for i in order[:400]:
                d.seek(positions[i])
                ent = d.read()
                if ent is None or ent[0] != names[i]:
                    bad.append(f"{i}:{names[i]}->{ent and ent[0]}")
            # seek back into the middle and read on to the end: the tail must repeat exactly
            mid = len(names) // 2
            d.seek(positions[mid])
            tail = [e[0] for e in d.read_all()]
            if tail != names[mid:]:
                bad.append("tail after seekdir differs")
            d.rewind()
            if [e[0] for e in d.read_all()] != names:
                bad.append("rewinddir listing differs")
        return len(names), len(set(names)), bad

    total, unique, bad = pair.same(seek_check)
    assert bad == [] and total == unique == 2352


def test_rewinddir_sees_new_entries(make_pair):
    pair = make_pair(lowers=[{"d/a": File(), "d/b": File()}])

    def op(m: Path) -> tuple[list[str], list[str]]:
        with DirStream(m / "d") as d:
            first = sorted(e[0] for e in d.read_all())
            (m / "d/new").write_text("n")
            os.unlink(m / "d/a")
            d.rewind()
            second = sorted(e[0] for e in d.read_all())
        return first, second

    first, second = pair.same(op)
    assert first == [".", "..", "a", "b"] and second == [".", "..", "b", "new"]
    pair.check_all()


def test_unlink_while_iterating_removes_everything(make_pair):
    # what rm -r does: read a batch, unlink what was read, read on. No entry may be skipped.
    stack = {f"d/f{i:03d}": File() for i in range(300)}
    pair = make_pair(upper={f"d/g{i:03d}": File() for i in range(100)},
                     lowers=[stack, {f"d/h{i:03d}": File() for i in range(100)}])

    def op(m: Path) -> tuple[int, list[str]]:
        seen = 0
        with DirStream(m / "d") as d:
            while (e := d.read()) is not None:
                if e[0] in (".", ".."):
                    continue
                os.unlink(m / "d" / e[0])
                seen += 1
        return seen, sorted(os.listdir(m / "d"))

    seen, left = pair.same(op)
    assert seen == 500 and left == []
    pair.same(lambda m: os.rmdir(m / "d"), expect="ok")
    pair.check_all()
