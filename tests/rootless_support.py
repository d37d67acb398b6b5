"""The rootless test machinery, shared by every module that runs something as a plain user:

* TEST_USER (a system user made if missing), with rw on /dev/fuse (and search on the dirs above
  the venv's python) granted by POSIX ACL entries for a module's duration: the fixtures
  ``test_user`` and ``fuse_user`` (registered for every test module by tests/conftest.py);
* running commands and functions as that user (``as_user``, ``run_user``, ``user_op``,
  ``user_snapshot``), its mounts (``UserMount``, the ``user_mounts`` fixture) and root's kernel
  overlayfs on its layers with ``-o userxattr`` (``kernel_mount``);
* the "as whom" layer: the ``who`` fixture runs one test as root, as the plain user and as root of
  a user namespace (see ``Who`` below).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from overlay_harness import (
    CMD_TIMEOUT,
    IMPL,
    MOUNT_TIMEOUT,
    PRIVATE_PREFIX,
    PYTHON,
    REPO,
    UMOUNT_TIMEOUT,
    USER_PREFIX,
    USERNS,
    KernelMount,
    MountError,
    Snapshot,
    StackPaths,
    force_unmount,
    in_user_namespace,
    is_mounted,
    make_traversable,
    mount_stack,
    mount_table,
    mounts_under,
    outcome,
    run_as,
    snapshot_merged,
    stop_all,
    unionfs_pids,
    wait_until,
)

from unionfs import acl

TEST_USER = "pyunionfs-test"
FUSE_DEV = "/dev/fuse"
# serialises the ACL grants of concurrent test sessions on this machine
FUSE_LOCK = ("/run/lock" if os.path.isdir("/run/lock") else "/tmp") + "/pyunionfs-test-acl.lock"
LOCK_TIMEOUT = 300.0
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


# --------------------------------------------------------------------------------------------------
# The test user and its access to /dev/fuse
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_user() -> tuple[int, int]:
    """(uid, gid) of TEST_USER, a system user created here if missing (and kept: another test
    session may be using it at the same moment)."""
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", TEST_USER],
                           capture_output=True, text=True, timeout=CMD_TIMEOUT)
        if r.returncode != 0 and "already exists" not in r.stderr:
            pytest.skip(f"cannot create the test user {TEST_USER}: {r.stderr.strip()}")
        pw = pwd.getpwnam(TEST_USER)
    return pw.pw_uid, pw.pw_gid


# The access ACL xattr, in the format unionfs.acl reads and writes.
ACL_XATTR = acl.ACCESS
ACL_UNDEFINED_ID = 0xFFFFFFFF


def _acl_pack(entries: list[list[int]]) -> bytes:
    return acl.pack(sorted(entries))  # the kernel wants the entries in tag order


def _acl_get(path: str) -> bytes | None:
    try:
        return os.getxattr(path, ACL_XATTR)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def _acl_with_user(raw: bytes | None, mode: int, uid: int, perm: int) -> bytes:
    """``raw`` (or the ACL equivalent to ``mode``) plus ``user:uid:perm``, mask widened to cover
    it: what ``setfacl -m u:USER:perm`` makes."""
    if raw is None:
        entries = [[acl.USER_OBJ, (mode >> 6) & 7, ACL_UNDEFINED_ID],
                   [acl.GROUP_OBJ, (mode >> 3) & 7, ACL_UNDEFINED_ID],
                   [acl.OTHER, mode & 7, ACL_UNDEFINED_ID]]
    else:
        entries = acl.parse(raw)
    entries = [e for e in entries if not (e[0] == acl.USER and e[2] == uid) and e[0] != acl.MASK]
    entries.append([acl.USER, perm, uid])
    mask = 0
    for tag, p, _ in entries:
        if tag in (acl.USER, acl.GROUP_OBJ, acl.GROUP):
            mask |= p
    entries.append([acl.MASK, mask, ACL_UNDEFINED_ID])
    return _acl_pack(entries)


def _acl_without_user(raw: bytes, uid: int) -> bytes:
    return _acl_pack([e for e in acl.parse(raw) if not (e[0] == acl.USER and e[2] == uid)])


@contextlib.contextmanager
def acl_grant(path: str, uid: int, perm: int) -> Iterator[None]:
    """``user:uid:perm`` on ``path`` (like ``setfacl -m``) while active. Afterwards the exact
    previous ACL and mode come back (``getfacl``/``setfacl --restore``), unless someone else changed
    the ACL meanwhile: then only our entry is taken out of theirs."""
    st = os.stat(path)
    before = _acl_get(path)
    ours = _acl_with_user(before, stat.S_IMODE(st.st_mode), uid, perm)
    try:
        os.setxattr(path, ACL_XATTR, ours)
    except OSError as e:
        pytest.skip(f"cannot grant {TEST_USER} access to {path} with a POSIX ACL: {e}")
    try:
        yield
    finally:
        now = _acl_get(path)
        if now == ours:  # untouched since our grant: restore exactly
            if before is None:
                os.removexattr(path, ACL_XATTR)
            else:
                os.setxattr(path, ACL_XATTR, before)
            os.chmod(path, stat.S_IMODE(st.st_mode))
        elif now is not None:
            os.setxattr(path, ACL_XATTR, _acl_without_user(now, uid))


def _unsearchable_dirs(uid: int, gid: int, path: str) -> list[str]:
    """Ancestors of ``path`` (symlinks resolved) that uid/gid may not search."""
    real = Path(os.path.realpath(path))
    dirs = [str(d) for d in reversed(real.parents)]
    res = run_as(uid, gid, lambda _: [d for d in dirs if not os.access(d, os.X_OK)], real)
    assert res[0] == "ok", res
    return res[1]


@contextlib.contextmanager
def _file_lock(path: str, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"{path} held by another test session for {timeout}s")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def fuse_user(test_user: tuple[int, int]) -> Iterator[tuple[int, int]]:
    """TEST_USER, for this module with rw on /dev/fuse and search (x) on the dirs above the venv's
    real python (e.g. /root for a pyenv build), each an ACL entry that is removed afterwards."""
    uid, gid = test_user
    with _file_lock(FUSE_LOCK, LOCK_TIMEOUT), contextlib.ExitStack() as grants:
        grants.enter_context(acl_grant(FUSE_DEV, uid, 6))
        for d in _unsearchable_dirs(uid, gid, PYTHON):
            grants.enter_context(acl_grant(d, uid, 1))
        r = run_user(uid, gid, [PYTHON, "-c", "import os, unionfs; os.close(os.open("
                                f"{FUSE_DEV!r}, os.O_RDWR))"])
        assert r.returncode == 0, f"{TEST_USER} can't run pyunionfs or open {FUSE_DEV}: {r.stderr}"
        yield test_user


# --------------------------------------------------------------------------------------------------
# Running things as the test user
# --------------------------------------------------------------------------------------------------


def as_user(uid: int, gid: int, argv: list[str]) -> list[str]:
    """``argv`` as uid/gid (no supplementary groups, no capabilities) with a clean environment."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--",
            "env", "-i", f"PATH={USER_PATH}", "HOME=/nonexistent", "LANG=C.UTF-8",
            f"PYTHONPATH={REPO}", "PYTHONDONTWRITEBYTECODE=1", *argv]


