"""An isolated podman/buildah environment for testing a containers-storage ``mount_program``.

Used by tests/containers/ and scripts/containers/bench_podman.py. Everything lives under one
temporary directory: graphroot, runroot, the engine's tmp_dir, HOME, XDG dirs and the config files
(``CONTAINERS_STORAGE_CONF``, ``CONTAINERS_CONF``, ``CONTAINERS_REGISTRIES_CONF``, a policy.json
in the temporary HOME). Nothing is pulled; the base image is built from /bin/busybox.

Drivers (the storage driver is always ``overlay``):

* ``pyunionfs``       mount_program = pyunionfs (through a wrapper that adds ``--log FILE``)
* ``fuse-overlayfs``  mount_program = /usr/bin/fuse-overlayfs
* ``native``          the kernel's overlayfs, no mount_program

Root (``user=None``) or rootless (``user=NAME``: podman runs via ``runuser -u NAME``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DRIVERS = ("pyunionfs", "fuse-overlayfs", "native")
TEST_USER = "pyunionfs-ctest"
BASE_IMAGE = "localhost/ctest-base:latest"
FUSE_OVERLAYFS = "/usr/bin/fuse-overlayfs"
BUSYBOX = "/bin/busybox"
PATH_ENV = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SUBID_COUNT = 65536
_ABBR = {"pyunionfs": "pyu", "fuse-overlayfs": "fo", "native": "nat"}


def pyunionfs_program() -> str:
    """The pyunionfs entry point: $PYUNIONFS, else the repo's .venv."""
    return os.environ.get("PYUNIONFS") or str(REPO / ".venv" / "bin" / "pyunionfs")


class CommandError(AssertionError):
    """A command failed or timed out; the message has the command, status and output."""


def run(cmd: Sequence[str], *, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None, input: str | None = None,
        cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run cmd in its own process group; on timeout kill that group (and only it)."""
    p = subprocess.Popen(list(cmd), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise CommandError(f"timed out after {timeout}s: {shell_quote(cmd)}\n"
                           f"--- stdout ---\n{out}\n--- stderr ---\n{err}") from None
    r = subprocess.CompletedProcess(list(cmd), p.returncode, out, err)
    if check and r.returncode != 0:
        raise CommandError(describe(r))
    return r


def shell_quote(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


def describe(r: subprocess.CompletedProcess[str]) -> str:
    return (f"exit {r.returncode}: {shell_quote(r.args)}\n"
            f"--- stdout ---\n{r.stdout.rstrip()}\n--- stderr ---\n{r.stderr.rstrip()}")


# --- test user, subordinate ids, ACL grants -------------------------------------------------

def ensure_test_user(name: str = TEST_USER) -> pwd.struct_passwd:
    """Create a system user NAME (no home, no login) with /etc/subuid and /etc/subgid ranges
    if missing. Idempotent; the user is left in place."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--comment", "pyunionfs container tests", name])
        pw = pwd.getpwnam(name)
    for kind, path in (("uids", "/etc/subuid"), ("gids", "/etc/subgid")):
        ranges = _subid_ranges(path)
        if any(owner in (name, str(pw.pw_uid)) for owner, _, _ in ranges):
            continue
        start = max([200000] + [s + n for _, s, n in ranges])
        run(["usermod", f"--add-sub{kind}", f"{start}-{start + SUBID_COUNT - 1}", name])
    return pw


def _subid_ranges(path: str) -> list[tuple[str, int, int]]:
    out = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def getfacl(path: str) -> str:
    return run(["getfacl", "--absolute-names", "--numeric", path]).stdout


def _named_entries(acl: str) -> dict[str, str]:
    """'user:1000' -> 'rw-' for the named user/group entries of a getfacl listing."""
    out = {}
    for line in acl.splitlines():
        m = re.match(r"^(user|group):([^:]+):([rwx-]{3})", line)
        if m:
            out[f"{m[1]}:{m[2]}"] = m[3]
    return out


