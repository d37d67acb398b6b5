"""Layer tars (unionfs/oci/layer.py): ``pyunionfs layer apply|export`` and ``diff``.

The kernel is the oracle for what a layer means: applied layers are mounted with kernel overlayfs
and must show what the tars say; an upper written through a kernel mount, exported and applied
again, must give the kernel the same view.  Hostile tars are refused with one line and nothing
written outside the layer; the same runs as an unprivileged user (xattr whiteouts in
user.overlay.*) and as root of a user namespace (test_rootless runs this file there)."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from overlay_harness import (
    PRIVATE_PREFIX,
    PYTHON,
    REPO,
    USERNS,
    StackPaths,
    make_traversable,
    mount_stack,
    run_as,
    snapshot_merged,
    snapshot_raw,
    snapshot_upper,
)

from unionfs.oci import layer
from unionfs.oci.diff import changes

T = 1_600_000_000


def _tar(path: Path, entries: list[tuple], compression: str | None = None) -> Path:
    """entries: (name, kind, extra...) with kind file/dir/sym/link/fifo/chr, written in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, kind, *rest in entries:
            opts = rest[0] if rest and isinstance(rest[0], dict) else {}
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = opts.get("mtime", T), opts.get("mode", 0o644)
            info.uid, info.gid = opts.get("uid", 0), opts.get("gid", 0)
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in opts.get("xattrs", {}).items()}
            data = None
            if kind == "file":
                data = opts.get("data", b"").encode() if isinstance(opts.get("data", b""), str) \
                    else opts.get("data", b"")
                info.size = len(data)
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, opts.get("mode", 0o755)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, opts["to"]
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, opts["to"]
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, *opts["dev"]
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compression == "gzip":
        raw = gzip.compress(raw)
    elif compression == "zstd":
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


BASE = [("etc", "dir"), ("etc/passwd", "file", {"data": "root:x:0:0\n"}),
        ("etc/motd", "file", {"data": "old\n", "xattrs": {"user.note": "kept"}}),
        ("bin", "dir", {"mode": 0o755}), ("bin/busybox", "file", {"data": "BB", "mode": 0o755}),
        ("bin/sh", "link", {"to": "bin/busybox"}), ("bin/ls", "link", {"to": "bin/busybox"}),
        ("lib", "sym", {"to": "usr/lib"}), ("usr/lib/libc.so", "file", {"data": "libc"}),
        ("var/cache/a", "file", {"data": "a"}), ("var/cache/b", "file", {"data": "b"}),
        ("run", "dir", {"mode": 0o1777}), ("run/fifo", "fifo"),
        ("opt/tool/conf", "file", {"data": "x", "uid": 1000, "gid": 1000, "mode": 0o600})]
TOP = [("etc/motd", "file", {"data": "new\n"}), ("etc/.wh.passwd", "file"),
       ("var/cache", "dir"), ("var/cache/.wh..wh..opq", "file"), ("var/cache/c", "file",
                                                                  {"data": "c"}),
       ("opt/.wh.tool", "file"), ("bin/ls", "sym", {"to": "busybox"})]

# what the kernel must show over [TOP, BASE]
WANT = {"etc/motd": b"new\n", "bin/busybox": b"BB", "bin/sh": b"BB", "usr/lib/libc.so": b"libc",
        "var/cache/c": b"c"}
GONE = ["etc/passwd", "var/cache/a", "var/cache/b", "opt/tool"]


def _apply(tar: Path, dest: Path, **kw) -> layer.Applied:
    return layer.apply(str(tar), str(dest), **kw)


@pytest.fixture
def kernel_mount(tmp_path):
    mounts = []

    def mount(lowers: list[Path], upper: Path | None = None):
        n = len(mounts)
        merged, work = tmp_path / f"merged{n}", tmp_path / f"work{n}"
        merged.mkdir()
        if upper is not None:
            work.mkdir()
        m = mount_stack(StackPaths(tmp_path, lowers, upper, work if upper else None, merged),
                        "kernel")
        mounts.append(m)
        return m

    yield mount
    for m in reversed(mounts):
        m.stop()


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_applied_layers_read_by_kernel_as_the_tars_say(tmp_path, kernel_mount, compression):
    base = _apply(_tar(tmp_path / "base.tar", BASE, compression), tmp_path / "L0")
    top = _apply(_tar(tmp_path / "top.tar", TOP, compression), tmp_path / "L1")
    assert base.diff_id != top.diff_id and base.entries == len(BASE)
    m = kernel_mount([tmp_path / "L1", tmp_path / "L0"])
    root = m.root
    for rel, data in WANT.items():
        assert (root / rel).read_bytes() == data, rel
    for rel in GONE:
        assert not os.path.lexists(root / rel), rel
    assert sorted(os.listdir(root / "var/cache")) == ["c"]
    assert os.readlink(root / "bin/ls") == "busybox" and os.readlink(root / "lib") == "usr/lib"
    assert os.lstat(root / "bin/sh").st_ino == os.lstat(root / "bin/busybox").st_ino
    assert stat.S_ISFIFO(os.lstat(root / "run/fifo").st_mode)
    assert stat.S_IMODE(os.lstat(root / "run").st_mode) == 0o1777
    assert os.lstat(root / "etc/motd").st_mtime == T
    st = os.lstat(tmp_path / "L0/opt/tool/conf")
    if not USERNS:
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    assert os.getxattr(tmp_path / "L0/etc/motd", "user.note") == b"kept"
    # the markers, in the dialect this process may write
    assert os.getxattr(tmp_path / "L1/var/cache", PRIVATE_PREFIX + "opaque") == b"y"
    wh = os.lstat(tmp_path / "L1/etc/passwd")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0


