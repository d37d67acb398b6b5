"""Rootless pyunionfs (the ``user.overlay.*`` dialect), two ways:

* ``test_differential_suite_in_userns``: a subset of the differential suite run again as root of a
  user namespace (UNIONFS_TEST_USERNS=1, see overlay_harness.userns_run): the kernel side mounts
  with ``-o userxattr``, pyunionfs must choose that dialect by itself.
* a plain unprivileged user (TEST_USER, created if missing) mounting through the setuid
  fusermount3, with /dev/fuse granted to it by an ACL entry for the module's duration; its uppers
  are then read by kernel overlayfs with ``-o userxattr``, and uppers the kernel wrote in that user's
  own user namespace are read by its pyunionfs.

``python tests/test_rootless.py workload MERGED`` runs ``workload`` on a mount (used inside the
test user's user namespace, where the kernel side of the reverse direction is mounted).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    MOUNT_TIMEOUT,
    PYTHON,
    REPO,
    UMOUNT_TIMEOUT,
    USER_PREFIX,
    USERNS,
    File,
    Snapshot,
    StackPaths,
    StackSpec,
    Symlink,
    build_stack,
    environment_problem,
    force_unmount,
    in_user_namespace,
    is_mounted,
    make_traversable,
    mount_table,
    read_xattrs,
    run_as,
    snapshot_upper,
    unionfs_pids,
    wait_until,
)
from rootless_support import (
    TEST_USER,
    as_user,
    kernel_mount,
    run_user,
    user_op,
    user_snapshot,
)

# The test user's fixtures (test_user, fuse_user, user_mounts) and the rest of the machinery are in
# rootless_support.py.

# The differential modules re-run in userns mode, and the userns-only counterparts of what they skip.
USERNS_SUITE = ["tests/test_lookup.py", "tests/test_dirops.py", "tests/test_rename.py",
                "tests/test_copyup.py", "tests/test_readdir.py", "tests/test_xattr.py",
                "tests/test_interop.py", "tests/test_whiteout_formats.py",
                "tests/test_rootless_userns.py", "tests/test_caching.py",
                "tests/test_setid.py", "tests/test_fallocate.py", "tests/test_acl.py",
                "tests/test_posix_misc.py", "tests/test_remount.py", "tests/test_features.py",
                "tests/test_inode_numbers.py", "tests/test_index.py", "tests/test_oci_layer.py",
                "tests/test_oci_image.py", "tests/test_api.py", "tests/test_direct_io.py",
                "tests/test_kernel_cache.py", "tests/test_writeback.py"]
USERNS_SUITE_TIMEOUT = 600.0


def _root_problem() -> str | None:
    if USERNS or (os.geteuid() == 0 and in_user_namespace()):
        return "runs from the initial user namespace only (it makes users and namespaces)"
    return environment_problem()


pytestmark = pytest.mark.skipif(bool(_root_problem()), reason=_root_problem() or "")


# --------------------------------------------------------------------------------------------------
# The differential suite in a user namespace
# --------------------------------------------------------------------------------------------------


def _summary_counts(out: str) -> dict[str, int]:
    lines = [ln for ln in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


@pytest.mark.timeout(USERNS_SUITE_TIMEOUT + 60)
def test_differential_suite_in_userns(tmp_path: Path) -> None:
    """USERNS_SUITE as root of a user namespace; the nested run's own summary is the verdict."""
    cmd = [PYTHON, str(REPO / "tests/overlay_harness.py"), "userns", "--",
           PYTHON, "-m", "pytest", *USERNS_SUITE, "-q", "-p", "no:cacheprovider", "--maxfail=10",
           "-rfE", "--timeout=120", f"--basetemp={tmp_path / 'userns'}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=USERNS_SUITE_TIMEOUT)
    except subprocess.TimeoutExpired:
        # the launcher, its namespace init and the nested pytest share this process group; the
        # init's death takes every other process of the pid namespace (FUSE daemons) with it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=CMD_TIMEOUT)
        pytest.fail(f"userns suite still running after {USERNS_SUITE_TIMEOUT}s:\n{out[-6000:]}")
    counts = _summary_counts(out)
    tail = "\n".join(out.splitlines()[-60:])
    assert proc.returncode == 0, f"userns suite failed (exit {proc.returncode}):\n{tail}"
    assert counts.get("passed", 0) > 0, f"userns suite ran no test:\n{tail}"


# --------------------------------------------------------------------------------------------------
# The image, the workload and what it must leave
# --------------------------------------------------------------------------------------------------

IMAGE = StackSpec(
    upper={"etc/preexisting": File("u")},
    lowers=[
        {"etc/conf": File("conf=1\n", mode=0o640, mtime=1_500_000_000), "etc/drop": File("drop"),
         "usr/bin/tool": File("#!", mode=0o755), "usr/share/doc/a": File("a"),
         "old/tree/x": File("x"), "old/keep": File("k"), "sym": Symlink("etc/conf"),
         "rw/data": File("0123456789")},
        {"etc/conf": File("base"), "old/tree/y": File("y"), "old/deeper/z": File("z"),
         "base-only": File("base"), "usr/share/doc/c": File("c")},
    ],
    prefix=USER_PREFIX,
)


def build_user_stack(base: Path, uid: int, gid: int) -> StackPaths:
    """IMAGE under ``base``, every object (and the dirs holding the layers) owned by the user."""
    paths = build_stack(IMAGE, base)
    for dirpath, dirnames, filenames in os.walk(base):
        for n in [*dirnames, *filenames]:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            os.chown(p, uid, gid, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                os.chmod(p, stat.S_IMODE(st.st_mode))  # keep the mode; chown kept the times
    os.chown(base, uid, gid)
    return paths


def workload(m: Path) -> None:
    """What a rootless user does to an image: append, overwrite, create, delete, rm -rf a lower
    dir and make it again, rename, chmod, user.* xattr, new dir and symlink."""
    with open(m / "etc/conf", "a") as f:
        f.write("edited=2\n")
    with open(m / "rw/data", "r+b") as f:
        f.seek(3)
        f.write(b"XY")
    (m / "base-only").write_text("rewritten")
    (m / "etc/new").write_text("new file")
    os.unlink(m / "etc/drop")
    os.unlink(m / "usr/share/doc/c")
    shutil.rmtree(m / "old")
    os.makedirs(m / "old/tree")
    (m / "old/tree/fresh").write_text("fresh")
    os.rename(m / "usr/share/doc/a", m / "usr/share/doc/a-renamed")
    os.chmod(m / "usr/bin/tool", 0o700)
    os.setxattr(m / "etc/conf", "user.tag", b"v")
    os.mkdir(m / "newdir")
    os.symlink("../etc/new", m / "newdir/link")
    os.utime(m / "etc/new", ns=(1_600_000_000_000_000_000, 1_600_000_001_000_000_000))


def check_merged(snap: Snapshot, uid: int, gid: int) -> None:
    """The merged view after ``workload`` (whoever ran it)."""
    n = snap.nodes
    expected = {".", "base-only", "etc", "etc/conf", "etc/new", "etc/preexisting", "newdir",
                "newdir/link", "old", "old/tree", "old/tree/fresh", "rw", "rw/data", "sym", "usr",
                "usr/bin", "usr/bin/tool", "usr/share", "usr/share/doc", "usr/share/doc/a-renamed"}
    assert set(n) == expected, f"names: missing {expected - set(n)}, extra {set(n) - expected}"
    assert n["usr/bin/tool"].mode == 0o700
    assert dict(n["etc/conf"].xattrs) == {"user.tag": b"v"}
    assert n["etc/conf"].size == len("conf=1\nedited=2\n")
    assert n["rw/data"].size == 10
    assert all((node.uid, node.gid) == (uid, gid) for node in n.values()), "owners"
    assert not any(name.startswith(("trusted.", USER_PREFIX)) for node in n.values()
                   for name, _ in node.xattrs), "a private xattr shows in the merged view"


def check_upper(paths: StackPaths, uid: int) -> None:
    """The rootless on-disk format: 0/0 char-device whiteouts, user.overlay.opaque=y on the
    re-made dir, no trusted.* anywhere, WORK holding just an empty work/ the user can reuse."""
    upper, work = paths.upper, paths.work
    assert upper is not None and work is not None
    for rel in ("etc/drop", "usr/share/doc/c", "usr/share/doc/a"):
        st = os.lstat(upper / rel)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, f"{rel} is not a 0/0 whiteout"
    assert os.getxattr(upper / "old", USER_PREFIX + "opaque") == b"y"
    snap = snapshot_upper(upper, prefix=USER_PREFIX)
    assert snap.nodes["old"].opaque is True and snap.nodes["newdir"].opaque is False
    assert snap.nodes["old/tree"].opaque is False
    for tree in (upper, work):
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in [".", *dirnames, *filenames]:
                p = os.path.join(dirpath, name)
                trusted = [x for x in read_xattrs(p, ("trusted.",))]
                assert not trusted, f"{p} has {trusted}"
    assert sorted(os.listdir(work)) == ["work"], f"WORK holds {os.listdir(work)}"
    st = os.lstat(work / "work")
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == uid, "WORK/work is not the user's dir"
    with os.scandir(work / "work") as it:  # root may look into a mode-000 dir
        assert not list(it), "WORK/work not empty after unmount"


# --------------------------------------------------------------------------------------------------
# Plain unprivileged user
# --------------------------------------------------------------------------------------------------

FORMS = {"background": False, "foreground": True}


@pytest.mark.parametrize("form", list(FORMS))
def test_user_mount_workload_and_kernel_reads_it(fuse_user, user_mounts, tmp_path: Path,
                                                 form: str) -> None:
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    m = user_mounts(uid, gid, paths, FORMS[form])
    user_op(uid, gid, workload, m.root)
    ours = user_snapshot(uid, gid, m.root)
    check_merged(ours, uid, gid)
    assert user_op(uid, gid, lambda r: (r / "rw/data").read_bytes(), m.root) == b"012XY56789"
    assert user_op(uid, gid, lambda r: sorted(os.listdir(r / "old")), m.root) == ["tree"]
    # the counts answer the mounting user (and root), through the kernel's caches too
    r = run_user(uid, gid, [PYTHON, "-m", "unionfs", "stats", "--json", str(m.root)])
    assert r.returncode == 0 and json.loads(r.stdout)["requests"] > 0, r.stderr
    m.stop()
    out = m.output()
    assert not re.search(r"Traceback| (ERROR|CRITICAL) ", out), f"pyunionfs said:\n{out}"
    check_upper(paths, uid)

    again = user_mounts(uid, gid, paths, FORMS[form])  # the user can remount its own WORK
    assert user_snapshot(uid, gid, again.root) == ours
    again.stop()

    with kernel_mount(paths, paths.work) as k:  # WORK as pyunionfs left it
        theirs = user_snapshot(uid, gid, k.root)
    assert ours == theirs, "kernel (userxattr) reads the rootless upper differently:\n" + (
        ours.diff(theirs, ("pyunionfs", "kernel")))


def _listing_and_late_opens(m: Path) -> dict[str, Any]:
    """A listing past READDIRPLUS's first batch (plain READDIR entries, no node each) and
    opens that arrive after the file's last name went (an O_PATH fd holds it meanwhile)."""
    out: dict[str, Any] = {}
    with os.scandir(m / "big") as it:
        entries = [(e.name, e.inode()) for e in it]
    out["listed"] = len(entries)
    out["d_ino_wrong"] = [n for n, ino in entries if os.lstat(m / "big" / n).st_ino != ino]
    (m / "up").write_bytes(b"upper data")
    for name in ("up", "big/f0000"):
        held = os.open(m / name, os.O_PATH)
        try:
            os.unlink(m / name)
            for flags in (os.O_RDONLY, os.O_RDWR):
                try:
                    fd = os.open(f"/proc/self/fd/{held}", flags)
                    try:
                        out[f"{name} {flags}"] = os.pread(fd, 100, 0)
                    finally:
                        os.close(fd)
                except OSError as e:
                    out[f"{name} {flags}"] = errno.errorcode[e.errno]
        finally:
            os.close(held)
    return out


def test_user_mount_lists_and_opens_like_root(fuse_user, user_mounts, tmp_path: Path) -> None:
    """As an unprivileged user: a 700-entry lower directory lists with each d_ino its st_ino,
    and an open on its way when a file's last name went opens it (upper: read and write;
    lower: read, and EEXIST for writing), as test_posix_misc and test_readdir show the
    kernel doing (the root and user-namespace suites compare those with it)."""
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    big = paths.lowers[-1] / "big"
    big.mkdir()
    for i in range(700):
        (big / f"f{i:04}").write_text("lower data")
    for p in (big, *big.iterdir()):
        os.chown(p, uid, gid)
    m = user_mounts(uid, gid, paths, False)
    got = user_op(uid, gid, _listing_and_late_opens, m.root)
    assert got == {"listed": 700, "d_ino_wrong": [],
                   f"up {os.O_RDONLY}": b"upper data", f"up {os.O_RDWR}": b"upper data",
                   f"big/f0000 {os.O_RDONLY}": b"lower data", f"big/f0000 {os.O_RDWR}": "EEXIST"}
    m.stop()


def _writes_through_the_cache(root: Path) -> dict[str, Any]:
    """Small appends, and a partial page written through a write-only handle of a file whose
    mode (0200) the daemon, as the same user without CAP_DAC_OVERRIDE, can't read either."""
    with open(root / "log", "ab", buffering=0) as f:
        for i in range(500):
            f.write(b"entry %03d\n" % i)
    wo = root / "wo"
    with open(wo, "wb") as f:
        f.write(b"a" * 5000)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the kernel must read
    os.chmod(wo, 0o200)
    fd = os.open(wo, os.O_WRONLY)
    try:
        os.pwrite(fd, b"B", 4100)
        err = "ok"
    except OSError as e:
        err = errno.errorcode[e.errno]
    finally:
        os.close(fd)
    return {"log": (root / "log").stat().st_size, "wo": err}


def test_user_mount_with_writeback(fuse_user, user_mounts, tmp_path: Path) -> None:
    """-o writeback as an unprivileged user: what was written reaches the upper.  A partial
    page written through a write-only handle of a mode-0200 file, which the kernel must read
    around and the daemon (the same user, without CAP_DAC_OVERRIDE) can't read, fails with
    EACCES and changes nothing (docs/differences.md); a local file system would write it."""
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    m = user_mounts(uid, gid, paths, False, options="writeback")
    got = user_op(uid, gid, _writes_through_the_cache, m.root)
    m.stop()
    assert paths.upper is not None
    assert got["log"] == 5000 and (paths.upper / "log").stat().st_size == 5000
    assert (paths.upper / "log").read_bytes().endswith(b"entry 499\n")
    data = (paths.upper / "wo").read_bytes()
    assert got["wo"] == "EACCES" and data == b"a" * 5000, got


def _changes_after_the_last_name_went(m: Path) -> dict[str, Any]:
    """chmod and truncate through /proc/self/fd of an O_PATH descriptor held across the unlink
    of the file's last name: an upper file takes them, a lower one says EEXIST (no name left
    to copy it up to), as test_posix_misc shows the kernel doing."""
    (m / "up2").write_bytes(b"upper data")
    out: dict[str, Any] = {}
    for name in ("up2", "etc/drop"):
        held = os.open(m / name, os.O_PATH)
        link = f"/proc/self/fd/{held}"
        try:
            os.unlink(m / name)
            for what, change in (("chmod", lambda p=link: os.chmod(p, 0o600)),
                                 ("truncate", lambda p=link: os.truncate(p, 3))):
                try:
                    change()
                    out[f"{name} {what}"] = "ok"
                except OSError as e:
                    out[f"{name} {what}"] = errno.errorcode[e.errno]
            st = os.stat(link)
            out[name] = (stat.S_IMODE(st.st_mode), st.st_size)
        finally:
            os.close(held)
    return out


def test_user_mount_changes_a_file_after_its_last_name_went(fuse_user, user_mounts,
                                                            tmp_path: Path) -> None:
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    m = user_mounts(uid, gid, paths, False)
    got = user_op(uid, gid, _changes_after_the_last_name_went, m.root)
    m.stop()
    assert got == {"up2 chmod": "ok", "up2 truncate": "ok", "up2": (0o600, 3),
                   "etc/drop chmod": "EEXIST", "etc/drop truncate": "EEXIST",
                   "etc/drop": (0o644, 4)}, got


def _kernel_in_user_namespace(uid: int, gid: int, paths: StackPaths) -> None:
    """Kernel overlayfs mounted by the test user in its own user namespace (``unshare -Urm``, the
    userxattr dialect is then required), with ``workload`` run on it there."""
    opts = (f"lowerdir={':'.join(map(str, paths.lowers))},upperdir={paths.upper},"
            f"workdir={paths.work},userxattr")
    script = ('mount -t overlay overlay -o "$1" "$2" || exit 99; '
              f'{PYTHON} {REPO / "tests/test_rootless.py"} workload "$2"; rc=$?; '
              'umount "$2" || exit 98; exit $rc')
    r = run_user(uid, gid, ["unshare", "--user", "--map-root-user", "--mount", "--",
                            "sh", "-c", script, "sh", opts, str(paths.merged)],
                 timeout=MOUNT_TIMEOUT + CMD_TIMEOUT)
    assert r.returncode == 0, f"kernel overlay in {TEST_USER}'s userns: exit {r.returncode}\n" \
                              f"{r.stdout}{r.stderr}"


def test_kernel_userns_upper_read_by_user_pyunionfs(fuse_user, user_mounts,
                                                    tmp_path: Path) -> None:
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    _kernel_in_user_namespace(uid, gid, paths)
    fresh = tmp_path / "stack/work-k"
    fresh.mkdir()
    with kernel_mount(paths, fresh) as k:
        theirs = user_snapshot(uid, gid, k.root)
    check_merged(theirs, uid, gid)
    m = user_mounts(uid, gid, paths, False)  # reusing the WORK the kernel (in the userns) left
    ours = user_snapshot(uid, gid, m.root)
    m.stop()
    assert not re.search(r"Traceback| (ERROR|CRITICAL) ", m.output()), m.output()
    assert theirs == ours, "rootless pyunionfs reads the kernel's userxattr upper differently:\n" + (
        theirs.diff(ours, ("kernel", "pyunionfs")))


def test_user_upper_same_as_kernel_userns_upper(fuse_user, user_mounts, tmp_path: Path) -> None:
    """The same workload leaves the same (normalised) upper, whether rootless pyunionfs or the
    kernel in the user's user namespace ran it."""
    uid, gid = fuse_user
    k_paths = build_user_stack(tmp_path / "kernel", uid, gid)
    o_paths = build_user_stack(tmp_path / "ours", uid, gid)
    _kernel_in_user_namespace(uid, gid, k_paths)
    m = user_mounts(uid, gid, o_paths, False)
    user_op(uid, gid, workload, m.root)
    m.stop()
    assert k_paths.upper is not None and o_paths.upper is not None
    a = snapshot_upper(k_paths.upper, prefix=USER_PREFIX)
    b = snapshot_upper(o_paths.upper, prefix=USER_PREFIX)
    assert a == b, "upper dirs differ:\n" + a.diff(b, ("kernel(userns)", "pyunionfs(user)"))


# -- failure paths ---------------------------------------------------------------------------------


def _foreign_work(paths: StackPaths) -> None:
    os.chown(paths.work, 0, 0)  # root's WORK, 0755: the user can't make WORK/work


def _missing_lower(paths: StackPaths) -> None:
    shutil.rmtree(paths.lowers[1])


def _foreign_nonempty_work(paths: StackPaths) -> None:
    # a root mount's leftovers: WORK/work (mode 000, root's) with something inside
    assert paths.work is not None
    os.mkdir(paths.work / "work")
    os.mkdir(paths.work / "work/#stale")
    (paths.work / "work/#stale/f").write_text("x")
    os.chmod(paths.work / "work", 0)


FAILURES: dict[str, Callable[[StackPaths], None]] = {
    "unwritable-work": _foreign_work, "missing-lower": _missing_lower,
    "foreign-nonempty-work": _foreign_nonempty_work,
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("case", list(FAILURES))
def test_user_mount_failure_is_one_line(fuse_user, tmp_path: Path, case: str, form: str) -> None:
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    FAILURES[case](paths)
    assert paths.work is not None
    work_before = sorted(os.listdir(paths.work))
    lowers = ":".join(str(p) for p in paths.lowers)
    args = [PYTHON, "-m", "unionfs", "mount", *(["-f"] if FORMS[form] else []), lowers,
            str(paths.upper), str(paths.work), str(paths.merged)]
    proc = subprocess.Popen(as_user(uid, gid, args), cwd=str(REPO), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=MOUNT_TIMEOUT + 15)
    except subprocess.TimeoutExpired:  # -f that mounted after all: it runs until unmounted
        err = "(still running)"
    finally:
        if is_mounted(paths.merged):
            with contextlib.suppress(subprocess.TimeoutExpired):
                run_user(uid, gid, ["fusermount3", "-u", str(paths.merged)], UMOUNT_TIMEOUT)
            force_unmount(str(paths.merged))
        try:
            proc.wait(timeout=UMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=CMD_TIMEOUT)
        if not wait_until(lambda: not unionfs_pids(paths.merged), UMOUNT_TIMEOUT):
            for pid in unionfs_pids(paths.merged):  # a daemon of this test's own mount point
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0 and err != "(still running)", f"mount succeeded: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyunionfs: error: "), (
        f"expected one 'pyunionfs: error: ...' line, got:\n{err}")
    assert sorted(os.listdir(paths.work)) == work_before, (
        f"WORK changed by the failed mount: {work_before} -> {sorted(os.listdir(paths.work))}")
    if case == "foreign-nonempty-work":
        assert stat.S_IMODE(os.lstat(paths.work / "work").st_mode) == 0
        assert (paths.work / "work/#stale/f").read_text() == "x", "root's leftovers were touched"


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "workload":
        workload(Path(argv[1]))
        return 0
    print("usage: test_rootless.py workload MERGED", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))



def _read_only_dirs(m: Path) -> None:
    with open(m / "ro/f", "a") as f:  # copy-up into a parent the user can't write
        f.write("more")
    os.unlink(m / "etc/drop")
    os.mkdir(m / "etc/drop", 0o555)  # over a whiteout: opaque mark on a 0555 dir
    os.mkdir(m / "etc/ro-new", 0o555)
    os.rename(m / "etc/ro-new", m / "etc/ro-moved")  # into a merged parent: opaque too


def test_user_read_only_directories(fuse_user, user_mounts, tmp_path: Path) -> None:
    """What the kernel does with its own privileges, an ordinary user's daemon must manage on
    directories it owns but may not write (fuse-overlayfs #414, #349)."""
    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    ro = paths.lowers[0] / "ro"
    ro.mkdir()
    (ro / "f").write_text("data")
    os.chown(ro / "f", uid, gid)
    os.chown(ro, uid, gid)
    os.chmod(ro, 0o555)
    m = user_mounts(uid, gid, paths, FORMS["background"])
    user_op(uid, gid, _read_only_dirs, m.root)
    ours = user_snapshot(uid, gid, m.root)
    assert user_op(uid, gid, lambda r: (r / "ro/f").read_text(), m.root) == "datamore"
    m.stop()
    out = m.output()
    assert not re.search(r"Traceback| (ERROR|CRITICAL) ", out), f"pyunionfs said:\n{out}"
    assert paths.upper is not None
    for d in ("ro", "etc/drop", "etc/ro-moved"):
        assert stat.S_IMODE(os.lstat(paths.upper / d).st_mode) == 0o555, d
    for d in ("etc/drop", "etc/ro-moved"):
        assert os.getxattr(paths.upper / d, "user.overlay.opaque") == b"y", d
    with kernel_mount(paths, paths.work) as k:
        theirs = user_snapshot(uid, gid, k.root)
    assert ours == theirs, ours.diff(theirs, ("pyunionfs", "kernel"))


ACL_SCRIPT = ("touch acl/new && mkdir acl/newdir && mknod acl/fifo p\n"
              "setfacl -m u::rwx,g::rwx,o::rwx acl/f\n"
              "chmod 0640 acl/new && setfacl -m u:0:r-x acl/new\n")


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl missing: install Debian's "
                                                            "'acl' package (make deps does)")
