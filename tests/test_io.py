"""Data paths through the mount: random read/write/truncate sequences (an fsx-style check), open
files that lose their name, odd file names, permissions of unprivileged callers during copy-up."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from overlay_harness import Dir, File, Symlink, Whiteout, tree_of

UID, GID = 1000, 1000


@pytest.mark.parametrize("seed", [7, 8])
def test_fsx_style_random_io(make_pair, seed):
    # one lower file, copied up by the first write; every read compared with the kernel's
    rng0 = random.Random(seed)
    pair = make_pair(lowers=[{"f": File(rng0.randbytes(300_000))}])
    rng = random.Random(seed * 1000)
    ops = []
    for _ in range(120):
        kind = rng.choice(["pwrite", "pwrite", "pread", "truncate", "append", "fstat"])
        off = rng.randrange(0, 400_000)
        ops.append((kind, off, rng.randrange(1, 70_000), rng.randrange(256)))

    def op(m: Path) -> list:
        out = []
        fd = os.open(m / "f", os.O_RDWR)
        try:
            for kind, off, n, byte in ops:
                if kind == "pwrite":
                    out.append(os.pwrite(fd, bytes([byte]) * n, off))
                elif kind == "pread":
                    out.append(os.pread(fd, n, off))
                elif kind == "truncate":
                    os.ftruncate(fd, off)
                elif kind == "append":
                    with open(m / "f", "ab") as a:
                        a.write(bytes([byte]) * n)
                elif kind == "fstat":
                    out.append(os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return out

    pair.same(op, expect="ok")
    pair.check_all()


def test_open_file_survives_unlink(make_pair):
    pair = make_pair(lowers=[{"f": File("lower data")}], upper={"u": File("upper data")})

    def op(m: Path) -> list:
        out = []
        for name in ("f", "u"):
            fd = os.open(m / name, os.O_RDWR)
            try:
                os.unlink(m / name)
                os.pwrite(fd, b"XX", 0)
                out.append((os.pread(fd, 100, 0), os.fstat(fd).st_nlink))
            finally:
                os.close(fd)
        return out

    assert pair.same(op) == [(b"XXwer data", 0), (b"XXper data", 0)]
    pair.check_all()


def test_rename_over_open_file_keeps_old_content(make_pair):
    pair = make_pair(lowers=[{"target": File("old"), "src": File("new")}])

    def op(m: Path) -> tuple[bytes, bytes]:
        fd = os.open(m / "target", os.O_RDONLY)
        try:
            os.rename(m / "src", m / "target")
            return os.pread(fd, 10, 0), (m / "target").read_bytes()
        finally:
            os.close(fd)

    assert pair.same(op) == (b"old", b"new")
    pair.check_all()


ODD = ["with space", "new\nline", "ünïcødé", os.fsdecode(b"latin1-\xe9\xff"), "-dash", "a" * 200,
       "tab\there", "quote'\"", "back\\slash"]


def test_odd_file_names(make_pair):
    lower = {f"d/{n}": File(n) for n in ODD}
    lower[f"d/{ODD[0]} dir/x"] = File()
    pair = make_pair(upper={f"d/{ODD[1]}": Whiteout()}, lowers=[lower])
    names = pair.same(lambda m: sorted(os.listdir(m / "d")))
    assert ODD[1] not in names and ODD[3] in names and len(names) == len(ODD)

    def op(m: Path) -> list[str]:
        d = m / "d"
        for n in ODD[2:5]:
            os.rename(d / n, d / (n + ".renamed"))
        os.unlink(d / ODD[5])
        (d / ODD[1]).write_text("recreated")
        os.symlink(ODD[6], d / (ODD[7] + "link"))
        return sorted(os.listdir(d))

    pair.same(op, expect="ok")
    pair.check_all()


def test_unprivileged_copy_up_under_root_dirs(make_pair):
    # the user owns the file but not its parents: copy-up still creates the parents (as they are
    # below) and the user's write lands in the upper copy
    pair = make_pair(lowers=[{"home": Dir(mode=0o755), "home/user": Dir(mode=0o755),
                              "home/user/notes": File("v1\n", mode=0o644, uid=UID, gid=GID)}])

    def op(m: Path) -> str:
        with open(m / "home/user/notes", "a") as f:
            f.write("v2\n")
        os.chmod(m / "home/user/notes", 0o600)
        return (m / "home/user/notes").read_text()

    assert pair.same_as(UID, GID, op) == "v1\nv2\n"
    snap = pair.assert_same_upper()
    assert (snap.nodes["home/user"].uid, snap.nodes["home/user"].mode) == (0, 0o755)
    assert (snap.nodes["home/user/notes"].uid, snap.nodes["home/user/notes"].mode) == (UID, 0o600)
    pair.check_all()


def test_unprivileged_utime(make_pair):
    pair = make_pair(lowers=[{"shared": File("x", mode=0o666), "own": File("y", uid=UID)}])
    # "touch" (times = now) needs only write permission; explicit times need ownership
    pair.same_as(UID, GID, lambda m: os.utime(m / "shared"), expect="ok", what="touch shared")
    pair.same_as(UID, GID, lambda m: os.utime(m / "shared", (1, 1)), expect="EPERM",
                 what="explicit times on someone else's file")
    pair.same_as(UID, GID, lambda m: os.utime(m / "own", (1, 2)), expect="ok")
    assert pair.same(lambda m: os.stat(m / "own").st_mtime) == 2
    pair.check_all()


def test_copy_up_inside_mode_000_dirs(make_pair):
    # root writes below directories nobody may enter; the copied-up chain keeps mode 000
    pair = make_pair(lowers=[{"locked": Dir(mode=0o000), "locked/inner": Dir(mode=0o500),
                              "locked/inner/f": File("x", mode=0o400)}])
    pair.same(lambda m: (m / "locked/inner/f").write_text("root was here"), expect="ok")
    pair.same(lambda m: (m / "locked/inner/new").write_text("n"), expect="ok")
    snap = pair.assert_same_upper()
    assert snap.nodes["locked"].mode == 0 and snap.nodes["locked/inner"].mode == 0o500
    pair.check_all()


def test_long_symlink_target(make_pair):
    target = "/".join(["component"] * 400)[:4095]
    pair = make_pair(lowers=[{"s": Symlink(target)}])
    assert pair.same(lambda m: os.readlink(m / "s")) == target
    pair.same(lambda m: os.symlink(target, m / "s2"), expect="ok")
    assert pair.same(lambda m: os.readlink(m / "s2")) == target
    pair.check_all()


def test_many_open_files(make_pair):
    pair = make_pair(lowers=[{f"f{i}": File(str(i)) for i in range(300)}])

    def op(m: Path) -> int:
        fds = [os.open(m / f"f{i}", os.O_RDWR if i % 2 else os.O_RDONLY) for i in range(300)]
        try:
            return sum(int(os.pread(fd, 10, 0)) for fd in fds)
        finally:
            for fd in fds:
                os.close(fd)

    assert pair.same(op) == sum(range(300))
    for side in pair.sides:  # the O_RDWR opens copied up exactly the odd ones
        assert len(tree_of(side.upper)) == 1 + 150, side.impl
    pair.check_all()
