"""The layers every run builds once: the change layer the kernel writes, copies of the stdlib
and /usr/include, the big file and directory, the mv and chown layers."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from benchkit.common import (
    ALWAYS_EXCLUDED,
    CHOWN_PER_DIR,
    MIB,
    MV_FILE_SIZE,
    MV_FILES,
    BenchError,
    Profile,
    count_entries,
    log,
    run_cmd,
    spread,
)
from benchkit.mounts import Mount, kernel_overlay_problem


@dataclass
class MainLayers:
    root: Path
    dirs: list[Path]  # top first, as lowerdir= wants them
    stdlib: str  # the stdlib copy: MERGED/<stdlib>
    stdlib_src: Path
    dynload: str  # the real lib-dynload (C extensions are imported from there)
    include: str  # the /usr/include copy: MERGED/<include>
    large: str  # the big lower file
    tarball: Path  # for untar, outside the layers
    untar_last: str  # a file the tar extracts (checked)
    chmod_target: str
    big_expected: int  # visible entries of big/
    mv_layer: Path  # mv_dir's own (only) lower: big/ with MV_FILES files
    git_layer: Path  # the git workloads' own (only) lower: repo/, a checkout (make_git_layer)
    git_edited: list[str]  # the files its second commit edited, relative to repo/
    # chown_r's own (only) lower: tree/dNN/fNN of 1 MiB each (None: not built, not selected)
    chown_layer: Path | None = None
    chown_files: list[str] = field(default_factory=list)  # the files, relative to the layer
    entries: int | None = None  # visible entries of the merged tree (None: not counted)
    stdlib_entries: int = 0  # ... under <stdlib>
    chmod_entries: int = 0  # ... under chmod_target
    changes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _top_entries(src: Path, exclude: tuple[str, ...], limit: int | None) -> list[str]:
    names = sorted(
        n for n in os.listdir(src) if not any(fnmatch.fnmatch(n, pat) for pat in exclude)
    )
    if limit is None:
        return names
    chosen, total = [], 0
    for n in names:
        size = 1 + (count_entries(src / n) if (src / n).is_dir() else 0)
        if total + size <= limit:
            chosen.append(n)
            total += size
    return chosen


def copy_tree(src: Path, dst: Path, exclude: tuple[str, ...], limit: int | None) -> None:
    """cp -a of src's top-level entries (less the excluded) into dst, with src's own metadata."""
    dst.mkdir()
    entries = _top_entries(src, exclude, limit)
    if entries:
        run_cmd(["cp", "-a", "-t", str(dst), *(str(src / n) for n in entries)], 600, "cp -a")
    shutil.copystat(src, dst)
    with contextlib.suppress(OSError):
        st = os.stat(src)
        os.chown(dst, st.st_uid, st.st_gid)


def write_large(path: Path, mib: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(4 * MIB)
    with open(path, "wb") as f:
        for i in range(0, mib, 4):
            f.write(block[: min(4, mib - i) * MIB])
        f.flush()
        os.fsync(f.fileno())


def make_tarball(scratch: Path, p: Profile) -> tuple[Path, str]:
    src = scratch / "untar-src"
    blob = os.urandom(8192)
    last = ""
    dirs = [f"t{d // 10:02d}/d{d:03d}" for d in range(p.untar_dirs)]
    for d in dirs:
        (src / d).mkdir(parents=True)
    for i in range(p.untar_files):
        rel = f"{dirs[i % len(dirs)]}/f{i:05d}"
        (src / rel).write_bytes(blob[: 200 + (i * 733) % 3900])
        last = rel
    tarball = scratch / "untar.tar"
    run_cmd(["tar", "cf", str(tarball), "-C", str(src), "."], 300, "tar cf")
    shutil.rmtree(src)
    return tarball, last


def make_mv_layer(layer: Path) -> Path:
    """mv_dir's lower: big/ holding MV_FILES files of MV_FILE_SIZE bytes (a layer of its own, so
    that big/ is in no other layer)."""
    (layer / "big").mkdir(parents=True)
    blob = os.urandom(MV_FILE_SIZE + MV_FILES)
    for i in range(MV_FILES):
        (layer / "big" / f"f{i:04d}").write_bytes(blob[i : i + MV_FILE_SIZE])
    return layer


# No user or system configuration, and no automatic gc (a commit would start one in the
# background, racing the explicit one and the timed runs).
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
           "GIT_CONFIG_COUNT": "2", "GIT_CONFIG_KEY_0": "gc.auto", "GIT_CONFIG_VALUE_0": "0",
           "GIT_CONFIG_KEY_1": "maintenance.auto", "GIT_CONFIG_VALUE_1": "false",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}


def git(repo: Path, *args: str, timeout: float = 600) -> None:
    """git in ``repo``, with no user or system configuration (the same on every machine)."""
    env = dict(os.environ, **GIT_ENV)
    r = subprocess.run(["git", "-C", str(repo), *args], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"git {args[0]} in {repo}: {r.stderr.decode(errors='replace')[:200]}")


def make_git_layer(layer: Path, src: Path) -> list[str]:
    """The git workloads' lower: repo/, a packed git checkout of the stdlib copy ``src`` with
    two commits; the second edits every tenth .py file (so that checking out the first
    rewrites them). Returns those files, relative to repo/."""
    repo = layer / "repo"
    layer.mkdir()
    copy_tree(src, repo, ("__pycache__",), None)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    edited = sorted(str(f.relative_to(repo)) for f in repo.rglob("*.py"))[::10]
    for rel in edited:
        with open(repo / rel, "a") as f:
            f.write("# edited\n")
    git(repo, "commit", "-q", "-a", "-m", "edit")
    git(repo, "gc", "-q")  # packed, as a clone is
    return edited


def make_chown_layer(layer: Path, mib: int) -> list[str]:
    """chown_r's lower: tree/ holding mib files of 1 MiB of random data (none alike, so that
    nothing dedups or compresses them), CHOWN_PER_DIR per directory; returns their paths."""
    files = []
    for i in range(mib):
        rel = f"tree/d{i // CHOWN_PER_DIR:03d}/f{i % CHOWN_PER_DIR:02d}"
        (layer / rel).parent.mkdir(parents=True, exist_ok=True)
        (layer / rel).write_bytes(os.urandom(MIB))
        files.append(rel)
    return files


class KernelChanges:
    """The change layer's edits, made through a kernel overlay mount (the kernel writes it)."""

    def __init__(self, merged: Path) -> None:
        self.m = merged
        self.skipped: dict[str, int] = {}

    def delete(self, rel: str) -> None:
        os.unlink(self.m / rel)

    def replace_dir(self, rel: str) -> None:
        shutil.rmtree(self.m / rel)
        os.mkdir(self.m / rel)
        (self.m / rel / "replaced.txt").write_text("rm -rf and mkdir again\n")

    def append(self, rel: str) -> None:
        with open(self.m / rel, "ab") as f:
            f.write(b"\n/* appended by the change layer */\n")

    def chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.m / rel, mode)

    def touch(self, rel: str) -> None:
        os.utime(self.m / rel)

    def mkdir(self, rel: str) -> None:
        os.mkdir(self.m / rel)

    def create(self, rel: str, data: bytes) -> None:
        (self.m / rel).write_bytes(data)