def test_user_mount_acls_like_kernel(fuse_user, user_mounts, tmp_path: Path) -> None:
    """An ordinary user's daemon inherits default ACLs (the umask yields to them) and keeps
    mode and ACL in step, as kernel overlayfs does for the same user on a copy of the stack."""
    from test_acl import _facl, _sh

    uid, gid = fuse_user
    names = ("acl/new", "acl/newdir", "acl/fifo", "acl/f")

    def op(root: Path) -> str:
        return _sh(root, ACL_SCRIPT + _facl(*names))

    stacks = {}
    for side in ("kernel", "ours"):
        paths = stacks[side] = build_user_stack(tmp_path / side, uid, gid)
        d = paths.lowers[0] / "acl"
        d.mkdir()
        (d / "f").write_text("x")
        for p in (d, d / "f"):
            os.chown(p, uid, gid)
        subprocess.run(["setfacl", "-m", "d:u::rwx,d:g::r-x,d:o::---,d:u:0:rwx", str(d)],
                       check=True)
    with kernel_mount(stacks["kernel"], stacks["kernel"].work) as k:
        theirs = run_as(uid, gid, op, k.root, umask=0o077)
    m = user_mounts(uid, gid, stacks["ours"], False)
    ours = run_as(uid, gid, op, m.root, umask=0o077)
    m.stop()
    assert theirs[0] == "ok" and "rc=" not in theirs[1], f"test premise: kernel gave {theirs}"
    assert ours == theirs


