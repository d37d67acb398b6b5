"""What fuzzing (tests/fuzz/, scripts/fuzz.py) found, kept found: each input inline, run
through the command line where a user meets it, with the one line it now prints and
nothing written outside the target directory.  Runs without atheris."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from fuzz import common, index_entry, nlink_xattr

from unionfs import index

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYUNIONFS_SERVER": "0", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "unionfs", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def _one_error_line(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 1, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == f"pyunionfs: error: {expected}", lines[0]


@pytest.fixture
def box() -> common.Sandbox:
    """A sentinel beside the work directory: checked unchanged after every test."""
    return common.Sandbox()


# -- layer tars ---------------------------------------------------------------------------


@pytest.mark.parametrize("xattr, value, why", [
    # a name the filesystem refuses (longer than XATTR_NAME_MAX): ERANGE, as any user
    ("user." + "x" * 300, "v", "Numerical result out of range"),
])
def test_layer_xattr_the_filesystem_refuses(box: common.Sandbox, xattr: str, value: str,
                                            why: str) -> None:
    """Was an OSError with no entry named ("pyunionfs: error: Numerical result out of
    range"), from _meta's setxattr re-raising anything but EPERM/ENOTSUP/EACCES."""
    with box.input_dir() as work:
        tar = os.path.join(work, "in.tar")
        with open(tar, "wb") as f:
            f.write(common.tar_bytes([
                common.info("d/", tarfile.DIRTYPE, 0o755),
                (common.info("d/f", pax_headers={f"SCHILY.xattr.{xattr}": value}), b"x")]))
        dest = os.path.join(work, "layer")
        _one_error_line(_cli("layer", "apply", "-q", tar, dest),
                        f"entry 'd/f': xattr {xattr!r}: {why}")
        assert sorted(os.listdir(work)) == ["in.tar"]  # the partial layer removed


@pytest.mark.parametrize("entries, expected", [
    # found by hypothesis through the layer_tar target's round trip: the first apply made a
    # directory ".wh.a", which export wrote and the next apply read as a whiteout of "a"
    ([".wh.a/a"], "entry '.wh.a/a': below the whiteout name '.wh.a'"),
    (["a/.wh.a/a"], "entry 'a/.wh.a/a': below the whiteout name '.wh.a'"),
    (["a", ".wh.a/a"], "entry '.wh.a/a': below the whiteout name '.wh.a'"),
])
def test_layer_entry_below_a_whiteout_name(box: common.Sandbox, entries: list[str],
                                           expected: str) -> None:
    with box.input_dir() as work:
        tar = os.path.join(work, "in.tar")
        with open(tar, "wb") as f:
            f.write(common.tar_bytes([common.info(n) for n in entries]))
        _one_error_line(_cli("layer", "apply", "-q", tar, os.path.join(work, "layer")),
                        expected)
        assert sorted(os.listdir(work)) == ["in.tar"]


def test_layer_aufs_bookkeeping_is_skipped(box: common.Sandbox) -> None:
    """AUFS's hard-link directory and what it holds are no content, as before."""
    with box.input_dir() as work:
        tar = os.path.join(work, "in.tar")
        with open(tar, "wb") as f:
            f.write(common.tar_bytes([common.info(".wh..wh.plnk/", tarfile.DIRTYPE, 0o700),
                                      (common.info(".wh..wh.plnk/12.34"), b"x"),
                                      (common.info("f"), b"y")]))
        dest = os.path.join(work, "layer")
        assert _cli("layer", "apply", "-q", tar, dest).returncode == 0
        assert os.listdir(dest) == ["f"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set security.capability: "
                    "without it the xattr is dropped, as EPERM always was")
def test_layer_bad_capability_xattr(box: common.Sandbox) -> None:
    """A security.capability the kernel can't parse (EINVAL) in an otherwise fine layer:
    the first seed of the layer_tar target had one."""
    with box.input_dir() as work:
        tar = os.path.join(work, "in.tar")
        with open(tar, "wb") as f:
            f.write(common.tar_bytes([(common.info(
                "bin/tool", pax_headers={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}),
                b"\x7fELF")]))
        _one_error_line(_cli("layer", "apply", "-q", tar, os.path.join(work, "layer")),
                        "entry 'bin/tool': xattr 'security.capability': Invalid argument")
        assert sorted(os.listdir(work)) == ["in.tar"]


# -- image archives -----------------------------------------------------------------------


def _docker_archive(root: str, manifest: bytes, config: bytes) -> None:
    os.makedirs(root)
    with open(os.path.join(root, "config.json"), "wb") as f:
        f.write(config)
    with open(os.path.join(root, "manifest.json"), "wb") as f:
        f.write(manifest)


@pytest.mark.parametrize("manifest, config, expected", [
    # json recurses per level: RecursionError escaped read_image's (KeyError, ..., ValueError)
    (b"[" * 100_000, b"{}", "manifest.json is not JSON we read (nested too deep)"),
    (json.dumps([{"Config": "config.json", "Layers": []}]).encode(),
     b'{"rootfs": ' * 50_000, "config.json is not JSON we read (nested too deep)"),
    # a diff_id that is no string went on into Store.layer_dir: AttributeError
    (json.dumps([{"Config": "config.json", "Layers": ["config.json"]}]).encode(),
     json.dumps({"rootfs": {"diff_ids": [5]}}).encode(),
     "diff_ids of the config is not a list of strings"),
    (json.dumps([{"Config": "config.json", "Layers": "config.json"}]).encode(),
     json.dumps({"rootfs": {"diff_ids": []}}).encode(),
     "Layers of manifest.json is not a list of strings"),
    (json.dumps([{"Config": "config.json", "Layers": [], "RepoTags": [1]}]).encode(),
     json.dumps({"rootfs": {"diff_ids": []}}).encode(),
     "RepoTags of manifest.json is not a list of strings"),
    (json.dumps([{"Config": ["config.json"], "Layers": []}]).encode(), b"{}",
     "Config of manifest.json is not a list of strings"),
])
def test_image_manifest(box: common.Sandbox, manifest: bytes, config: bytes,
                        expected: str) -> None:
    with box.input_dir() as work:
        archive = os.path.join(work, "archive")
        _docker_archive(archive, manifest, config)
        merged = os.path.join(work, "merged")
        os.mkdir(merged)
        store = os.path.join(work, "store")
        _one_error_line(_cli("image", "mount", "-q", "--store", store, archive, merged),
                        f"'{archive}': {expected}")
        assert not os.listdir(os.path.join(store, "layers"))


def test_image_oci_tag_not_a_string(box: common.Sandbox) -> None:
    with box.input_dir() as work:
        root = os.path.join(work, "oci")
        os.makedirs(os.path.join(root, "blobs", "sha256"))

        def blob(doc: object) -> str:
            raw = json.dumps(doc).encode()
            digest = hashlib.sha256(raw).hexdigest()
            with open(os.path.join(root, "blobs", "sha256", digest), "wb") as f:
                f.write(raw)
            return "sha256:" + digest

        cfg = blob({"rootfs": {"diff_ids": []}})
        man = blob({"config": {"digest": cfg}, "layers": []})
        with open(os.path.join(root, "index.json"), "w") as f:
            json.dump({"manifests": [{"digest": man, "annotations": {
                "org.opencontainers.image.ref.name": {"not": "a tag"}}}]}, f)
        with open(os.path.join(root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
        merged = os.path.join(work, "merged")
        os.mkdir(merged)
        _one_error_line(_cli("image", "mount", "-q", "--store", os.path.join(work, "s"), root,
                             merged), f"'{root}': a tag in index.json is not a list of strings")


# -- on-disk formats read by index.py --------------------------------------------------


@pytest.mark.parametrize("value", [b"U+2147483647", b"U+99999999999", b"U+1_0", b"U+1 ",
                                   b"U+" + b"9" * 40])
def test_nlink_read_as_the_kernel_reads_it(value: bytes) -> None:
    nlink_xattr.one_input(b"\x01\x01" + value)


# What ovl_get_nlink makes of each value (upper 2 links, lower 3), pinned here rather than
# only compared with the fuzz target's model of it.
@pytest.mark.parametrize(("value", "want"), [
    (b"U+1", 3), (b"U+0", 2), (b"U-1", 1), (b"U-2", None), (b"L-1", 2), (b"L+0\n", 3),
    (b"L-+1", None), (b"U++1", None), (b"U+1\0junk", 3), (b"U+2147483645", 2147483647),
    (b"U+2147483646", None), (b"U+0000000001", 3), (b"U+00000000001", None), (b"U+1 ", None),
    (b"X+1", None), (b"U", None), (b"", None)])
def test_nlink_values(value: bytes, want: int | None) -> None:
    assert index.parse_nlink(value, 2, 3) == want


def test_index_lookup_of_a_long_origin() -> None:
    index_entry.one_input(bytes([0, 0xFB, 200, 0, 1]) + bytes(195))
