"""pytest plugin (registered as ``unionfs`` through the ``pytest11`` entry point): overlay
mounts as fixtures (docs/testing.md).

- ``overlay``: a fresh mounted ``Overlay`` per test, layers from the ``overlay_layers``
  marker (``@pytest.mark.overlay_layers(lowers=[{...}], upper={...}, options={...})``),
  on the backend the ``overlay_backends`` marker parametrises over.
- ``overlay_factory``: ``overlay_factory(lowers=[...], upper=..., options=..., backend=...)``
  makes, mounts and returns more; all are unmounted after the test.
- ``@pytest.mark.overlay_backends("pyunionfs", "kernel")``: the test runs once per backend;
  the kernel one is skipped, with the reason, where it can't mount (not root).
- A mount a test leaves behind (an ``Overlay`` mounted by hand and never unmounted) is
  unmounted and reported as an error of that test.

Layer specs: ``{"etc/motd": "text", "bin/tool": b"bytes", "var/empty/": None, "link":
Symlink("target"), "gone": Whiteout()}`` (a path ending in "/" or None is a directory;
nested dicts are directories too).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from unionfs.api import BACKENDS, Overlay, OverlayError, live_overlays


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class Whiteout:
    """A deleted name in a layer (a 0/0 character device, as the kernel writes it)."""


def build_layer(spec: Mapping[str, Any] | None, root: Path) -> Path:
    """Write a layer spec into directory ``root`` (made if missing)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in (spec or {}).items():
        path = root / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Mapping):
            build_layer(value, path)
        elif value is None or name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif isinstance(value, Symlink):
            os.symlink(value.target, path)
        elif isinstance(value, Whiteout):
            os.mknod(path, stat.S_IFCHR, 0)
        elif isinstance(value, bytes):
            path.write_bytes(value)
        elif isinstance(value, str):
            path.write_text(value)
        else:
            raise TypeError(f"layer spec {name!r}: a str, bytes, dict, None, Symlink or "
                            f"Whiteout, not {type(value).__name__}")
    return root


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "overlay_layers(lowers=None, upper=None, options=None): "
                            "the layers of the overlay fixture")
    config.addinivalue_line("markers", "overlay_backends(*backends): run the test on each "
                            "backend (pyunionfs, kernel, fuse-overlayfs)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("overlay_backends")
    if marker is None:
        return
    # fuse-overlayfs only when named: it differs from the kernel where the other two agree
    backends = list(marker.args) or ["pyunionfs", "kernel"]
    for b in backends:
        if b not in BACKENDS:
            raise pytest.UsageError(f"overlay_backends: unknown backend {b!r}")
    metafunc.parametrize("overlay_backend", backends, ids=backends)


@pytest.fixture
def overlay_backend() -> str:
    """The backend of this test run ("pyunionfs" unless overlay_backends says otherwise)."""
    return "pyunionfs"


def _problem(backend: str) -> str | None:
    if backend == "kernel" and os.geteuid() != 0:
        return "the kernel backend needs root (mount -t overlay)"
    if backend != "kernel" and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "no access to /dev/fuse"
    if backend == "fuse-overlayfs" and shutil.which("fuse-overlayfs") is None:
        return "fuse-overlayfs is not installed"
    return None


@pytest.fixture
def overlay_factory(tmp_path_factory: pytest.TempPathFactory, overlay_backend: str
                    ) -> Iterator[Callable[..., Overlay]]:
    made: list[Overlay] = []

    def factory(lowers: list[Mapping[str, Any] | os.PathLike[str] | str] | None = None,
                upper: Mapping[str, Any] | os.PathLike[str] | str | None = None,
                options: Any = None, backend: str | None = None,
                readonly: bool = False) -> Overlay:
        backend = backend or overlay_backend
        why = _problem(backend)
        if why is not None:
            pytest.skip(why)
        base = tmp_path_factory.mktemp("overlay")
        lower_paths = []
        for i, low in enumerate(lowers or [{}]):
            lower_paths.append(build_layer(low, base / f"lower{i}")
                               if isinstance(low, Mapping) else Path(low))
        up = work = None
        if not readonly:
            up = build_layer(upper, base / "upper") if upper is None or \
                isinstance(upper, Mapping) else Path(upper)
            work = base / "work"
            work.mkdir()
        ov = Overlay(lowers=lower_paths, upper=up, work=work, mountpoint=_mk(base / "merged"),
                     options=options, backend=backend, readonly=readonly)
        ov.mount()
        made.append(ov)
        return ov

    yield factory
    errors = []
    for ov in reversed(made):
        try:
            ov.unmount()
        except OverlayError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


def _mk(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture
def overlay(request: pytest.FixtureRequest, overlay_factory: Callable[..., Overlay]) -> Overlay:
    marker = request.node.get_closest_marker("overlay_layers")
    kwargs = dict(marker.kwargs) if marker is not None else {}
    return overlay_factory(**kwargs)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Any:
    before = set(getattr(item, "_unionfs_live", ()))
    result = yield
    leaked = [ov for ov in live_overlays() if ov not in before]
    if leaked:
        for ov in leaked:
            try:
                ov.unmount()
            except OverlayError:
                pass
        raise OverlayError("the test left overlays mounted (unmounted now): "
                           + ", ".join(str(ov.mountpoint) for ov in leaked))
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item._unionfs_live = live_overlays()  # type: ignore[attr-defined]
