"""podman/buildah on the containers-storage overlay driver with a mount_program (pyunionfs by
default; fuse-overlayfs and the kernel's overlay as references), as root and rootless.

Each check is about what a union filesystem must get right for containers: deletions
(whiteouts), renames, a directory replaced by a new one (opaque), appends (copy-up), and that
the layers podman writes from the merged view (commit, build, save, export) say the same."""

from __future__ import annotations

import os
import re
import tarfile
import time
from pathlib import Path

import podman_env as pe
import pytest
from podman_env import BASE_IMAGE, PodmanEnv, apply_layers, archive_layers, whiteouts

pytestmark = pytest.mark.timeout(300)

# --- a container that changes the base image --------------------------------------------------

RUN_SCRIPT = ("echo more >> /data/append.txt && rm /data/delete.txt"
              " && mv /data/old.txt /data/renamed.txt"
              " && rm -rf /data/dir && mkdir /data/dir && touch /data/dir/new"
              " && find /data | sort && echo == && cat /data/append.txt")
RUN_TREE = ["/data", "/data/append.txt", "/data/dir", "/data/dir/new", "/data/keep.txt",
            "/data/renamed.txt"]
RUN_CONTAINER = "ct-run"
COMMITTED = "localhost/ctest-committed:latest"


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_container(penv: PodmanEnv) -> str:
    """`podman run` (kept, not --rm) of RUN_SCRIPT over the base image; its stdout."""
    return penv.podman("run", "--name", RUN_CONTAINER, BASE_IMAGE, "sh", "-c", RUN_SCRIPT).stdout


def test_run_changes_seen_inside(run_container: str) -> None:
    tree, _, append = run_container.partition("==\n")
    assert _lines(tree) == RUN_TREE
    assert append == "line1\nmore\n"


def _alternatives_ok(found: set[str], alternatives: list[set[str]], what: str) -> None:
    hits = [a for a in alternatives if a <= found]
    assert hits, f"{what}: expected one of {alternatives}, got {sorted(found)}"


def test_run_diff(penv: PodmanEnv, run_container: str) -> None:
    out = penv.podman("diff", RUN_CONTAINER).stdout
    changes = {tuple(line.split(None, 1)) for line in _lines(out)}
    data = {c for c in changes if c[1] == "/data" or c[1].startswith("/data/")}
    required = {("C", "/data/append.txt"), ("D", "/data/delete.txt"), ("D", "/data/old.txt"),
                ("A", "/data/renamed.txt"), ("A", "/data/dir/new")}
    assert required <= data, f"podman diff:\n{out}"
    # the replaced directory: each old child deleted (naive diff, from the merged views), or
    # the directory itself deleted (the kernel driver's diff of an opaque upper directory)
    old_children = {("D", "/data/dir/x"), ("D", "/data/dir/y"), ("D", "/data/dir/sub")}
    _alternatives_ok(data, [old_children, {("D", "/data/dir")}], "podman diff, replaced /data/dir")
    allowed = required | old_children | {("C", "/data"), ("C", "/data/dir"), ("D", "/data/dir")}
    assert data <= allowed, f"unexpected entries {sorted(data - allowed)} in podman diff:\n{out}"


def test_commit(penv: PodmanEnv, run_container: str) -> None:
    penv.podman("commit", RUN_CONTAINER, COMMITTED)
    out = penv.podman("run", "--rm", COMMITTED, "sh", "-c",
                      "find /data | sort && echo == && cat /data/append.txt").stdout
    tree, _, append = out.partition("==\n")
    assert _lines(tree) == RUN_TREE
    assert append == "line1\nmore\n"

    archive = penv.work / "committed.tar"
    penv.podman("save", "--format", "docker-archive", "-o", str(archive), COMMITTED)
    layers = archive_layers(archive)
    assert len(layers) == 2, f"{len(layers)} layers"
    top = {n for n in layers[1] if n.startswith("data/")}
    wh = whiteouts(layers[1])
    assert {"data/.wh.delete.txt", "data/.wh.old.txt"} <= wh, sorted(top)
    _alternatives_ok(wh, [{"data/dir/.wh..wh..opq"},
                          {"data/dir/.wh.x", "data/dir/.wh.y", "data/dir/.wh.sub"}],
                     "layer of the commit, replaced /data/dir")
    files = {n for n in top if layers[1][n].kind != "dir" and n not in wh}
    assert files == {"data/append.txt", "data/renamed.txt", "data/dir/new"}, sorted(top)
    tree2 = apply_layers(layers)
    assert sorted("/" + n for n in tree2 if n == "data" or n.startswith("data/")) == RUN_TREE
    assert tree2["data/append.txt"].data == b"line1\nmore\n"