def test_diff_id_is_the_sha256_of_the_tar(tmp_path):
    import hashlib

    tar = _tar(tmp_path / "l.tar", BASE)
    gz = tmp_path / "l.tar.gz"
    gz.write_bytes(gzip.compress(tar.read_bytes()))
    a = _apply(tar, tmp_path / "a")
    b = _apply(gz, tmp_path / "b")
    want = "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    assert a.diff_id == b.diff_id == a.digest == want
    assert b.digest == "sha256:" + hashlib.sha256(gz.read_bytes()).hexdigest()
    assert snapshot_upper(tmp_path / "a", mtimes=True) == snapshot_upper(tmp_path / "b",
                                                                            mtimes=True)


HOSTILE = {
    "absolute": [("/etc/evil", "file")],
    "dotdot": [("a/../../evil", "file")],
    "symlink-dir": [("esc", "sym", {"to": "OUTSIDE"}), ("esc/evil", "file")],
    "symlink-dotdot": [("up", "sym", {"to": ".."}), ("up/evil", "file")],
    "symlink-deep": [("d", "dir"), ("d/l", "sym", {"to": "/"}), ("d/l/tmp/evil", "file")],
    "hardlink-outside": [("h", "link", {"to": "../OUTSIDE/secret"})],
    "hardlink-absolute": [("h", "link", {"to": "/etc/passwd"})],
    "hardlink-missing": [("h", "link", {"to": "nothing/here"})],
    "hardlink-through-symlink": [("s", "sym", {"to": "OUTSIDE"}), ("h", "link", {"to": "s/secret"})],
    "duplicate": [("f", "file", {"data": "1"}), ("f", "file", {"data": "2"})],
    "dir-over-file": [("f", "file"), ("f", "dir")],
    "whiteout-of-own-entry": [("f", "file"), (".wh.f", "file")],
    "file-over-symlink": [("s", "sym", {"to": "OUTSIDE/secret"}), ("s", "file", {"data": "x"})],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tars_are_refused_and_write_nothing_outside(tmp_path, case):
    outside = tmp_path / "OUTSIDE"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    def sub(v):
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v.replace("OUTSIDE", str(outside)) if isinstance(v, str) else v

    tar = _tar(tmp_path / "evil.tar", [tuple(sub(v) for v in e) for e in HOSTILE[case]])
    before = snapshot_raw(outside)
    r = subprocess.run([PYTHON, "-m", "unionfs", "layer", "apply", "-q", str(tar),
                        str(tmp_path / "layer")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyunionfs: error: ") and \
        "Traceback" not in r.stderr, r.stderr
    assert snapshot_raw(outside) == before
    assert not (tmp_path / "layer").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial
    assert not os.path.lexists("/etc/evil") and not os.path.lexists("/tmp/evil")


def test_overlay_marks_in_a_tar_are_dropped(tmp_path):
    # a redirect or metacopy forged in a layer would let it reach any lower file
    tar = _tar(tmp_path / "l.tar", [("d", "dir", {"xattrs": {
        "trusted.overlay.redirect": "/etc", "user.overlay.opaque": "y", "user.ok": "1"}}),
        ("f", "file", {"xattrs": {"trusted.overlay.metacopy": "", "user.overlay.redirect": "/x"}})])
    _apply(tar, tmp_path / "L")
    for rel in ("d", "f"):
        names = os.listxattr(tmp_path / "L" / rel)
        assert not [n for n in names if ".overlay." in n], names
    assert os.getxattr(tmp_path / "L/d", "user.ok") == b"1"


def test_device_nodes_refused_for_an_unprivileged_user(tmp_path):
    if USERNS:
        pytest.skip("root of a user namespace may not make devices either: the next lines "
                    "run as an unprivileged user of the initial namespace")
    tar = _tar(tmp_path / "dev.tar", [("dev", "dir"), ("dev/sda", "chr", {"dev": (8, 0)})])
    make_traversable(tmp_path)
    os.chmod(tmp_path, 0o777)
    with pytest.raises(RuntimeError, match="a device node .8:0., which only root may make"):
        run_as(65534, 65534, lambda root: layer.apply(str(tar), str(root / "L")), tmp_path)
    assert not (tmp_path / "L").exists()


def test_unprivileged_apply_writes_the_rootless_dialect(tmp_path):
    if USERNS:
        pytest.skip("the userns run checks its own dialect in the first test")
    make_traversable(tmp_path)
    os.chmod(tmp_path, 0o777)
    tar = _tar(tmp_path / "top.tar", TOP)
    res = run_as(65534, 65534, lambda root: layer.apply(str(tar), str(root / "L")).entries,
                 tmp_path)
    assert res == ("ok", len(TOP)), res
    L = tmp_path / "L"
    assert os.getxattr(L / "var/cache", "user.overlay.opaque") == b"y"
    wh = os.lstat(L / "etc/passwd")
    # 0/0 devices are unprivileged since Linux 5.8; else an xattr whiteout
    assert (stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0) or \
        os.getxattr(L / "etc/passwd", "user.overlay.whiteout") == b""


def test_kernel_upper_exported_and_applied_gives_the_same_view(tmp_path, kernel_mount):
    _apply(_tar(tmp_path / "base.tar", BASE), tmp_path / "L0")
    upper = tmp_path / "upper"
    upper.mkdir()
    m = kernel_mount([tmp_path / "L0"], upper)
    root = m.root
    (root / "etc/motd").write_text("changed\n")
    os.unlink(root / "etc/passwd")
    for n in os.listdir(root / "var/cache"):
        os.unlink(root / "var/cache" / n)
    os.rmdir(root / "var/cache")
    os.mkdir(root / "var/cache")
    (root / "var/cache/new").write_text("n")
    os.symlink("nowhere", root / "dangling")
    os.link(root / "etc/motd", root / "motd2")
    os.setxattr(root / "etc/motd", "user.x", b"\x00\xffbin")
    want = snapshot_merged(root)
    m.stop()
    out = layer.export(str(upper), str(tmp_path / "new.tar.gz"), "gzip", mtime=0)
    again = layer.export(str(upper), str(tmp_path / "again.tar.gz"), "gzip", mtime=0)
    assert (tmp_path / "new.tar.gz").read_bytes() == (tmp_path / "again.tar.gz").read_bytes()
    assert (out.diff_id, out.digest) == (again.diff_id, again.digest)
    with tarfile.open(tmp_path / "new.tar.gz") as t:
        names = t.getnames()
    assert "etc/.wh.passwd" in names and "var/cache/.wh..wh..opq" in names
    assert not [n for n in names if "overlay" in n]
    applied = _apply(tmp_path / "new.tar.gz", tmp_path / "L1")
    assert applied.diff_id == out.diff_id
    got = snapshot_merged(kernel_mount([tmp_path / "L1", tmp_path / "L0"]).root)
    assert got.nodes.keys() == want.nodes.keys()
    for rel, node in want.nodes.items():
        g = got.nodes[rel]
        assert (g.type, g.mode, g.digest, g.xattrs) == (node.type, node.mode, node.digest,
                                                         node.xattrs), rel
    assert changes(str(upper), [str(tmp_path / "L0")]) == [
        ("A", "/dangling"), ("C", "/etc"), ("C", "/etc/motd"),
        ("D", "/etc/passwd"), ("A", "/motd2"), ("C", "/var"), ("C", "/var/cache"),
        ("D", "/var/cache/a"), ("D", "/var/cache/b"), ("A", "/var/cache/new")]


@pytest.mark.skipif(USERNS, reason="the kernel refuses redirect_dir=on and metacopy=on with "
                    "userxattr")
def test_moved_dirs_and_metacopies_exported_with_what_they_show(tmp_path, kernel_mount):
    # redirect_dir=on/metacopy=on uppers point into the lowers; with --lowers, export writes
    # a moved directory as an opaque one with everything it shows, a metacopy with its data
    _apply(_tar(tmp_path / "base.tar", BASE + [
        ("srv/www/index.html", "file", {"data": "<html>"}), ("srv/www/img/a.png", "file",
                                                            {"data": "png"}),
        ("srv/big", "file", {"data": "B" * 5000})]), tmp_path / "L0")
    upper = tmp_path / "upper"
    upper.mkdir()
    m = mount_stack(StackPaths(tmp_path, [tmp_path / "L0"], upper, _mk(tmp_path / "w"),
                               _mk(tmp_path / "mnt")), "kernel",
                    options="redirect_dir=on,metacopy=on")
    try:
        root = m.root
        os.rename(root / "srv/www", root / "srv/site")  # relative redirect
        os.rename(root / "var/cache", root / "cache")  # absolute redirect
        (root / "srv/site/new.html").write_text("new")
        os.unlink(root / "srv/site/img/a.png")
        os.chmod(root / "srv/big", 0o600)  # metadata only
        os.rename(root / "etc/motd", root / "srv/motd")  # a metacopy with a redirect
        want = snapshot_merged(root)
    finally:
        m.stop()
    r = subprocess.run([PYTHON, "-m", "unionfs", "layer", "export", str(upper), "-o",
                        str(tmp_path / "x.tar")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "--lowers" in r.stderr, r.stderr  # not without them
    layer.export(str(upper), str(tmp_path / "new.tar"), None, mtime=0,
                 lowers=[str(tmp_path / "L0")])
    with tarfile.open(tmp_path / "new.tar") as t:
        names = t.getnames()
    assert "srv/site/.wh..wh..opq" in names and "srv/site/img/a.png" not in names
    assert "srv/site/index.html" in names and "cache/a" in names
    _apply(tmp_path / "new.tar", tmp_path / "L1")
    got = snapshot_merged(kernel_mount([tmp_path / "L1", tmp_path / "L0"]).root)
    assert got.nodes.keys() == want.nodes.keys()
    for rel, node in want.nodes.items():
        g = got.nodes[rel]
        assert (g.type, g.mode, g.digest) == (node.type, node.mode, node.digest), rel


def _mk(p: Path) -> Path:
    p.mkdir()
    return p


def test_export_refuses_redirects_it_cannot_resolve(tmp_path):
    up = tmp_path / "up"
    (up / "d").mkdir(parents=True)
    os.setxattr(up / "d", PRIVATE_PREFIX + "redirect", b"/old")
    r = subprocess.run([PYTHON, "-m", "unionfs", "layer", "export", str(up), "-o",
                        str(tmp_path / "x.tar")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "redirect" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not list(tmp_path.glob("x.tar*"))


def test_cli_errors_in_one_line(tmp_path):
    for args in (["layer", "apply", str(tmp_path / "missing.tar"), str(tmp_path / "d")],
                 ["layer", "export", str(tmp_path / "nope"), "-o", str(tmp_path / "o.tar")],
                 ["diff", str(tmp_path / "nope")]):
        r = subprocess.run([PYTHON, "-m", "unionfs", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    r = subprocess.run([PYTHON, "-m", "unionfs", "layer", "apply", str(tmp_path / "junk.tar"),
                        str(tmp_path / "d")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _one_line_refusal(tmp_path: Path, tar: Path) -> str:
    r = subprocess.run([PYTHON, "-m", "unionfs", "layer", "apply", "-q", str(tar),
                        str(tmp_path / "L")], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "L").exists()
    return lines[0]


def test_damaged_and_out_of_range_tars_refused(tmp_path):
    # found in review: tarfile takes a damaged header for the end of the archive (a partial
    # layer, exit 0), and out-of-range numbers or a cut gzip stream gave tracebacks
    good = _tar(tmp_path / "good.tar", [("a", "file", {"data": "1"}), ("b", "file"),
                                        ("c", "file")]).read_bytes()
    bad = bytearray(good)
    bad[1024 + 100:1024 + 108] = b"garbage!"  # the second header's mode: its checksum fails
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    assert "corrupt after entry 1" in _one_line_refusal(tmp_path, tmp_path / "bad.tar")
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress(good)[:-8])  # no gzip trailer
    assert "truncated or corrupt" in _one_line_refusal(tmp_path, tmp_path / "cut.tar.gz")
    for field, value in (("uid", 1 << 40), ("mtime", 10**30)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            info = tarfile.TarInfo("f")
            setattr(info, field, value)
            t.addfile(info, io.BytesIO(b""))
        (tmp_path / f"{field}.tar").write_bytes(buf.getvalue())
        assert "out of range" in _one_line_refusal(tmp_path, tmp_path / f"{field}.tar")


def test_many_directories_then_a_hard_link(tmp_path):
    # found in review: the directory fd cache closed an fd the hard link still used (EBADF)
    entries = [("t/target", "file", {"data": "x"})] + \
        [(f"d{i}/z", "file", {"data": "z"}) for i in range(770)] + \
        [("d300/link", "link", {"to": "t/target"})]
    _apply(_tar(tmp_path / "many.tar", entries), tmp_path / "L")
    assert os.lstat(tmp_path / "L/d300/link").st_ino == os.lstat(tmp_path / "L/t/target").st_ino
