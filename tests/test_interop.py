"""On-disk compatibility: an upper written by pyunionfs must mean the same to the kernel, and the
reverse; remounts show the same tree; the daemon lets go of the layers after unmount."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from overlay_harness import (
    IMPL,
    PRIVATE_PREFIX,
    Dir,
    Fifo,
    File,
    Hardlink,
    Symlink,
    Whiteout,
    is_mounted,
    mount_stack,
    run_cmd,
    snapshot_merged,
)

IMAGE = dict(
    upper={"etc/preexisting": File("u")},
    lowers=[
        {"etc/conf": File("conf=1\n", mode=0o640, gid=4, mtime=1_500_000_000),
         "etc/drop": File("drop me"), "usr/bin/tool": File("#!", mode=0o755),
         "usr/share/doc/a": File("a"), "usr/share/doc/b": File("b"),
         "var/cache": Dir(opaque=True), "var/cache/c1": File(), "old/tree/x": File(),
         "links/h1": File("hl"), "links/h2": Hardlink("links/h1"), "pipe": Fifo(),
         "sym": Symlink("etc/conf"), "hidden": Whiteout()},
        {"etc/conf": File("base"), "usr/share/doc/c": File("c"), "var/cache/stale": File(),
         "old/tree/y": File(), "old/tree/deeper/z": File(), "hidden": File("nope"),
         "base-only": File("base")},
    ],
)


def workload(m: Path) -> None:
    """Touches every on-disk convention: copy-up, whiteouts, opaque dirs, escaped xattrs, links."""
    with open(m / "etc/conf", "a") as f:  # copy-up by write
        f.write("edited=2\n")
    os.unlink(m / "etc/drop")  # whiteout
    (m / "etc/new").write_text("new file")
    os.chmod(m / "usr/bin/tool", 0o700)  # metadata copy-up
    os.rename(m / "usr/share/doc/a", m / "usr/share/doc/a-renamed")  # rename + whiteout
    os.unlink(m / "usr/share/doc/c")  # whiteout for a bottom-layer name
    for dirpath, dirnames, filenames in os.walk(m / "old", topdown=False):  # rm -rf
        for n in filenames:
            os.unlink(os.path.join(dirpath, n))
        for n in dirnames:
            os.rmdir(os.path.join(dirpath, n))
    os.rmdir(m / "old")
    os.makedirs(m / "old/tree")  # opaque re-creation
    (m / "old/tree/fresh").write_text("fresh")
    os.setxattr(m / "etc/conf", "user.tag", b"v")
    os.setxattr(m / "base-only", PRIVATE_PREFIX + "esc", b"escaped")  # the dialect's own
    os.link(m / "etc/new", m / "etc/new-link")
    os.symlink("../etc/new", m / "usr/newlink")
    os.mkfifo(m / "var/fifo")
    os.truncate(m / "links/h1", 1)  # breaks the lower hard link
    os.mkdir(m / "hidden")  # mkdir over a lower whiteout
    os.utime(m / "etc/new", ns=(1_600_000_000_000_000_000, 1_600_000_001_000_000_000))


def _fresh_work(paths, name: str) -> Path:
    w = paths.base / name
    w.mkdir()
    return w


def test_pyunionfs_upper_read_by_kernel(make_pair):
    pair = make_pair(**IMAGE)
    pair.same(workload, expect="ok")
    pair.check_all()  # (mtimes of files written just now differ between the two sides)
    ours = snapshot_merged(pair.o.root, mtimes=True)
    pair.o.stop()
    with mount_stack(pair.o.paths, "kernel", work=_fresh_work(pair.o.paths, "work-k")) as m:
        theirs = snapshot_merged(m.root, mtimes=True)
    assert ours == theirs, "kernel reads pyunionfs's upper differently:\n" + ours.diff(
        theirs, ("pyunionfs", "kernel"))


def test_kernel_upper_read_by_pyunionfs(make_pair):
    pair = make_pair(**IMAGE)
    pair.same(workload, expect="ok")
    kernel_view = snapshot_merged(pair.k.root, mtimes=True)
    pair.k.stop()
    with mount_stack(pair.k.paths, IMPL, work=_fresh_work(pair.k.paths, "work-o")) as m:
        ours = snapshot_merged(m.root, mtimes=True)
    assert kernel_view == ours, "pyunionfs reads the kernel's upper differently:\n" + (
        kernel_view.diff(ours, ("kernel", "pyunionfs")))


def test_kernel_workdir_reused_by_pyunionfs(make_pair):
    # switching drivers on an existing container: the old workdir (with the kernel's work/ inside,
    # mode 000) must be accepted, as the kernel accepts a non-empty workdir
    pair = make_pair(**IMAGE)
    pair.same(workload, expect="ok")
    kernel_view = snapshot_merged(pair.k.root)
    pair.k.stop()
    with mount_stack(pair.k.paths, IMPL) as m:
        assert snapshot_merged(m.root) == kernel_view
        (m.root / "after-switch").write_text("ok")


def test_remount_shows_same_tree(make_stack, mounter):
    paths = make_stack(**IMAGE)
    m = mounter(paths, IMPL)
    workload(m.root)
    before = snapshot_merged(m.root, mtimes=True)
    m.stop()
    m = mounter(paths, IMPL)  # same upper and workdir, immediately
    after = snapshot_merged(m.root, mtimes=True)
    m.stop()
    assert before == after, before.diff(after, ("first mount", "remount"))


def test_upper_on_disk_format_after_workload(make_pair):
    pair = make_pair(**IMAGE)
    pair.same(workload, expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["etc/drop"].type == "whiteout"
    assert snap.nodes["old"].opaque is True
    # the lower whiteout already ends the lookup, so nothing is "below" the new dir: not opaque
    assert snap.nodes["hidden"].opaque is False
    assert snap.nodes["etc"].opaque is False
    assert dict(snap.nodes["base-only"].xattrs) == {PRIVATE_PREFIX + "overlay.esc": b"escaped"}
    for side in pair.sides:  # real 0/0 char devices, as the kernel writes them
        st = os.lstat(side.upper / "etc/drop")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, side.impl


def test_daemon_releases_layers_after_unmount(make_stack, mounter, tmpfs):
    # after umount the daemon must exit and let go of the layer filesystems: unmounting a layer
    # fs right away must not fail with EBUSY
    t = tmpfs()
    (t / "lower").mkdir()
    (t / "lower/f").write_text("x")
    paths = make_stack(lowers=[{}])
    paths.lowers[:] = [t / "lower"]
    m = mounter(paths, IMPL)
    assert (m.root / "f").read_text() == "x"
    (m.root / "g").write_text("y")
    m.stop()
    r = run_cmd(["umount", str(t)])
    assert r.returncode == 0, f"layer fs still busy after unmount: {r.stderr}"
    assert not is_mounted(t)