# --- a three-step build -----------------------------------------------------------------------

BUILT = "localhost/ctest-built:latest"
CONTAINERFILE = f"""\
FROM {BASE_IMAGE}
RUN mkdir -p /b/dir/sub && echo 1 > /b/keep && echo 2 > /b/del1 && echo 3 > /b/del2 \\
    && echo x > /b/dir/old && echo y > /b/dir/sub/deep && ln -s keep /b/link
RUN rm /b/del1 /data/delete.txt && rm -rf /b/dir /data/dir && mkdir /b/dir /data/dir \\
    && echo x > /b/dir/new
RUN echo again >> /b/keep && rm /b/del2 && mv /b/link /b/link2 && echo z > /data/dir/z
"""
# the image's tree below /b and /data: name -> file content, "->target" for symlinks, None: dir
BUILT_TREE: dict[str, str | None] = {
    "b": None, "b/keep": "1\nagain\n", "b/dir": None, "b/dir/new": "x\n", "b/link2": "->keep",
    "data": None, "data/keep.txt": "keep\n", "data/append.txt": "line1\n",
    "data/old.txt": "old name\n", "data/dir": None, "data/dir/z": "z\n",
}
# per RUN layer: the non-directory entries below b/ and data/ (whiteouts included); a replaced
# directory is either opaque or has a whiteout per old child (both are valid OCI layers)
LAYER_FILES = [
    [{"b/keep", "b/del1", "b/del2", "b/dir/old", "b/dir/sub/deep", "b/link"}],
    [{"b/.wh.del1", "data/.wh.delete.txt", "b/dir/new"}],
    [{"b/keep", "b/.wh.del2", "b/.wh.link", "b/link2", "data/dir/z"}],
]
REPLACED = {"b/dir": {"old", "sub"}, "data/dir": {"x", "y", "sub"}}


@pytest.fixture(scope="module")
def built(penv: PodmanEnv) -> str:
    ctx = penv.work / "build"
    ctx.mkdir(exist_ok=True)
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    if penv.rootless:
        for p in (ctx, ctx / "Containerfile"):
            os.chown(p, penv.uid, penv.gid)
    return penv.podman("build", "--layers", "-t", BUILT, "-f", str(ctx / "Containerfile"),
                       str(ctx), timeout=240).stdout