class HandChanges(KernelChanges):
    """The same edits written directly into the top layer, as the kernel would have. Without
    root there are no 0/0 whiteouts and no trusted.overlay.opaque: those edits are skipped."""

    def __init__(self, top: Path, lowers: list[Path]) -> None:
        super().__init__(top)
        self.lowers = lowers
        self.root = os.geteuid() == 0

    def _skip(self, what: str) -> bool:
        if self.root:
            return False
        self.skipped[what] = self.skipped.get(what, 0) + 1
        return True

    def _lower(self, rel: str) -> Path:
        for layer in self.lowers:
            if os.path.lexists(layer / rel):
                return layer / rel
        raise FileNotFoundError(rel)

    def _parents(self, rel: str) -> None:
        parts = Path(rel).parts[:-1]
        for i in range(1, len(parts) + 1):
            sub = Path(*parts[:i])
            if not (self.m / sub).exists():
                os.mkdir(self.m / sub)
                with contextlib.suppress(FileNotFoundError):
                    self._copy_meta(self._lower(str(sub)), self.m / sub)

    def _copy_meta(self, src: Path, dst: Path) -> None:
        shutil.copystat(src, dst, follow_symlinks=False)
        if self.root:
            st = os.lstat(src)
            os.lchown(dst, st.st_uid, st.st_gid)

    def _copy_up(self, rel: str) -> None:
        self._parents(rel)
        if not os.path.lexists(self.m / rel):
            src = self._lower(rel)
            shutil.copy2(src, self.m / rel, follow_symlinks=False)
            self._copy_meta(src, self.m / rel)

    def delete(self, rel: str) -> None:
        if not self._skip("whiteouts"):
            self._parents(rel)
            os.mknod(self.m / rel, stat.S_IFCHR, os.makedev(0, 0))

    def replace_dir(self, rel: str) -> None:
        self._parents(rel)
        os.mkdir(self.m / rel)
        self._copy_meta(self._lower(rel), self.m / rel)
        if not self._skip("opaque marks"):
            os.setxattr(self.m / rel, "trusted.overlay.opaque", b"y")
        (self.m / rel / "replaced.txt").write_text("rm -rf and mkdir again\n")

    def append(self, rel: str) -> None:
        self._copy_up(rel)
        super().append(rel)

    def chmod(self, rel: str, mode: int) -> None:
        self._copy_up(rel)
        super().chmod(rel, mode)

    def touch(self, rel: str) -> None:
        self._copy_up(rel)
        super().touch(rel)

    def mkdir(self, rel: str) -> None:
        self._parents(rel)
        super().mkdir(rel)

    def create(self, rel: str, data: bytes) -> None:
        self._parents(rel)
        super().create(rel, data)


