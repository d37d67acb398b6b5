"""Image archives (untrusted): a ``docker save`` tar (manifest.json) or an OCI layout
(index.json, manifests, configs, blobs), imported into a fresh layer store.

The first byte chooses the form: odd, the rest is a whole archive tar; even, the rest is
documents separated by ``\\n---\\n``, written as a directory: the first is manifest.json
(bit 1 set) or index.json, the others blobs under their digests.  So that the fuzzer can
name a blob it can't hash, ``@N`` in a document stands for ``sha256:<hex of document N>``
and ``%N`` for the hex alone (documents refer forward: N is substituted last first)."""

from __future__ import annotations

import hashlib
import json
import os
import re

from unionfs.oci import image
from unionfs.oci.layer import LayerError

from . import common
from .common import Finding, info, sample_layer, tar_bytes

SEP = b"\n---\n"
MAX_DOCS = 8
_TOKEN = re.compile(rb"([@%])([0-9])")


def _documents(body: bytes) -> list[bytes]:
    docs = body.split(SEP)[:MAX_DOCS]
    hexes: dict[int, str] = {}
    for n in range(len(docs) - 1, -1, -1):
        def sub(m: re.Match[bytes]) -> bytes:
            k = int(m.group(2))
            h = hexes.get(k)
            if h is None:
                return m.group(0)
            return (b"sha256:" if m.group(1) == b"@" else b"") + h.encode()
        docs[n] = _TOKEN.sub(sub, docs[n])
        hexes[n] = hashlib.sha256(docs[n]).hexdigest()
    return docs


def _layout(work: str, flags: int, body: bytes) -> str:
    root = os.path.join(work, "archive")
    os.makedirs(os.path.join(root, "blobs", "sha256"))
    docs = _documents(body)
    top = "manifest.json" if flags & 2 else "index.json"
    with open(os.path.join(root, top), "wb") as f:
        f.write(docs[0])
    if top == "index.json":
        with open(os.path.join(root, "oci-layout"), "w") as f:
            f.write('{"imageLayoutVersion":"1.0.0"}')
    for doc in docs[1:]:
        with open(os.path.join(root, "blobs", "sha256", hashlib.sha256(doc).hexdigest()),
                  "wb") as f:
            f.write(doc)
    return root


def _check_image(img: image.Image) -> None:
    """What import_archive and commit go on to use, typed as the dataclasses say."""
    if not isinstance(img.config, dict) or not isinstance(img.config_digest, str):
        raise Finding(f"config of type {type(img.config).__name__} accepted")
    if not isinstance(img.layers, list) or not all(isinstance(t, str) for t in img.tags):
        raise Finding(f"tags {img.tags!r} accepted")
    for ref in img.layers:
        if not isinstance(ref.blob, str) or not isinstance(ref.diff_id, str) or \
                not isinstance(ref.digest, (str, type(None))):
            raise Finding(f"layer reference {ref!r} accepted")


def one_input(data: bytes) -> None:
    if not data:
        return
    box = common.sandbox()
    with box.input_dir() as work:
        if data[0] & 1:
            archive = os.path.join(work, "archive.tar")
            with open(archive, "wb") as f:
                f.write(data[1:])
        else:
            archive = _layout(work, data[0], data[1:])
        try:
            src = image._Source(archive)
            try:
                _check_image(image.read_image(src))
            finally:
                src.close()
            image.Store(os.path.join(work, "store")).import_archive(archive)
        except LayerError as e:
            if not str(e) or "\n" in str(e):
                raise Finding(f"not a one-line error: {str(e)!r}") from None
        except OSError as e:
            # oci.cli.report prints one with an errno as one line; without, a Python message
            if not common.clean_os_error(e):
                raise


def _sample_parts() -> tuple[bytes, bytes, str]:
    tar = sample_layer()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    return tar, config, diff_id


def seeds() -> list[bytes]:
    tar, config, diff_id = _sample_parts()
    small = tar_bytes([(info("hello"), b"hi\n")])
    out: list[bytes] = []
    # both archive forms at once, as commit writes them
    with common.sandbox().input_dir() as work:
        lpath = os.path.join(work, "layer.tar")
        with open(lpath, "wb") as f:
            f.write(tar)
        cfg_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        arch = os.path.join(work, "a.tar")
        image._write_archive(arch, config, cfg_digest, [(diff_id, lpath)], "x/y:1")
        with open(arch, "rb") as f:
            out.append(b"\x01" + f.read())
    index = {"schemaVersion": 2, "mediaType": image.OCI_INDEX, "manifests": [
        {"mediaType": image.OCI_MANIFEST, "digest": "@1", "size": 1,
         "platform": {"architecture": "amd64", "os": "linux"},
         "annotations": {"org.opencontainers.image.ref.name": "v1"}}]}
    manifest = {"schemaVersion": 2, "mediaType": image.OCI_MANIFEST,
                "config": {"mediaType": image.OCI_CONFIG, "digest": "@2", "size": 1},
                "layers": [{"mediaType": image.OCI_LAYER, "digest": "@3", "size": 1}]}
    cfg_tok = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["@3"]}}).encode()
    out.append(b"\x00" + SEP.join([json.dumps(index).encode(), json.dumps(manifest).encode(),
                                   cfg_tok, small]))
    nested = {"manifests": [{"digest": "@1", "mediaType": image.OCI_INDEX}]}
    inner = json.dumps(index).encode().replace(b"@1", b"@2")
    manifest2 = json.dumps(manifest).encode().replace(b"@3", b"@4").replace(b"@2", b"@3")
    cfg_tok2 = cfg_tok.replace(b"@3", b"@4")
    out.append(b"\x00" + SEP.join([json.dumps(nested).encode(), inner, manifest2, cfg_tok2,
                                   small]))
    docker = [{"Config": "blobs/sha256/%1", "RepoTags": ["a:b"], "Layers": ["blobs/sha256/%2"]}]
    cfg2 = json.dumps({"rootfs": {"type": "layers", "diff_ids": ["@2"]}}).encode()
    out.append(b"\x02" + SEP.join([json.dumps(docker).encode(), cfg2, small]))
    return out
