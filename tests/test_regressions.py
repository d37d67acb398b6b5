"""Scenarios that broke other userspace overlays (overlay-semantics §15), plus a random namespace
churn compared step by step with the kernel."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    IMPL,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Dir,
    File,
    Symlink,
    Whiteout,
    hash_tree,
    mount_stack,
    renameat2,
    snapshot_merged,
)

IMAGE_LAYER = {"app/config.yml": File("debug: false\n", mode=0o644),
               "app/lib/mod.py": File("x = 1\n"), "app/lib/data.bin": File(b"\x00" * 4096)}


def test_editing_image_file_copies_up_lower_untouched(make_pair):
    pair = make_pair(lowers=[IMAGE_LAYER, {"base/os-release": File("ID=test\n")}])
    hashes = [[hash_tree(p) for p in s.paths.lowers] for s in pair.sides]

    def edit(m: Path) -> str:
        p = m / "app/config.yml"
        text = p.read_text().replace("false", "true")
        with open(p, "r+") as f:  # in-place edit, like sed -i without rename or an IDE
            f.seek(0)
            f.write(text)
            f.truncate()
        return p.read_text()

    assert pair.same(edit) == "debug: true\n"
    for side, before in zip(pair.sides, hashes):
        assert [hash_tree(p) for p in side.paths.lowers] == before, f"{side.impl} touched a lower"
        assert (side.paths.lowers[0] / "app/config.yml").read_text() == "debug: false\n"
        assert (side.upper / "app/config.yml").read_text() == "debug: true\n"
    pair.check_all()


def test_delete_leaves_0_0_whiteout(make_pair):
    pair = make_pair(lowers=[IMAGE_LAYER])
    pair.same(lambda m: os.unlink(m / "app/lib/mod.py"), expect="ok")
    for side in pair.sides:
        st = os.lstat(side.upper / "app/lib/mod.py")
        assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 0 and os.minor(st.st_rdev) == 0
        assert not os.path.exists(side.upper / "app/lib/.wh.mod.py"), "AUFS-style whiteout written"
    pair.check_all()


@pytest.mark.parametrize("how", ["shutil", "rm-rf"])
def test_rm_rf_then_recreate_shows_no_old_files(make_pair, how):
    tree = {f"D/old{i}": File(str(i)) for i in range(20)}
    tree.update({"D/sub/deep/old": File(), "D/sub/x": Symlink("../old1"), "keep": File()})
    pair = make_pair(upper={"D/upper-old": File()}, lowers=[tree, {"D/bottom-old": File(),
                                                                    "D/sub/bottom": File()}])

    def op(m: Path) -> tuple[list[str], str, str, list[str]]:
        # warm every cache first: the stale entries must not survive the removal
        for dirpath, _, filenames in os.walk(m / "D"):
            for n in filenames:
                os.lstat(os.path.join(dirpath, n))
        if how == "shutil":
            shutil.rmtree(m / "D")
        else:
            subprocess.run(["rm", "-rf", str(m / "D")], check=True, timeout=CMD_TIMEOUT)
        os.mkdir(m / "D")
        listing = sorted(os.listdir(m / "D"))
        errs = []
        for rel in ("D/old1", "D/sub"):
            try:
                os.lstat(m / rel)
                errs.append("exists")
            except FileNotFoundError:
                errs.append("ENOENT")
        os.makedirs(m / "D/sub")
        (m / "D/sub/new").write_text("new")
        return listing, errs[0], errs[1], sorted(os.listdir(m / "D/sub"))

    assert pair.same(op) == ([], "ENOENT", "ENOENT", ["new"])
    pair.same(lambda m: os.lstat(m / "D/sub/deep/old"), expect="ENOENT")
    snap = pair.assert_same_upper()
    assert snap.nodes["D"].opaque is True
    pair.check_all()


def test_recreated_dir_survives_remount(make_stack, mounter):
    paths = make_stack(lowers=[{"D/old": File(), "D/sub/o": File()}])
    m = mounter(paths, IMPL)
    shutil.rmtree(m.root / "D")
    os.makedirs(m.root / "D/sub")
    m.stop()
    m = mounter(paths, IMPL)
    assert os.listdir(m.root / "D") == ["sub"] and os.listdir(m.root / "D/sub") == []


def test_symlink_over_lower_whiteout_persists(make_stack, mounter):
    # fuse-overlayfs#279: creating a symlink over a deleted name must not resurrect the lower file
    paths = make_stack(lowers=[{"f": File("lower")}])
    m = mounter(paths, IMPL)
    os.unlink(m.root / "f")
    os.symlink("target", m.root / "f")
    m.stop()
    m = mounter(paths, IMPL)
    assert os.readlink(m.root / "f") == "target"


def test_root_whiteout_does_not_hide_names_in_subdirs(make_pair):
    # fuse-overlayfs#151
    pair = make_pair(upper={"x": Whiteout()}, lowers=[{"x": File(), "d/x": File("deep x")}])
    assert pair.same(lambda m: (m / "d/x").read_text()) == "deep x"
    pair.check_all()


def test_whiteouts_inside_opaque_dir(make_pair):
    # fuse-overlayfs#306. An opaque upper dir is not merged, so the kernel iterates it as a plain dir
    # and a (foreign) whiteout inside is listed, while lookup of it says ENOENT.  We hide it from
    # both, so that readdir agrees with lookup: a deliberate difference (docs/differences.md).
    pair = make_pair(upper={"d": Dir(opaque=True), "d/w": Whiteout(), "d/f": File()},
                     lowers=[{"d/w": File(), "d/z": File()}])
    k, o = pair.both(lambda m: sorted(os.listdir(m / "d")))
    assert k == ("ok", ["f", "w"]), "premise: the kernel lists the whiteout"
    assert o == ("ok", ["f"])
    pair.same(lambda m: os.lstat(m / "d/w"), expect="ENOENT")
    pair.same(lambda m: os.lstat(m / "d/z"), expect="ENOENT")


# --- random namespace churn, compared operation by operation -------------------------------------

NAMES = ["a", "b", "c", "d1", "d2", "d1/x", "d1/y", "d2/x", "d2/z", "d1/sub", "d1/sub/q"]


def _churn_stack() -> dict:
    return dict(
        upper={"c": File("upper c"), "d2/z": File("z")},
        lowers=[{"a": File("la"), "d1/x": File("x"), "d1/sub/q": File("q"), "d2/x": Whiteout()},
                {"b": File("lb"), "d1/y": File("y"), "d2/x": File("hidden"), "d2": Dir(mode=0o750)}],
    )


def _random_op(rng: random.Random):
    kind = rng.choice(["write", "append", "unlink", "mkdir", "rmdir", "rename", "link", "symlink",
                       "chmod", "setxattr", "truncate", "read", "listdir", "stat", "exchange",
                       "noreplace"])
    a, b = rng.choice(NAMES), rng.choice(NAMES)
    data = rng.randbytes(rng.randrange(0, 64))
    mode = rng.choice([0o600, 0o644, 0o755, 0o700])

    def op(m: Path):
        pa, pb = m / a, m / b
        if kind == "write":
            fd = os.open(pa, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        elif kind == "append":
            fd = os.open(pa, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        elif kind == "unlink":
            os.unlink(pa)
        elif kind == "mkdir":
            os.mkdir(pa, mode)
        elif kind == "rmdir":
            os.rmdir(pa)
        elif kind == "rename":
            os.rename(pa, pb)
        elif kind == "exchange":
            renameat2(pa, pb, RENAME_EXCHANGE)
        elif kind == "noreplace":
            renameat2(pa, pb, RENAME_NOREPLACE)
        elif kind == "link":
            os.link(pa, pb)
        elif kind == "symlink":
            os.symlink(b, pa)
        elif kind == "chmod":
            os.chmod(pa, mode, follow_symlinks=False) if not os.path.islink(pa) else None
        elif kind == "setxattr":
            os.setxattr(pa, "user.k", data, follow_symlinks=False)
        elif kind == "truncate":
            os.truncate(pa, len(data))
        elif kind == "read":
            return pa.read_bytes()
        elif kind == "listdir":
            return sorted(os.listdir(pa))
        elif kind == "stat":
            st = os.lstat(pa)
            return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                    None if stat.S_ISDIR(st.st_mode) else st.st_nlink)
        return None

    op.__name__ = f"{kind}({a!r}, {b!r})"
    return op


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")  # dentries and inodes: what a kernel-side cache would have kept


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_random_namespace_churn(make_pair, seed):
    pair = make_pair(**_churn_stack())
    rng = random.Random(seed)
    for _ in range(250):
        pair.same(_random_op(rng))
    pair.check_all()
    # whatever was cached during the churn must agree with a fresh look
    before = snapshot_merged(pair.o.root)
    _drop_caches()
    after = snapshot_merged(pair.o.root)
    assert before == after, "tree changed after drop_caches:\n" + before.diff(after, ("cached", "fresh"))
    pair.o.stop()
    with mount_stack(pair.o.paths, pair.o.impl) as m:
        remounted = snapshot_merged(m.root)
    assert before == remounted, "tree changed after remount:\n" + before.diff(remounted, ("mounted", "remounted"))


@pytest.mark.skipif(IMPL == "kernel", reason="checks the pyunionfs daemon process")
def test_no_fd_leak_in_daemon(make_pair):
    # fuse-overlayfs#210: fds leaked per mkdir/rmdir until EMFILE
    pair = make_pair(lowers=[{"d/x": File("x"), "f": File("f")}])
    pid = pair.o.mount.pid  # type: ignore[union-attr]

    def nfds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    m = pair.o.root
    for _ in range(20):  # warm-up: lazily opened layer fds, thread pools
        os.mkdir(m / "w")
        os.rmdir(m / "w")
    before = nfds()
    for i in range(300):
        os.mkdir(m / "d/sub")
        (m / "d/sub/f").write_text(str(i))
        os.listdir(m / "d")
        os.unlink(m / "d/sub/f")
        os.rmdir(m / "d/sub")
        with open(m / "f") as f:
            f.read()
        os.rename(m / "f", m / "g")
        os.rename(m / "g", m / "f")
    after = nfds()
    assert after - before < 20, f"daemon fds grew from {before} to {after}"
