"""Inode numbers as the kernel gives them (overlay-semantics §9) and overlay.origin (§6.5): which
real object's st_ino each name shows, before and after copy-up, rename and remount, and an origin
the kernel reads back (its st_ino for our upper is the same)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from overlay_harness import (
    IMPL,
    PRIVATE_PREFIX,
    USERNS,
    Dir,
    File,
    Hardlink,
    Pair,
    Symlink,
    mount_stack,
)

from unionfs import origin

IMAGE = dict(
    upper={"merged/up": File("u"), "pure/f": File("p")},
    lowers=[
        {"merged/a": File("a"), "merged/sub/deep": File("d"), "lonely/x": File("x"),
         "links/h1": File("hl"), "links/h2": Hardlink("links/h1"), "sym": Symlink("merged/a"),
         "big": Dir()},
        {"merged/b": File("b"), "merged/sub/base": File("base"), "bottom/only": File("o")},
    ],
)


# open_by_handle_at needs CAP_DAC_READ_SEARCH in the initial namespace.
CAN_DECODE = os.geteuid() == 0 and not USERNS


def _where(side_paths, root: Path) -> dict[str, str]:
    """For every name in the merged tree: which real object's number it shows ("upper",
    "lower0", ...), found by the number among all objects of that side's layers."""
    layers = [("upper", side_paths.upper)] + [(f"lower{i}", p) for i, p in enumerate(side_paths.lowers)]
    owner: dict[int, str] = {}
    for label, top in layers:
        for dirpath, dirnames, filenames in os.walk(top):
            for n in dirnames + filenames:
                owner.setdefault(os.lstat(os.path.join(dirpath, n)).st_ino, label)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = owner.get(os.lstat(p).st_ino, "none")
    return out


def _workload(m: Path) -> None:
    os.chmod(m / "merged/a", 0o600)  # copied up: keeps the lower number (origin)
    os.chmod(m / "lonely", 0o700)  # a lower dir copied up: merged now
    os.lchown(m / "sym", 1, 1)  # a symlink copied up
    os.rename(m / "merged/b", m / "merged/b2")  # a copy renamed in its dir
    os.rename(m / "merged/sub/base", m / "pure/base")  # and into a pure upper dir
    (m / "merged/new").write_text("n")  # new: its own number
    os.mkdir(m / "merged/newdir")


def _check_numbers(pair: Pair) -> dict[str, str]:
    k = _where(pair.k.paths, pair.k.root)
    o = _where(pair.o.paths, pair.o.root)
    assert k == o, "numbers come from other objects:\n" + "\n".join(
        f"  {p}: kernel {k.get(p)}, ours {o.get(p)}" for p in sorted(set(k) | set(o))
        if k.get(p) != o.get(p))
    return k