def test_user_mount_atime_handles_remount(fuse_user, user_mounts, tmp_path: Path) -> None:
    """An ordinary user's daemon: ``noatime`` holds for its own upper files, file handles are
    given, and a remount is refused in one line (fusermount3 can't remount; the kernel would
    need CAP_SYS_ADMIN)."""
    from test_posix_misc import OLD, name_to_handle

    uid, gid = fuse_user
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    assert paths.upper is not None
    up = paths.upper / "mine"
    up.write_text("data")
    os.chown(up, uid, gid)
    os.utime(up, (OLD, OLD + 10))
    m = user_mounts(uid, gid, paths, FORMS["background"], options="noatime")

    def reads(root: Path) -> tuple[bool, bool, str]:
        before = os.stat(root / "mine").st_atime_ns
        (root / "mine").read_bytes()
        name_to_handle(root / "mine")  # raises if refused
        r = subprocess.run([PYTHON, "-m", "unionfs", "mount", "-o", "remount,ro", str(root)],
                           capture_output=True, text=True, timeout=CMD_TIMEOUT, cwd=str(REPO))
        return os.stat(root / "mine").st_atime_ns == before, r.returncode == 1, r.stderr

    same_atime, refused, err = user_op(uid, gid, reads, m.root)
    m.stop()
    assert same_atime, "noatime: a read by the user's own mount moved the atime"
    assert refused and err.count("\n") == 1 and "only root" in err, err
    assert os.stat(up).st_atime == OLD


