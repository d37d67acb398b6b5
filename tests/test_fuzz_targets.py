"""The fuzz targets of tests/fuzz/ kept working: every seed through every target's
``one_input`` (plain pytest), a short atheris run of each (skipped, saying so, without
atheris), and hypothesis driving the same targets with structured inputs: option
strings from their grammar, layer tars from entry lists, manifests from JSON."""

from __future__ import annotations

import importlib
import json
import os
import sys
import tarfile
from types import ModuleType

import pytest
from fuzz import TARGETS, common
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _target(name: str) -> ModuleType:
    return importlib.import_module(f"fuzz.{name}")


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_run_clean(name: str) -> None:
    module = _target(name)
    seeds = module.seeds()
    assert seeds, f"{name} has no seeds"
    for seed in seeds:
        module.one_input(seed)


def test_every_module_is_a_target() -> None:
    here = os.path.join(REPO, "tests", "fuzz")
    modules = {f[:-3] for f in os.listdir(here)
               if f.endswith(".py") and f not in ("__init__.py", "common.py", "runner.py")}
    assert modules == set(TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_atheris_runs_each_target(name: str, tmp_path: object) -> None:
    pytest.importorskip("atheris", reason="atheris not installed: the coverage-guided run of "
                        "the fuzz targets is skipped (.venv/bin/pip install atheris)")
    res = _load_script().run_target(name, seconds=20, runs=200, timeout=10, rss_mb=2048,
                                 python=sys.executable, out=str(tmp_path))
    assert not res.crashes, open(os.path.join(str(tmp_path), name, "last-run.log")).read()
    assert res.execs > 0


def _load_script() -> ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_script",
                                                  os.path.join(REPO, "scripts", "fuzz.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_script"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- hypothesis: structured inputs ------------------------------------------------------

_WORDS = st.sampled_from([
    "lowerdir=/a:/b", "lowerdir=/a\\:b", "upperdir=/u", "workdir=/w", "redirect_dir=on",
    "redirect_dir=follow", "redirect_dir=off", "index=on", "index=off", "metacopy=on",
    "nfs_export=on", "xino=auto", "uuid=null", "userxattr", "volatile", "volatile=0",
    "noatime", "strictatime", "relatime", "nodiratime", "squash_to_root", "squash_to_uid=5",
    "uidmapping=0:1000:1", "gidmapping=:0:100000:65536", "timeout=0", "timeout=1e9",
    "writeback", "xattr_permissions=1", "whiteouts=oci", "noacl", "ro", "allow_other",
    'context="a,b"', "x-systemd.automount", "fsname=x", "threaded", "", "\\,", "=",
])
_FREE = st.text(alphabet="=,:\\\"/aon01.-_ ²", max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_WORDS, _FREE), max_size=8), st.booleans())
def test_options_from_their_grammar(words: list[str], mount_program: bool) -> None:
    _target("options").one_input((("!" if mount_program else "") + ",".join(words)).encode())


_NAMES = st.lists(st.sampled_from(["a", "b", ".wh.a", ".wh..wh..opq", ".wh..wh.plnk", "..",
                                   ".", "", "c" * 200, "\u00e9", ".wh."]),
                  min_size=1, max_size=3).map("/".join)
_KINDS = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                          tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
_XATTRS = st.dictionaries(st.sampled_from(["user.a", "trusted.overlay.opaque",
                                           "user.overlay.redirect", "trusted.x",
                                           "security.capability", "user." + "x" * 260,
                                           "system.posix_acl_access"]),
                          st.text(max_size=6), max_size=2)


@st.composite
def _entries(draw: st.DrawFn) -> bytes:
    out: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(_KINDS)
        i = common.info(draw(_NAMES), kind, draw(st.sampled_from([0, 0o644, 0o755, 0o4755])),
                        pax_headers={f"SCHILY.xattr.{k}": v for k, v in draw(_XATTRS).items()})
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            i.linkname = draw(st.one_of(_NAMES, st.just("../../sentinel/canary")))
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            i.devmajor, i.devminor = draw(st.sampled_from([(0, 0), (1, 3), (7, 0)]))
        if kind == tarfile.REGTYPE:
            out.append((i, draw(st.binary(max_size=16))))
        else:
            out.append(i)
    return common.tar_bytes(out)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_entries())
def test_layer_tars_from_entry_lists(data: bytes) -> None:
    _target("layer_tar").one_input(data)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                     | st.sampled_from(["@1", "@2", "sha256:", "blobs/sha256/%1"]),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.sampled_from(
                         ["manifests", "digest", "config", "layers", "rootfs", "diff_ids",
                          "Config", "Layers", "RepoTags", "platform", "mediaType",
                          "annotations"]), inner, max_size=4),
                     max_leaves=12)


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([0, 2]), st.lists(_JSON, min_size=1, max_size=4))
def test_manifests_from_json(flags: int, docs: list[object]) -> None:
    image = _target("image")
    body = image.SEP.join(json.dumps(d).encode() for d in docs)
    image.one_input(bytes([flags]) + body)