def run_user(uid: int, gid: int, argv: list[str],
             timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(as_user(uid, gid, argv), capture_output=True, text=True, timeout=timeout,
                          cwd=str(REPO), stdin=subprocess.DEVNULL, check=False)


def user_snapshot(uid: int, gid: int, root: Path, mtimes: bool = True) -> Snapshot:
    """The merged view as the user sees it (a FUSE mount without allow_other is the mounting
    user's only, and the kernel mount is looked at with the same credentials)."""
    res = run_as(uid, gid, lambda m: pickle.dumps(snapshot_merged(m, mtimes)), root)
    assert res[0] == "ok", f"snapshot of {root} as {uid}: {res}"
    return pickle.loads(res[1])


def user_op(uid: int, gid: int, fn: Callable[[Path], Any], root: Path) -> Any:
    res = run_as(uid, gid, fn, root)
    assert res[0] == "ok", f"{getattr(fn, '__name__', 'op')} as {uid}: {res}"
    return res[1]




class UserMount:
    """``python -m unionfs mount LOWERS UPPER WORK MERGED`` as the test user (daemon form, or
    ``-f`` as a child process); ``stop()`` unmounts with the user's fusermount3 -u (root's -uz as
    the last resort) and waits for the daemon to exit."""

    def __init__(self, uid: int, gid: int, paths: StackPaths, foreground: bool,
                 work: Path | None = None, options: str = ""):
        self.uid, self.gid, self.paths, self.foreground = uid, gid, paths, foreground
        self.root = paths.merged
        self.log = paths.base / "pyunionfs-user.log"
        self.stderr = ""
        self.proc: subprocess.Popen[bytes] | None = None
        lowers = ":".join(str(p) for p in paths.lowers)
        args = [PYTHON, "-m", "unionfs", "mount", *(["-o", options] if options else []), lowers,
                str(paths.upper), str(work or paths.work), str(paths.merged)]
        if foreground:
            self._err = open(paths.base / "pyunionfs-user.stderr", "w+b")
            self.proc = subprocess.Popen(as_user(uid, gid, [*args[:4], "-f", *args[4:]]),
                                         cwd=str(REPO), stdin=subprocess.DEVNULL,
                                         stdout=self._err, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            try:
                if not wait_until(lambda: is_mounted(self.root) or self.proc.poll() is not None,
                                  MOUNT_TIMEOUT):
                    raise AssertionError(f"not mounted after {MOUNT_TIMEOUT}s")
                assert is_mounted(self.root), (
                    f"pyunionfs -f exited {self.proc.poll()}:\n{self.read_stderr()}")
            except BaseException:
                self.stop()
                raise
        else:
            r = run_user(uid, gid, [*args[:4], "--log", str(self.log), *args[4:]],
                         timeout=MOUNT_TIMEOUT + 15)
            self.stderr = r.stderr
            if r.returncode != 0 or not is_mounted(self.root):
                self.stop()
                raise AssertionError(f"background mount as {TEST_USER} failed ({r.returncode}):\n"
                                     f"{r.stderr}{self.read_log()}")
        row = [r for r in mount_table() if r[0] == os.path.realpath(self.root)][-1]
        if row[1] != "fuse.pyunionfs" or f"user_id={uid}" not in row[3].split(","):
            self.stop()
            raise AssertionError(f"not {TEST_USER}'s pyunionfs mount: {row}")

    def read_stderr(self) -> str:
        if self.proc is None:
            return self.stderr
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def read_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def output(self) -> str:
        return self.read_stderr() + self.read_log()

    def stop(self) -> None:
        """Idempotent; raises if the unmount needed the fallbacks or the daemon lingered."""
        problems = []
        merged = str(self.root)
        pids = [self.proc.pid] if self.proc is not None else unionfs_pids(self.root)
        if is_mounted(merged):
            try:
                r = run_user(self.uid, self.gid, ["fusermount3", "-u", merged],
                             timeout=UMOUNT_TIMEOUT)
                if r.returncode != 0:
                    problems.append(f"fusermount3 -u as {TEST_USER}: {r.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append("fusermount3 -u timed out")
            force_unmount(merged)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=UMOUNT_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append("pyunionfs -f did not exit after unmount")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=CMD_TIMEOUT)
        elif not wait_until(lambda: not unionfs_pids(self.root), UMOUNT_TIMEOUT):
            problems.append("daemon did not exit after unmount")
            for pid in unionfs_pids(self.root):
                if pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        if is_mounted(merged):
            problems.append("still mounted")
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.output())


@pytest.fixture
def user_mounts() -> Iterator[Callable[..., UserMount]]:
    """``user_mounts(uid, gid, paths, foreground, work=None, options="")``; all stopped at
    teardown."""
    made: list[UserMount] = []

    def factory(uid: int, gid: int, paths: StackPaths, foreground: bool,
                work: Path | None = None, options: str = "") -> UserMount:
        m = UserMount(uid, gid, paths, foreground, work, options)
        made.append(m)
        return m

    yield factory
    stop_all(reversed(made))


@contextlib.contextmanager
def kernel_mount(paths: StackPaths, work: Path) -> Iterator[KernelMount]:
    """Root's kernel overlayfs with ``-o userxattr`` on the same layers."""
    m = KernelMount(paths, work, userxattr=True)
    try:
        yield m
    finally:
        m.stop()


def chown_tree(top: Path, uid: int, gid: int) -> None:
    """``top`` and everything below it (symlinks themselves) to uid/gid, modes kept (chown
    clears setuid/setgid).  Walked by directory fds, so trees deeper than PATH_MAX work too."""
    raise_nofile()

    def one(dfd: int, name: str) -> os.stat_result:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dfd)
        return st

    st = os.lstat(top)
    os.chown(top, uid, gid, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return
    os.chmod(top, stat.S_IMODE(st.st_mode))
    stack = [os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)]
    names = [sorted(os.listdir(stack[0]))]
    try:
        while stack:
            if not names[-1]:
                os.close(stack.pop())
                names.pop()
                continue
            name = names[-1].pop()
            if stat.S_ISDIR(one(stack[-1], name).st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=stack[-1])
                stack.append(fd)
                names.append(sorted(os.listdir(fd)))
    finally:
        for fd in stack:
            os.close(fd)