# --------------------------------------------------------------------------------------------------
# The Python API and the pytest plugin, as an ordinary user writes them
# --------------------------------------------------------------------------------------------------

USER_API_TEST = '''
from pathlib import Path
from unionfs import Overlay

def test_readme_example(tmp_path):
    app, base = tmp_path / "app", tmp_path / "base"
    (base / "etc").mkdir(parents=True)
    (base / "etc/issue").write_text("base")
    app.mkdir()
    u, w, m = (tmp_path / n for n in ("u", "w", "m"))
    for d in (u, w, m):
        d.mkdir()
    with Overlay(lowers=[app, base], upper=u, work=w, mountpoint=m,
                 options={"userxattr": True}) as ov:
        (m / "etc/motd").write_text("hi")
        assert ov.changes() == [("C", "/etc"), ("A", "/etc/motd")]

def test_fixture(overlay):
    (overlay.mountpoint / "f").write_text("x")
    assert overlay.changes() == [("A", "/f")]
'''


def test_user_runs_pytest_with_the_api_and_plugin(fuse_user, tmp_path: Path) -> None:
    # the issue's "Done when": an unprivileged user writes the README example in a test of
    # their own and runs it with pytest (the plugin found by its entry point)
    uid, gid = fuse_user
    work = tmp_path / "userproj"
    work.mkdir()
    (work / "test_mine.py").write_text(USER_API_TEST)
    make_traversable(work)
    os.chown(work, uid, gid)
    os.chown(work / "test_mine.py", uid, gid)
    # from the project's own directory, as its author runs it (a rootdir found elsewhere
    # would make pytest list directories of root's)
    r = subprocess.run(as_user(uid, gid, [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                          f"--rootdir={work}", f"--basetemp={work / 'tmp'}",
                                          "test_mine.py"]),
                       capture_output=True, text=True, timeout=180, cwd=str(work),
                       stdin=subprocess.DEVNULL, check=False)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_user_mounts_come_from_the_users_warm_server(fuse_user, tmp_path: Path) -> None:
    """As an unprivileged user the first mount starts cold and leaves the user's own server
    (its socket in a 0700 directory of the user's); the next mount is forked by it, as the
    user, with the user's mount in the mount table, and unmounts as quickly."""
    uid, gid = fuse_user
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    os.chown(run, uid, gid)
    env = [f"PYUNIONFS_SERVER_DIR={run}", "PYUNIONFS_SERVER_IDLE=20"]
    paths = build_user_stack(tmp_path / "stack", uid, gid)
    log = paths.base / "warm.log"
    lowers = ":".join(str(p) for p in paths.lowers)
    mount = [*env, PYTHON, "-m", "unionfs", "mount", "-d", "--log", str(log), lowers,
             str(paths.upper), str(paths.work), str(paths.merged)]
    umount = [*env, PYTHON, "-m", "unionfs", "umount", str(paths.merged)]
    starts = []
    try:
        for _ in range(2):
            r = run_user(uid, gid, mount, timeout=MOUNT_TIMEOUT + 15)
            assert r.returncode == 0, r.stderr + log.read_text()
            row = [r for r in mount_table() if r[0] == os.path.realpath(paths.merged)][-1]
            assert f"user_id={uid}" in row[3].split(","), row
            starts.append([ln for ln in log.read_text().splitlines() if "start-up: " in ln][-1])
            r = run_user(uid, gid, umount)
            assert r.returncode == 0, r.stderr
            if len(starts) == 1:  # the server the cold start left
                assert wait_until(lambda: any(run.glob("s-*")), 30), "no server came up"
                time.sleep(0.5)
    finally:
        force_unmount(str(paths.merged))
        socks = list(run.glob("s-*"))
        for sock in socks:  # the user's server, which this test started
            with contextlib.suppress(OSError), \
                    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(sock))
                pid = int.from_bytes(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  12)[:4], sys.byteorder)
                owner = os.stat(f"/proc/{pid}").st_uid
                os.kill(pid, signal.SIGKILL)
                assert owner == uid, f"the server runs as {owner}"
    assert "start-up: command " in starts[0] and "start-up: request " in starts[1], starts
    assert [s.lstat().st_uid for s in socks] == [uid]
