"""Directory renames with redirect_dir=on (overlay-semantics §7.3), against the kernel mounted with
the same option: the merged view, the errno of each call and the upper directory (redirect xattrs
included) must agree, and each side's upper must read the same under the other implementation."""

from __future__ import annotations

import errno
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
    Whiteout,
    ls_op,
    mount_stack,
    renameat2,
    snapshot_merged,
)

ON = "redirect_dir=on"
REDIRECT = PRIVATE_PREFIX + "redirect"

pytestmark = pytest.mark.skipif(
    USERNS, reason="the kernel refuses redirect_dir=on with userxattr (test_features covers it)")

# A lower image with the shapes a rename meets: a populated dir two layers deep (merged), a dir in
# one layer, an empty one, nested dirs, an opaque dir, a whiteout, hard links.
IMAGE = dict(
    upper={"merged/up": File("u"), "gone": Whiteout(), "fresh/n": File("n")},
    lowers=[
        {"merged/a": File("a"), "merged/sub/deep": File("d"), "tree/x/y/z": File("z"),
         "empty": Dir(), "opq": Dir(opaque=True), "opq/kept": File("k"),
         "links/h1": File("hl"), "links/h2": Hardlink("links/h1"), "gone/old": File()},
        {"merged/b": File("b"), "merged/sub/base": File("base"), "opq/hidden": File(),
         "bottom/only": File("o"), "gone/older": File()},
    ],
)


def _rename(old: str, new: str, flags: int = 0):
    def op(m: Path) -> None:
        renameat2(m / old, m / new, flags)
    op.__name__ = f"rename({old!r}, {new!r}{f', flags={flags}' if flags else ''})"
    return op


def _write(rel: str, data: str):
    def op(m: Path) -> None:
        with open(m / rel, "a") as f:
            f.write(data)
    op.__name__ = f"append({rel!r})"
    return op


def _read(rel: str):
    def op(m: Path) -> bytes:
        return (m / rel).read_bytes()
    op.__name__ = f"read({rel!r})"
    return op


def _redirects(upper: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, dirnames, _ in os.walk(upper):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            try:
                out[os.path.relpath(p, upper)] = os.getxattr(p, REDIRECT, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENODATA:
                    raise
    return out


def check_crossed(pair: Pair, options: str = ON) -> None:
    """Both uppers, each mounted by the other implementation, show the kernel's view."""
    want = snapshot_merged(pair.k.root)
    pair.stop()
    for side, impl in ((pair.o, "kernel"), (pair.k, IMPL)):
        work = side.paths.base / f"work-{impl}"
        work.mkdir()
        with mount_stack(side.paths, impl, work=work, options=options) as m:
            got = snapshot_merged(m.root)
        assert got == want, f"{impl} reads the {side.impl} upper differently:\n" + want.diff(
            got, ("before", impl))


def test_rename_lower_dirs_like_kernel(make_pair):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_rename("merged", "merged2"), expect="ok")  # same parent: relative redirect
    pair.same(_rename("tree/x", "fresh/x2"), expect="ok")  # elsewhere: absolute redirect
    pair.same(_rename("empty", "empty2"), expect="ok")
    pair.same(_rename("bottom", "merged2/bottom"), expect="ok")
    pair.same(ls_op("merged2"), expect="ok")
    pair.same(ls_op("fresh/x2/y"), expect="ok")
    pair.same(_read("merged2/sub/base"), expect="ok")
    pair.same(lambda m: os.listxattr(m / "merged2"))  # the redirect stays private
    pair.check_all()
    assert _redirects(pair.o.upper) == {"merged2": b"merged", "fresh/x2": b"/tree/x",
                                        "empty2": b"empty", "merged2/bottom": b"/bottom"}
    check_crossed(pair)


def test_rename_twice_and_back(make_pair):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_rename("merged", "m1"), expect="ok")
    pair.same(_rename("m1", "fresh/m2"), expect="ok")  # relative becomes absolute
    pair.same(_rename("fresh/m2", "fresh/m3"), expect="ok")  # absolute stays
    pair.same(_write("fresh/m3/sub/base", "+"), expect="ok")  # copy-up from the old lower path
    pair.same(_rename("fresh/m3", "merged"), expect="ok")  # back where it came from
    pair.same(ls_op("merged/sub"), expect="ok")
    pair.same(_read("merged/sub/base"), expect="ok")
    pair.same(ls_op(), expect="ok")
    pair.check_all()
    check_crossed(pair)


def test_rename_parent_of_moved_dir(make_pair):
    # Nested redirects: a moved dir inside a dir that moves after it, then files changed in both.
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_rename("tree/x/y", "tree/x/y2"), expect="ok")
    pair.same(_rename("tree/x", "tree/x2"), expect="ok")
    pair.same(_rename("tree", "merged/tree"), expect="ok")
    pair.same(_write("merged/tree/x2/y2/z", "!"), expect="ok")
    pair.same(lambda m: (m / "merged/tree/x2/new").write_text("n"), expect="ok")
    pair.same(_rename("merged/tree/x2/y2", "y3"), expect="ok")  # out to the root
    pair.same(ls_op("y3"), expect="ok")
    pair.same(_read("y3/z"), expect="ok")
    pair.check_all()
    check_crossed(pair)