def raise_nofile() -> None:
    """A walk by fds holds one per level: lift the soft RLIMIT_NOFILE to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --------------------------------------------------------------------------------------------------
# As whom: one test run as root, as the plain user and as root of a user namespace
# --------------------------------------------------------------------------------------------------

WHO = ("root", "user", "userns")
IN_USERNS = USERNS or in_user_namespace()
USER_OP_TIMEOUT = 120.0  # a function run as the user (rm -rf of a 2000-deep chain is one)


class WhoMount:
    """The test user's pyunionfs mount, as the harness's mounts look: ``root``, ``paths``,
    ``stop()``; a failed mount raises MountError as theirs do."""

    impl = "pyunionfs"

    def __init__(self, uid: int, gid: int, paths: StackPaths, foreground: bool, options: str):
        self.paths = paths
        try:
            self.mount = UserMount(uid, gid, paths, foreground, options=options)
        except AssertionError as e:
            raise MountError(f"pyunionfs mount as {TEST_USER} failed: {e}") from None

    @property
    def root(self) -> Path:
        return self.paths.merged

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.mount.proc is not None, "not a foreground mount"
        return self.mount.proc

    def output(self) -> str:
        return self.mount.output()

    def stop(self) -> None:
        self.mount.stop()


class _UserBase:
    """A directory for the user's layers outside pytest's temp root: every pytest session that
    starts without --basetemp takes the search bit for others off /tmp/pytest-of-root, and a
    concurrent one (a developer's, another checkout's) then fails the user's path walks to its
    layers and mounts with EACCES.  Removed once the test's mounts are stopped (it is the
    registry's first item), unless the test failed: then kept for a post-mortem, as the paths
    in its report say."""

    def __init__(self, path: Path, registry: Any):
        self.path, self.registry = path, registry

    @classmethod
    def make(cls, registry: Any) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{TEST_USER}-", dir=tempfile.gettempdir()))
        os.chmod(path, 0o711)
        registry.tmp_path = path  # make_stack's stacks go there too
        registry.items.insert(0, cls(path, registry))  # stopped last, after the mounts above
        return path

    def stop(self) -> None:
        left = mounts_under(self.path)
        for m in sorted(left, key=len, reverse=True):
            force_unmount(m)
        if mounts_under(self.path):
            raise AssertionError(f"still mounted under {self.path}: not removed")
        if getattr(getattr(self.registry.request.node, "rep_call", None), "failed", False):
            return
        # rm -rf walks by fds: trees past PATH_MAX (shutil.rmtree's recursion limit) go too
        subprocess.run(["rm", "-rf", "--", str(self.path)], timeout=CMD_TIMEOUT * 4,
                       check=False)
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


class Who:
    """Whom a test runs as (the ``who`` fixture):

    * ``root``: as before (root of a user namespace in a run under UNIONFS_TEST_USERNS=1);
    * ``user``: TEST_USER with /dev/fuse granted (``fuse_user``): layers it owns (``own``), its
      pyunionfs mounts through fusermount3 (``mount``; the kernel side is root's kernel overlayfs
      with ``-o userxattr`` on the same layers), functions and commands run as it (``op``,
      ``call``, ``argv``), the ``user.overlay.`` dialect (``prefix``);
    * ``userns``: the test's ``root`` case, run again by ``pytest_pyfunc_call`` in a nested pytest
      as root of a fresh user namespace (``overlay_harness.py userns``); its body never runs here.
    """

    def __init__(self, name: str, registry: Any, tmp_path: Path, uid: int = 0, gid: int = 0):
        self.name, self.registry, self.tmp_path = name, registry, tmp_path
        self.uid, self.gid = uid, gid
        self.base = tmp_path  # where this identity's layers go (make_stack's too)
        if self.user:
            self.base = _UserBase.make(registry)

    def __repr__(self) -> str:
        return f"Who({self.name}{' in a user namespace' if USERNS else ''})"

    @property
    def user(self) -> bool:
        return self.name == "user"

    @property
    def prefix(self) -> str:
        """The private xattr prefix on this identity's uppers."""
        return USER_PREFIX if self.user else PRIVATE_PREFIX

    @property
    def trusted(self) -> bool:
        """May it set and read ``trusted.*`` xattrs (CAP_SYS_ADMIN in the initial namespace)?"""
        return self.name == "root" and not IN_USERNS

    def own(self, *paths: Path) -> None:
        """Make ``paths`` (trees) this identity's, and reachable by it."""
        if not self.user:
            return
        for p in paths:
            make_traversable(p)
            chown_tree(p, self.uid, self.gid)

    def argv(self, argv: list[str]) -> list[str]:
        return as_user(self.uid, self.gid, argv) if self.user else argv

    def op(self, fn: Callable[[Path], Any], root: Path,
           timeout: float = USER_OP_TIMEOUT) -> tuple[str, Any]:
        """``outcome(fn, root)`` with this identity's credentials."""
        if not self.user:
            return outcome(fn, root)
        return run_as(self.uid, self.gid, fn, root, timeout=timeout)

    def call(self, fn: Callable[[Path], Any], root: Path,
             timeout: float = USER_OP_TIMEOUT) -> Any:
        """``fn(root)``'s value; an OSError fails the test."""
        res = self.op(fn, root, timeout)
        assert res[0] == "ok", f"{getattr(fn, '__name__', 'op')} as {self.name}: {res}"
        return res[1]

    def snapshot(self, root: Path, mtimes: bool = False) -> Snapshot:
        """The merged view as this identity sees it (a user's FUSE mount is its own only)."""
        if not self.user:
            return snapshot_merged(root, mtimes)
        return user_snapshot(self.uid, self.gid, root, mtimes)

    def mount(self, paths: StackPaths, impl: str = IMPL, *, foreground: bool = False,
              options: str = "") -> Any:
        """``impl`` over ``paths`` as this identity, stopped at teardown (``mounter``'s
        contract); as the user the kernel side is root's ``-o userxattr`` mount."""
        m: Any
        if not self.user:
            m = mount_stack(paths, impl, options=options)
        elif impl == "kernel":
            m = KernelMount(paths, userxattr=True, options=options)
        else:
            m = WhoMount(self.uid, self.gid, paths, foreground, options)
        self.registry.items.append(m)
        return m


