"""podman/buildah with a mount_program: fixtures. Only collected under `make test-containers`
(which sets PYUNIONFS_CONTAINER_TESTS=1), so `make test` stays as it was.

    PYUNIONFS_CONTAINER_DRIVERS  comma list of pyunionfs, fuse-overlayfs, native (default pyunionfs)
    PYUNIONFS_CONTAINER_MODES    comma list of root, rootless (default root,rootless)
    PYUNIONFS_CTEST_LOG=0        don't pass --log FILE to pyunionfs (the wrapper still logs calls)
    PYUNIONFS_CTEST_MOUNTOPT     storage.conf mountopt for the mount_program drivers (nodev)
    PYUNIONFS_CTEST_TMP          parent of the temporary stores (/var/tmp)
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "containers"))

import podman_env as pe  # noqa: E402

ENABLE = "PYUNIONFS_CONTAINER_TESTS"
if os.environ.get(ENABLE) != "1":
    collect_ignore_glob = ["test_*.py"]


def _combos() -> list[tuple[str, str]]:
    drivers = [d.strip() for d in os.environ.get("PYUNIONFS_CONTAINER_DRIVERS",
                                                 "pyunionfs").split(",") if d.strip()]
    modes = [m.strip() for m in os.environ.get("PYUNIONFS_CONTAINER_MODES",
                                               "root,rootless").split(",") if m.strip()]
    for d in drivers:
        if d not in pe.DRIVERS:
            raise pytest.UsageError(f"PYUNIONFS_CONTAINER_DRIVERS: unknown driver {d!r}")
    for m in modes:
        if m not in ("root", "rootless"):
            raise pytest.UsageError(f"PYUNIONFS_CONTAINER_MODES: unknown mode {m!r}")
    return [(d, m) for d in drivers for m in modes]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "penv" in metafunc.fixturenames:
        combos = _combos()
        metafunc.parametrize("penv", combos, indirect=True, scope="module",
                             ids=[f"{d}-{m}" for d, m in combos])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    rep = yield
    setattr(item, f"_ct_rep_{rep.when}", rep)
    return rep


def _problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (podman as root, and runuser for the rootless user)"
    for tool in ("podman", "buildah", "runc", "runuser", "setfacl", "newuidmap", pe.BUSYBOX):
        if not (os.path.exists(tool) or any(os.access(os.path.join(d, tool), os.X_OK)
                                            for d in pe.PATH_ENV.split(":"))):
            return f"{tool} not found (run scripts/containers/install-deps.sh)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    return None


@pytest.fixture(scope="session", autouse=True)
def _host_state() -> Iterator[None]:
    with pe.host_state_guard():
        yield


@pytest.fixture(scope="module")
def penv(request: pytest.FixtureRequest) -> Iterator[pe.PodmanEnv]:
    """An isolated store for (driver, root|rootless) with the base image imported."""
    driver, mode = request.param
    problem = _problem()
    if problem:
        pytest.skip(problem)
    if driver == "pyunionfs" and not os.access(pe.pyunionfs_program(), os.X_OK):
        pytest.fail(f"{pe.pyunionfs_program()} missing: run `make deps`")
    with contextlib.ExitStack() as stack:
        user = None
        if mode == "rootless":
            pw = pe.ensure_test_user()
            user = pw.pw_name
            if driver != "native":
                # /dev/fuse is 0600 root here: the user's mount program must open it
                stack.enter_context(pe.acl_grant("/dev/fuse", pw.pw_uid, "rw"))
            if driver == "pyunionfs":
                # the venv's interpreter may live in a directory the user can't search
                for d in pe.untraversable_dirs(pe.pyunionfs_paths()):
                    stack.enter_context(pe.acl_grant(d, pw.pw_uid, "--x"))
        env = pe.PodmanEnv.create(driver, user,
                                  pyunionfs_log=os.environ.get("PYUNIONFS_CTEST_LOG") != "0")

        def close() -> None:
            notes = env.close()
            if notes:
                warnings.warn(f"{driver}-{mode} cleanup: " + "; ".join(notes), stacklevel=1)

        stack.callback(close)
        env.import_base_image()
        yield env


@pytest.fixture(autouse=True)
def _mount_program_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """On failure, attach what the pyunionfs mount program logged during the test."""
    if "penv" not in request.fixturenames:
        yield
        return
    env: pe.PodmanEnv = request.getfixturevalue("penv")
    start = env.log.stat().st_size if env.log and env.log.exists() else 0
    yield
    failed = any(getattr(getattr(request.node, f"_ct_rep_{w}", None), "failed", False)
                 for w in ("setup", "call"))
    if failed and env.log and env.log.exists():
        with open(env.log, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        lines = text.splitlines()
        if len(lines) > 400:
            lines = [f"[... {len(lines) - 400} lines ...]", *lines[-400:]]
        request.node.add_report_section("teardown", f"pyunionfs log {env.log}",
                                        "\n".join(lines) or "(nothing logged)")
