"""Faults below us (issue 25, item 4): what the filesystem under UPPER and WORK fails, and
what a power cut takes, must reach the caller as that errno and leave no torn file, no half
copy-up and no dead daemon.

* faultfs (tests/faultfs.py), a FUSE passthrough mounted where UPPER and WORK live, fails
  chosen calls with EIO, ENOSPC or EDQUOT, and drops file data that was never fsynced;
* a small ext4 on a loop device gives a real ENOSPC (blocks and inodes), compared with the
  kernel's overlayfs on a same-size one; btrfs qgroups a real EDQUOT (when mkfs.btrfs is
  installed);
* RLIMIT_NOFILE of the daemon lowered with prlimit gives EMFILE, until fds come back.

Each test adds its figures to one summary line (stdout with ``-s``, and
PYUNIONFS_STRESS_REPORT).  tests/stress/test_stress_faults.py runs the random, longer forms.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from faultfs import FaultFS
from overlay_harness import (
    IMPL,
    PYTHON,
    REPO,
    USERNS,
    Dir,
    File,
    Mount,
    PyUnionMount,
    StackPaths,
    force_unmount,
    make_traversable,
    mount_stack,
    run_cmd,
)

pytestmark = [
    pytest.mark.skipif(IMPL == "kernel", reason="faults pyunionfs's upper: the kernel side is "
                       "compared inside the tests where the fault can be made for it"),
    pytest.mark.skipif(USERNS, reason="mounts FUSE and loop filesystems from the initial "
                       "namespace; the rootless case runs as a plain user below"),
]

FIGURES: dict[str, str] = {}


def report(line: str) -> None:
    print(line, flush=True)
    dest = os.environ.get("PYUNIONFS_STRESS_REPORT")
    if dest:
        with open(dest, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    if FIGURES:
        print()
        report("faults: " + "; ".join(FIGURES.values()))


def blob(n: int, seed: int) -> bytes:
    import random
    return random.Random(seed).randbytes(n)


# --------------------------------------------------------------------------------------------------
# A stack whose UPPER and WORK are on faultfs
# --------------------------------------------------------------------------------------------------


@dataclass
class Faulty:
    ffs: FaultFS
    mount: Mount
    paths: StackPaths  # upper/work: through faultfs
    backing: Path  # faultfs's backing dir: backing/upper, backing/work

    @property
    def m(self) -> Path:
        return self.paths.merged

    def leftovers(self) -> list[str]:
        """Half-built objects: anything in WORK/work but the shared whiteout that new
        whiteouts are linked from (the kernel's too), any ``#`` temp name in UPPER."""
        out = [f"work/work/{n}" for n in os.listdir(self.backing / "work" / "work")
               if n != "#whiteout"]
        for d, dirs, files in os.walk(self.backing / "upper"):
            out += [os.path.join(d, n) for n in dirs + files if n.startswith("#")]
        return out

    def serving(self) -> None:
        """The daemon still answers, and can still change UPPER."""
        probe = self.m / f".alive{time.monotonic_ns()}"
        probe.write_bytes(b"ok")
        assert probe.read_bytes() == b"ok"
        probe.unlink()


def on_faultfs(paths: StackPaths, track: bool = False,
               wrap: Callable[[list[str]], list[str]] | None = None,
               owner: tuple[int, int] | None = None) -> tuple[FaultFS, StackPaths, Path]:
    """Move ``paths``' upper and work into a backing dir and put faultfs over it (run by
    ``wrap``; ``owner``: who gets the new directories)."""
    assert paths.upper is not None and paths.work is not None
    backing = paths.base / "backing"
    backing.mkdir()
    os.rename(paths.upper, backing / "upper")
    os.rename(paths.work, backing / "work")
    mnt = paths.base / "ffs"
    mnt.mkdir()
    make_traversable(mnt)
    if owner is not None:
        for p in (backing, mnt):
            os.chown(p, *owner)
    ffs = FaultFS(backing, mnt, track=track, wrap=wrap, python=PYTHON)
    return ffs, StackPaths(paths.base, paths.lowers, mnt / "upper", mnt / "work",
                           paths.merged), backing


@pytest.fixture
def faulty(make_stack: Callable[..., StackPaths], _registry: Any
           ) -> Iterator[Callable[..., Faulty]]:
    """``faulty(lowers, upper=None, options="", track=False) -> Faulty``.  The overlay is
    unmounted before faultfs (it holds a clone of faultfs's mount)."""
    made: list[tuple[FaultFS, Mount | None]] = []

    def factory(lowers: list[Any], upper: Any = None, options: str = "",
                track: bool = False) -> Faulty:
        ffs, paths, backing = on_faultfs(make_stack(lowers, upper=upper if upper else {}),
                                         track)
        made.append((ffs, None))
        m = PyUnionMount(paths, options=options)
        _registry.items.append(m)  # the watchdog's, should a request hang
        made[-1] = (ffs, m)
        return Faulty(ffs, m, paths, backing)

    try:
        yield factory
    finally:
        for ffs, m in reversed(made):
            try:
                if m is not None:
                    with contextlib.suppress(Exception):
                        m.stop()
            finally:
                ffs.stop()


def errname(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


# --------------------------------------------------------------------------------------------------
# A failing call under UPPER becomes the caller's errno
# --------------------------------------------------------------------------------------------------

UPPER_DATA = b"upper data\n" * 100


def _write(m: Path) -> None:
    with open(m / "u", "r+b") as f:
        f.write(b"x" * 65536)


def _fsync(m: Path) -> None:
    fd = os.open(m / "u", os.O_WRONLY)
    try:
        os.pwrite(fd, UPPER_DATA[:1], 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fdatasync(m: Path) -> None:
    fd = os.open(m / "u", os.O_WRONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _fallocate(m: Path) -> None:
    fd = os.open(m / "u", os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, 1 << 20)
    finally:
        os.close(fd)


# (what, rule, action, check on the backing upper afterwards)
CASES: dict[str, tuple[dict[str, Any], Callable[[Path], object], Callable[[Path], bool]]] = {
    "write": ({"op": "write", "path": "upper/u", "errno": "ENOSPC"}, _write,
              lambda up: (up / "u").read_bytes() == UPPER_DATA),
    "fsync": ({"op": "fsync", "path": "upper/u", "errno": "EIO"}, _fsync,
              lambda up: (up / "u").exists()),
    "fdatasync": ({"op": "fsync", "path": "upper/u", "errno": "EDQUOT"}, _fdatasync,
                  lambda up: (up / "u").read_bytes() == UPPER_DATA),
    "fallocate": ({"op": "fallocate", "path": "upper/u", "errno": "ENOSPC"}, _fallocate,
                  lambda up: (up / "u").stat().st_size == len(UPPER_DATA)),
    "create": ({"op": "create", "path": "upper/new", "errno": "EDQUOT"},
               lambda m: (m / "new").write_bytes(b"n"), lambda up: not (up / "new").exists()),
    "mkdir": ({"op": "mkdir", "path": "*", "errno": "ENOSPC"},
              lambda m: (m / "newdir").mkdir(), lambda up: not (up / "newdir").exists()),
    "mkdir-over-whiteout": ({"op": "rename", "path": "upper/gone", "errno": "EDQUOT"},
                            lambda m: (m / "gone").mkdir(),
                            lambda up: stat.S_ISCHR((up / "gone").lstat().st_mode)),
    "symlink": ({"op": "symlink", "path": "*", "errno": "EDQUOT"},
                lambda m: (m / "sl").symlink_to("u"), lambda up: not (up / "sl").is_symlink()),
    "link": ({"op": "link", "path": "*", "errno": "ENOSPC"},
             lambda m: os.link(m / "u", m / "hl"), lambda up: not (up / "hl").exists()),
    "rename": ({"op": "rename", "path": "upper/u", "errno": "EIO"},
               lambda m: (m / "u").rename(m / "v"),
               lambda up: (up / "u").read_bytes() == UPPER_DATA and not (up / "v").exists()),
    "setxattr": ({"op": "setxattr", "path": "upper/u", "xattr": "user.*", "errno": "ENOSPC"},
                 lambda m: os.setxattr(m / "u", "user.k", b"v"),
                 lambda up: "user.k" not in os.listxattr(up / "u")),
    "chmod": ({"op": "setattr", "path": "upper/u", "errno": "EIO"},
              lambda m: os.chmod(m / "u", 0o600),
              lambda up: stat.S_IMODE((up / "u").stat().st_mode) == 0o644),
    "truncate": ({"op": "setattr", "path": "upper/u", "errno": "EDQUOT"},
                 lambda m: os.truncate(m / "u", 1 << 20),
                 lambda up: (up / "u").read_bytes() == UPPER_DATA),
    "whiteout": ({"op": "*", "path": "*low", "errno": "EIO", "count": -1},
                 lambda m: (m / "low").unlink(), lambda up: not (up / "low").exists()),
    "unlink": ({"op": "unlink", "path": "upper/u", "errno": "EIO"},
               lambda m: (m / "u").unlink(), lambda up: (up / "u").read_bytes() == UPPER_DATA),
}


def test_failing_calls_below_reach_the_caller(faulty: Callable[..., Faulty]) -> None:
    """Each call the upper filesystem fails gives the caller that errno (never EIO for
    ENOSPC/EDQUOT, never a success), changes nothing it shouldn't, leaves nothing half
    built, and the daemon serves on; once the fault is gone the same call works."""
    f = faulty([{"low": File("lower"), "gone": File("g"), "ro": File("r")}],
               upper={"u": File(UPPER_DATA, mode=0o644)})
    os.unlink(f.m / "gone")  # a whiteout to mkdir over
    up = f.backing / "upper"
    got: dict[str, str] = {}
    for what, (rule, action, intact) in CASES.items():
        with f.ffs.failing(rule):
            got[what] = errname(lambda: action(f.m))  # noqa: B023 - called at once
            fired = f.ffs.stats()["rules"][0]["fired"]
        want = rule["errno"]
        assert got[what] == want, f"{what}: {got[what]}, want {want} (rule fired {fired}x)"
        assert intact(up), f"{what}: the upper changed although the call failed"
        assert not f.leftovers(), f"{what}: {f.leftovers()}"
        f.serving()
    # the same calls without faults go through
    for what in ("write", "fsync", "create", "mkdir", "rename", "setxattr"):
        assert errname(lambda: CASES[what][1](f.m)) == "ok", what  # noqa: B023
        if what == "rename":
            (f.m / "v").rename(f.m / "u")
    stats = f.ffs.stats()
    assert "internal error" not in f.mount.log_tail(400)
    FIGURES["calls"] = (f"{len(CASES)} failing calls gave their errno, upper intact "
                        f"({sum(stats['failed'].values())} faults injected)")


# --------------------------------------------------------------------------------------------------
# Copy-up whose work inside WORK fails
# --------------------------------------------------------------------------------------------------

BIG = blob(3 << 20, 1)  # above copyup.THREAD_COPY_MIN: the copy runs in a thread
SMALL = blob(70_000, 2)

COPY_UP_FAULTS: dict[str, dict[str, Any]] = {
    # first: a failed copy-up elsewhere may have marked the directory already
    "impure": {"op": "setxattr", "path": "upper/d", "xattr": "*.overlay.impure",
               "errno": "ENOSPC"},
    "write": {"op": "write", "path": "work/work/#*", "errno": "ENOSPC"},
    "write-midway": {"op": "write", "path": "work/work/#*", "errno": "EIO", "skip": 1,
                     "only": ["big"]},
    "write-edquot": {"op": "write", "path": "work/work/#*", "errno": "EDQUOT"},
    "truncate": {"op": "setattr", "path": "work/work/#*", "errno": "ENOSPC"},
    "fsync": {"op": "fsync", "path": "work/work/#*", "errno": "EIO"},
    "create": {"op": "create", "path": "work/work/#*", "errno": "EDQUOT"},
    "origin": {"op": "setxattr", "path": "work/work/#*", "xattr": "*.overlay.origin",
               "errno": "ENOSPC"},
    "chown": {"op": "setattr", "path": "work/work/#*", "errno": "EIO", "skip": 1},
    "rename": {"op": "rename", "path": "work/work/#*", "errno": "EIO"},
}


def test_copy_up_failing_inside_work_leaves_nothing(faulty: Callable[..., Faulty]) -> None:
    """A copy-up (append to a lower file) whose temp copy fails at any step: the caller gets
    the errno, UPPER gets nothing, WORK/work nothing, the merged file is the lower one,
    and the next try succeeds."""
    lowers = [{"d/big": File(BIG), "d/small": File(SMALL), "d/sub/x": File("x")}]
    f = faulty(lowers, upper={"d": Dir()})
    up = f.backing / "upper"
    tried = 0
    for what, spec in COPY_UP_FAULTS.items():
        rule = {k: v for k, v in spec.items() if k != "only"}
        for name, data in (("big", BIG), ("small", SMALL)):
            if name not in spec.get("only", [name]):
                continue
            with f.ffs.failing(rule):
                got = errname(lambda: open(f.m / "d" / name, "ab").close())  # noqa: B023
                fired = f.ffs.stats()["rules"][0]["fired"]
            tried += 1
            assert fired == 1, f"{what}/{name}: the rule never fired ({f.ffs.stats()})"
            assert got == rule["errno"], f"{what}/{name}: {got}, want {rule['errno']}"
            assert not (up / "d" / name).exists(), f"{what}/{name}: half copy-up in UPPER"
            assert not f.leftovers(), f"{what}/{name}: {f.leftovers()}"
            assert (f.m / "d" / name).read_bytes() == data, f"{what}/{name}: merged changed"
            assert (f.paths.lowers[0] / "d" / name).read_bytes() == data
            f.serving()
    # a directory's copy-up (a child made in a lower dir)
    with f.ffs.failing({"op": "mkdir", "path": "work/work/#*", "errno": "ENOSPC"}):
        assert errname(lambda: (f.m / "d/sub/new").write_text("n")) == "ENOSPC"
    assert not (up / "d/sub").exists() and not f.leftovers()
    tried += 1
    for name, data in (("big", BIG), ("small", SMALL)):
        with open(f.m / "d" / name, "ab") as fh:
            fh.write(b"+")
        assert (up / "d" / name).read_bytes() == data + b"+"
    (f.m / "d/sub/new").write_text("n")
    assert (up / "d/sub/x").exists() is False and (up / "d/sub/new").read_text() == "n"
    assert "internal error" not in f.mount.log_tail(400)
    FIGURES["copy-up"] = f"{tried} failed copy-ups, 0 half copies, 0 WORK leftovers"


def test_copy_up_whose_last_step_fails_is_still_usable(faulty: Callable[..., Faulty]) -> None:
    """Steps after the copy's rename into UPPER (the parent's times put back) may fail too:
    the copy is complete by then, so the file must work afterwards, whatever the first
    call said."""
    f = faulty([{"d/f": File(SMALL)}], upper={"d": Dir()})
    with f.ffs.failing({"op": "setattr", "path": "upper/d", "errno": "EIO"}):
        first = errname(lambda: open(f.m / "d/f", "ab").close())
    with open(f.m / "d/f", "ab") as fh:
        fh.write(b"+")
    assert (f.m / "d/f").read_bytes() == SMALL + b"+"
    assert (f.backing / "upper/d/f").read_bytes() == SMALL + b"+"
    assert not f.leftovers()
    assert first == "ok", first  # the kernel restores the parent's times best effort too
    FIGURES["after-rename"] = "fault after the copy-up's rename: copy-up ok, file usable"


# --------------------------------------------------------------------------------------------------
# Power cut: unsynced data dropped, daemon SIGKILLed, remount
# --------------------------------------------------------------------------------------------------

LOW = {f"a{i}": blob(100_000 + 50_000 * i, 10 + i) for i in range(6)}
LOW["big"] = blob(2 << 20, 20)
ADD = b"appended data " * 1000


def _power_cut_workload(m: Path) -> dict[str, set[bytes]]:
    """The ops, and for each name the contents allowed after a power cut: what was fsynced,
    or (not fsynced) what was synced before."""
    allowed: dict[str, set[bytes]] = {}

    def append(name: str, sync: bool) -> None:
        with open(m / name, "ab") as f:
            f.write(ADD)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        allowed[name] = {LOW[name] + ADD} if sync else {LOW[name]}

    append("a0", False)
    append("a1", True)
    append("big", False)
    os.chmod(m / "a2", 0o600)  # a copy-up of the data for a change of mode
    allowed["a2"] = {LOW["a2"]}
    for name, sync in (("a3", True), ("a4", False)):
        with open(m / name, "wb") as f:  # O_TRUNC: copied up without data
            f.write(ADD)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        allowed[name] = {ADD} if sync else {b"", ADD}
    for name, sync in (("n0", True), ("n1", False)):
        with open(m / name, "wb") as f:
            f.write(ADD)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        allowed[name] = {ADD} if sync else {b"", ADD}
    allowed["a5"] = {LOW["a5"]}  # never touched
    return allowed


@pytest.mark.parametrize("volatile", [False, True], ids=["synced-copy-up", "volatile-control"])
def test_power_cut_keeps_what_was_fsynced(faulty: Callable[..., Faulty],
                                          mounter: Callable[..., Mount], volatile: bool) -> None:
    """Copy-ups are fsynced before their rename into UPPER (copyup.py, as the kernel's):
    after a power cut that drops every unsynced write, a SIGKILL of the daemon and a
    remount, each copied-up file holds at least its whole lower data and each fsynced
    write; nothing is torn.  With ``-o volatile`` (no fsync, by request) the same cut
    does tear copies: the control that proves the cut drops data."""
    lowers = [{name: File(data) for name, data in LOW.items()}]
    f = faulty(lowers, options="volatile" if volatile else "", track=True)
    allowed = _power_cut_workload(f.m)
    cut = f.ffs.power_cut()
    assert cut["reverted"] > 0, cut
    f.mount.overlay.kill()
    f.mount.stop()
    f.ffs.stop()
    upper = f.backing / "upper"
    if volatile:
        torn = [n for n in ("a0", "a2", "big") if (upper / n).read_bytes() != LOW[n]]
        assert torn, "the power cut dropped nothing: the control proves nothing"
        FIGURES["volatile"] = f"volatile: {len(torn)}/3 unsynced copy-ups torn by the cut"
        return
    # remount over the backing dir itself: what a reboot would find
    again = mounter(StackPaths(f.paths.base, f.paths.lowers, upper, f.backing / "work",
                               f.paths.merged))
    bad = {}
    for name, ok in allowed.items():
        got = (again.root / name).read_bytes() if (again.root / name).exists() else None
        if got not in ok:
            bad[name] = (None if got is None else len(got), sorted(len(o) for o in ok))
    assert not bad, f"torn or lost after the power cut (name: got size, allowed sizes): {bad}"
    assert stat.S_IMODE((again.root / "a2").stat().st_mode) == 0o600
    assert not [n for n in os.listdir(upper) if n.startswith("#")]
    assert os.listdir(f.backing / "work" / "work") == []
    intact = sum(len(next(iter(allowed[n]))) for n in allowed if len(allowed[n]) == 1)
    FIGURES["power-cut"] = (f"power cut: {cut['reverted']} files reverted "
                            f"({cut['lost_bytes']} unsynced bytes dropped), {len(allowed)} files "
                            f"as synced, {intact} bytes intact")


# --------------------------------------------------------------------------------------------------
# Out of file descriptors
# --------------------------------------------------------------------------------------------------


def test_out_of_fds_gives_emfile_and_recovers(make_stack: Callable[..., StackPaths],
                                              mounter: Callable[..., Mount]) -> None:
    """RLIMIT_NOFILE of the daemon lowered (prlimit) to a few above what it holds: opens
    through the mount fail with EMFILE (a copy-up among them, which leaves nothing behind),
    the daemon keeps serving, and everything works again once files are closed."""
    n = 200
    paths = make_stack([{**{f"f{i:03}": File(f"file {i}") for i in range(n)},
                         "cp": File(SMALL)}], upper={})
    m = mounter(paths)
    assert isinstance(m, PyUnionMount)
    os.listdir(m.root)
    time.sleep(0.3)
    pid = m.pid
    before = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    used = len(os.listdir(f"/proc/{pid}/fd"))
    held: list[int] = []
    errors: dict[str, int] = {}
    try:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 24, before[1]))
        for i in range(n):
            try:
                held.append(os.open(m.root / f"f{i:03}", os.O_RDONLY))
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, "?")
                errors[name] = errors.get(name, 0) + 1
        assert held and set(errors) <= {"EMFILE", "ENFILE"} and errors, (len(held), errors)
        opened = len(held)
        # out of fds, a change in the mount table and a stats query don't take the daemon
        # down (its mount table follower opened mountinfo anew: EMFILE ended the loop)
        event = paths.base / "event"
        event.mkdir()
        assert run_cmd(["mount", "-t", "tmpfs", "tmpfs", str(event)]).returncode == 0
        assert run_cmd(["umount", str(event)]).returncode == 0
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([PYTHON, "-m", "unionfs", "stats", str(m.root)], timeout=5,
                           capture_output=True, stdin=subprocess.DEVNULL, cwd=str(REPO))
        time.sleep(0.5)
        assert os.path.exists(f"/proc/{pid}") and os.listdir(m.root), "the daemon went"
        # out of fds, a copy-up fails cleanly too
        cp = errname(lambda: open(m.root / "cp", "ab").close())
        assert cp in ("EMFILE", "ENFILE"), cp
        assert paths.upper is not None and paths.work is not None
        assert not (paths.upper / "cp").exists() and os.listdir(paths.work / "work") == []
        for fd in held:
            os.close(fd)
        held.clear()
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{pid}/fd")) > used + 12 and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(m.root / "cp", "ab") as f:
            f.write(b"+")
        assert (paths.upper / "cp").read_bytes() == SMALL + b"+"
        assert sorted(os.listdir(m.root))[:2] == ["cp", "f000"]
    finally:
        for fd in held:
            os.close(fd)
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, before)
    assert "internal error" not in m.log_tail(400), m.log_tail(60)
    FIGURES["fds"] = (f"RLIMIT_NOFILE {used}+24: {opened} opens "
                      f"ok, {sum(errors.values())} {'/'.join(sorted(errors))}, then recovered")


