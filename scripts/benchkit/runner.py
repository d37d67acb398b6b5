"""The run: layers built, every workload mounted afresh on each filesystem, interleaved,
rounds repeated; the command line (scripts/bench.py)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchkit.common import (
    FS_NAMES,
    FULL,
    FUSE_NAMES,
    MOUNT_TIMEOUT,
    QUICK,
    RSS_BACK_FRACTION,
    RSS_KIB_PER_INODE_TARGET,
    RTT_CPU_TARGET_US,
    BenchError,
    MountFailed,
    Profile,
    become_subreaper,
    drop_caches,
    log,
    read_file,
    run_cmd,
    vm_rss_kib,
    walk_lstat,
)
from benchkit.layers import MainLayers, make_main_layers
from benchkit.mounts import (
    Mount,
    availability,
    daemon_of,
    default_pyunionfs_cmd,
    mount_command,
    requests_served,
    umount_command,
    version_of,
    wait_gone,
    watchdog,
)
from benchkit.report import (
    Result,
    figure_rows,
    fmt_time,
    layer_rows,
    main_rows,
    print_errors,
    print_rows,
    rate_rows,
    rss_rows,
)
from benchkit.workloads import CHOWN_KEYS, SECTION_KEYS, WORKLOADS, Ctx, Workload, _ents
from unionfs.api import Overlay
from unionfs.mounttable import is_mounted as mounted
from unionfs.mounttable import mounts_under as mounts_below
from unionfs.mounttable import wait_until

# start-up rows, timed by the commands themselves (startup_one), not by a workload's run
STARTUP = ("mount_cold", "mount_warm", "umount", "overlay_cycle")


class Bench:
    def __init__(
        self,
        scratch: Path,
        p: Profile,
        rounds: int,
        timeout: float,
        active: list[str],
        can_drop: bool,
    ) -> None:
        self.scratch, self.p, self.rounds, self.timeout = scratch, p, rounds, timeout
        self.active, self.can_drop = active, can_drop
        self.current: list[Mount] = []
        self.cache_cold = True  # caches dropped since the lowers were last read
        self.n = 0
        (scratch / "logs").mkdir()

    def fresh(
        self,
        fs: str,
        lowers: list[Path],
        probe: str | None = None,
        cwd: Path | None = None,
        options: str = "",
    ) -> Mount:
        self.n += 1
        rd = self.scratch / "run" / f"{self.n:04d}-{fs}"
        upper, work, merged = rd / "upper", rd / "work", rd / "merged"
        for d in (upper, work, merged):
            d.mkdir(parents=True)
        return Mount(
            fs,
            lowers,
            upper,
            work,
            merged,
            self.scratch / "logs" / f"{fs}.log",
            probe=merged / probe if probe else None,
            cwd=cwd,
            extra_options=options,
        )

    @contextlib.contextmanager
    def mounted(self, mount: Mount, background: bool = False) -> Iterator[float]:
        """Mount (timed: mount_ready, or the background command's wall time), yield the time,
        unmount and remove the run dir."""
        self.current.append(mount)
        try:
            if background:
                t = mount.start_background()
            else:
                mount.start()
                assert mount.ready_s is not None
                t = mount.ready_s
            yield t
        finally:
            try:
                mount.stop()
            finally:
                self.current.remove(mount)
            rd = mount.merged.parent
            if not mounts_below(rd) and not mounted(mount.merged):
                shutil.rmtree(rd, ignore_errors=True)

    def stop_all(self) -> None:
        for mount in list(self.current):
            try:
                mount.stop()
            except Exception as e:
                log(f"unmounting {mount.merged}: {e}")

    def timed(self, mount: Mount, what: str, fn: Callable[[], None]) -> float:
        with watchdog(mount, what, self.timeout) as fired:
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:
                if fired.is_set():
                    raise BenchError("timeout") from None
                if isinstance(e, BenchError):
                    raise
                raise BenchError(f"{type(e).__name__}: {e}") from None
            return time.perf_counter() - t0

    # ---- main workloads

    def run_main(
        self, layers: MainLayers, workloads: list[Workload]
    ) -> dict[str, dict[str, Result]]:
        results = {w.key: {fs: Result() for fs in self.active} for w in workloads}
        probe = layers.stdlib
        for fs in self.active:  # untimed warm-up: the daemons' code in the page cache
            try:
                with self.mounted(self.fresh(fs, layers.dirs, probe)):
                    pass
            except BenchError as e:
                log(f"{fs}: warm-up mount: {e}")
                for w in workloads:  # reported once per workload, not tried again
                    results[w.key][fs].error = f"cannot mount: {e}"
        for rnd in range(self.rounds):
            t_round = time.perf_counter()
            for w in workloads:
                for fs in self.active:
                    res = results[w.key][fs]
                    if res.error is not None:
                        continue  # failed in an earlier round: not again
                    try:
                        t, figures = self.run_one(fs, w, layers)
                        res.runs.append(t)
                        if figures:
                            res.figures.append(figures)
                    except BenchError as e:
                        res.error = str(e)
                        log(f"{fs}: {w.key}: {e}")
                times = ", ".join(
                    f"{fs} {fmt_time(r.runs[-1]) if r.error is None and r.runs else 'ERR'}"
                    for fs, r in results[w.key].items()
                )
                log(f"round {rnd + 1} {w.key}: {times}")
            log(f"round {rnd + 1}/{self.rounds}: {time.perf_counter() - t_round:.1f} s")
        return results

    def run_one(self, fs: str, w: Workload, layers: MainLayers) -> tuple[float, dict[str, float]]:
        """The time of one run, and the figures it measured (Ctx.figures)."""
        if w.key in STARTUP:
            return self.startup_one(fs, w.key, layers), {}
        lowers, probe = w.lowers(layers) if w.lowers else (layers.dirs, layers.stdlib)
        options = w.options if fs in ("kernel", "pyunionfs") else ""
        if fs in FUSE_NAMES and w.fuse_options:
            options = ",".join(o for o in (options, w.fuse_options) if o)
        mount = self.fresh(fs, lowers, probe, options=options)
        with self.mounted(mount, background=w.key == "mount_bg") as t_mount:
            if w.run is None:
                return t_mount, {}
            c = Ctx(mount.merged, layers, self.p, self.timeout, mount.upper)
            prepare = w.prepare
            if not w.cold and w.lowers is None:
                self.warm_lowers(layers)
            if prepare is not None:
                self.timed(mount, f"{w.key} (preparation)", lambda: prepare(c))
            os.sync()
            if w.cold and self.can_drop:
                drop_caches()
                self.cache_cold = True
            run = w.run
            before = requests_served(mount)
            t = self.timed(mount, w.key, lambda: run(c))
            after = requests_served(mount)
            if before is not None and after is not None:
                c.figures["requests"] = n = after[0] - before[0]
                if n:
                    c.figures["cpu_us_per_request"] = (after[1] - before[1]) * 1e6 / n
            check = w.check
            if check is not None:
                self.timed(mount, f"{w.key} (check)", lambda: check(c))
            return t, c.figures

    def startup_one(self, fs: str, key: str, layers: MainLayers) -> float:
        """A start-up row: the mount command (cold, or with the server up) until a file reads
        back, the unmount command until the daemon has gone, or an Overlay's enter + exit."""
        mount = self.fresh(fs, layers.dirs, layers.stdlib)
        first = mount.merged / layers.stdlib / "os.py"
        rd = mount.merged.parent
        env = dict(os.environ)
        if key == "mount_cold":
            env["PYUNIONFS_SERVER"] = "0"

        def run(cmd: list[str]) -> None:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise BenchError(f"{fs}: {shlex.join(cmd[:3])}...: {r.stderr.strip()[-300:]}")

        def cycle() -> float:
            t0 = time.perf_counter()
            run(mount_command(mount))
            with watchdog(mount, key, MOUNT_TIMEOUT), open(first, "rb") as f:
                f.read(4096)
            return time.perf_counter() - t0

        try:
            if key == "overlay_cycle":
                ov = Overlay(lowers=layers.dirs, upper=mount.upper, work=mount.work,
                             mountpoint=mount.merged, backend=fs, timeout=MOUNT_TIMEOUT,
                             log_path=self.scratch / "logs" / f"{fs}-cycle.log")
                t0 = time.perf_counter()
                with ov:
                    with open(first, "rb") as f:
                        f.read(4096)
                return time.perf_counter() - t0
            if key == "mount_warm" and fs == "pyunionfs":
                cycle()  # leaves a server (if there was none) for the timed one
                run(umount_command(mount))
                self.wait_server(env)
            t = cycle()
            if key != "umount":
                return t
            pid = daemon_of(mount)
            t0 = time.perf_counter()
            run(umount_command(mount))
            wait_gone(pid, MOUNT_TIMEOUT)
            return time.perf_counter() - t0
        finally:
            if mounted(mount.merged):
                subprocess.run(umount_command(mount), capture_output=True, timeout=60)
            if not mounts_below(rd) and not mounted(mount.merged):
                shutil.rmtree(rd, ignore_errors=True)

    @staticmethod
    def wait_server(env: dict[str, str]) -> None:
        from unionfs import client

        def up() -> bool:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(client.socket_path(env)[0])
                return True
            except (OSError, client.Unsafe):
                return False

        if not wait_until(up, 30):
            log("pyunionfs: no mount server came up: mount_warm is a cold start")

    def warm_lowers(self, layers: MainLayers) -> None:
        """After a drop_caches, read the layers' metadata and small files (and the tarball)
        directly, so that the first filesystem of a warm workload (the kernel) does not pay the
        disk reads that the others then profit from. The big file is prewarmed where wanted."""
        if not self.cache_cold:
            return
        large = {str(layers.dirs[2] / layers.large)}
        for layer in layers.dirs:
            for dirpath, _dirnames, filenames in os.walk(layer):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    if stat.S_ISREG(os.lstat(full).st_mode) and full not in large:
                        read_file(Path(full))
        read_file(layers.tarball)
        self.cache_cold = False

    # ---- layer scaling

    def make_scaling_layers(self) -> Path:
        base = self.scratch / "S"
        names = [f"c{i:03d}" for i in range(100)]
        for k in range(1, max(self.p.layer_counts) + 1):
            (base / str(k) / "common").mkdir(parents=True)
            for n in names:
                (base / str(k) / "common" / n).write_bytes(b"%d\n" % k)
            (base / str(k) / f"only-{k}").write_bytes(b"")
        os.sync()
        return base

    def run_layers(self) -> dict[str, dict[str, dict[int, Result]]]:
        measures = ("mount_ready", "ls", "lookup")
        res = {
            m: {fs: {n: Result() for n in self.p.layer_counts} for fs in self.active}
            for m in measures
        }
        t0 = time.perf_counter()
        base = self.make_scaling_layers()
        log(
            f"scaling layers ({max(self.p.layer_counts)} lowers) ready in {time.perf_counter() - t0:.1f} s"
        )
        for rnd in range(self.rounds):
            t_round = time.perf_counter()
            for n in self.p.layer_counts:
                lowers = [Path(str(k)) for k in range(1, n + 1)]  # relative to base
                for fs in self.active:
                    for measure in measures:
                        r = res[measure][fs][n]
                        if r.error is not None or r.na is not None:
                            continue
                        try:
                            r.runs.append(self.run_layer_one(fs, measure, n, lowers, base))
                        except MountFailed as e:
                            if fs != "kernel":
                                r.error = str(e)
                                continue
                            for m in measures:  # e.g. a kernel that takes fewer lowers
                                res[m][fs][n].na = str(e)
                            log(f"{fs}: layers N={n}: n/a ({e})")
                            break
                        except BenchError as e:
                            r.error = str(e)
                            log(f"{fs}: layers N={n} {measure}: {e}")
            log(f"layers round {rnd + 1}/{self.rounds}: {time.perf_counter() - t_round:.1f} s")
        return res

    def run_layer_one(
        self, fs: str, measure: str, n: int, lowers: list[Path], base: Path
    ) -> float:
        mount = self.fresh(fs, lowers, "common" if measure == "mount_ready" else None, cwd=base)
        with self.mounted(mount) as t_mount:
            m = mount.merged
            if measure == "mount_ready":

                def check_root() -> None:
                    if len(os.listdir(m)) != n + 1:
                        raise BenchError(f"{len(os.listdir(m))} names in MERGED, expected {n + 1}")

                self.timed(mount, "layers check", check_root)
                return t_mount
            if measure == "ls":
                return self.timed(
                    mount,
                    "ls -l",
                    lambda: run_cmd(["ls", "-l", str(m / "common")], self.timeout, "ls -l"),
                )

            def lookups() -> None:
                for i in range(100):
                    os.stat(m / "common" / f"c{i:03d}")
                for i in range(50):
                    try:
                        os.stat(m / "common" / f"missing-{i:02d}")
                    except FileNotFoundError:
                        continue
                    raise BenchError(f"common/missing-{i:02d} exists")

            return self.timed(mount, "lookup", lookups)

    # ---- daemon RSS

    def run_rss(self, layers: MainLayers | None) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.p.rss_usr:
            lowers, tree = [Path("/usr")], "/usr (one lower)"
        else:
            assert layers is not None
            lowers, tree = layers.dirs, "the main layers (3 lowers)"
        for fs in self.active:
            if fs not in FUSE_NAMES:
                continue
            r: dict[str, Any] = {"tree": tree, "error": None}
            out[fs] = r
            try:
                self.rss_one(fs, lowers, r)
            except (BenchError, OSError) as e:
                r["error"] = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
                log(f"{fs}: rss: {r['error']}")
        return out

    def rss_one(self, fs: str, lowers: list[Path], r: dict[str, Any]) -> None:
        mount = self.fresh(fs, lowers)
        with self.mounted(mount):
            pid = mount.pid()
            assert pid is not None
            r["rss_mount_kib"] = base = vm_rss_kib(pid)
            entries = 0

            def walk() -> None:
                nonlocal entries
                entries = walk_lstat(mount.merged)

            r["stat_s"] = round(self.timed(mount, "rss: lstat of every entry", walk), 3)
            r["entries"] = entries
            r["rss_stat_kib"] = peak = vm_rss_kib(pid)
            r["kib_per_inode"] = round((peak - base) / entries, 3) if entries else None
            r["rss_drop_kib"] = r["back_near_base"] = None
            if self.can_drop:
                drop_caches("2")
                r["rss_drop_kib"] = dropped = self.settled_rss(pid)
                r["back_near_base"] = dropped - base <= RSS_BACK_FRACTION * max(peak - base, 0)
        kpi, back = r["kib_per_inode"], r["back_near_base"]
        r["pass"] = (
            None
            if fs != "pyunionfs" or kpi is None
            else kpi <= RSS_KIB_PER_INODE_TARGET and back is not False
        )

    @staticmethod
    def settled_rss(pid: int) -> int:
        """VmRSS once the FORGETs after drop_caches have been handled: stable for 1 s (max 15 s)."""
        last, stable_since = vm_rss_kib(pid), time.monotonic()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            time.sleep(0.2)
            now = vm_rss_kib(pid)
            if now != last:
                last, stable_since = now, time.monotonic()
            elif time.monotonic() - stable_since >= 1.0:
                break
        return last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="\n\n".join((__doc__ or "").split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small sizes and 1 round: a smoke run")
    ap.add_argument(
        "-n", "--rounds", type=int, help="rounds (median of N); default 3, 1 with --quick"
    )
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument(
        "--fs", default=",".join(FS_NAMES), help="comma-separated subset of: " + ", ".join(FS_NAMES)
    )
    keys = [w.key for w in WORKLOADS] + list(SECTION_KEYS)
    ap.add_argument("--workloads", help="comma-separated subset of: " + ", ".join(keys))
    ap.add_argument(
        "--pyunionfs", help="command that runs pyunionfs (default: .venv/bin/pyunionfs)"
    )
    ap.add_argument(
        "--pyunionfs-options", default="",
        help="more -o options for pyunionfs alone, e.g. writeback (compare a run without)",
    )
    ap.add_argument(
        "--dir",
        help="parent for the scratch dir (default: $TMPDIR or /tmp); needs ~4x the file size free",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help="seconds per workload before the filesystem is stopped (default 300, 60 with --quick)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    ap.add_argument(
        "--change-layer",
        choices=("auto", "hand"),
        default="auto",
        help="auto: the kernel writes the top layer when it can (root); hand: written directly",
    )
    ap.add_argument("--mib", type=int, help="size of the big file in MiB")
    ap.add_argument("--bigdir", type=int, help="entries of big/")
    ap.add_argument("--untar-files", type=int, help="files in the untar tarball")
    ap.add_argument("--appends", type=int, help="append_small: number of writes")
    ap.add_argument("--appends-8", type=int, help="append_8: number of writes")
    ap.add_argument(
        "--chown-mib", type=int, help="chown_r: MiB of the tree, in files of 1 MiB (default 256)"
    )
    ap.add_argument("--layer-counts", help="comma-separated numbers of lowers (max 500)")
    args = ap.parse_args(argv)

    p = Profile(**(QUICK if args.quick else FULL).__dict__)
    for name in ("mib", "bigdir", "untar_files", "appends", "appends_8", "chown_mib"):
        if getattr(args, name):
            setattr(p, name, getattr(args, name))
    if args.layer_counts:
        try:
            p.layer_counts = sorted({int(x) for x in args.layer_counts.split(",") if x.strip()})
        except ValueError:
            ap.error("--layer-counts: comma-separated integers")
        if not p.layer_counts or min(p.layer_counts) < 1 or max(p.layer_counts) > 500:
            ap.error("--layer-counts: between 1 and 500")
    p.bigdir = max(p.bigdir, 700)  # the change layer's whiteouts in big/ need that many
    rounds = args.rounds or p.rounds
    timeout = args.timeout or (60.0 if args.quick else 300.0)
    pycmd = shlex.split(args.pyunionfs) if args.pyunionfs else default_pyunionfs_cmd()
    Mount.pyunionfs_cmd = pycmd
    Mount.pyunionfs_options = args.pyunionfs_options
    chosen = [f.strip() for f in args.fs.split(",") if f.strip()]
    if bad := [f for f in chosen if f not in FS_NAMES]:
        ap.error(f"unknown filesystem(s): {', '.join(bad)}")
    selected = set(keys)
    if args.workloads:
        selected = {k.strip() for k in args.workloads.split(",") if k.strip()}
        if bad := sorted(selected - set(keys)):
            ap.error(f"unknown workload(s): {', '.join(bad)}")
    workloads = [w for w in WORKLOADS if w.key in selected]

    unavailable = {fs: "not selected" for fs in FS_NAMES if fs not in chosen}
    for fs in chosen:
        if (why := availability(fs, pycmd)) is not None:
            unavailable[fs] = why
            log(f"{fs}: n/a ({why})")
    active = [fs for fs in FS_NAMES if fs not in unavailable]
    # pyunionfs is what is measured: asked for but unusable is a failure (exit 1)
    subject_missing = "pyunionfs" in chosen and "pyunionfs" in unavailable
    if not active:
        log("no filesystem to benchmark")
        return 1
    can_drop = os.geteuid() == 0
    if not can_drop:
        log("not root: caches are not dropped, 'cold' runs are warm")
    become_subreaper()

    scratch = Path(tempfile.mkdtemp(prefix="pyunionfs-bench-", dir=args.dir)).resolve()
    bench = Bench(scratch, p, rounds, timeout, active, can_drop)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    started = time.time()
    layers: MainLayers | None = None
    results: dict[str, dict[str, Result]] = {}
    scaling: dict[str, dict[str, dict[int, Result]]] = {}
    rss: dict[str, dict[str, Any]] = {}
    fatal: str | None = None
    try:
        need_main = bool(workloads) or ("rss" in selected and not p.rss_usr)
        if need_main:
            log(
                f"generating the main layers in {scratch} ({p.mib} MiB file, {p.bigdir}-entry big/)"
            )
            t0 = time.perf_counter()
            chown = any(w.key in CHOWN_KEYS for w in workloads)
            if chown:
                log(f"and chown_r's layer ({p.chown_mib} files of 1 MiB)")
            by_hand = args.change_layer == "hand"
            layers = make_main_layers(scratch, p, by_hand=by_hand, chown=chown)
            log(
                f"main layers ready in {time.perf_counter() - t0:.1f} s: {_ents(layers.entries)}, "
                f"change layer {layers.changes}; {rounds} round(s) of {', '.join(active)}"
            )
        if workloads:
            assert layers is not None
            results = bench.run_main(layers, workloads)
        if "layers" in selected:
            scaling = bench.run_layers()
        if "rss" in selected:
            rss = bench.run_rss(layers)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, OSError) as e:
        fatal = f"{type(e).__name__}: {e}" if not isinstance(e, BenchError) else str(e)
        log(f"error: {fatal}")
    finally:
        bench.stop_all()
        leftover = mounts_below(scratch)
        if leftover:
            log(f"still mounted, scratch dir kept: {', '.join(leftover)}")
        elif args.keep:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    duration = time.time() - started
    print()
    print(
        f"pyunionfs benchmark: {rounds} round(s), median; {'quick' if args.quick else 'full'} profile; "
        f"kernel {platform.release()}; {os.cpu_count()} CPUs; {duration:.0f} s"
    )
    errors: list[tuple[str, str, str]] = [("bench", "setup", fatal)] if fatal else []
    main_summary: dict[str, dict[str, Any]] = {}
    if results and layers is not None:
        print()
        rows, main_summary = main_rows(workloads, results, unavailable)
        print_rows(["workload", *FS_NAMES, "py/fo", "py/kernel", "py req", "target", "ok"], rows)
        rtt = results.get("getattr_rtt", {}).get("pyunionfs")
        cpu = rtt.figure("cpu_us_per_request") if rtt is not None else None
        if cpu is not None:
            ok = "pass" if cpu <= RTT_CPU_TARGET_US else "FAIL"
            print(f"getattr round trip: pyunionfs daemon CPU {cpu:.1f} us per request "
                  f"(target <= {RTT_CPU_TARGET_US:.0f} us): {ok}")
            main_summary.setdefault("getattr_rtt", {})["py_cpu_us_per_request"] = round(cpu, 2)
        if rates := rate_rows(workloads, results, unavailable, p):
            print()
            print_rows(["ops per second", *FS_NAMES], rates)
        figs, fig_summary = figure_rows(workloads, results, unavailable)
        if figs:
            print()
            print_rows(["measured", *FS_NAMES, "py/fo", "py/kernel"], figs)
            for key, extra in fig_summary.items():
                main_summary.setdefault(key, {}).update(extra)
        print()
        for w in workloads:
            print(f"  {w.key:<13} {w.desc(layers, p)}")
        for note in layers.notes:
            print(f"  note: {note}")
        errors += [
            (fs, w.key, r.error) for w in workloads for fs, r in results[w.key].items() if r.error
        ]
    layer_summary: dict[str, Any] = {}
    if scaling:
        print()
        print(
            f"layer scaling: N lowers, each with common/ holding the same 100 names ({rounds} round(s), median)"
        )
        rows, layer_summary = layer_rows(scaling, p.layer_counts, unavailable)
        print_rows(
            ["measure", "fs", *(f"N={n}" for n in p.layer_counts), "128/1", "target", "ok"],
            rows,
            left=2,
        )
        print(
            "  mount_ready: until in mountinfo and stat MERGED/common works; ls: ls -l common/ as the"
        )
        print(
            "  first access of a fresh mount; lookup: stat of 100 names in common/ + 50 missing ones"
        )
        for m, by_fs in scaling.items():
            for fs, cells in by_fs.items():
                for n, r in cells.items():
                    if r.error:
                        errors.append((fs, f"layers N={n} {m}", r.error))
                    elif r.na and (m == "mount_ready" or fs != "kernel"):
                        print(f"  {fs} N={n} {m}: n/a — {r.na}")
    if rss:
        print()
        tree = next(iter(rss.values()))["tree"]
        print(f"daemon RSS: lstat of every entry of {tree} with an empty upper, then drop_caches 2")
        print_rows(
            ["fs", "entries", "after mount", "after stat", "after drop", "KiB/inode", "back", "ok"],
            rss_rows(rss),
        )
        print(
            f"  target (pyunionfs): <= {RSS_KIB_PER_INODE_TARGET} KiB/inode, and after drop_caches at most "
            f"base + {RSS_BACK_FRACTION:.0%} of the growth ('back')"
        )
        errors += [(fs, "rss", r["error"]) for fs, r in rss.items() if r.get("error")]
    for fs, why in unavailable.items():
        if why != "not selected":
            print(f"  {fs}: n/a — {why}")
    print_errors(errors)

    if args.json:
        data = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "duration_s": round(duration, 1),
            "host": {
                "kernel": platform.release(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "root": os.geteuid() == 0,
            },
            "profile": {**p.__dict__, "rounds": rounds, "quick": args.quick},
            "filesystems": {
                fs: {
                    "available": fs not in unavailable,
                    "reason": unavailable.get(fs),
                    "version": version_of(fs, pycmd) if fs not in unavailable else None,
                }
                for fs in FS_NAMES
            },
            "layers": None
            if layers is None
            else {
                "lowers": [
                    "change layer",
                    f"stdlib copy ({layers.stdlib_src})",
                    "/usr/include copy",
                ],
                "entries": layers.entries,
                "stdlib_entries": layers.stdlib_entries,
                "chmod_target": layers.chmod_target,
                "chmod_entries": layers.chmod_entries,
                "big_entries": layers.big_expected,
                "chown_files": len(layers.chown_files),
                "change_layer": layers.changes,
                "notes": layers.notes,
            },
            "results": {
                w.key: {
                    "label": w.desc(layers, p) if layers else w.key,
                    "target": None if w.target is None else w.target.text(),
                    **main_summary.get(w.key, {}),
                    **{
                        fs: {
                            **r.json(),
                            **(w.extra(r.median, p) if w.extra and r.median else {}),
                        }
                        for fs, r in results[w.key].items()
                    },
                }
                for w in workloads
                if w.key in results
            },
            "layer_scaling": {
                m: {
                    **layer_summary.get(m, {}),
                    **{
                        fs: {str(n): r.json() for n, r in cells.items()}
                        for fs, cells in by_fs.items()
                    },
                }
                for m, by_fs in scaling.items()
            },
            "rss": rss,
            "errors": [f"{fs} {where}: {msg}" for fs, where, msg in errors],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        log(f"results written to {args.json}")
    return 1 if errors or subject_missing else 0
