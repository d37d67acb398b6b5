"""Fixtures: skip conditions, pair/mount factories, and the no-mount-left-behind guards."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from overlay_harness import (
    IMPL,
    USERNS,
    LayerSpec,
    Mount,
    Pair,
    PyUnionMount,
    StackPaths,
    StackSpec,
    build_stack,
    environment_problem,
    force_unmount,
    in_user_namespace,
    mount_stack,
    mounts_under,
    run_cmd,
)

# The test user's fixtures and the "as whom" layer, for every module (rootless_support.py).
from rootless_support import (  # noqa: F401
    fuse_user,
    pytest_pyfunc_call,
    test_user,
    user_mounts,
    who,
)

_PROBLEM = environment_problem()


# UNIONFS_TEST_USERNS=1: tests whose operations (not just their layer specs, which the harness
# translates or skips by itself) cannot hold as root of a user namespace. Keyed by node id without
# parameters.
_ESCAPE_ELSEWHERE = ("sets or reads trusted.overlay.* names through the mount; with userxattr "
                     "those are ordinary trusted.* xattrs (EPERM in a user namespace) — the "
                     "user.overlay. form is in test_rootless_userns.py")
USERNS_SKIPS = {
    "tests/test_dirops.py::test_mknod_devices_fifo_socket":
        "mknod of device nodes through the mount needs CAP_MKNOD outside the user namespace",
    "tests/test_rename.py::test_rename_to_same_name_and_between_hardlinks":
        "premise does not hold: in a user namespace the kernel's copy-up origin is null and it "
        "answers ESTALE to a rename between two hard links of a copied-up file",
    "tests/test_copyup.py::test_copy_up_of_fifo_stays_fifo":
        "premise does not hold: with a null copy-up origin the kernel shows a copied-up file with "
        "its lower st_ino but a new hard link to it with the upper st_ino (until remount), so the "
        "two names don't look linked",
    "tests/test_xattr.py::test_setting_overlay_xattr_is_escaped_in_upper": _ESCAPE_ELSEWHERE,
    "tests/test_xattr.py::test_escaped_xattr_on_disk_appears_unescaped": _ESCAPE_ELSEWHERE,
}

# UNIONFS_TEST_USERNS=1, pyunionfs side only: differences that come from FUSE itself there.
# (None since the mount declares FUSE_POSIX_ACL: without it the kernel answered ACL queries in
# a user namespace with EOPNOTSUPP itself, fs/fuse/acl.c fuse_no_acl.)
USERNS_XFAILS: dict[str, str] = {}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "watchdog(seconds): kill this test's daemons after seconds")
    if USERNS and not in_user_namespace():
        raise pytest.UsageError(
            "UNIONFS_TEST_USERNS=1 needs pytest running inside a user namespace: start it as "
            "`python tests/overlay_harness.py userns -- python -m pytest ...`")


# Files whose tests change or measure what the whole machine shares: they drop the kernel's
# caches (which would evict another test's cached dentries and pages while it counts requests or
# checks residency), grant /dev/fuse to the test user and restore it, make users, put a helper
# in /usr/local/bin, or run make/pip on this checkout (which may rewrite the venv's entry point
# that helper links to: a remount then found no /usr/local/bin/pyunionfs), or hold the test
# user's /dev/fuse grant (fuse_user, who: a module holds it throughout, another waits for it).
# Under pytest-xdist (`make test`) they form one group, run one after the other on one
# worker, while every other file runs beside them.
HOST_WIDE = {"test_attrs.py", "test_caching.py", "test_posix_misc.py", "test_regressions.py",
             "test_remount.py", "test_rootless.py", "test_rootless_userns.py", "test_direct_io.py",
             "test_bench.py", "test_mount_faults.py", "test_durability.py", "test_kernel_cache.py",
             "test_packaging.py", "test_faults.py", "test_soak.py", "test_claim.py",
             "test_stress_concurrent.py", "test_stress_resources.py", "test_stress_integrity.py",
             "test_stress_fio.py", "test_stress_hostile.py", "test_stress_kill.py",
             "test_stress_faults.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in HOST_WIDE:
            item.add_marker(pytest.mark.xdist_group("host"))
    if not USERNS:
        return
    for item in items:
        test = item.nodeid.split("[", 1)[0]
        if test in USERNS_SKIPS:
            item.add_marker(pytest.mark.skip(reason=f"userns mode: {USERNS_SKIPS[test]}"))
        if test in USERNS_XFAILS and IMPL != "kernel":
            item.add_marker(pytest.mark.xfail(strict=True,
                                              reason=f"userns mode: {USERNS_XFAILS[test]}"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    # remember each phase's report so fixtures can attach daemon logs to failing tests
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(scope="session")
def _environment() -> None:
    """Skip (not fail) where mount tests can't run. Not autouse: tests that need no mount (e.g.
    test_layering.py) still run anywhere."""
    if _PROBLEM:
        pytest.skip(_PROBLEM)


def _unmount_leftovers(tmp_path_factory: pytest.TempPathFactory, what: str) -> None:
    left = mounts_under(tmp_path_factory.getbasetemp())
    for m in sorted(left, key=len, reverse=True):
        force_unmount(m)
    assert not left, f"{what}: {left}"


@pytest.fixture(scope="session", autouse=True)
def _no_mount_left_behind_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Session guard: nothing under pytest's temp root may still be mounted at the end."""
    yield
    _unmount_leftovers(tmp_path_factory, "mounts left behind at session end")


