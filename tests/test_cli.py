"""The command-line contract the fixtures (and users) rely on: background mount returns once
mounted, clean failures, umount, SIGTERM, `\\:` escapes, mount type and options."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    IMPL,
    PYTHON,
    REPO,
    UMOUNT_TIMEOUT,
    File,
    PyUnionMount,
    force_unmount,
    is_mounted,
    mount_table,
    run_as,
    unionfs_pids,
    wait_until,
)

pytestmark = pytest.mark.skipif(IMPL == "kernel", reason="tests pyunionfs's own command line")


def _cli(*args: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([PYTHON, "-m", "unionfs", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL)




@contextlib.contextmanager
def _background_cleanup(merged: Path) -> Iterator[None]:
    """Whatever a background-mount test does, leave no mount and no daemon behind."""
    try:
        yield
    finally:
        if is_mounted(merged):
            with contextlib.suppress(Exception):
                subprocess.run(["fusermount3", "-u", str(merged)], timeout=UMOUNT_TIMEOUT,
                               capture_output=True)
            force_unmount(str(merged))
        if not wait_until(lambda: not unionfs_pids(merged), UMOUNT_TIMEOUT):
            for pid in unionfs_pids(merged):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _dirs(make_stack):
    return make_stack(lowers=[{"f": File("from lower")}, {"g": File("bottom")}])


def test_background_mount_is_live_on_return(make_stack):
    paths = _dirs(make_stack)
    with _background_cleanup(paths.merged):
        r = _cli("mount", f"{paths.lowers[0]}:{paths.lowers[1]}", str(paths.upper),
                 str(paths.work), str(paths.merged))
        assert r.returncode == 0, r.stderr
        assert is_mounted(paths.merged), "mount command returned before the mount was live"
        assert (paths.merged / "f").read_text() == "from lower"
        row = next(row for row in mount_table() if row[0] == str(paths.merged))
        assert row[1] == "fuse.pyunionfs"
        assert "allow_other" in row[3].split(",") and "default_permissions" in row[3].split(",")
        r = _cli("umount", str(paths.merged))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(paths.merged)
        assert wait_until(lambda: not unionfs_pids(paths.merged), UMOUNT_TIMEOUT), \
            "daemon still running after umount"


def test_background_readonly_mount(make_stack):
    paths = _dirs(make_stack)
    with _background_cleanup(paths.merged):
        r = _cli("mount", f"{paths.lowers[0]}:{paths.lowers[1]}", str(paths.merged))
        assert r.returncode == 0, r.stderr
        assert sorted(os.listdir(paths.merged)) == ["f", "g"]
        with pytest.raises(OSError) as ei:
            (paths.merged / "new").write_text("x")
        assert ei.value.errno == 30  # EROFS
        assert _cli("umount", str(paths.merged)).returncode == 0


VALIDATION_CASES = ["missing-lower", "missing-upper", "lower-is-file", "work-inside-upper",
                    "work-equals-upper", "lower-inside-upper", "same-lower-twice",
                    "lower-equals-upper", "readonly-single-lower", "work-on-other-fs",
                    "upper-inside-lower"]


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_mount_validation_like_kernel(make_stack, tmpfs, case):
    """Mount checks (overlay-semantics §1.5): refuse what the kernel refuses, and say so in one
    line starting 'pyunionfs: '.  One deliberate difference: an upper inside a lower, which the
    kernel takes and then answers ELOOP inside, is refused too (docs/differences.md)."""
    paths = _dirs(make_stack)
    lo, up, wk = [str(p) for p in paths.lowers], str(paths.upper), str(paths.work)
    if case == "missing-lower":
        lo[0] = f"{paths.base}/nope"
    elif case == "missing-upper":
        up = f"{paths.base}/nope"
    elif case == "lower-is-file":
        lo[0] = str(paths.lowers[0] / "f")
    elif case == "work-inside-upper":
        wk = f"{up}/w"
        os.mkdir(wk)
    elif case == "work-equals-upper":
        wk = up
    elif case == "lower-inside-upper":
        lo[0] = f"{up}/sub"
        os.mkdir(lo[0])
    elif case == "same-lower-twice":
        lo[1] = lo[0]
    elif case == "lower-equals-upper":
        lo[0] = up
    elif case == "readonly-single-lower":
        lo, up, wk = lo[:1], "", ""
    elif case == "work-on-other-fs":
        wk = str(tmpfs())
    elif case == "upper-inside-lower":
        up = str(paths.lowers[1] / "up")
        os.mkdir(up)
    layer_args = [":".join(lo)] + ([up, wk] if up else [])

    opts = f"lowerdir={':'.join(lo)}" + (f",upperdir={up},workdir={wk}" if up else "")
    kmerged = paths.base / "kmerged"
    kmerged.mkdir()
    r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(kmerged)],
                       capture_output=True, text=True, timeout=CMD_TIMEOUT)
    kernel_ok = r.returncode == 0
    if kernel_ok:
        subprocess.run(["umount", str(kmerged)], timeout=UMOUNT_TIMEOUT, check=True)
    assert kernel_ok == (case == "upper-inside-lower"), f"test premise: kernel mount -> {r}"

    with _background_cleanup(paths.merged):
        r = _cli("mount", *layer_args, str(paths.merged))
        ours_ok = r.returncode == 0
        if ours_ok:
            assert is_mounted(paths.merged)
            assert _cli("umount", str(paths.merged)).returncode == 0
        else:
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("pyunionfs: "), r.stderr
            assert not is_mounted(paths.merged)
        if case == "upper-inside-lower":
            assert not ours_ok and "is inside lower directory" in r.stderr, r.stderr
        else:
            assert ours_ok == kernel_ok, f"kernel mount ok={kernel_ok}, pyunionfs ok={ours_ok}: {r.stderr}"


def test_mount_usage_error_is_one_line(make_stack):
    paths = _dirs(make_stack)
    with _background_cleanup(paths.merged):
        r = _cli("mount", str(paths.merged))
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyunionfs: "), r.stderr


def test_sigterm_unmounts_foreground_daemon(make_stack, _registry):
    paths = _dirs(make_stack)
    m = PyUnionMount(paths, server=False)  # a child: its exit status is checked
    _registry.items.append(m)
    assert (paths.merged / "g").read_text() == "bottom"
    m.proc.send_signal(signal.SIGTERM)
    rc = m.proc.wait(timeout=UMOUNT_TIMEOUT)
    assert rc == 0, m.log_tail()
    assert not is_mounted(paths.merged)


def test_colon_escape_in_lower_path(make_stack, mounter):
    paths = _dirs(make_stack)
    odd = paths.base / "with:colon"
    odd.mkdir()
    (odd / "c").write_text("colon layer")
    paths.lowers.insert(0, odd)  # the harness escapes ':' as '\\:'
    mounter(paths)
    assert sorted(os.listdir(paths.merged)) == ["c", "f", "g"]
    assert (paths.merged / "c").read_text() == "colon layer"


def test_mount_is_visible_to_other_users(make_stack, mounter):
    # allow_other + default_permissions: an unprivileged uid sees the mount, with ordinary
    # permission checks
    paths = make_stack(lowers=[{"pub": File("public", mode=0o644), "priv": File("x", mode=0o600)}])
    m = mounter(paths)
    assert run_as(1000, 1000, lambda r: (r / "pub").read_text(), m.root) == ("ok", "public")
    assert run_as(1000, 1000, lambda r: (r / "priv").read_text(), m.root) == ("err", "EACCES")


def test_killed_daemon_leaves_a_stale_mount_we_name_and_remove(make_stack):
    # kill -9: the mount is dead (ENOTCONN).  Mounting again says so in one line; umount clears it.
    paths = _dirs(make_stack)
    lowers = f"{paths.lowers[0]}:{paths.lowers[1]}"
    with _background_cleanup(paths.merged):
        assert _cli("mount", lowers, str(paths.upper), str(paths.work),
                    str(paths.merged)).returncode == 0
        for pid in unionfs_pids(paths.merged):
            os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not unionfs_pids(paths.merged), UMOUNT_TIMEOUT)
        r = _cli("mount", lowers, str(paths.upper), str(paths.work), str(paths.merged))
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1 and "stale" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        r = _cli("umount", str(paths.merged))
        assert r.returncode == 0, r.stderr
        assert not is_mounted(paths.merged)


def test_mount_helper_form_with_o_options(make_stack):
    # what mount(8) runs through mount.fuse3: "pyunionfs SOURCE MOUNTPOINT -o OPTS", generic
    # options accepted silently, SOURCE naming the mount in /proc/mounts
    paths = _dirs(make_stack)
    opts = (f"rw,lowerdir={paths.lowers[0]}:{paths.lowers[1]},upperdir={paths.upper},"
            f"workdir={paths.work},dev,suid,noatime")
    with _background_cleanup(paths.merged):
        r = _cli("myimage", str(paths.merged), "-o", opts)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        row = next(row for row in mount_table() if row[0] == str(paths.merged))
        assert row[1] == "fuse.pyunionfs"
        (paths.merged / "new").write_text("x")
        assert (paths.upper / "new").read_text() == "x"
        assert _cli("umount", str(paths.merged)).returncode == 0