def test_rename_into_and_out_of_opaque_and_whiteouts(make_pair):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_rename("merged", "opq/m"), expect="ok")  # into an opaque dir
    pair.same(ls_op("opq/m"), expect="ok")
    pair.same(_rename("opq", "opq2"), expect="ok")  # the opaque dir itself (lower, opaque)
    pair.same(ls_op("opq2"), expect="ok")
    pair.same(_rename("opq2/m", "gone"), expect="ok")  # out, onto a whited-out name
    pair.same(ls_op("gone"), expect="ok")
    pair.same(_rename("tree", "empty"), expect="ok")  # over an empty lower dir
    pair.same(_rename("empty", "fresh"), expect="ENOTEMPTY")
    pair.same(ls_op("empty/x/y"), expect="ok")
    pair.check_all()
    check_crossed(pair)


def test_exchange_and_mass_rename(make_pair):
    lowers = [{f"d{i:03}/f": File(str(i)) for i in range(40)} | IMAGE["lowers"][0],
              IMAGE["lowers"][1]]
    pair = make_pair(upper=IMAGE["upper"], lowers=lowers, options=ON)
    pair.same(_rename("merged", "tree", 2), expect="ok")  # RENAME_EXCHANGE of two lower dirs
    pair.same(ls_op("merged"), expect="ok")
    pair.same(ls_op("tree"), expect="ok")
    pair.same(_rename("fresh", "merged/fresh", 2), expect="ENOENT")
    pair.same(_rename("fresh", "bottom", 2), expect="ok")  # an upper dir for a lower one

    def mass(m: Path) -> None:
        os.mkdir(m / "all")
        for i in range(40):
            os.rename(m / f"d{i:03}", m / ("all" if i % 2 else "") / f"e{i:03}")
    pair.same(mass, expect="ok")
    pair.same(ls_op("all"), expect="ok")
    pair.same(_read("all/e039/f"), expect="ok")
    pair.check_all()
    check_crossed(pair)


def test_hard_link_inside_renamed_dir(make_pair):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_rename("links", "l2"), expect="ok")
    pair.same(lambda m: os.link(m / "l2/h1", m / "l2/h3"), expect="ok")
    pair.same(lambda m: os.stat(m / "l2/h3").st_nlink, expect="ok")
    pair.same(_read("l2/h2"), expect="ok")
    pair.check_all()
    check_crossed(pair)


def test_remove_and_recreate_after_rename(make_pair):
    pair = make_pair(**IMAGE, options=ON)
    pair.same(_rename("merged/sub", "sub2"), expect="ok")
    pair.same(lambda m: [os.unlink(m / "sub2" / n) for n in sorted(os.listdir(m / "sub2"))],
              expect="ok")
    pair.same(lambda m: os.rmdir(m / "sub2"), expect="ok")
    pair.same(lambda m: os.mkdir(m / "merged/sub"), expect="ok")  # the old name: opaque
    pair.same(ls_op("merged/sub"), expect="ok")
    pair.same(lambda m: os.mkdir(m / "sub2"), expect="ok")
    pair.check_all()
    check_crossed(pair)


def test_long_redirect_falls_back_to_exdev(make_pair):
    # An absolute redirect longer than redirect_max (256) can't be recorded: EXDEV, and mv copies.
    deep = "/".join(["d" * 60] * 5)
    pair = make_pair(lowers=[{f"{deep}/f": File("x"), "short/f": File()}], upper={},
                     options=ON)
    pair.same(_rename(deep, "moved"), expect="EXDEV")
    pair.same(_rename(deep.rsplit("/", 1)[0], "moved"), expect="ok")  # 240 bytes: fits
    pair.check_all()


@pytest.mark.parametrize("options", ["", "redirect_dir=follow", "redirect_dir=off",
                                     "redirect_dir=nofollow"])
def test_without_redirect_dir_on_renames_are_exdev(make_pair, options):
    pair = make_pair(**IMAGE, options=options)
    pair.same(_rename("merged", "m2"), expect="EXDEV")
    pair.same(_rename("tree", "merged", 2), expect="EXDEV")
    pair.same(_rename("fresh", "fresh2"), expect="ok")  # a dir of upper alone moves
    pair.check_all()


def test_nofollow_refuses_redirects(make_pair):
    # An upper written with redirects, mounted with redirect_dir=nofollow: EPERM where following
    # the redirect would find something, as the kernel refuses to follow it.
    pair = make_pair(upper={"new": Dir(xattrs={"trusted.overlay.redirect": "old"}), "old": Whiteout(),
                            "lone": Dir(xattrs={"trusted.overlay.redirect": "nothing"})},
                     lowers=[{"old/x": File("x")}], options="redirect_dir=nofollow")
    pair.same(lambda m: os.lstat(m / "new").st_mode, expect="EPERM")
    pair.same(lambda m: os.lstat(m / "lone").st_mode, expect="EPERM")  # even with nothing there
    assert pair.same(ls_op(), expect="ok") == ["lone", "new"]  # listed all the same
    pair.same(lambda m: os.lstat(m / "new").st_mode, expect="EPERM")  # not cached by the listing


def test_mv_of_big_lower_dir_copies_nothing(make_pair):
    # The scenario of the issue: `mv` of a lower dir holding 1 000 files writes one directory to
    # upper (plus the whiteout), not the files.
    pair = make_pair(lowers=[{f"big/f{i:04}": File("x" * 100) for i in range(1000)}], upper={},
                     options=ON)
    pair.same(lambda m: os.rename(m / "big", m / "big2"), expect="ok")
    for side in pair.sides:
        entries = sorted(p.name for p in side.upper.iterdir())
        assert entries == ["big", "big2"], (side.impl, entries)
        assert list((side.upper / "big2").iterdir()) == [], side.impl
    pair.same(lambda m: len(os.listdir(m / "big2")), expect="ok")
    pair.check_all()