@contextlib.contextmanager
def acl_grant(path: str, uid: int, perms: str) -> Iterator[None]:
    """Give uid `perms` on path (setfacl -m u:UID:perms) for the duration, then put back what
    was there. Only our own entry is undone (other users' entries, e.g. of a concurrent test
    run, are left as they are then); if the ACL had no extended entries before and has none
    left but the mask, `setfacl -b` makes it minimal again, i.e. exactly as before."""
    before = getfacl(path)
    key = f"user:{uid}"
    old = _named_entries(before).get(key)
    run(["setfacl", "-m", f"u:{uid}:{perms}", path])
    try:
        yield
    finally:
        if old is not None:
            run(["setfacl", "-m", f"u:{uid}:{old}", path], check=False)
        else:
            run(["setfacl", "-x", f"u:{uid}", path], check=False)
            if not _named_entries(before) and not _named_entries(getfacl(path)):
                run(["setfacl", "-b", path], check=False)
        after = getfacl(path)
        if after != before:
            # someone else changed the ACL meanwhile; our entry is gone or restored anyway
            print(f"podman_env: note: ACL of {path} differs from before the test:\n"
                  f"--- before ---\n{before}--- after ---\n{after}")


def untraversable_dirs(paths: Sequence[str]) -> list[str]:
    """Directories on the way to paths (resolved) that 'other' can't search (no o+x)."""
    todo: list[str] = []
    for p in paths:
        for q in (p, os.path.realpath(p)):
            d = Path(q)
            for anc in [d, *d.parents] if d.is_dir() else list(d.parents):
                with contextlib.suppress(OSError):
                    st = anc.stat()
                    if stat.S_ISDIR(st.st_mode) and not st.st_mode & stat.S_IXOTH \
                            and str(anc) not in todo:
                        todo.append(str(anc))
    return todo


def pyunionfs_paths() -> list[str]:
    """The files a pyunionfs process needs: the entry point, its interpreter, the stdlib."""
    prog = pyunionfs_program()
    paths = [prog]
    with contextlib.suppress(OSError):
        first = Path(prog).read_text().splitlines()[0]
        if first.startswith("#!"):
            interp = first[2:].strip().split()[0]
            paths.append(interp)
            cfg = Path(interp).parent.parent / "pyvenv.cfg"
            if cfg.exists():
                for line in cfg.read_text().splitlines():
                    k, _, v = line.partition("=")
                    if k.strip() in ("home", "executable"):
                        paths.append(v.strip())
    paths.append(str(REPO / "unionfs"))
    return paths


@contextlib.contextmanager
def host_state_guard() -> Iterator[None]:
    """podman as root always keeps its blob-info cache in /var/lib/containers/cache (there is
    no option to move it); remove /var/lib/containers afterwards if it wasn't there before."""
    existed = os.path.lexists("/var/lib/containers")
    try:
        yield
    finally:
        if not existed and os.path.isdir("/var/lib/containers"):
            shutil.rmtree("/var/lib/containers", ignore_errors=True)


# --- the environment ------------------------------------------------------------------------