@pytest.fixture(params=WHO)
def who(request: pytest.FixtureRequest, _registry: Any, tmp_path: Path) -> Who:
    """Parametrizes a test by whom it runs as (``Who``)."""
    name = request.param
    if name != "root" and IN_USERNS:
        pytest.skip(f"as {name}: this run is itself root of a user namespace; the {name} case "
                    "runs from the initial one (root makes the user, grants it /dev/fuse, "
                    "writes the namespace's id maps)")
    if name == "user":
        uid, gid = request.getfixturevalue("fuse_user")
        return Who(name, _registry, tmp_path, uid, gid)
    return Who(name, _registry, tmp_path)


def _root_nodeid(nodeid: str) -> str:
    """The node id of the ``root`` case of a ``userns`` one."""
    base, _, ids = nodeid.partition("[")
    parts = ["root" if p == "userns" else p for p in ids[:-1].split("-")]
    return f"{base}[{'-'.join(parts)}]"


def _item_timeout(item: pytest.Function) -> float:
    marker = item.get_closest_marker("timeout")
    if marker and marker.args:
        return float(marker.args[0])
    value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value or 180)


def _userns_case(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("who") == "userns"


# node id of a root case -> (its <testcase> in the nested run's JUnit XML or None, the run's
# output, its exit status)
_USERNS_DONE: dict[str, tuple[ET.Element | None, str, int]] = {}


def _run_nested(item: pytest.Function, nodeids: list[str]) -> None:
    """``nodeids`` in one nested pytest as root of a fresh user namespace, their results into
    _USERNS_DONE.  The namespace's pid 1 takes every process the run left (daemons) with it."""
    who_: Who = item.funcargs["who"]  # type: ignore[assignment]
    base = who_.tmp_path / "userns"
    xml = who_.tmp_path / "userns.xml"
    limit = _item_timeout(item)
    cmd = [PYTHON, str(REPO / "tests/overlay_harness.py"), "userns", "--",
           PYTHON, "-m", "pytest", *nodeids, "-q", "-p", "no:cacheprovider", "-rA", "-s",
           f"--basetemp={base}", f"--junitxml={xml}", f"--timeout={max(limit - 15, 30):.0f}"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(limit - 10, 35))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # the launcher's group: the ns with it
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=CMD_TIMEOUT)
        out += f"\n(the nested run was still running after {limit - 10:.0f}s: killed)"
    cases: dict[str, ET.Element] = {}
    with contextlib.suppress(OSError, ET.ParseError):
        cases = {c.get("name", ""): c for c in ET.parse(xml).getroot().iter("testcase")}
    for n in nodeids:
        _USERNS_DONE[n] = (cases.get(n.rsplit("::", 1)[-1]), out, proc.returncode)