def _tree_of(entries: dict[str, pe.LayerEntry]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for n, e in entries.items():
        if n in ("b", "data") or n.startswith(("b/", "data/")):
            out[n] = None if e.kind == "dir" else (
                f"->{e.linkname}" if e.kind == "symlink" else e.data.decode(errors="replace"))
    return out


def test_build_listing(penv: PodmanEnv, built: str) -> None:
    out = penv.podman("run", "--rm", BUILT, "sh", "-c",
                      "find /b /data | sort && echo == && cat /b/keep && readlink /b/link2"
                      ).stdout
    tree, _, rest = out.partition("==\n")
    assert _lines(tree) == sorted("/" + n for n in BUILT_TREE), out
    assert rest == "1\nagain\nkeep\n", out


def _check_layers(layers: list[dict[str, pe.LayerEntry]]) -> None:
    assert len(layers) == 4, f"expected base + 3 RUN layers, got {len(layers)}"
    for i, (expected,) in enumerate(LAYER_FILES, start=1):
        layer = layers[i]
        ours = {n: e for n, e in layer.items() if n.startswith(("b/", "data/"))}
        files = {n for n, e in ours.items() if e.kind != "dir"}
        expect = set(expected)
        if i == 2:
            assert {"b/dir", "data/dir"} <= set(layer), f"layer {i}: {sorted(ours)}"
            for d, children in REPLACED.items():
                opq = f"{d}/.wh..wh..opq"
                each = {f"{d}/.wh.{c}" for c in children}
                _alternatives_ok(files, [{opq}, each], f"layer {i}, replaced {d}")
                expect |= {opq} if opq in files else each
        assert files == expect, (f"layer {i}: missing {sorted(expect - files)}, "
                                 f"unexpected {sorted(files - expect)}")
    assert _tree_of(apply_layers(layers)) == BUILT_TREE


@pytest.mark.parametrize("fmt", ["docker-archive", "oci-archive"])
def test_build_save(penv: PodmanEnv, built: str, fmt: str) -> None:
    archive = penv.work / f"built-{fmt}.tar"
    penv.podman("save", "--format", fmt, "-o", str(archive), BUILT)
    _check_layers(archive_layers(archive))


def test_export(penv: PodmanEnv, built: str) -> None:
    penv.podman("run", "--name", "ct-export", BUILT, "sh", "-c", "rm /b/keep && echo hi > /b/added")
    archive = penv.work / "export.tar"
    penv.podman("export", "-o", str(archive), "ct-export")
    penv.podman("rm", "ct-export")
    with tarfile.open(archive) as t:
        names = {pe.norm_name(n) for n in t.getnames()}
    assert not {n for n in names if ".wh." in n}, "whiteouts in an export"
    gone = {"b/keep", "b/del1", "b/del2", "b/link", "b/dir/old", "b/dir/sub", "b/dir/sub/deep",
            "data/delete.txt", "data/dir/x", "data/dir/y", "data/dir/sub"}
    assert not gone & names, f"deleted names in the export: {sorted(gone & names)}"
    present = {"b/added", "b/dir/new", "b/link2", "data/keep.txt", "data/old.txt", "data/dir/z",
               "bin/busybox", "etc/passwd"}
    assert present <= names, f"missing from the export: {sorted(present - names)}"


def test_image_mount(penv: PodmanEnv, built: str) -> None:
    script = ('m=$(podman image mount ' + BUILT + ') || exit 1\n'
              'echo "$m"; (cd "$m" && find b data | sort && echo == && cat b/keep'
              ' && readlink b/link2); rc=$?\n'
              'podman image unmount ' + BUILT + ' >/dev/null || rc=1\n'
              'grep -q " $m " /proc/self/mountinfo && { echo "still mounted: $m"; rc=1; }\n'
              'exit $rc')
    out = penv.unshare(script).stdout
    _, _, out = out.partition("\n")
    tree, _, rest = out.partition("==\n")
    assert _lines(tree) == sorted(BUILT_TREE), out
    assert rest == "1\nagain\nkeep\n", out


META_SCRIPT = ("chmod 600 /data/keep.txt && chown 65534:65534 /data/old.txt"
               " && ln /data/append.txt /data/hard && ln -s keep.txt /data/sym"
               " && mkfifo /data/fifo && mkdir -m 0751 /data/m"
               " && touch -d '2001-02-03 04:05:06' /data/m && chmod 4755 /bin/busybox")
META_STAT = ("stat -c '%n %a %u:%g %h %F' /data/keep.txt /data/old.txt /data/append.txt"
             " /data/hard /data/sym /data/fifo /data/m /bin/busybox"
             " && stat -c %Y /data/m && readlink /data/sym")
META_EXPECT = ["/data/keep.txt 600 0:0 1 regular file",
               "/data/old.txt 644 65534:65534 1 regular file",
               "/data/append.txt 644 0:0 2 regular file", "/data/hard 644 0:0 2 regular file",
               "/data/sym 777 0:0 1 symbolic link", "/data/fifo 644 0:0 1 fifo",
               "/data/m 751 0:0 2 directory", "/bin/busybox 4755 0:0 1 regular file",
               "981173106", "keep.txt"]


def test_metadata_commit(penv: PodmanEnv) -> None:
    """Copy-up of mode/owner changes, a hard link, symlink, fifo, setuid bit and a set mtime:
    the same inside the container and in the image committed from it."""
    out = penv.podman("run", "--name", "ct-meta", BASE_IMAGE, "sh", "-c",
                      f"umask 022 && {META_SCRIPT} && {META_STAT}").stdout
    assert _lines(out) == META_EXPECT
    penv.podman("commit", "ct-meta", "localhost/ctest-meta:latest")
    penv.podman("rm", "ct-meta")
    out = penv.podman("run", "--rm", "localhost/ctest-meta:latest", "sh", "-c", META_STAT).stdout
    got, expect = _lines(out), list(META_EXPECT)
    if penv.mount_program:
        # With a mount_program, containers-storage diffs the mounted trees ("naive diff"): the
        # lower file that gained a link counts as unchanged and the new name is stored as a
        # copy, so the committed image has two files with nlink 1 (so with fuse-overlayfs too).
        def unlinked(lines: list[str]) -> list[str]:
            return [re.sub(r" \d+ regular", " N regular", ln) if ln.startswith((
                    "/data/append", "/data/hard")) else ln for ln in lines]
        got, expect = unlinked(got), unlinked(expect)
    assert got == expect


CHURN_SCRIPT = """set -e
mkdir /churn && cd /churn
i=0; while [ $i -lt 300 ]; do echo $i > f$i; i=$((i+1)); done
i=0; while [ $i -lt 300 ]; do rm f$i; mv f$((i+1)) g$((i+1)); i=$((i+3)); done
cp -a /bin /churn/bin && rm -rf /churn/bin/[a-m]* && rm -rf /data/dir/sub
ls /churn | wc -l; ls /churn/bin | wc -l; cat /churn/g1 /churn/f2; ls /data/dir | sort | tr '\\n' ' '
"""


def test_churn_commit(penv: PodmanEnv) -> None:
    """Some hundred creates, deletes and renames, a copied tree partly removed, a lower
    subdirectory removed: the same counts inside the container and in the committed image."""
    show = ("cd /churn && ls /churn | wc -l; ls /churn/bin | wc -l; cat /churn/g1 /churn/f2;"
            " ls /data/dir | sort | tr '\\n' ' '")
    out = penv.podman("run", "--name", "ct-churn", BASE_IMAGE, "sh", "-c", CHURN_SCRIPT,
                      timeout=240).stdout
    applets = len([a for a in [*pe.busybox_applets(), "busybox"] if not "a" <= a[0] <= "m"])
    expect = ["201", str(applets), "1", "2", "x y"]
    assert [ln.strip() for ln in _lines(out)] == expect
    penv.podman("commit", "ct-churn", "localhost/ctest-churn:latest")
    penv.podman("rm", "ct-churn")
    out = penv.podman("run", "--rm", "localhost/ctest-churn:latest", "sh", "-c", show).stdout
    assert [ln.strip() for ln in _lines(out)] == expect


def test_keep_id(penv: PodmanEnv) -> None:
    """Rootless `--userns=keep-id`: containers-storage passes uidmapping=/gidmapping= to the
    mount program. Files the user makes are theirs, inside, after a commit, and on a rerun."""
    if not penv.rootless:
        pytest.skip("--userns=keep-id is a rootless option")
    stat = "stat -c '%n %u:%g' /tmp/d/f /tmp/d /tmp/keep.txt /data/keep.txt /tmp"
    me = f"{penv.uid}:{penv.gid}"
    expect = [f"/tmp/d/f {me}", f"/tmp/d {me}", f"/tmp/keep.txt {me}", "/data/keep.txt 0:0",
              "/tmp 0:0"]
    out = penv.podman("run", "--name", "ct-keepid", "--userns=keep-id", BASE_IMAGE, "sh", "-c",
                      "id -u && mkdir /tmp/d && echo x > /tmp/d/f && cp /data/keep.txt /tmp/"
                      f" && {stat}").stdout
    assert _lines(out) == [str(penv.uid), *expect]
    penv.podman("commit", "ct-keepid", "localhost/ctest-keepid:latest")
    penv.podman("rm", "ct-keepid")
    out = penv.podman("run", "--rm", "localhost/ctest-keepid:latest", "sh", "-c", stat).stdout
    assert _lines(out) == expect
    out = penv.podman("run", "--rm", "--userns=keep-id", "localhost/ctest-keepid:latest", "sh",
                      "-c", f"{stat} && rm -r /tmp/d && echo removed").stdout
    assert _lines(out) == [*expect, "removed"]


# --- the mount program's own command line, without podman ------------------------------------

def test_mount_program_command_line(penv: PodmanEnv) -> None:
    """`PROG -o lowerdir=...,upperdir=...,workdir=... MERGED` as containers-storage runs it,
    over layers with OCI whiteouts; then a delete, an unmount and a remount."""
    if penv.mount_program is None:
        pytest.skip("native overlay: no mount program")
    d = penv.work / "direct"
    prog = penv.mount_program
    opts = f"lowerdir={d}/l1:{d}/l2,upperdir={d}/u,workdir={d}/w"
    if penv.mountopt:
        opts += "," + penv.mountopt
    script = f"""
set -e
umnt() {{ fusermount3 -u "$1" 2>/dev/null || umount "$1"; }}
trap 'umnt {d}/m 2>/dev/null || true' EXIT
mkdir -p {d}/l1/d {d}/l2/d/sub {d}/u {d}/w {d}/m
: > {d}/l1/.wh.gone; : > {d}/l1/d/.wh..wh..opq; echo new > {d}/l1/d/new
echo gone > {d}/l2/gone; echo keep > {d}/l2/keep; echo rm > {d}/l2/rm
echo old > {d}/l2/d/old; echo deep > {d}/l2/d/sub/deep
{prog} -o {opts} {d}/m
echo "== merged"; (cd {d}/m && find . | sort)
rm {d}/m/rm
umnt {d}/m
echo "== upper"; (cd {d}/u && find . ! -name . -exec stat -c '%n %F %t:%T' {{}} + | sort)
{prog} -o {opts} {d}/m
echo "== remount"; (cd {d}/m && find . | sort)
umnt {d}/m
"""
    out = penv.unshare(script, timeout=60).stdout
    sections = dict(s.split("\n", 1) for s in out.split("== ")[1:])
    assert _lines(sections["merged"]) == [".", "./d", "./d/new", "./keep", "./rm"], out
    assert _lines(sections["remount"]) == [".", "./d", "./d/new", "./keep"], out
    upper = _lines(sections["upper"])
    assert ("./rm character special file 0:0" in upper or
            any(u.startswith("./.wh.rm ") for u in upper)), f"no whiteout for rm in upper: {out}"


def test_no_mount_program_left(penv: PodmanEnv, run_container: str, built: str) -> None:
    """Once nothing is mounted any more, no mount program process of ours is left."""
    if penv.mount_program is None:
        pytest.skip("native overlay: no mount program")
    penv.podman("rm", "-af", "-t", "0")
    if penv.rootless:
        penv.unshare("podman image unmount -af >/dev/null")
    else:
        penv.podman("image", "unmount", "-af")
    needle = str(penv.graphroot).encode()
    deadline = time.monotonic() + 10
    while True:
        left = []
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    cmd = (p / "cmdline").read_bytes()
                except OSError:
                    continue
                if needle in cmd and b"lowerdir=" in cmd:
                    args = cmd.replace(b"\0", b" ").decode(errors="replace")
                    left.append(f"{p.name}: {args}")
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, "mount programs still running after everything was unmounted:\n" + \
        "\n".join(left)