def _files_under(layer: Path, rel: str) -> list[str]:
    out = []
    for dirpath, _dirnames, filenames in os.walk(layer / rel):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(full).st_mode):
                out.append(os.path.relpath(full, layer))
    return sorted(out)


def apply_changes(ch: KernelChanges, py: Path, inc: Path, layers: MainLayers, p: Profile) -> bool:
    """A few hundred edits of a realistic image layer; returns whether whiteouts were made."""
    S, I = layers.stdlib, layers.include  # noqa: E741
    subdirs = sorted(
        (count_entries(inc / I / d), d)
        for d in os.listdir(inc / I)
        if (inc / I / d).is_dir() and not (inc / I / d).is_symlink()
        and f"{I}/{d}" != layers.chmod_target
    )  # fmt: skip
    replaced = [f"{I}/{d}" for n, d in subdirs if n >= 3][:2]
    if (py / S / "test" / "test_email").is_dir():
        replaced.append(f"{S}/test/test_email")
    for rel in replaced:
        ch.replace_dir(rel)

    def keep(rel: str) -> bool:
        return not any(rel.startswith(r + "/") for r in replaced) and not rel.startswith(
            layers.chmod_target + "/"
        )

    inc_files = [f for f in _files_under(inc, I) if keep(f)]
    stdlib_files = _files_under(py, S)
    opt2 = [f for f in stdlib_files if f.endswith(".opt-2.pyc")]
    tests = [f for f in stdlib_files if f.startswith(f"{S}/test/") and keep(f)]
    for rel in spread(opt2, 50, 0) + spread(inc_files, 50, 0) + spread(tests, 30, 0):
        ch.delete(rel)
    for rel in spread(inc_files, 50, 1) + spread(tests, 30, 1):
        ch.append(rel)
    for i, rel in enumerate(spread(inc_files, 50, 2)):
        ch.chmod(rel, 0o600 if i % 2 else 0o755)
    for i in range(50):
        ch.create(f"{S}/bench-new-{i:03d}.txt", b"new in the change layer\n" * (i + 1))
    kept_dirs = [f"{I}/{d}" for _n, d in subdirs if f"{I}/{d}" not in replaced][:10]
    for i in range(40):
        target = kept_dirs[i % len(kept_dirs)] if kept_dirs else I
        ch.create(f"{target}/bench-new-{i:03d}.h", b"#define BENCH_NEW 1\n")
    ch.mkdir(f"{I}/bench-new-dir")
    for i in range(10):
        ch.create(f"{I}/bench-new-dir/n{i}.h", b"/* new */\n")
    # big/: the top layer's third, a few whiteouts, a few names copied up
    for j in range(0, p.bigdir, 3):
        ch.create(f"big/entry-{j:05d}", b"")
    whiteouts = not isinstance(ch, HandChanges) or ch.root
    for k in range(100, 105):
        ch.delete(f"big/entry-{1 + 3 * k:05d}")
    for k in range(200, 205):
        ch.touch(f"big/entry-{1 + 3 * k:05d}")
    return whiteouts


def layer_census(top: Path) -> dict[str, int]:
    c = {"whiteouts": 0, "opaque_dirs": 0, "dirs": 0, "files": 0}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames:
            c["dirs"] += 1
            with contextlib.suppress(OSError):
                if os.getxattr(os.path.join(dirpath, name), "trusted.overlay.opaque") == b"y":
                    c["opaque_dirs"] += 1
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                c["whiteouts"] += 1
            else:
                c["files"] += 1
    return c