@dataclass
class PodmanEnv:
    """One isolated store. Create with `PodmanEnv.create(...)`; always `close()` it."""

    driver: str
    user: str | None
    base: Path
    mountopt: str | None = None
    log: Path | None = None
    uid: int = 0
    gid: int = 0
    _notes: list[str] = field(default_factory=list)
    wrapped: bool = True  # mount_program: the logging wrapper (tests), or pyunionfs itself

    # layout
    @property
    def home(self) -> Path:
        return self.base / "home"

    @property
    def graphroot(self) -> Path:
        return self.base / "graph"

    @property
    def runtime_dir(self) -> Path:
        return self.base / "run"

    @property
    def engine_tmp(self) -> Path:
        return self.base / "tmp"

    @property
    def conf(self) -> Path:
        return self.base / "conf"

    @property
    def work(self) -> Path:
        """Scratch space owned by the podman user (build contexts, saved archives)."""
        return self.base / "work"

    @property
    def rootless(self) -> bool:
        return self.user is not None

    @property
    def mount_program(self) -> str | None:
        if self.driver == "native":
            return None
        if self.driver == "fuse-overlayfs":
            return FUSE_OVERLAYFS
        if not self.wrapped:
            return pyunionfs_program()
        return str(self.base / "bin" / "pyunionfs-mount")

    @classmethod
    def create(cls, driver: str, user: str | None = None, parent: str | Path | None = None,
               mountopt: str | None = None, pyunionfs_log: bool = True,
               wrapped: bool = True) -> PodmanEnv:
        """``wrapped=False``: mount_program is the pyunionfs command itself, as a user would
        configure it (the benchmark), not the wrapper that logs each call (the tests)."""
        if driver not in DRIVERS:
            raise ValueError(f"unknown driver {driver!r} (one of {', '.join(DRIVERS)})")
        # short: podman refuses a runroot longer than 50 characters (for its socket paths)
        tag = f"{_ABBR[driver]}-{'u' if user else 'r'}"
        base = Path(tempfile.mkdtemp(prefix=f"pyuct-{tag}-",
                                     dir=parent or os.environ.get("PYUNIONFS_CTEST_TMP",
                                                                  "/var/tmp")))
        if mountopt is None and driver != "native":
            mountopt = os.environ.get("PYUNIONFS_CTEST_MOUNTOPT", "nodev")
        env = cls(driver=driver, user=user, base=base, mountopt=mountopt or None)
        env.wrapped = wrapped
        try:
            env._setup(pyunionfs_log)
        except BaseException:
            env.close()
            raise
        return env

    def _setup(self, pyunionfs_log: bool) -> None:
        runroot = self.runtime_dir / "containers" if self.user else self.base / "runroot"
        if len(str(runroot)) >= 50:
            raise ValueError(f"runroot {runroot} is too long for podman (50 characters); "
                             "set PYUNIONFS_CTEST_TMP to a shorter directory")
        if self.user:
            pw = pwd.getpwnam(self.user)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
        os.chmod(self.base, 0o755)
        for d in (self.home / ".config" / "containers", self.home / ".local" / "share",
                  self.graphroot, self.base / "runroot", self.engine_tmp, self.conf,
                  self.work, self.base / "bin", self.base / "logs", self.base / "tmpdir"):
            d.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(mode=0o700)
        self._write_configs()
        if self.driver == "pyunionfs":
            self._write_wrapper(pyunionfs_log)
        if self.user:
            for p in [self.base, *self.base.rglob("*")]:
                os.lchown(p, self.uid, self.gid)

    def _write_configs(self) -> None:
        g, b = self.graphroot, self.base
        lines = ["[storage]", 'driver = "overlay"', f'graphroot = "{g}"',
                 f'runroot = "{b / "runroot"}"']
        if self.rootless:
            lines.append(f'rootless_storage_path = "{g}"')
        lines += ["", "[storage.options.overlay]"]
        if self.mount_program:
            lines.append(f'mount_program = "{self.mount_program}"')
        if self.mountopt:
            lines.append(f'mountopt = "{self.mountopt}"')
        (self.conf / "storage.conf").write_text("\n".join(lines) + "\n")
        (self.conf / "containers.conf").write_text(f"""\
[containers]
netns = "none"
log_driver = "k8s-file"
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{b / "tmp" / "events.log"}"
lock_type = "file"
tmp_dir = "{b / "tmp"}"
static_dir = "{g / "libpod"}"
volume_path = "{g / "volumes"}"
image_copy_tmp_dir = "{b / "tmpdir"}"
stop_timeout = 2

[network]
network_config_dir = "{b / "conf" / "net"}"
""")
        (self.conf / "registries.conf").write_text(
            'unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
        (self.home / ".config" / "containers" / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]}) + "\n")

    def _write_wrapper(self, with_log: bool) -> None:
        """mount_program wrapper: records each call in the log, adds --log FILE (unless
        PYUNIONFS_CTEST_LOG=0), and records the exit status."""
        self.log = self.base / "logs" / "pyunionfs.log"
        self.log.touch()
        log_args = f'--log "{self.log}"' if with_log else ""
        w = self.base / "bin" / "pyunionfs-mount"
        w.write_text(f"""#!/bin/sh
# mount_program wrapper written by scripts/containers/podman_env.py
log="{self.log}"
echo "== $(date +%T.%N) mount_program (uid $(id -u)): $*" >>"$log"
"{pyunionfs_program()}" {log_args} "$@"
rc=$?
echo "== mount_program exit $rc" >>"$log"
exit $rc
""")
        w.chmod(0o755)

    # commands
    def env(self) -> dict[str, str]:
        c = self.conf
        return {
            "PATH": PATH_ENV, "HOME": str(self.home), "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_DATA_HOME": str(self.home / ".local" / "share"),
            "TMPDIR": str(self.base / "tmpdir"),
            "CONTAINERS_STORAGE_CONF": str(c / "storage.conf"),
            "CONTAINERS_CONF": str(c / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(c / "registries.conf"),
        }

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv as the podman user with this environment (env -i: nothing else leaks in)."""
        envs = [f"{k}={v}" for k, v in self.env().items()]
        if self.user:
            return ["runuser", "-u", self.user, "--", "env", "-i", *envs, *argv]
        return ["env", "-i", *envs, *argv]

    def sh(self, argv: Sequence[str], *, timeout: float = 120, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return run(self.command(argv), timeout=timeout, check=check, input=input,
                       cwd=self.work)
        except CommandError as e:
            raise CommandError(f"{e}{self.log_note()}") from None

    def podman(self, *args: str, timeout: float = 120, check: bool = True,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.sh(["podman", *args], timeout=timeout, check=check, input=input)

    def unshare(self, script: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        """sh -c script as root of the podman user namespace (plain root for root)."""
        if self.rootless:
            return self.podman("unshare", "sh", "-c", script, timeout=timeout, check=check)
        return self.sh(["sh", "-c", script], timeout=timeout, check=check)

    def log_note(self, tail: int = 60) -> str:
        if not self.log or not self.log.exists():
            return ""
        lines = self.log.read_text(errors="replace").splitlines()
        return f"\n--- tail of {self.log} ---\n" + "\n".join(lines[-tail:])

    # images
    def import_base_image(self, name: str = BASE_IMAGE) -> None:
        tar = self.work / "base-rootfs.tar"
        tar.write_bytes(base_rootfs_tar())
        if self.user:
            os.chown(tar, self.uid, self.gid)
        self.podman("import", str(tar), name)

    # cleanup
    def close(self) -> list[str]:
        """Remove containers, images, mounts, our processes and the directory. Returns notes
        about anything that needed force (printed by callers on failure)."""
        notes = self._notes
        if (self.base / "conf" / "containers.conf").exists():
            for args in (("rm", "-af", "-t", "0"), ("image", "unmount", "-af"),
                         ("rmi", "-af")):
                try:
                    if args[0] == "image" and self.rootless:
                        self.unshare("podman image unmount -af", timeout=60, check=False)
                    else:
                        self.podman(*args, timeout=60, check=False)
                except CommandError as e:
                    notes.append(str(e))
        self._kill_our_processes(notes)
        self._unmount_leftovers(notes)
        if mounts_under(self.base):
            notes.append(f"still mounted under {self.base}, not removed: {mounts_under(self.base)}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        return notes

    def _kill_our_processes(self, notes: list[str]) -> None:
        """The rootless pause process (its pid file is in our tmp_dir), then any process whose
        command line names our directory (conmon, mount programs), TERM then KILL."""
        pids: list[int] = []
        pidfile = self.engine_tmp / "pause.pid"
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pidfile.read_text().strip()))
        needle = str(self.base).encode()
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if needle in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
        pids = list(dict.fromkeys(pids))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in pids if _alive(p)]
            if not alive:
                return
            if sig == signal.SIGKILL:
                notes.append(f"had to SIGKILL {alive}")
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, sig)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(_alive(p) for p in alive):
                time.sleep(0.1)

    def _unmount_leftovers(self, notes: list[str]) -> None:
        for m in sorted(mounts_under(self.base), key=len, reverse=True):
            notes.append(f"left mounted: {m}")
            if run(["umount", m], check=False, timeout=30).returncode != 0:
                run(["umount", "-l", m], check=False, timeout=30)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below base in our mount namespace."""
    prefix = os.path.realpath(base)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return out


# --- base image -------------------------------------------------------------------------------

BASE_FILES = {
    "data/keep.txt": "keep\n",
    "data/append.txt": "line1\n",
    "data/delete.txt": "delete me\n",
    "data/old.txt": "old name\n",
    "data/dir/x": "x\n",
    "data/dir/y": "y\n",
    "data/dir/sub/z": "z\n",
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    "etc/group": "root:x:0:\nnobody:x:65534:\n",
}


def busybox_applets() -> list[str]:
    out = run([BUSYBOX, "--list"]).stdout.split()
    return sorted(a for a in out if a and a != "busybox" and "/" not in a)


def base_rootfs_tar() -> bytes:
    """A minimal rootfs: bin/busybox + applet symlinks, /tmp, /etc, /root and BASE_FILES."""
    buf = io.BytesIO()
    now = int(time.time())
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add_dir(name: str, mode: int = 0o755) -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, now
            t.addfile(ti)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), mode, now
            t.addfile(ti, io.BytesIO(data))

        for d in ("bin", "etc", "root", "data", "data/dir", "data/dir/sub", "proc", "sys",
                  "dev", "run", "var"):
            add_dir(d, 0o700 if d == "root" else 0o755)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(BUSYBOX).read_bytes(), 0o755)
        for a in busybox_applets():
            ti = tarfile.TarInfo(f"bin/{a}")
            ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, now
            t.addfile(ti)
        for name, text in BASE_FILES.items():
            add_file(name, text.encode())
    return buf.getvalue()


