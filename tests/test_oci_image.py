"""``pyunionfs image mount|commit|umount`` and the layer store (unionfs/oci/image.py) on archives
written here, without container tools (tests/containers/test_images.py has podman, skopeo and
umoci): layers shared between images, digests checked, bad archives refused in one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from overlay_harness import PYTHON, REPO, USERNS, environment_problem, is_mounted

pytestmark = pytest.mark.skipif(environment_problem() is not None,
                                reason=str(environment_problem()))


def _layer(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            raw = data.encode()
            info.size, info.mode, info.mtime = len(raw), 0o644, 1_600_000_000
            t.addfile(info, io.BytesIO(raw))
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def oci_layout(path: Path, layers: list[bytes], bad_diff_id: bool = False,
               bad_blob: bool = False) -> Path:
    """An OCI image layout (directory) with gzip layers."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        d = _sha(data)
        (blobs / d[7:]).write_bytes(data)
        return d

    descs, diff_ids = [], []
    for raw in layers:
        gz = gzip.compress(raw, mtime=0)
        d = put(gz)
        if bad_blob:
            (blobs / d[7:]).write_bytes(gz + b"tampered")
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                      "digest": d, "size": len(gz)})
        diff_ids.append(_sha(raw if not bad_diff_id else raw + b"x"))
    cfg = json.dumps({"architecture": "amd64", "os": "linux",
                      "rootfs": {"type": "layers", "diff_ids": diff_ids},
                      "config": {"Cmd": ["sh"]}}).encode()
    cfg_d = put(cfg)
    man = json.dumps({"schemaVersion": 2, "config": {
        "mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d,
        "size": len(cfg)}, "layers": descs}).encode()
    man_d = put(man)
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d,
         "size": len(man)}]}))
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return path


BASE = _layer({"etc/os-release": "base\n", "bin/sh": "sh"})
APP = _layer({"app/run": "app\n", "etc/.wh.os-release": ""})
OTHER = _layer({"other/x": "x"})


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "unionfs", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def mounted(tmp_path):
    done: list[tuple[Path, Path]] = []

    def mount(archive: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        m = tmp_path / name
        m.mkdir()
        r = _cli("image", "mount", "--store", str(tmp_path / "store"), *extra, str(archive),
                 str(m))
        if r.returncode == 0:
            done.append((m, tmp_path / "store"))
        return r, m

    yield mount
    for m, store in reversed(done):
        if is_mounted(m):
            _cli("image", "umount", "--store", str(store), str(m))
        if is_mounted(m):
            subprocess.run(["fusermount3", "-u", str(m)], timeout=60)


def test_layers_shared_between_images_and_commit_read_back(tmp_path, mounted):
    one = oci_layout(tmp_path / "one", [BASE, APP])
    two = oci_layout(tmp_path / "two", [BASE, OTHER])
    r, m1 = mounted(one, "m1")
    assert r.returncode == 0, r.stderr
    assert "(2 applied, 0 from the store)" in r.stderr
    assert sorted(os.listdir(m1)) == ["app", "bin", "etc"] and os.listdir(m1 / "etc") == []
    r, m2 = mounted(two, "m2")
    assert r.returncode == 0 and "(1 applied, 1 from the store)" in r.stderr, r.stderr
    assert (m2 / "etc/os-release").read_text() == "base\n"
    assert len(os.listdir(tmp_path / "store/layers")) == 3 * 2  # dirs and their .blob notes
    (m1 / "app/run").write_text("changed\n")
    os.unlink(m1 / "bin/sh")
    out = tmp_path / "new.tar"
    r = _cli("image", "commit", "-q", "--store", str(tmp_path / "store"), "-o", str(out), str(m1))
    assert r.returncode == 0 and r.stdout.startswith("config sha256:"), r.stderr
    r, m3 = mounted(out, "m3")
    assert r.returncode == 0 and "(1 applied, 2 from the store)" in r.stderr, r.stderr
    assert (m3 / "app/run").read_text() == "changed\n" and not (m3 / "bin/sh").exists()
    with tarfile.open(out) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        assert len(manifest[0]["Layers"]) == 3 and "index.json" in t.getnames()
    # a throwaway upper goes with the umount
    containers = tmp_path / "store/containers"
    assert len(os.listdir(containers)) == 3
    assert _cli("image", "umount", "--store", str(tmp_path / "store"), str(m3)).returncode == 0
    assert len(os.listdir(containers)) == 2


@pytest.mark.parametrize("bad", ["diff_id", "blob"])
def test_digest_mismatch_refused(tmp_path, mounted, bad):
    img = oci_layout(tmp_path / "img", [BASE, APP], bad_diff_id=bad == "diff_id",
                     bad_blob=bad == "blob")
    r, m = mounted(img, "m")
    assert r.returncode == 1 and not is_mounted(m)
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("pyunionfs: error: layer 1: ") and "refused" in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not [n for n in os.listdir(tmp_path / "store/layers") if not n.endswith(".blob")]


def test_bad_archives_in_one_line(tmp_path, mounted):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"x" * 4096)
    notimg = tmp_path / "notimg.tar"
    with tarfile.open(notimg, "w") as t:
        t.add(__file__, arcname="readme")
    for archive in (junk, notimg, tmp_path / "missing.tar"):
        r, m = mounted(archive, f"m-{archive.stem}")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "Traceback" not in r.stderr and not is_mounted(m)
    r = _cli("image", "commit", "--store", str(tmp_path / "store"), "-o", str(tmp_path / "o.tar"),
             str(tmp_path))
    assert r.returncode == 1 and "not an image mounted" in r.stderr


@pytest.mark.skipif(USERNS, reason="redirect_dir=on needs trusted.overlay.* (refused with "
                    "userxattr, as by the kernel)")
def test_commit_of_a_moved_directory(tmp_path, mounted):
    # -o redirect_dir=on: the upper only points to the moved directory's content below; the
    # committed layer holds all of it
    img = oci_layout(tmp_path / "img", [BASE, APP])
    r, m = mounted(img, "m", "-o", "redirect_dir=on")
    assert r.returncode == 0, r.stderr
    os.rename(m / "bin", m / "sbin")
    out = tmp_path / "new.tar"
    r = _cli("image", "commit", "-q", "--store", str(tmp_path / "store"), "-o", str(out), str(m))
    assert r.returncode == 0, r.stderr
    r, m2 = mounted(out, "m2")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(m2)) == ["app", "etc", "sbin"]
    assert (m2 / "sbin/sh").read_text() == "sh"


@pytest.mark.parametrize("case", ["symlink-loop", "no-config-key"])
def test_malformed_archives_in_one_line(tmp_path, mounted, case):
    # found in review: a loop of symlinks in a docker save archive hung, a manifest without
    # its keys printed a traceback
    archive = tmp_path / f"{case}.tar"
    with tarfile.open(archive, "w") as t:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if case == "symlink-loop":
            add("manifest.json", json.dumps([{"Config": "c.json", "Layers": []}]).encode())
            for a, b in (("c.json", "d.json"), ("d.json", "c.json")):
                link = tarfile.TarInfo(a)
                link.type, link.linkname = tarfile.SYMTYPE, b
                t.addfile(link)
        else:
            add("manifest.json", json.dumps([{"Layers": []}]).encode())
    r, m = mounted(archive, "m")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not is_mounted(m)