def run_in_userns(item: pytest.Function) -> None:
    """The ``root`` case of ``item``, run as root of a user namespace by a nested pytest; its
    outcome (passed, skipped, xfailed, failed) becomes this one's.  The userns cases of one
    module share one nested run (an interpreter and pytest start costs 2 s), unless the module
    sets ``USERNS_ONE_BY_ONE`` (cases too long to run within the first one's time limit)."""
    nodeid = _root_nodeid(item.nodeid)
    if nodeid not in _USERNS_DONE:
        batch = [item]
        if not getattr(item.module, "USERNS_ONE_BY_ONE", False):
            batch = [i for i in item.session.items if i.path == item.path and _userns_case(i)
                     and _root_nodeid(i.nodeid) not in _USERNS_DONE]
        _run_nested(item, [_root_nodeid(i.nodeid) for i in batch])
        print(_USERNS_DONE[nodeid][1])  # the nested run's report lines, once
    case, out, rc = _USERNS_DONE.pop(nodeid)
    tail = "\n".join(out.splitlines()[-60:])
    if case is None:
        pytest.fail(f"{nodeid} in a user namespace did not run (exit {rc}):\n{tail}",
                    pytrace=False)
    failed = case.find("failure")
    if failed is None:
        failed = case.find("error")
    if failed is not None:
        pytest.fail(f"{nodeid} in a user namespace: {failed.get('message', '')}\n"
                    f"{(failed.text or '')[-6000:]}", pytrace=False)
    skipped = case.find("skipped")
    if skipped is not None:
        msg = skipped.get("message", "")
        if skipped.get("type") == "pytest.xfail":
            pytest.xfail(f"in a user namespace: {msg}")
        pytest.skip(f"in a user namespace: {msg}")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A ``who=userns`` case runs nested (``run_in_userns``) instead of calling its body."""
    if not _userns_case(pyfuncitem) or IN_USERNS:
        return None
    run_in_userns(pyfuncitem)
    return True