# --- image archives ---------------------------------------------------------------------------

def norm_name(name: str) -> str:
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


@dataclass
class LayerEntry:
    name: str
    kind: str  # "dir", "file", "symlink", "hardlink", "other"
    data: bytes = b""
    linkname: str = ""


def read_layer(data: bytes) -> dict[str, LayerEntry]:
    """Entries of one layer tar (possibly compressed), by normalised name."""
    out: dict[str, LayerEntry] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as t:
        for m in t.getmembers():
            n = norm_name(m.name)
            if not n:
                continue
            if m.isdir():
                e = LayerEntry(n, "dir")
            elif m.issym():
                e = LayerEntry(n, "symlink", linkname=m.linkname)
            elif m.islnk():
                e = LayerEntry(n, "hardlink", linkname=norm_name(m.linkname))
            elif m.isfile():
                f = t.extractfile(m)
                e = LayerEntry(n, "file", f.read() if f else b"")
            else:
                e = LayerEntry(n, "other")
            out[n] = e
    return out


def archive_layers(path: Path) -> list[dict[str, LayerEntry]]:
    """Layers (bottom first) of a `podman save` docker-archive or oci-archive."""
    with tarfile.open(path) as t:
        names = set(t.getnames())

        def blob(name: str) -> bytes:
            f = t.extractfile(_member(t, name))
            assert f is not None, name
            return f.read()

        if "manifest.json" in names or "./manifest.json" in names:
            manifest = json.loads(blob("manifest.json"))
            return [read_layer(blob(name)) for name in manifest[0]["Layers"]]
        index = json.loads(blob("index.json"))
        digest = index["manifests"][0]["digest"]
        manifest = json.loads(blob("blobs/" + digest.replace(":", "/")))
        return [read_layer(blob("blobs/" + layer["digest"].replace(":", "/")))
                for layer in manifest["layers"]]


