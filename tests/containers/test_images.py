"""``pyunionfs image mount|commit`` against the tools users have: podman saves the image (docker
and OCI archives), skopeo converts, umoci unpacks it independently (its rootfs is what our mount
must show), and podman loads what we commit and runs it.  Root and rootless (the podman user of
the rootless set-up; the layers then carry the user.overlay.* dialect)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import podman_env as pe
import pytest
from podman_env import BASE_IMAGE, PodmanEnv

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(not (shutil.which("skopeo") and shutil.which("umoci")),
                                 reason="skopeo and umoci: run scripts/containers/install-deps.sh")]

CHANGE = ("echo changed > {m}/etc/motd && rm {m}/bin/true && mkdir -p {m}/new/dir && "
          "echo n > {m}/new/dir/f && rm -rf {m}/data/dir && mkdir {m}/data/dir && "
          "echo z > {m}/data/dir/z")


def _tree(penv: PodmanEnv, root: Path) -> list[str]:
    """Every name under ``root`` with its type, link target and content hash, as the podman
    user sees it (a rootless FUSE mount is that user's alone)."""
    script = ("cd \"$1\" && find . -mindepth 1 -printf '%y %p %l\\n' | sort && "
              "find . -type f -exec sha256sum {} + | sort -k2")
    return penv.sh(["sh", "-c", script, "tree", str(root)]).stdout.splitlines()


def _pyunionfs(penv: PodmanEnv, *args: str, check: bool = True):
    return penv.sh([pe.pyunionfs_program(), *args], check=check)


def _owned(penv: PodmanEnv, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if penv.user:
        os.chown(path, penv.uid, penv.gid)
    return path


@pytest.fixture(scope="module")
def saved(penv: PodmanEnv) -> dict[str, Path]:
    """The base image with a layer on top, saved by podman in both formats."""
    penv.podman("run", "--name", "ct-img", BASE_IMAGE, "sh", "-c",
                "mkdir -p /data/dir /etc && echo old > /etc/motd && touch /data/dir/x")
    penv.podman("commit", "-q", "ct-img", "localhost/ctest-img:latest")
    penv.podman("rm", "ct-img")
    out = {}
    for fmt in ("docker-archive", "oci-archive"):
        path = penv.work / f"img-{fmt}.tar"
        penv.podman("save", "--format", fmt, "-o", str(path), "localhost/ctest-img:latest")
        out[fmt] = path
    return out


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_mount_shows_what_umoci_unpacks(penv: PodmanEnv, saved: dict[str, Path], fmt: str) -> None:
    work = _owned(penv, penv.work / f"umoci-{fmt}")
    layout = work / "layout"
    penv.sh(["skopeo", "copy", "-q", f"{fmt}:{saved[fmt]}", f"oci:{layout}:img"])
    bundle = work / "bundle"
    penv.sh(["umoci", "unpack", *(["--rootless"] if penv.rootless else []), "--image",
             f"{layout}:img", str(bundle)])
    merged = _owned(penv, work / "merged")
    store = _owned(penv, work / "store")
    _pyunionfs(penv, "image", "mount", "-q", "--store", str(store), str(saved[fmt]), str(merged))
    try:
        assert _tree(penv, merged) == _tree(penv, bundle / "rootfs")
    finally:
        _pyunionfs(penv, "image", "umount", "--store", str(store), str(merged))
    assert not pe.mounts_under(work)


def test_commit_loads_into_podman_and_runs(penv: PodmanEnv, saved: dict[str, Path]) -> None:
    work = _owned(penv, penv.work / "commit")
    merged, store = _owned(penv, work / "merged"), _owned(penv, work / "store")
    first = _pyunionfs(penv, "image", "mount", "--store", str(store),
                       str(saved["docker-archive"]), str(merged))
    try:
        assert "applied" in first.stderr
        penv.sh(["sh", "-c", CHANGE.format(m=merged)])
        want = _tree(penv, merged)
        out = work / "new.tar"
        _pyunionfs(penv, "image", "commit", "-q", "--store", str(store), "--tag",
                   "localhost/ctest-ours:v1", "-o", str(out), str(merged))
    finally:
        _pyunionfs(penv, "image", "umount", "--store", str(store), str(merged))
    # our archive, read by podman: the same files in a container
    penv.podman("load", "-q", "-i", str(out))
    ran = penv.podman("run", "--rm", "localhost/ctest-ours:v1", "sh", "-c",
                      "cat /etc/motd /new/dir/f /data/dir/z; ls /data/dir; "
                      "test -e /bin/true && echo still-there || echo gone").stdout
    assert ran.split() == ["changed", "n", "z", "z", "gone"]
    # and by ourselves, from a second store use: only the new layer is applied
    again = _owned(penv, work / "again")
    second = _pyunionfs(penv, "image", "mount", "--store", str(store), str(out), str(again))
    try:
        assert _tree(penv, again) == want
        assert "1 applied" in second.stderr, second.stderr
    finally:
        _pyunionfs(penv, "image", "umount", "--store", str(store), str(again))
    penv.podman("rmi", "localhost/ctest-ours:v1")