@pytest.fixture(autouse=True)
def _no_mount_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Per-test guard, so a leak is pinned on the test that caused it (and cleaned up at once)."""
    yield
    _unmount_leftovers(tmp_path_factory, "test left mounts behind")


# A FUSE request the daemon never answers blocks the test in an uninterruptible wait, and
# pytest-timeout's SIGALRM cannot break it. So each test gets a watchdog thread that SIGKILLs the
# daemons it started shortly before pytest-timeout (180 s) would fire: the kernel then fails every
# pending request with ENOTCONN, the test fails, and teardown cleans up normally.
WATCHDOG_SECONDS = 150.0


class _Registry:
    """Everything a test mounted, stopped in reverse order at teardown even when the test failed."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path):
        self.request = request
        self.tmp_path = tmp_path
        self.items: list[Pair | Mount] = []
        self.n = 0
        self.watchdog_fired = False
        marker = request.node.get_closest_marker("watchdog")
        self.watchdog_seconds = float(marker.args[0]) if marker else WATCHDOG_SECONDS
        self._timer = threading.Timer(self.watchdog_seconds, self._kill_daemons)
        self._timer.daemon = True
        self._timer.start()

    def _kill_daemons(self) -> None:
        self.watchdog_fired = True
        for it in list(self.items):
            for m in _mounts_of(it):
                if isinstance(m, PyUnionMount):
                    m.overlay.kill()

    def base(self, prefix: str) -> Path:
        self.n += 1
        return self.tmp_path / f"{prefix}{self.n}"

    def close(self) -> None:
        self._timer.cancel()
        errors: list[Exception] = []
        if self.watchdog_fired:
            errors.append(TimeoutError(f"watchdog killed the daemons after {self.watchdog_seconds}s "
                                       "(a request was never answered?)"))
        logs = []
        for it in reversed(self.items):
            for m in _mounts_of(it):
                if isinstance(m, PyUnionMount):
                    logs.append(f"--- {m.paths.base} ---\n{m.log_tail(200)}")
            try:
                it.stop()
            except Exception as e:  # noqa: BLE001 - stop everything, report afterwards
                errors.append(e)
        failed = any(getattr(getattr(self.request.node, f"rep_{w}", None), "failed", False)
                     for w in ("setup", "call"))
        if (failed or errors) and logs:
            self.request.node.add_report_section("teardown", "pyunionfs log", "\n".join(logs))
        if errors:
            raise errors[0]


def _mounts_of(it: Pair | Mount) -> list[Mount]:
    if isinstance(it, Pair):
        return [s.mount for s in it.sides if s.mount is not None]
    return [it]


@pytest.fixture
def _registry(_environment: None, request: pytest.FixtureRequest,
              tmp_path: Path) -> Iterator[_Registry]:
    reg = _Registry(request, tmp_path)
    try:
        yield reg
    finally:
        reg.close()


@pytest.fixture
def make_pair(_registry: _Registry) -> Callable[..., Pair]:
    """``make_pair(lowers=[top, ..., bottom], upper=None, readonly=False, options="") -> Pair``.

    Builds the stack twice and mounts it with the kernel and with pyunionfs (or the kernel twice
    under UNIONFS_TEST_IMPL=kernel), both with the mount ``options`` given."""

    def factory(lowers: list[LayerSpec], upper: LayerSpec | None = None,
                readonly: bool = False, options: str = "") -> Pair:
        pair = Pair(StackSpec(lowers=lowers, upper=upper, readonly=readonly), _registry.base("pair"),
                    options=options)
        _registry.items.append(pair)
        return pair

    return factory


@pytest.fixture
def make_stack(_registry: _Registry) -> Callable[..., StackPaths]:
    """``make_stack(lowers, upper=None, readonly=False) -> StackPaths`` (not mounted)."""

    def factory(lowers: list[LayerSpec], upper: LayerSpec | None = None,
                readonly: bool = False) -> StackPaths:
        return build_stack(StackSpec(lowers=lowers, upper=upper, readonly=readonly),
                           _registry.base("stack"))

    return factory


@pytest.fixture
def mounter(_registry: _Registry) -> Callable[..., Mount]:
    """``mounter(paths, impl='pyunionfs'|'kernel', work=None) -> Mount``; stopped at teardown
    unless the test stops it first (stop() is idempotent)."""

    def factory(paths: StackPaths, impl: str = IMPL, work: Path | None = None) -> Mount:
        m = mount_stack(paths, impl, work)
        _registry.items.append(m)
        return m

    return factory


@pytest.fixture
def tmpfs(_registry: _Registry) -> Callable[[], Path]:
    """A fresh small tmpfs (for layers on other filesystems); unmounted at teardown."""
    mounted: list[Path] = []

    def factory() -> Path:
        p = _registry.base("tmpfs")
        p.mkdir()
        r = run_cmd(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(p)])
        assert r.returncode == 0, f"mounting a tmpfs failed: {r.stderr}"
        mounted.append(p)
        return p

    class _Tmpfs:
        def stop(self) -> None:
            for p in reversed(mounted):
                with contextlib.suppress(Exception):
                    run_cmd(["umount", str(p)])
                force_unmount(str(p))

    _registry.items.insert(0, _Tmpfs())  # type: ignore[arg-type]  # stopped last (after overlays)
    return factory
