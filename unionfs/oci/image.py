"""Image archives and the layer store: ``pyunionfs image mount|commit|umount``.

An archive is a ``docker save`` tar (``manifest.json``) or an OCI image layout (``index.json``
and ``blobs/``, a directory or a tar of one).  Each layer is applied once into the store,
``$XDG_DATA_HOME/pyunionfs`` (``~/.local/share/pyunionfs``), under its diff_id, checked against
the digests the manifest and the config give, and shared by every image that has it.  The
blob is kept beside it, so that a commit can write the image again with a new layer on top.

Store layout::

    layers/<diff_id hex>/           an applied layer (overlay whiteouts and opaque marks)
    layers/<diff_id hex>.blob        the digest of the blob it was applied from
    blobs/sha256/<hex>               the layer tars as the archives held them
    mounts/<hash of MERGED>.json     what is mounted where: image config, layers, upper
    containers/<id>/{upper,work}     the throwaway upper of a mount without --upper
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from unionfs.oci import layer
from unionfs.oci.layer import LayerError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"


def default_store() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "pyunionfs")


def _hex(digest: str) -> str:
    algo, _, value = digest.partition(":")
    if algo != "sha256" or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
        raise LayerError(f"unsupported or malformed digest {digest!r}")
    return value


# -- reading archives ------------------------------------------------------------------


class _Source:
    """An archive's files by name: a directory or a tar (read in place, not unpacked)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tar: tarfile.TarFile | None = None
        if os.path.isdir(path):
            return
        try:
            self.tar = tarfile.open(path, "r:*")
            self.members = {layer.clean_name(m.name, "archive entry"): m
                            for m in self.tar.getmembers()}
        except FileNotFoundError:
            raise LayerError(f"'{path}': no such file or directory") from None
        except (OSError, tarfile.TarError, EOFError):
            raise LayerError(f"'{path}': not an image archive (neither a directory nor a "
                             "whole tar)") from None

    def has(self, name: str) -> bool:
        if self.tar is None:
            return os.path.isfile(os.path.join(self.path, layer.clean_name(name)))
        return layer.clean_name(name) in self.members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        clean = layer.clean_name(name, "archive entry")
        if self.tar is None:
            with open(os.path.join(self.path, clean), "rb") as f:
                yield f
            return
        m = self.members.get(clean)
        for _ in range(40):  # docker save links layers between images; a loop is an error
            if m is None or not m.issym():
                break
            clean = layer.clean_name(os.path.normpath(os.path.join(os.path.dirname(clean),
                                                                   m.linkname)), "archive link")
            m = self.members.get(clean)
        else:
            raise LayerError(f"'{self.path}': {name!r} is a loop of symlinks")
        member = self.tar.extractfile(m) if m is not None else None
        if member is None:
            raise LayerError(f"'{self.path}': no file {name!r} in the archive")
        with member:
            yield member

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            return _loads(f.read(), f"'{self.path}': {name}")

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()


