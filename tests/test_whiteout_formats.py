"""Every whiteout and opaque format, read (``-o whiteouts=oci``), and the default per form.

The kernel treats ``.wh.*`` names as ordinary files (test_lookup covers that, side by side
with it), so in ``oci`` mode there is no kernel oracle: these tests state what OCI image
layers mean (a ``.wh.NAME`` hides NAME in the layers below, ``.wh..wh..opq`` makes its
directory opaque) and, where the same layers mean the same to both, check that pyunionfs in
``oci`` mode shows what the kernel shows once the markers are converted to its own format.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    IMPL,
    PRIVATE_PREFIX,
    PYTHON,
    REPO,
    Dir,
    File,
    KernelMount,
    PyUnionMount,
    StackPaths,
    Whiteout,
    is_mounted,
    snapshot_merged,
    tree_of,
)

pytestmark = pytest.mark.skipif(IMPL == "kernel", reason="pyunionfs's own whiteout options")

EMPTY = File("", mode=0)  # how containers-storage and `docker save` store a .wh. file

OCI_LOWERS = [
    {"etc/.wh.gone": EMPTY, "etc/kept": File("top"), "var/.wh..wh..opq": EMPTY,
     "var/new": File("new"), "usr/.wh.lib": EMPTY, "opq-user": Dir(
         xattrs={"user.overlay.opaque": b"y"}), "opq-user/mine": File(),
     "opq-fo": Dir(xattrs={"user.fuseoverlayfs.opaque": b"y"}), "opq-fo/mine": File(),
     "both": File("same layer wins"), ".wh.both": EMPTY},
    {"etc/gone": File("old"), "etc/kept": File("bottom"), "etc/other": File("o"),
     "var/old": File("hidden by .wh..wh..opq"), "usr/lib/x": File(), "usr/bin/y": File(),
     "opq-user/below": File(), "opq-fo/below": File(), "both": File("below")},
]
# The same stack in the kernel's own format: 0/0 whiteouts and P.opaque (the harness's dialect).
KERNEL_LOWERS = [
    {"etc/gone": Whiteout(), "etc/kept": File("top"), "var": Dir(opaque=True),
     "var/new": File("new"), "usr/lib": Whiteout(), "opq-user": Dir(opaque=True),
     "opq-user/mine": File(), "opq-fo": Dir(opaque=True), "opq-fo/mine": File(),
     "both": File("same layer wins")},
    OCI_LOWERS[1],
]


@pytest.fixture
def oci_mount(make_stack) -> Iterator[tuple[StackPaths, PyUnionMount]]:
    paths = make_stack(OCI_LOWERS)
    m = PyUnionMount(paths, options="whiteouts=oci")
    try:
        yield paths, m
    finally:
        m.stop()


def test_oci_view_equals_kernel_view_of_converted_layers(oci_mount, make_stack) -> None:
    paths, m = oci_mount
    kpaths = make_stack(KERNEL_LOWERS)
    with KernelMount(kpaths):
        want = snapshot_merged(kpaths.merged)
    got = snapshot_merged(paths.merged)
    assert got == want, "oci view differs from the kernel's view of the converted stack:\n" + \
        want.diff(got, ("kernel(converted)", "pyunionfs(oci)"))
    names = set(tree_of(paths.merged))
    assert not any(os.path.basename(n).startswith(".wh.") for n in names), names
    assert (paths.merged / "both").read_text() == "same layer wins"


def test_oci_markers_hidden_and_not_creatable(oci_mount) -> None:
    paths, m = oci_mount
    root = paths.merged
    for name in (".wh.gone", ".wh..wh..opq"):
        with pytest.raises(FileNotFoundError):
            os.lstat(root / "etc" / name)
    for make in (lambda p: p.write_text("x"), lambda p: p.mkdir(),
                 lambda p: os.symlink("t", p), lambda p: os.rename(root / "etc/kept", p),
                 lambda p: os.link(root / "etc/kept", p)):
        with pytest.raises(OSError) as e:
            make(root / "etc/.wh.new")
        assert e.value.errno == errno.EINVAL
    # markers of other tools are hidden and can't be set through the mount
    assert "user.overlay.opaque" not in os.listxattr(root / "opq-user")
    with pytest.raises(OSError) as e:
        os.getxattr(root / "opq-fo", "user.fuseoverlayfs.opaque")
    assert e.value.errno == errno.ENODATA
    with pytest.raises(OSError) as e:
        os.setxattr(root / "etc/kept", "user.fuseoverlayfs.opaque", b"y")
    assert e.value.errno == errno.EPERM


def test_oci_changes_then_kernel_reads_the_upper(oci_mount) -> None:
    """Writing in oci mode (0/0 whiteouts, the dialect's opaque mark) over .wh. layers:
    delete, recreate, replace a directory; lookup agrees with readdir throughout."""
    paths, m = oci_mount
    root = paths.merged
    os.unlink(root / "etc/other")
    (root / "etc/gone").write_text("back")  # a name an OCI whiteout hid
    for p in sorted((root / "usr").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "usr").rmdir()
    (root / "usr").mkdir()
    (root / "usr/fresh").write_text("f")
    assert sorted(os.listdir(root / "usr")) == ["fresh"]
    with pytest.raises(FileNotFoundError):
        os.lstat(root / "usr/bin")
    assert sorted(os.listdir(root / "etc")) == ["gone", "kept"]
    up = paths.upper
    assert up is not None
    assert stat.S_ISCHR(os.lstat(up / "etc/other").st_mode)
    assert os.getxattr(up / "usr", PRIVATE_PREFIX + "opaque") == b"y"
    view = snapshot_merged(root)
    m.stop()
    # The lowers still hold .wh. files the kernel can't read, so the kernel is pointed at
    # our upper over the converted lowers: the same layers in its own format.
    conv = paths.base / "conv"
    conv.mkdir()
    from overlay_harness import materialise  # noqa: PLC0415 - only here
    lowers = []
    for i, spec in enumerate(KERNEL_LOWERS):
        materialise(spec, conv / f"l{i}")
        lowers.append(conv / f"l{i}")
    (conv / "work").mkdir()
    (conv / "m").mkdir()
    kp = StackPaths(conv, lowers, up, conv / "work", conv / "m")
    with KernelMount(kp):
        kview = snapshot_merged(kp.merged)
    assert kview == view, "kernel reads our upper differently:\n" + view.diff(
        kview, ("pyunionfs(oci)", "kernel"))


def test_kernel_mode_shows_wh_files(make_stack) -> None:
    paths = make_stack(OCI_LOWERS)
    with PyUnionMount(paths, options="whiteouts=kernel"):
        assert (paths.merged / "etc/.wh.gone").exists()
        assert (paths.merged / "etc/gone").read_text() == "old"


def _mount_program(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([PYTHON, "-m", "unionfs", *args], capture_output=True, text=True,
                          timeout=CMD_TIMEOUT, cwd=str(REPO), env=env,
                          stdin=subprocess.DEVNULL)


def _opts(paths: StackPaths) -> str:
    return (f"lowerdir={':'.join(map(str, paths.lowers))},upperdir={paths.upper},"
            f"workdir={paths.work}")


@pytest.mark.parametrize("form", ["mount_program", "helper"])
def test_mount_program_forms_read_oci_by_default(make_stack, form: str) -> None:
    """containers-storage runs `PROG -o OPTS MERGED` and passes no whiteout option;
    mount(8) runs `PROG SOURCE MERGED -o OPTS`. Both read .wh. files."""
    paths = make_stack(OCI_LOWERS)
    # exactly what podman sends: an empty item, volatile, a quoted SELinux label
    opts = _opts(paths) + ',,volatile,context="system_u:object_r:container_file_t:s0:c1,c2"'
    args = ["-o", opts, str(paths.merged)] if form == "mount_program" else \
        ["src", str(paths.merged), "-o", opts]
    r = _mount_program(args)
    try:
        assert r.returncode == 0, r.stderr
        assert r.stderr == "", r.stderr  # known words, so no warning
        assert is_mounted(paths.merged)
        assert not (paths.merged / "etc/gone").exists()
        assert not (paths.merged / "etc/.wh.gone").exists()
    finally:
        subprocess.run(["fusermount3", "-u", str(paths.merged)], timeout=CMD_TIMEOUT,
                       check=False)
    assert not is_mounted(paths.merged)


def test_mount_program_unknown_option_warns_once(make_stack) -> None:
    paths = make_stack(OCI_LOWERS)
    r = _mount_program(["-o", _opts(paths) + ",bogus,fancy=1,noacl", str(paths.merged)])
    try:
        assert r.returncode == 0, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and "bogus" in lines[0] and "fancy=1" in lines[0], lines
        assert "noacl" not in lines[0]  # fuse-overlayfs words we know are not "unknown"
    finally:
        subprocess.run(["fusermount3", "-u", str(paths.merged)], timeout=CMD_TIMEOUT,
                       check=False)


def test_mount_subcommand_stays_strict(make_stack) -> None:
    paths = make_stack(OCI_LOWERS)
    r = _mount_program(["mount", "-o", _opts(paths) + ",bogus", str(paths.merged)])
    assert r.returncode != 0
    assert r.stderr.strip() == "pyunionfs: error: unknown option 'bogus'"
    assert not is_mounted(paths.merged)


def test_version_in_both_forms() -> None:
    for args in (["--version"], ["-V"]):
        r = _mount_program(args)
        assert r.returncode == 0 and r.stdout.startswith("pyunionfs "), (args, r)


def _workload(m: Path) -> None:
    """Deletes, renames and replaces: every way a whiteout or opaque mark gets written."""
    os.unlink(m / "etc/kept")
    os.rename(m / "etc/other", m / "etc/renamed")
    for p in sorted((m / "usr").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (m / "usr").rmdir()
    (m / "usr").mkdir()
    (m / "usr/fresh").write_text("f")
    (m / "var/new").write_text("again")
    os.unlink(m / "var/new")


STACK = [{"etc/kept": File("k"), "etc/other": File("o"), "usr/bin/y": File(),
          "usr/lib/x": File(), "var/new": File("n")}, {"etc/base": File("b")}]


@pytest.mark.parametrize("form", ["xattr", "oci"])
def test_forced_whiteout_forms_mean_the_same_after_remount(make_stack, monkeypatch,
                                                          form: str) -> None:
    """What a filesystem that refuses 0/0 devices gets: xattr whiteouts, or .wh. files.
    The view must survive a remount, and for xattr whiteouts the kernel must agree (it
    reads them fully in lower layers, so the upper is given to it as the top lower)."""
    paths = make_stack(STACK)
    monkeypatch.setenv("PYUNIONFS_WRITE_WHITEOUTS", form)
    with PyUnionMount(paths):
        _workload(paths.merged)
        view = snapshot_merged(paths.merged)
    assert paths.upper is not None
    upper = tree_of(paths.upper)
    assert "chr" not in upper.values(), upper
    if form == "oci":
        assert upper.get("etc/.wh.kept") == "file" and upper.get("usr/.wh..wh..opq") == "file"
    else:
        assert os.getxattr(paths.upper / "etc/kept", PRIVATE_PREFIX + "whiteout") == b""
        assert os.getxattr(paths.upper / "etc", PRIVATE_PREFIX + "opaque") == b"x"
    monkeypatch.delenv("PYUNIONFS_WRITE_WHITEOUTS")
    with PyUnionMount(paths, options=f"whiteouts={'oci' if form == 'oci' else 'kernel'}"):
        again = snapshot_merged(paths.merged)
    assert again == view, view.diff(again, ("first mount", "remount"))
    if form == "xattr":
        ro = StackPaths(paths.base, [paths.upper, *paths.lowers], None, None, paths.merged)
        with KernelMount(ro):
            kview = snapshot_merged(paths.merged)
        assert kview == view, view.diff(kview, ("pyunionfs", "kernel, upper as lower"))


def test_oci_form_over_a_kernel_upper(make_stack, monkeypatch) -> None:
    """Mixed uppers: 0/0 whiteouts the kernel wrote and .wh. files we write side by side."""
    paths = make_stack(STACK, upper={"etc/base": Whiteout()})
    monkeypatch.setenv("PYUNIONFS_WRITE_WHITEOUTS", "oci")
    with PyUnionMount(paths):
        assert sorted(os.listdir(paths.merged / "etc")) == ["kept", "other"]
        (paths.merged / "etc/base").write_text("over a 0/0 whiteout")
        os.unlink(paths.merged / "etc/kept")
        (paths.merged / "etc/kept").write_text("over a .wh. file")
        assert sorted(os.listdir(paths.merged / "etc")) == ["base", "kept", "other"]
    assert paths.upper is not None
    assert sorted(os.listdir(paths.upper / "etc")) == ["base", "kept"]  # .wh.kept dropped


def test_long_non_ascii_names_in_oci_mode(make_stack) -> None:
    """252..255 bytes but fewer characters: there is no room for a .wh. name, and
    looking one up must not fail the listing (ENAMETOOLONG)."""
    long = "é" * 126  # 252 bytes
    paths = make_stack([{long: File("hi"), "d": Dir()}, {"other": File()}])
    with PyUnionMount(paths, options="whiteouts=oci"):
        assert sorted(os.listdir(paths.merged)) == sorted([long, "d", "other"])
        assert (paths.merged / long).read_text() == "hi"


def test_oci_form_reserves_room_for_the_prefix(make_stack, monkeypatch) -> None:
    paths = make_stack([{"a" * 253: File("x")}, {}])
    monkeypatch.setenv("PYUNIONFS_WRITE_WHITEOUTS", "oci")
    with PyUnionMount(paths):
        assert os.statvfs(paths.merged).f_namemax == 251
        with pytest.raises(OSError) as e:
            (paths.merged / ("b" * 252)).write_text("y")
        assert e.value.errno == errno.ENAMETOOLONG
        (paths.merged / ("b" * 251)).write_text("y")
        os.unlink(paths.merged / ("b" * 251))


@pytest.mark.parametrize("form", ["xattr", "oci"])
def test_forced_forms_rename_dirs_and_onto_whiteouts(make_stack, monkeypatch, form: str) -> None:
    """Renames that leave a whiteout go through work in one step each; a directory moved
    onto a 0/0 whiteout keeps that whiteout at its old name."""
    paths = make_stack([{"a/f": File("1"), "b": File("2"), "gone": File("3")}, {}],
                       upper={"gone": Whiteout(), "up/x": File("u")})
    monkeypatch.setenv("PYUNIONFS_WRITE_WHITEOUTS", form)
    with PyUnionMount(paths):
        m = paths.merged
        os.rename(m / "b", m / "b2")
        os.mkdir(m / "nd")
        os.rename(m / "nd", m / "gone")  # a pure-upper dir onto a 0/0 whiteout
        os.rename(m / "up", m / "up2")
        assert sorted(os.listdir(m)) == ["a", "b2", "gone", "up2"]
        view = snapshot_merged(m)
    monkeypatch.delenv("PYUNIONFS_WRITE_WHITEOUTS")
    mode = "oci" if form == "oci" else "kernel"
    with PyUnionMount(paths, options=f"whiteouts={mode}"):
        assert snapshot_merged(paths.merged) == view