# --------------------------------------------------------------------------------------------------
# Rootless: faultfs and pyunionfs as a plain user
# --------------------------------------------------------------------------------------------------

try:
    import rootless_support as _rootless
except ImportError:  # before the helpers moved out of test_rootless.py
    import test_rootless as _rootless  # type: ignore[no-redef]

test_user = _rootless.test_user
fuse_user = _rootless.fuse_user


def test_rootless_faults_below(fuse_user: tuple[int, int],
                               make_stack: Callable[..., StackPaths], _registry: Any) -> None:
    """The plain test user mounts faultfs (through fusermount3) and pyunionfs on it
    (user.overlay.* markers): a copy-up whose write fails and a create that fails give
    their errno, nothing half-built stays, and the mount serves on."""
    uid, gid = fuse_user
    paths = make_stack([{"f": File(SMALL, uid=uid, gid=gid), "d/g": File("g", uid=uid, gid=gid),
                         "e": Dir(mode=0o555, uid=uid, gid=gid), "e/x": File("x", uid=uid, gid=gid)}],
                       upper={})
    for d, dirs, _ in os.walk(paths.base):
        for p in (d, *(os.path.join(d, n) for n in dirs)):
            os.chown(p, uid, gid)

    def wrap(argv: list[str]) -> list[str]:
        return _rootless.as_user(uid, gid, argv)

    ffs, fpaths, backing = on_faultfs(paths, wrap=wrap, owner=(uid, gid))
    um = None
    try:
        um = _rootless.UserMount(uid, gid, fpaths, foreground=True)

        def ops(m: Path) -> dict[str, str]:
            out = {}
            out["copy-up"] = errname(lambda: open(m / "f", "ab").close())
            out["create"] = errname(lambda: (m / "d" / "new").write_text("n"))
            out["merged-f"] = str((m / "f").read_bytes() == SMALL)
            return out

        with ffs.failing({"op": "write", "path": "work/work/#*", "errno": "ENOSPC"},
                         {"op": "create", "path": "upper/d/new", "errno": "EDQUOT"}):
            got = _rootless.user_op(uid, gid, ops, fpaths.merged)
        assert got == {"copy-up": "ENOSPC", "create": "EDQUOT", "merged-f": "True"}, got
        assert sorted(os.listdir(backing / "upper")) == ["d"]  # (d copied up for the create)
        assert os.listdir(backing / "upper" / "d") == []
        assert os.listdir(backing / "work" / "work") == []
        def again(m: Path) -> None:
            open(m / "f", "ab").close()
            (m / "d" / "new").write_text("n")

        _rootless.user_op(uid, gid, again, fpaths.merged)
        assert (backing / "upper" / "f").read_bytes() == SMALL
        # Unprivileged, a copied-up directory without u+w gets its mode and times after its
        # rename into UPPER: when that step fails the caller hears it, and the directory,
        # which is in UPPER by then, is known to be there (it was EEXIST for every later
        # change).
        def chmod_x(m: Path) -> str:
            return errname(lambda: os.chmod(m / "e" / "x", 0o640))

        with ffs.failing({"op": "setattr", "path": "upper/e", "errno": "EIO"}):
            first = _rootless.user_op(uid, gid, chmod_x, fpaths.merged)
        assert first == "EIO", first
        later = _rootless.user_op(uid, gid, chmod_x, fpaths.merged)
        assert later == "ok", later
        assert stat.S_IMODE(os.lstat(backing / "upper" / "e" / "x").st_mode) == 0o640
        names = [x for p in (backing / "upper", backing / "upper" / "d", backing / "upper" / "f")
                 for x in os.listxattr(p)]
        assert names and all(x.startswith("user.overlay.") for x in names), names
    finally:
        try:
            if um is not None:
                um.stop()
        finally:
            ffs.stop()
    FIGURES["rootless"] = "rootless: ENOSPC copy-up and EDQUOT create as the plain user, clean"