def _loads(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:
        raise LayerError(f"{what} is not JSON ({e})") from None
    except RecursionError:
        # json's decoder recurses per level: a document of "[[[[..." exhausts the stack
        raise LayerError(f"{what} is not JSON we read (nested too deep)") from None


def _strings(value: Any, what: str) -> list[str]:
    """A list of strings from a manifest or config, or the one-line refusal: every one
    goes on to name a file or a digest."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LayerError(f"{what} is not a list of strings")
    return value


@dataclass
class LayerRef:
    blob: str  # name in the archive
    digest: str | None  # the blob's digest where the archive gives one (OCI)
    diff_id: str  # from the config


@dataclass
class Image:
    config: dict[str, Any]
    config_digest: str
    layers: list[LayerRef]
    tags: list[str] = field(default_factory=list)


def read_image(src: _Source) -> Image:
    try:
        return _read_image(src)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        if isinstance(e, LayerError):
            raise
        raise LayerError(f"'{src.path}': a malformed manifest or config "
                         f"({type(e).__name__}: {e})") from None


def _read_image(src: _Source) -> Image:
    if src.has("index.json") and src.has("oci-layout"):
        index = src.json("index.json")
        manifest = _pick_manifest(src, index)
        cfg_desc = manifest.get("config") or {}
        config_digest = cfg_desc.get("digest", "")
        config = src.json(f"blobs/sha256/{_hex(config_digest)}")
        blobs = [(f"blobs/sha256/{_hex(d['digest'])}", d["digest"])
                 for d in manifest.get("layers", [])]
        tags = [m.get("annotations", {}).get("org.opencontainers.image.ref.name", "")
                for m in index.get("manifests", [])]
        tags = [t for t in _strings(tags, f"'{src.path}': a tag in index.json") if t]
    elif src.has("manifest.json"):
        manifests = src.json("manifest.json")
        if not isinstance(manifests, list) or not manifests:
            raise LayerError(f"'{src.path}': manifest.json lists no image")
        if len(manifests) > 1:
            raise LayerError(f"'{src.path}': holds {len(manifests)} images; save one")
        m = manifests[0]
        config_name = _strings([m["Config"]], f"'{src.path}': Config of manifest.json")[0]
        with src.open(config_name) as f:
            raw = f.read()
        config = _loads(raw, f"'{src.path}': {config_name}")
        config_digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        blobs = [(name, None) for name in _strings(m.get("Layers", []),
                                                   f"'{src.path}': Layers of manifest.json")]
        tags = _strings(m.get("RepoTags") or [], f"'{src.path}': RepoTags of manifest.json")
    else:
        raise LayerError(f"'{src.path}': neither a docker save archive (manifest.json) nor an "
                         "OCI image layout (index.json, oci-layout)")
    diff_ids = _strings((config.get("rootfs") or {}).get("diff_ids") or [],
                        f"'{src.path}': diff_ids of the config")
    if len(diff_ids) != len(blobs):
        raise LayerError(f"'{src.path}': the config names {len(diff_ids)} layers, the manifest "
                         f"{len(blobs)}")
    return Image(config, config_digest,
                 [LayerRef(b, d, i) for (b, d), i in zip(blobs, diff_ids)], tags)


def _pick_manifest(src: _Source, index: dict[str, Any]) -> dict[str, Any]:
    for _ in range(4):  # an index may point to an index (multi-platform)
        manifests = index.get("manifests") or []
        if not manifests:
            raise LayerError(f"'{src.path}': index.json lists no manifest")
        desc = manifests[0]
        for d in manifests:
            plat = d.get("platform") or {}
            if plat.get("architecture") in ("amd64", None) and plat.get("os") in ("linux", None):
                desc = d
                break
        doc = src.json(f"blobs/sha256/{_hex(desc['digest'])}")
        if doc.get("mediaType") == OCI_INDEX or "manifests" in doc:
            index = doc
            continue
        return doc
    raise LayerError(f"'{src.path}': indexes nested too deep")


# -- the store ---------------------------------------------------------------------------


@dataclass
class Imported:
    image: Image
    lowers: list[str]  # top first, as a mount takes them
    applied: int  # layers applied now
    shared: int  # layers the store had


class Store:
    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.abspath(root or default_store())
        for sub in ("layers", "blobs/sha256", "mounts", "containers"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)

    def layer_dir(self, diff_id: str) -> str:
        return os.path.join(self.root, "layers", _hex(diff_id))

    def blob(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", _hex(digest))

    def import_archive(self, archive: str, userxattr: bool = False,
                       say: Callable[[str], None] = lambda s: None,
                       quiet: bool = False) -> Imported:
        src = _Source(archive)
        try:
            img = read_image(src)
            lowers: list[str] = []
            applied = shared = 0
            for n, ref in enumerate(img.layers, 1):
                dest = self.layer_dir(ref.diff_id)
                if os.path.isdir(dest):
                    with contextlib.suppress(OSError), open(dest + ".blob") as f:
                        ref.digest = ref.digest or f.read().strip()
                    shared += 1
                    say(f"layer {n}/{len(img.layers)} {ref.diff_id[:19]}: in the store")
                else:
                    blob = self._keep_blob(src, ref, n)
                    update, close = layer.terminal_progress(os.path.getsize(blob),
                                                            f"layer {n}", quiet)
                    new = f"{dest}.new-{os.getpid()}"  # another import may apply it meanwhile
                    try:
                        done = layer.apply(blob, new, userxattr=userxattr, progress=update)
                    finally:
                        close()
                    if done.diff_id != ref.diff_id:
                        layer.remove_tree(new)
                        raise LayerError(f"layer {n}: its content is {done.diff_id}, the config "
                                         f"says {ref.diff_id}: refused")
                    with open(dest + ".blob", "w") as f:
                        f.write(f"{ref.digest}\n")  # the blob it came from, for commits
                    try:
                        os.rename(new, dest)
                        applied += 1
                        say(f"layer {n}/{len(img.layers)} {ref.diff_id[:19]}: applied")
                    except OSError:
                        if not os.path.isdir(dest):
                            raise
                        layer.remove_tree(new)  # the other import's copy is the same
                        shared += 1
                lowers.insert(0, dest)
            return Imported(img, lowers, applied, shared)
        finally:
            src.close()

    def _keep_blob(self, src: _Source, ref: LayerRef, n: int) -> str:
        """The layer's blob into blobs/, its digest checked where the archive names one."""
        tmp = os.path.join(self.root, "blobs", f".incoming-{os.getpid()}")
        h = hashlib.sha256()
        try:
            with src.open(ref.blob) as f, open(tmp, "wb") as out:
                while chunk := f.read(layer.CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            digest = "sha256:" + h.hexdigest()
            if ref.digest is not None and digest != ref.digest:
                raise LayerError(f"layer {n}: blob {ref.blob} has digest {digest}, the "
                                 f"manifest says {ref.digest}: refused")
            ref.digest = digest
            final = self.blob(digest)
            os.replace(tmp, final)
        except (tarfile.TarError, EOFError) as e:
            raise LayerError(f"layer {n}: blob {ref.blob} can't be read ({e})") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return final

    # -- mounts -----------------------------------------------------------------------

    def _mount_record(self, merged: str) -> str:
        key = hashlib.sha256(os.path.realpath(merged).encode()).hexdigest()[:32]
        return os.path.join(self.root, "mounts", key + ".json")

    def new_container(self) -> tuple[str, str, str]:
        cid = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        base = os.path.join(self.root, "containers", cid)
        os.makedirs(os.path.join(base, "upper"))
        os.makedirs(os.path.join(base, "work"))
        return base, os.path.join(base, "upper"), os.path.join(base, "work")

    def record_mount(self, merged: str, imported: Imported, upper: str, work: str,
                     throwaway: str | None) -> None:
        img = imported.image
        _write_json(self._mount_record(merged), {
            "merged": os.path.realpath(merged), "upper": upper, "work": work,
            "throwaway": throwaway, "config": img.config, "tags": img.tags,
            "layers": [vars(r) for r in img.layers]})

    def mount_of(self, merged: str) -> dict[str, Any]:
        try:
            with open(self._mount_record(merged)) as f:
                return json.load(f)
        except FileNotFoundError:
            raise LayerError(f"'{merged}' is not an image mounted by 'pyunionfs image mount' "
                             "(with this --store)") from None

    def forget_mount(self, merged: str) -> None:
        rec = self.mount_of(merged)
        if rec.get("throwaway"):
            layer.remove_tree(rec["throwaway"])
        os.unlink(self._mount_record(merged))

    # -- commit -----------------------------------------------------------------------

    def commit(self, merged: str, out: str, tag: str | None = None,
               message: str = "pyunionfs image commit", quiet: bool = False) -> str:
        """An archive of the mounted image with its upper as a new top layer, in both
        formats at once: docker save's manifest.json and an OCI layout (index.json)."""
        rec = self.mount_of(merged)
        out = os.path.abspath(out)
        tmpdir = os.path.join(self.root, f".commit-{os.getpid()}")
        os.makedirs(tmpdir, exist_ok=True)
        try:
            new_layer = os.path.join(tmpdir, "layer.tar")
            update, close = layer.terminal_progress(0, "export", quiet)
            try:
                lowers = [self.layer_dir(r["diff_id"]) for r in reversed(rec["layers"])]
                exported = layer.export(rec["upper"], new_layer, compression=None,
                                        progress=update, lowers=lowers)
            finally:
                close()
            config = json.loads(json.dumps(rec["config"]))
            config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
            config["rootfs"]["diff_ids"] = [r["diff_id"] for r in rec["layers"]] + \
                [exported.diff_id]
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            config.setdefault("history", []).append({"created": now, "created_by": message})
            config["created"] = now
            cfg_raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
            cfg_digest = "sha256:" + hashlib.sha256(cfg_raw).hexdigest()
            layers: list[tuple[str, str]] = []  # (diff_id, path of an uncompressed tar)
            for r in rec["layers"]:
                layers.append((r["diff_id"], self.blob(r["digest"])))
            layers.append((exported.diff_id, new_layer))
            _write_archive(out, cfg_raw, cfg_digest, layers, tag)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
        return cfg_digest


def _write_json(path: str, doc: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def _uncompressed(path: str) -> Iterator[IO[bytes]]:
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(layer.GZIP_MAGIC):
            import gzip

            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g  # type: ignore[misc]
        elif head.startswith(layer.ZSTD_MAGIC):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as z:
                yield z
        else:
            yield f


def _write_archive(out: str, cfg_raw: bytes, cfg_digest: str, layers: list[tuple[str, str]],
                   tag: str | None) -> None:
    """docker save's format with an OCI layout inside (what docker 25 writes): every
    layer an uncompressed tar named by its diff_id, loadable by docker, podman, skopeo."""
    tmp = f"{out}.partial-{os.getpid()}"
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
            def add_bytes(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                t.addfile(info, io.BytesIO(data))

            names, descs = [], []
            for diff_id, path in layers:
                name = f"blobs/sha256/{_hex(diff_id)}"
                names.append(name)
                with _uncompressed(path) as f:
                    # the size first: a tar member's header comes before its data
                    size = 0
                    while chunk := f.read(layer.CHUNK):
                        size += len(chunk)
                with _uncompressed(path) as f:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = size, 0o644, 0
                    t.addfile(info, f)
                descs.append({"mediaType": OCI_LAYER, "digest": diff_id, "size": size})
            add_bytes(f"blobs/sha256/{_hex(cfg_digest)}", cfg_raw)
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest,
                                   "size": len(cfg_raw)},
                        "layers": descs}
            man_raw = json.dumps(manifest, separators=(",", ":")).encode()
            man_digest = "sha256:" + hashlib.sha256(man_raw).hexdigest()
            add_bytes(f"blobs/sha256/{_hex(man_digest)}", man_raw)
            ref: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": man_digest,
                                   "size": len(man_raw)}
            if tag:
                ref["annotations"] = {"io.containerd.image.name": tag,
                                      "org.opencontainers.image.ref.name": tag.rsplit(":", 1)[-1]
                                      if ":" in tag.rsplit("/", 1)[-1] else "latest"}
            add_bytes("index.json", json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                "manifests": [ref]}).encode())
            add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes("manifest.json", json.dumps([{
                "Config": f"blobs/sha256/{_hex(cfg_digest)}",
                "RepoTags": [tag] if tag else [], "Layers": names}]).encode())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
