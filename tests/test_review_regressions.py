"""Regressions from a code review of the core, each compared with the kernel: changes through an
fd whose name is gone, listings read in pieces while the directory changes, a hard-linked lower
file after one of its names was removed, copy-up racing with unlink, odd xattr and file names."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from overlay_harness import CMD_TIMEOUT, IMPL, PYTHON, REPO, File, Hardlink


def test_fchmod_after_unlink_changes_the_open_file_not_the_new_name(make_pair):
    pair = make_pair(lowers=[{"d/keep": File()}])

    def op(m: Path) -> tuple[int, int, float]:
        fd = os.open(m / "g", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.unlink(m / "g")
            (m / "g").write_text("new")
            os.fchmod(fd, 0o700)
            os.utime(fd, ns=(1_000_000_000, 1_000_000_000))
            new = os.lstat(m / "g")
            return new.st_mode & 0o777, os.fstat(fd).st_mode & 0o777, new.st_mtime == 1.0
        finally:
            os.close(fd)

    assert pair.same(op, expect="ok") == (0o644, 0o700, False)
    pair.check_all()


def test_fsetxattr_after_rename_over_changes_the_open_file(make_pair):
    pair = make_pair(lowers=[{"h": File("h"), "h2": File("h2")}])

    def op(m: Path) -> tuple[list[str], list[str]]:
        fd = os.open(m / "h", os.O_RDWR)
        try:
            os.rename(m / "h2", m / "h")
            os.setxattr(fd, "user.x", b"1")
            return sorted(os.listxattr(m / "h")), sorted(os.listxattr(fd))
        finally:
            os.close(fd)

    assert pair.same(op, expect="ok") == ([], ["user.x"])
    pair.check_all()


def test_listing_read_in_pieces_sees_unlink_and_copy_up(make_pair):
    names = [f"f{i:04d}" for i in range(3000)]
    pair = make_pair(lowers=[{f"d/{n}": File(n) for n in names}])

    def op(m: Path) -> tuple[str, str, bool]:
        order = os.listdir(m / "d")
        gone, changed = order[-1], order[-2]
        with os.scandir(m / "d") as it:
            next(it)  # the listing is cached by the open handle from here on
            os.unlink(m / "d" / gone)
            with open(m / "d" / changed, "a") as f:
                f.write("+")
            rest = sum(1 for _ in it)
        try:
            os.lstat(m / "d" / gone)
            gone_state = "present"
        except FileNotFoundError:
            gone_state = "ENOENT"
        with open(m / "d" / changed, "a") as f:  # must not fail (EEXIST) nor lose the first "+"
            f.write("+")
        # POSIX leaves open whether a name removed after opendir is still returned: the kernel's
        # cached list returns it (stat then says ENOENT), we skip it.
        return gone_state, (m / "d" / changed).read_text(), rest in (2998, 2999)

    k = pair.same(op, expect="ok")
    assert k[0] == "ENOENT" and k[1].endswith("++") and k[2]
    pair.check_all()


def test_other_name_of_lower_hardlink_after_rm_of_the_first(make_pair):
    pair = make_pair(lowers=[{"a": File("data"), "b": Hardlink("a")}])

    def op(m: Path) -> tuple[str, int]:
        fd = os.open(m / "a", os.O_RDONLY)
        try:
            os.unlink(m / "a")
            with open(m / "b", "a") as f:
                f.write("+more")
            os.chmod(m / "b", 0o600)
            return (m / "b").read_text(), os.lstat(m / "b").st_mode & 0o777
        finally:
            os.close(fd)

    assert pair.same(op, expect="ok") == ("data+more", 0o600)
    pair.check_all()


def test_unlink_during_big_copy_up_does_not_fail_the_open(make_stack, mounter):
    # The copy of a big lower file runs in a thread; an unlink of the name meanwhile waits for it
    # (the kernel holds the name locked) instead of making the copy-up's final rename fail.
    paths = make_stack(lowers=[{"big": File(b"x" * (64 << 20))}])
    m = mounter(paths, IMPL)
    errors: list[int] = []

    def opener() -> None:
        try:
            os.close(os.open(m.root / "big", os.O_RDWR))
        except OSError as e:
            errors.append(e.errno)

    t = threading.Thread(target=opener)
    t.start()
    time.sleep(0.05)
    os.unlink(m.root / "big")
    t.join(60)
    assert not t.is_alive()
    assert errno.EEXIST not in errors, errors
    assert not (m.root / "big").exists()


def test_private_xattr_name_with_non_utf8_bytes(make_pair):
    pair = make_pair(lowers=[{"f": File("x")}])
    name = os.fsdecode(b"trusted.overlay.\xff")

    def op(m: Path) -> bytes:
        os.setxattr(m / "f", name, b"v")
        return os.getxattr(m / "f", name)

    assert pair.same(op, expect="ok") == b"v"
    pair.check_all()


def test_name_too_long_is_enametoolong(make_pair):
    pair = make_pair(lowers=[{"d/f": File()}])
    pair.same(lambda m: os.lstat(m / "d" / ("n" * 300)), expect="ENAMETOOLONG")


@pytest.mark.skipif(IMPL == "kernel", reason="tests pyunionfs's own command line")
def test_unwritable_log_file_is_a_one_line_error(make_stack):
    paths = make_stack(lowers=[{"f": File()}, {"g": File()}])
    r = subprocess.run([PYTHON, "-m", "unionfs", "mount", "--log", "/nonexistent/x.log",
                        f"{paths.lowers[0]}:{paths.lowers[1]}", str(paths.upper), str(paths.work),
                        str(paths.merged)], capture_output=True, text=True, timeout=CMD_TIMEOUT,
                       cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)),
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "log" in r.stderr, r.stderr
    assert not os.path.ismount(paths.merged)