def stdlib_source() -> tuple[Path, str]:
    src = Path(sysconfig.get_paths()["stdlib"]).resolve()
    dyn = next((p for p in sys.path if p.endswith("lib-dynload")), None)
    dyn = dyn or str(sysconfig.get_config_var("DESTSHARED") or src / "lib-dynload")
    return src, dyn


def make_main_layers(
    scratch: Path, p: Profile, by_hand: bool = False, chown: bool = False
) -> MainLayers:
    root = scratch / "L"
    ch, py, inc = root / "ch", root / "py", root / "inc"
    for d in (ch, py, inc):
        d.mkdir(parents=True)
    src, dynload = stdlib_source()
    include_src = Path("/usr/include")
    notes: list[str] = []
    copy_tree(src, py / src.name, ALWAYS_EXCLUDED + p.stdlib_exclude, None)
    if include_src.is_dir():
        copy_tree(include_src, inc / "include", (), p.include_limit)
    else:
        (inc / "include").mkdir()
        notes.append("no /usr/include here: its copy is empty")
    # big/ in the two copies' layers: j % 3 == 1 in py, 2 in inc (0 comes with the change layer);
    # the first five of inc's names are in py too
    (py / "big").mkdir()
    (inc / "big").mkdir()
    for j in range(p.bigdir):
        if j % 3:
            ((py if j % 3 == 1 else inc) / "big" / f"entry-{j:05d}").touch()
    for j in range(2, 15, 3):
        (py / "big" / f"entry-{j:05d}").touch()
    large = "data/large.bin"
    write_large(inc / large, p.mib)
    tarball, untar_last = make_tarball(scratch, p)
    mv_layer = make_mv_layer(root / "mv")
    git_edited = make_git_layer(root / "git", py / src.name)
    # chmod_R: the /usr/include subtree closest to the wanted size
    sizes = sorted(
        (abs(count_entries(inc / "include" / d) + 1 - p.chmod_entries), d)
        for d in os.listdir(inc / "include")
        if (inc / "include" / d).is_dir() and not (inc / "include" / d).is_symlink()
    )
    chmod_target = f"include/{sizes[0][1]}" if sizes else f"{src.name}/encodings"
    layers = MainLayers(
        root=root,
        dirs=[ch, py, inc],
        stdlib=src.name,
        stdlib_src=src,
        dynload=dynload,
        include="include",
        large=large,
        tarball=tarball,
        untar_last=untar_last,
        chmod_target=chmod_target,
        big_expected=p.bigdir,
        mv_layer=mv_layer,
        git_layer=root / "git",
        git_edited=git_edited,
        notes=notes,
    )
    if chown:  # only when a chown_r workload runs: p.chown_mib MiB to write
        layers.chown_layer = root / "chown"
        layers.chown_files = make_chown_layer(layers.chown_layer, p.chown_mib)
    build_change_layer(layers, p, by_hand)
    os.sync()
    return layers


def build_change_layer(layers: MainLayers, p: Profile, by_hand: bool) -> None:
    ch, py, inc = layers.dirs
    why = "not asked for (--change-layer=hand)" if by_hand else kernel_overlay_problem()
    if why is None:
        work, merged = layers.root / "chwork", layers.root / "chmerged"
        work.mkdir()
        merged.mkdir()
        km = Mount("kernel", [py, inc], ch, work, merged, layers.root / "chmount.log")
        km.start()
        try:
            whiteouts = apply_changes(KernelChanges(merged), py, inc, layers, p)
            layers.entries = count_entries(merged)
            layers.stdlib_entries = count_entries(merged / layers.stdlib)
            layers.chmod_entries = count_entries(merged / layers.chmod_target)
            layers.notes.append("change layer written by the kernel (overlay mount, empty upper)")
        finally:
            km.stop()
        shutil.rmtree(work)
        merged.rmdir()
    else:
        hand = HandChanges(ch, [py, inc])
        whiteouts = apply_changes(hand, py, inc, layers, p)
        layers.stdlib_entries = count_entries(py / layers.stdlib)
        layers.chmod_entries = count_entries(inc / layers.chmod_target)
        note = f"change layer written by hand (kernel overlay: {why})"
        if hand.skipped:
            note += "; skipped (need root): " + ", ".join(
                f"{n} {what}" for what, n in hand.skipped.items()
            )
        layers.notes.append(note)
        log(note)
    if whiteouts:
        layers.big_expected = p.bigdir - 5
    layers.changes = layer_census(ch)