def _d_inos(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, _ in os.walk(root):
        with os.scandir(dirpath) as it:
            for e in it:
                out[os.path.relpath(e.path, root)] = (e.inode(), os.lstat(e.path).st_ino)
    return out


def test_numbers_come_from_the_kernels_objects(make_pair):
    pair = make_pair(**IMAGE)
    before = _check_numbers(pair)
    assert before["merged"] == "lower0" and before["merged/a"] == "lower0"  # premise
    pair.same(_workload, expect="ok")
    after = _check_numbers(pair)
    assert after["merged/a"] == "lower0" and after["lonely"] == "lower0"
    assert after["links/h2"] == "lower0"
    assert after["merged/new"] == "upper" and after["pure"] == "upper"
    for side in pair.sides:  # readdir's d_ino is stat's st_ino, everywhere
        bad = {p: v for p, v in _d_inos(side.root).items() if v[0] != v[1]}
        assert not bad, (side.impl, bad)
    pair.check_all()


def test_origin_in_kernel_format(make_pair):
    pair = make_pair(**IMAGE)
    pair.same(_workload, expect="ok")
    # Two names: the kernel breaks the link and writes no origin.  (The number the copy then
    # shows differs: docs/differences.md, "copy-up of a lower file with several names".)
    pair.same(lambda m: os.chmod(m / "links/h1", 0o600), expect="ok")
    name = PRIVATE_PREFIX + "origin"
    carriers = {}
    for side in pair.sides:
        got = set()
        for dirpath, dirnames, filenames in os.walk(side.upper):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                try:
                    value = os.getxattr(p, name, follow_symlinks=False)
                except OSError:
                    continue
                got.add(os.path.relpath(p, side.upper))
                if CAN_DECODE:
                    assert origin.parse(value) is not None, (side.impl, p, value.hex())
                else:  # the kernel records no handle it may not open
                    assert value == b"", (side.impl, p, value.hex())
        carriers[side.impl] = got
    assert carriers["kernel"] == carriers[IMPL], carriers
    assert "merged/a" in carriers["kernel"] and "links/h1" not in carriers["kernel"]
    if not CAN_DECODE:
        return
    # Each of our origins names the lower object the copy came from.
    lower0 = os.open(pair.o.paths.lowers[0] / "merged", os.O_PATH | os.O_DIRECTORY)
    try:
        value = os.getxattr(pair.o.upper / "merged/a", name)
        assert origin.matches(origin.parse(value), lower0, "a")
    finally:
        os.close(lower0)


@pytest.mark.parametrize("options", ["", "redirect_dir=on"])
def test_numbers_kept_across_remount_and_by_the_kernel(make_pair, options):
    # 1 000 objects of every kind: after a remount ours are the same numbers, and the kernel reading
    # our upper agrees on where every number comes from.
    if options and USERNS:
        pytest.skip("redirect_dir=on is refused with userxattr")
    lowers = [{**{f"many/f{i:04}": File(str(i)) for i in range(900)},
               **{f"dirs/d{i:03}/x": File() for i in range(50)}, **IMAGE["lowers"][0]},
              IMAGE["lowers"][1]]
    pair = make_pair(upper=IMAGE["upper"], lowers=lowers, options=options)

    def work(m: Path) -> None:
        _workload(m)
        for i in range(0, 900, 3):
            os.chmod(m / f"many/f{i:04}", 0o600)
        for i in range(0, 50, 2):
            os.chmod(m / f"dirs/d{i:03}", 0o700)
        if options:
            os.rename(m / "dirs/d001", m / "moved")
            os.rename(m / "bottom", m / "merged/bottom2")
    pair.same(work, expect="ok")
    want = _check_numbers(pair)

    def numbers(root: Path) -> dict[str, int]:
        out = {}
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                out[os.path.relpath(p, root)] = os.lstat(p).st_ino
        return out
    ours = numbers(pair.o.root)
    assert len(ours) > 1000
    pair.stop()
    where = {}
    for impl in (IMPL, "kernel"):
        work_dir = pair.o.paths.base / f"work-{impl}"
        work_dir.mkdir()
        with mount_stack(pair.o.paths, impl, work=work_dir, options=options) as m:
            again = numbers(m.root)
            where[impl] = _where(pair.o.paths, m.root)
        if impl == IMPL and CAN_DECODE:
            changed = {p: (ours[p], again.get(p)) for p in ours if ours[p] != again.get(p)}
            assert not changed, f"{len(changed)} numbers changed across the remount: " + str(
                dict(list(changed.items())[:5]))
    diff = {p: (where["kernel"].get(p), where[IMPL].get(p)) for p in where["kernel"]
            if where["kernel"].get(p) != where[IMPL].get(p)}
    assert not diff, f"the kernel reads our upper's numbers otherwise (kernel, ours): {diff}"
    if CAN_DECODE:
        assert where["kernel"] == want  # the origins we wrote keep the lower numbers
    else:
        # Without CAP_DAC_READ_SEARCH origins are empty, as the kernel writes them then:
        # after a remount a copy shows its own number, under the kernel too.
        assert where["kernel"]["merged/a"] == "upper" and want["merged/a"] == "lower0"