# --------------------------------------------------------------------------------------------------
# Real filesystems: ext4 on a loop device (ENOSPC), btrfs qgroups (EDQUOT)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def loop_fs(image: Path, mnt: Path, size_mib: int, mkfs: list[str]) -> Iterator[Path]:
    """A fresh filesystem of ``size_mib`` on a loop device of ours, mounted at ``mnt``;
    unmounted and detached afterwards (only that device)."""
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    r = run_cmd(["losetup", "--find", "--show", str(image)])
    if r.returncode != 0:
        pytest.skip(f"no loop device: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        r = run_cmd([*mkfs, dev], timeout=120)
        assert r.returncode == 0, f"{mkfs[0]}: {r.stderr}"
        mnt.mkdir(exist_ok=True)
        r = run_cmd(["mount", dev, str(mnt)])
        assert r.returncode == 0, f"mount {dev}: {r.stderr}"
        try:
            yield mnt
        finally:
            if run_cmd(["umount", str(mnt)]).returncode != 0:
                force_unmount(str(mnt))
    finally:
        run_cmd(["losetup", "-d", dev])
        image.unlink()


def _enospc_run(m: Path, upper: Path, work: Path) -> dict[str, Any]:
    """The same operations on either overlay over a 32 MiB ext4 with 256 inodes."""
    out: dict[str, Any] = {}
    out["copy-up"] = errname(lambda: open(m / "huge", "ab").close())
    out["copy-up-upper"] = sorted(os.listdir(upper))
    out["copy-up-work"] = sorted(os.listdir(work / "work"))
    out["merged-huge"] = (m / "huge").stat().st_size
    written, err = 0, "ok"
    fd = os.open(m / "fill", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        chunk = b"z" * (1 << 20)
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as e:
                err = errno.errorcode.get(e.errno or 0, "?")
                break
        out["fsync-full"] = errname(lambda: os.fsync(fd))
    finally:
        os.close(fd)
    out["fill"] = err
    out["fill-size-is-written"] = (upper / "fill").stat().st_size == written
    out["fill-bytes"] = written
    out["fill-merged"] = (m / "fill").stat().st_size == written
    # while full: a new name still takes an inode, not a block (maybe), a mkdir a block
    out["mkdir-full"] = errname(lambda: (m / "dfull").mkdir())
    (m / "fill").unlink()
    # FUSE sends RELEASE after close() returns, not before: the daemon may still hold the
    # unlinked file open for a moment, and its blocks are free only then (docs/differences.md)
    deadline = time.monotonic() + 5
    while (got := errname(lambda: (m / "again").write_bytes(b"a" * (1 << 20)))) == "ENOSPC" \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    out["after-free"] = got
    made, err = 0, "ok"
    for i in range(10_000):
        try:
            (m / f"i{i:05}").touch()
            made += 1
        except OSError as e:
            err = errno.errorcode.get(e.errno or 0, "?")
            break
    out["inodes"] = err
    out["inodes-made"] = made
    out["inodes-stray"] = sorted(n for n in os.listdir(upper) if n.startswith("#"))
    out["work-after"] = sorted(os.listdir(work / "work"))
    for i in range(made):
        (m / f"i{i:05}").unlink()
    out["after-inodes-freed"] = errname(lambda: (m / "last").write_text("l"))
    return out


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs mkfs.ext4 (e2fsprogs)")
def test_loop_ext4_enospc_like_kernel(make_stack: Callable[..., StackPaths],
                                      tmp_path: Path) -> None:
    """A real ENOSPC: UPPER and WORK on a 32 MiB ext4 (256 inodes) on a loop device.  A
    copy-up too big for it, writing until the disk is full, inode exhaustion: the kernel's
    overlayfs on a same-size filesystem gives the same errno at the same steps and leaves
    the same nothing in UPPER and WORK."""
    lowers = [{"huge": File(blob(40 << 20, 3)), "small": File("s")}]
    results: dict[str, dict[str, Any]] = {}
    for impl in ("kernel", "pyunionfs"):
        paths = make_stack(lowers, readonly=True)
        with loop_fs(tmp_path / f"{impl}.img", tmp_path / f"{impl}-fs", 32,
                     ["mkfs.ext4", "-q", "-F", "-m", "0", "-N", "256", "-E",
                      "lazy_itable_init=0,lazy_journal_init=0"]) as fs:
            (fs / "upper").mkdir()
            (fs / "work").mkdir()
            full = StackPaths(paths.base, paths.lowers, fs / "upper", fs / "work", paths.merged)
            m = mount_stack(full, impl)
            try:
                results[impl] = _enospc_run(m.root, fs / "upper", fs / "work")
                if impl == "pyunionfs":
                    assert "internal error" not in m.log_tail(400)
            finally:
                m.stop()
    k, p = results["kernel"], results["pyunionfs"]
    for key in ("copy-up", "copy-up-upper", "copy-up-work", "merged-huge", "fill",
                "fill-size-is-written", "fill-merged", "after-free", "inodes", "inodes-stray",
                "after-inodes-freed", "fsync-full"):
        assert p[key] == k[key], f"{key}: pyunionfs {p[key]!r}, kernel {k[key]!r}"
    assert p["copy-up"] == "ENOSPC" and p["fill"] == "ENOSPC" and p["inodes"] == "ENOSPC"
    # what fits differs by a few blocks and inodes (our uuid xattr, the kernel's work/index)
    assert abs(p["fill-bytes"] - k["fill-bytes"]) <= 2 << 20, (p["fill-bytes"], k["fill-bytes"])
    assert abs(p["inodes-made"] - k["inodes-made"]) <= 8, (p["inodes-made"], k["inodes-made"])
    FIGURES["ext4"] = (f"ext4 32 MiB: ENOSPC at copy-up/fill/inodes like the kernel; filled "
                       f"{p['fill-bytes'] >> 20} MiB (kernel {k['fill-bytes'] >> 20}), "
                       f"{p['inodes-made']} inodes (kernel {k['inodes-made']}), mkdir when full "
                       f"{p['mkdir-full']} (kernel {k['mkdir-full']})")


@pytest.mark.skipif(shutil.which("mkfs.btrfs") is None,
                    reason="needs mkfs.btrfs (Debian package btrfs-progs) for a real EDQUOT")
def test_btrfs_qgroup_edquot_like_kernel(make_stack: Callable[..., StackPaths],
                                         tmp_path: Path) -> None:
    """A real EDQUOT: UPPER and WORK in a btrfs subvolume limited to 8 MiB by a qgroup.  A
    copy-up over the limit and writing past it give EDQUOT to the caller on both overlays,
    and leave nothing half-built."""
    if "btrfs" not in Path("/proc/filesystems").read_text():
        pytest.skip("the kernel has no btrfs")
    lowers = [{"big": File(blob(12 << 20, 4)), "small": File(SMALL)}]
    results: dict[str, dict[str, Any]] = {}
    for impl in ("kernel", "pyunionfs"):
        paths = make_stack(lowers, readonly=True)
        with loop_fs(tmp_path / f"{impl}.img", tmp_path / f"{impl}-btrfs", 128,
                     ["mkfs.btrfs", "-q", "-f"]) as fs:
            sv = fs / "sv"
            for cmd in (["btrfs", "quota", "enable", str(fs)],
                        ["btrfs", "subvolume", "create", str(sv)],
                        ["btrfs", "qgroup", "limit", "8M", str(sv)]):
                r = run_cmd(cmd)
                assert r.returncode == 0, f"{cmd}: {r.stderr}"
            (sv / "upper").mkdir()
            (sv / "work").mkdir()
            full = StackPaths(paths.base, paths.lowers, sv / "upper", sv / "work", paths.merged)
            m = mount_stack(full, impl)
            try:
                out: dict[str, Any] = {}
                out["copy-up"] = errname(lambda: open(m.root / "big", "ab").close())  # noqa: B023
                out["upper"] = sorted(os.listdir(sv / "upper"))
                out["work"] = sorted(os.listdir(sv / "work" / "work"))
                written, err = 0, "ok"
                with open(m.root / "fill", "wb", buffering=0) as f:
                    while written < 64 << 20:
                        try:
                            written += f.write(b"q" * (1 << 20))
                        except OSError as e:
                            err = errno.errorcode.get(e.errno or 0, "?")
                            break
                out["fill"] = err
                out["fill-bytes"] = written
                (m.root / "fill").unlink()
                out["small"] = errname(lambda: open(m.root / "small", "ab").close())  # noqa: B023
                results[impl] = out
            finally:
                m.stop()
    k, p = results["kernel"], results["pyunionfs"]
    for key in ("copy-up", "upper", "work", "fill", "small"):
        assert p[key] == k[key], f"{key}: pyunionfs {p[key]!r}, kernel {k[key]!r}"
    assert p["fill"] == "EDQUOT", p
    FIGURES["btrfs"] = (f"btrfs qgroup 8 MiB: copy-up {p['copy-up']}, fill {p['fill']} after "
                        f"{p['fill-bytes'] >> 20} MiB (kernel {k['fill-bytes'] >> 20}), like the "
                        "kernel")
