"""index=on (overlay-semantics §6.6), against the kernel mounted with the same option: the names
of a lower hard link stay one file across copy-up (WORK/index/<hex of the origin>, linked into
each name that changes), keep the lower number and the right link count (overlay.nlink), lose
the entry with their last name; each side's upper and work read the same under the other
implementation; an upper is refused over other lowers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from overlay_harness import (
    IMPL,
    PRIVATE_PREFIX,
    USERNS,
    File,
    Hardlink,
    MountError,
    Pair,
    Symlink,
    ls_op,
    mount_stack,
    snapshot_merged,
)

ON = "index=on"
NLINK = PRIVATE_PREFIX + "nlink"

kernel_index = pytest.mark.skipif(
    USERNS, reason="index=on falls back to off without CAP_DAC_READ_SEARCH (the last test)")

IMAGE = dict(lowers=[{"d/a": File("data"), "d/b": Hardlink("d/a"), "c": Hardlink("d/a"),
                      "s": File("single"), "l/x": Symlink("target"), "l/y": Hardlink("l/x"),
                      "g/p1": File("pack" * 100), "g/p2": Hardlink("g/p1")}])
NAMES = ("d/a", "d/b", "c")


def _view(names: tuple[str, ...] = NAMES):
    def op(m: Path) -> tuple[object, ...]:
        out = []
        for n in names:
            try:
                st = os.lstat(m / n)
            except FileNotFoundError:
                out.append(None)
                continue
            out.append((st.st_nlink, st.st_mode, (m / n).read_text()))
        inos = {os.lstat(m / n).st_ino for n in names if os.path.lexists(m / n)}
        return tuple(out), len(inos)
    op.__name__ = f"view {names}"
    return op


def _index(side) -> list[tuple[str, int, bytes | None]]:
    """WORK/index: entries (hex names), their link counts and overlay.nlink."""
    d = side.paths.work / "index"
    out = []
    for n in sorted(os.listdir(d)):
        if n.startswith("#"):
            continue  # the kernel's whiteouts and temporary files live here too
        try:
            v = os.getxattr(d / n, NLINK, follow_symlinks=False)
        except OSError:
            v = None
        out.append((n, os.lstat(d / n).st_nlink, v))
    return out


def same_index(pair: Pair) -> None:
    k, o = (_index(s) for s in pair.sides)
    # entry names hold the lower's file handle: each side has its own copy of the lowers
    assert sorted(e[1:] for e in k) == sorted(e[1:] for e in o), f"index: kernel {k}, ours {o}"
    assert len({e[0] for e in k}) == len(k)


def check_crossed(pair: Pair, options: str = ON) -> None:
    """Each upper, with its own work (the index is there), under the other implementation."""
    want = snapshot_merged(pair.k.root)
    pair.stop()
    for side, impl in ((pair.o, "kernel"), (pair.k, IMPL)):
        with mount_stack(side.paths, impl, options=options) as m:
            got = snapshot_merged(m.root)
        assert got == want, f"{impl} reads the {side.impl} upper differently:\n" + want.diff(
            got, ("before", impl))


@kernel_index
@pytest.mark.parametrize("options", [ON, ON + ",metacopy=on"])
def test_names_stay_one_file_across_copy_up(make_pair, options):
    pair = make_pair(**IMAGE, options=options)
    assert pair.same(_view()) == (((3, 0o100644, "data"),) * 3, 1)
    pair.same(lambda m: os.chmod(m / "d/a", 0o600), expect="ok")
    assert pair.same(_view()) == (((3, 0o100600, "data"),) * 3, 1)
    same_index(pair)
    pair.same(lambda m: open(m / "d/b", "a").write("+more"), expect="ok")  # links d/b up
    assert pair.same(_view()) == (((3, 0o100600, "data+more"),) * 3, 1)
    same_index(pair)
    pair.same(lambda m: os.lstat(m / "s").st_ino == os.lstat(m / "d/a").st_ino, expect="ok")
    pair.check_all()
    check_crossed(pair, options)


@kernel_index
@pytest.mark.parametrize("options", [ON, ON + ",metacopy=on"])
def test_unlink_keeps_count_and_last_name_takes_the_entry(make_pair, options):
    pair = make_pair(**IMAGE, options=options)
    pair.same(lambda m: open(m / "c", "w").write("new"), expect="ok")
    pair.same(lambda m: os.unlink(m / "d/a"), expect="ok")
    assert pair.same(_view()) == ((None, (2, 0o100644, "new"), (2, 0o100644, "new")), 1)
    same_index(pair)
    pair.same(lambda m: os.unlink(m / "d/b"), expect="ok")  # never linked up: it is first
    same_index(pair)
    pair.same(lambda m: os.unlink(m / "c"), expect="ok")
    assert _index(pair.o) == [] and pair.same(ls_op("d")) == []
    # a lower hard link removed before any copy-up is copied up to be removed
    pair.same(lambda m: os.unlink(m / "g/p1"), expect="ok")
    assert pair.same(_view(("g/p1", "g/p2")))[0][1][0] == 1
    same_index(pair)
    pair.check_all()
    check_crossed(pair, options)


@kernel_index
@pytest.mark.parametrize("options", [ON, ON + ",metacopy=on"])
def test_link_rename_and_replace(make_pair, options):
    pair = make_pair(**IMAGE, options=options)
    pair.same(lambda m: os.link(m / "d/a", m / "d/new"), expect="ok")
    assert pair.same(_view(NAMES + ("d/new",)))[0][0][0] == 4
    same_index(pair)
    pair.same(lambda m: os.rename(m / "d/b", m / "b2"), expect="ok")
    pair.same(lambda m: os.rename(m / "s", m / "c"), expect="ok")  # replaces a name
    pair.same(_view(("d/a", "b2", "d/new")))
    same_index(pair)
    pair.same(lambda m: os.lchown(m / "l/y", 1, 1), expect="ok")  # a symlink's names
    pair.same(lambda m: [os.lstat(m / n)[4:6] + (os.lstat(m / n).st_nlink,)
                         for n in ("l/x", "l/y")], expect="ok")
    same_index(pair)
    pair.check_all()
    check_crossed(pair, options)


@kernel_index
def test_remount_shows_the_entry(make_pair):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(lambda m: open(m / "g/p2", "a").write("+"), expect="ok")
    pair.same(_view(("g/p1", "g/p2")))
    for side in pair.sides:
        side.stop()
    for side in pair.sides:
        with mount_stack(side.paths, side.impl, options=ON) as m:
            # g/p1 was never linked up: it shows the entry, one file with g/p2
            assert _view(("g/p1", "g/p2"))(m.root) == (((2, 0o100644, "pack" * 100 + "+"),) * 2, 1)
            os.chmod(m.root / "g/p1", 0o640)
            assert _view(("g/p1", "g/p2"))(m.root)[0][1][1] == 0o100640


@kernel_index
def test_upper_refused_over_other_lowers(make_pair, tmp_path):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(lambda m: os.chmod(m / "d/a", 0o600), expect="ok")
    pair.stop()
    for side in pair.sides:
        other = tmp_path / f"other-{side.impl}"
        other.mkdir()
        paths = side.paths
        moved = type(paths)(paths.base, [other], paths.upper, paths.work, paths.merged)
        for impl in ("kernel", IMPL):
            with pytest.raises(MountError):
                mount_stack(moved, impl, options=ON).stop()
        # without index the upper mounts, as under the kernel
        for impl in ("kernel", IMPL):
            mount_stack(moved, impl).stop()


@pytest.mark.skipif(not USERNS, reason="runs in the userns suite (test_rootless)")
def test_userns_falls_back_to_index_off(make_pair):
    # Root of a user namespace may not open file handles: the kernel mounts with index=on but
    # works as index=off (no WORK/index entries, the names break apart), and so do we.
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_view())
    pair.same(lambda m: os.chmod(m / "d/a", 0o600), expect="ok")
    assert pair.same(_view())[1] == 2
    pair.same(lambda m: open(m / "d/b", "a").write("+more"), expect="ok")
    pair.same(_view())
    for side in pair.sides:
        d = side.paths.work / "index"
        assert not d.exists() or not [n for n in os.listdir(d) if not n.startswith("#")]
    pair.check_all()


ORIGIN = PRIVATE_PREFIX + "origin"


def _entry_of(side, name: str) -> str:
    """The index entry (hex name) that upper ``name`` is linked to."""
    ino = os.lstat(side.paths.upper / name).st_ino
    d = side.paths.work / "index"
    return next(n for n in os.listdir(d) if os.lstat(d / n).st_ino == ino)


def _damage(side) -> dict[str, str]:
    """What a crash or hand edits can leave in WORK/index, made the same way on each side's own
    copy of the stack: {label: entry name}."""
    up, low, d = side.paths.upper, side.paths.lowers[0], side.paths.work / "index"
    names = {"kept": _entry_of(side, "d/a"), "orphan": _entry_of(side, "l/x"),
             "stale": _entry_of(side, "g/p2")}
    # orphan: its last upper name went, and its link count with it (a crash between the two)
    os.unlink(up / "l/x")
    os.removexattr(d / names["orphan"], NLINK, follow_symlinks=False)
    # stale: its upper name went and the lower file it came from is gone
    os.unlink(up / "g/p2")
    for n in ("g/p1", "g/p2"):
        os.unlink(low / n)
    # a whiteout and a directory with valid handle names: legitimate, left alone
    base = bytearray.fromhex(names["kept"])
    for label, last in (("whiteout", 1), ("dir", 2)):
        fake = bytes(base[:-1]) + bytes([base[-1] ^ last])
        names[label] = fake.hex()
    os.mknod(d / names["whiteout"], 0o600 | 0o020000, 0)
    os.mkdir(d / names["dir"])
    # leftovers of an interrupted change
    (d / "#leftover").write_text("x")
    os.makedirs(d / "#leftdir/sub")
    names["leftover"], names["leftdir"] = "#leftover", "#leftdir"
    return names


def _outcome(side, names: dict[str, str]) -> dict[str, str | None]:
    d = side.paths.work / "index"
    out: dict[str, str | None] = {}
    for label, n in names.items():
        try:
            st = os.lstat(d / n)
        except FileNotFoundError:
            out[label] = None
            continue
        out[label] = ("whiteout" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 else
                      "dir" if stat.S_ISDIR(st.st_mode) else f"file nlink={st.st_nlink}")
    return out


@kernel_index
@pytest.mark.parametrize("options", [ON, "nfs_export=on"])
def test_mount_cleans_the_index_as_the_kernel_does(make_pair, options):
    pair = make_pair(**IMAGE, options=options)
    for n in ("d/a", "l/x", "g/p2"):
        pair.same(lambda m, n=n: os.lchown(m / n, 0, 0), expect="ok", what=f"chown {n}")
    pair.stop()
    got = {}
    for side in pair.sides:
        names = _damage(side)
        with mount_stack(side.paths, side.impl, options=options) as m:
            view = (_view(("d/a", "d/b", "c"))(m.root), ls_op("l")(m.root), ls_op("g")(m.root))
        got[side.impl] = (_outcome(side, names), view)
    k, o = got["kernel"], got[IMPL]
    assert k == o, f"index after mount: kernel {k}, ours {o}"
    # the premise: the kernel removed the stale and orphan entries and the leftovers
    assert k[0]["stale"] is None and k[0]["leftover"] is None and k[0]["kept"] is not None
    assert k[0]["orphan"] == ("whiteout" if options.startswith("nfs") else None)


@kernel_index
@pytest.mark.parametrize("case", ["not hex", "short handle", "no origin", "bad origin"])
def test_malformed_index_entry_refuses_the_mount(make_pair, case):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(lambda m: os.lchown(m / "d/a", 0, 0), expect="ok")
    pair.stop()
    for side in pair.sides:
        d = side.paths.work / "index"
        before = sorted(os.listdir(d))
        if case == "not hex":
            bad = "zz" * 30
            (d / bad).write_text("")
        elif case == "short handle":
            bad = _entry_of(side, "d/a")[:20]
            (d / bad).write_text("")
        elif case == "no origin":
            bad = _entry_of(side, "d/a")
            os.removexattr(d / bad, ORIGIN)
        else:
            bad = _entry_of(side, "d/a")
            os.setxattr(d / bad, ORIGIN, b"\0\xfbnot a handle")
        if side.impl != "kernel":
            # we judge every entry before touching any: a leftover stays too (the kernel,
            # one pass in directory order, may have removed it before it met the bad one)
            (d / "#leftover").write_text("x")
            before.append("#leftover")
        with pytest.raises(MountError) as e:
            mount_stack(side.paths, side.impl, options=ON).stop()
        if side.impl != "kernel":
            line = str(e.value).splitlines()[0]
            assert f"malformed index entry '{side.paths.work}/index/{bad}'" in line, line
        assert sorted(os.listdir(d)) == sorted({*before, bad}), "a refused mount changed the index"
        mount_stack(side.paths, side.impl, options="index=off").stop()