def _member(t: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    for cand in (name, "./" + name):
        with contextlib.suppress(KeyError):
            return t.getmember(cand)
    raise KeyError(name)


def apply_layers(layers: Sequence[dict[str, LayerEntry]]) -> dict[str, LayerEntry]:
    """The tree that results from extracting layers (bottom first) with OCI whiteouts:
    `.wh.NAME` removes NAME from the layers below, `DIR/.wh..wh..opq` empties DIR of them."""
    tree: dict[str, LayerEntry] = {}

    def drop(prefix: str, itself: bool) -> None:
        for k in [k for k in tree if k.startswith(prefix + "/") or (itself and k == prefix)]:
            del tree[k]

    for layer in layers:
        for name in layer:
            parent, _, leaf = name.rpartition("/")
            if leaf == ".wh..wh..opq":
                drop(parent, itself=False) if parent else tree.clear()
            elif leaf.startswith(".wh."):
                drop(f"{parent}/{leaf[4:]}" if parent else leaf[4:], itself=True)
        for name, e in layer.items():
            if not name.rpartition("/")[2].startswith(".wh."):
                if e.kind != "dir":
                    drop(name, itself=False)  # a non-dir replaces a dir and what was below
                tree[name] = e
    return tree


def whiteouts(layer: dict[str, LayerEntry]) -> set[str]:
    return {n for n in layer if n.rpartition("/")[2].startswith(".wh.")}
