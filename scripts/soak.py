#!/usr/bin/env python3
"""The soak (issue 25): a mixed load on one pyunionfs mount for DURATION seconds, watching the
daemon's memory and file descriptors, then a replay of a deterministic part on kernel overlayfs.

    .venv/bin/python scripts/soak.py --duration 3600            # make soak DURATION=3600
    .venv/bin/python scripts/soak.py --duration 15 --small      # what tests/test_soak.py runs

The load, all at once, against one mount of two lowers (made with unionfs.Overlay, -o
redirect_dir=on):

* generators: random create/write/append/truncate/read/stat/mkdir/rmdir/unlink/rename/symlink/
  link/chmod/setxattr/readdir/fsync, each in its own subtree with an exact model of it, so every
  errno and every wrong answer is an error (fsstress instead, where installed: --fsstress);
* readers: processes reading and hashing tree/ files, lower-only and copied up (a toucher copies
  them up by chmod/setxattr/utime: their content never changes, so every hash is checked);
* big files: lower files of --big-mib MiB copied up through the mount (spread over the run),
  then appended, truncated and read back against a model;
* rename storms: renames of files and dirs across dirs, lower dirs among them (redirects);
* mount cycles: a second overlay with its own upper/work on the same lowers, mounted, used
  (a big-file copy-up, a lower-dir rename), unmounted, its upper checked, again and again;
* the replayed generator: one more generator whose ops are logged; at the end the same seed
  runs on kernel overlayfs over copies of its lowers and the merged views and uppers of its
  subtree are compared.

It samples the daemon's VmRSS and /proc/PID/fd count every --sample seconds and calls both
flat when, after the warm-up (--warmup, default 20% of the run, at most 5 min), the maximum over
the last half is at most the maximum over the first quarter plus an allowance (RSS: --rss-
allowance-mib + 5%; fds: --fd-allowance, plus the directories added to the layers meanwhile, of
which the daemon's dir-fd cache may hold one O_PATH fd each); the least-squares slope per hour is
printed.  The fd targets at the end (by layer, stale ones apart) go to the report.  Exit status: 0
all well, 1 errors / growth / a replay difference, 2 interrupted (SIGINT/SIGTERM: a partial
report), 3 the setup failed.  The JSON report goes to --json (bench-out/soak.json).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import soak_load as load  # noqa: E402

from unionfs.api import Overlay, OverlayError, mounted  # noqa: E402

MiB = 1 << 20
MAX_PRINTED_ERRORS = 50
# the tests' snapshots (tests/ is no package: mypy sees Any, as for any module found at run time)
harness: Any = importlib.import_module("overlay_harness")
snapshot_diff, snapshot_merged, snapshot_upper = \
    harness.snapshot_diff, harness.snapshot_merged, harness.snapshot_upper
LOG_PROBLEM = re.compile(r"internal error|Traceback|\bERROR\b|\bCRITICAL\b")


class Interrupted(Exception):
    pass


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.signal: str | None = None
        self.counts: Counter[str] = Counter()
        self.errors: list[dict[str, Any]] = []
        self.error_count = 0
        self.infos: dict[str, list[dict[str, Any]]] = {}
        # t, rss KiB, fds, threads, directories in the layers (what the dir-fd cache may hold),
        # anonymous rss KiB (the heap: file-backed pages grow as code paths are first used)
        self.samples: list[tuple[float, int, int, int, int, int]] = []
        self.layer_root: Path | None = None
        self.lower_dirs = 0
        self.procs: list[BaseProcess] = []
        self.overlays: list[Overlay] = []
        self.cycler_pids: set[int] = set()
        self.t0 = time.monotonic()
        self.phase = "setup"
        self.report: dict[str, Any] = {}

    # -- signals ---------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # a second one: stop waiting, clean up now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\nsoak: {self.signal}: stopping, a partial report follows", flush=True)

    def stopping(self) -> bool:
        return self.signal is not None

    # -- events from workers ---------------------------------------------------------------

    def drain(self, q: Any) -> None:
        while True:
            try:
                msg = q.get_nowait()
            except (queue.Empty, EOFError, OSError):
                return
            kind = msg[0]
            if kind == "count":
                self.counts[msg[1]] += msg[2]
            elif kind == "error":
                self.add_error(msg[1], msg[2], msg[3])
            elif kind == "info":
                self.infos.setdefault(msg[1], []).append(msg[2])
            elif kind == "pid":
                self.cycler_pids.add(msg[2])

    def add_error(self, kind: str, op: str, what: str) -> None:
        self.error_count += 1
        t = round(time.monotonic() - self.t0, 1)
        if len(self.errors) < 500:
            self.errors.append({"t": t, "kind": kind, "op": op, "error": what})
        if self.error_count <= MAX_PRINTED_ERRORS:
            print(f"soak: ERROR [{t:7.1f}s] {kind}: {op}: {what}", flush=True)
        elif self.error_count == MAX_PRINTED_ERRORS + 1:
            print("soak: further errors are only counted (all in the JSON report, up to 500)",
                  flush=True)

    # -- sampling --------------------------------------------------------------------------

    def sample(self, pid: int) -> tuple[int, int, int] | None:
        try:
            rss = threads = anon = 0
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return None
        # reading the upper beside the mount is harmless: nothing is written there
        dirs = self.lower_dirs + (count_dirs(self.layer_root / "upper") if self.layer_root
                                  else 0)
        self.samples.append((round(time.monotonic() - self.t0, 2), rss, fds, threads, dirs,
                             anon))
        return rss, fds, threads

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> int:
        a = self.args
        base = Path(a.dir)
        base.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="pyunionfs-soak-", dir=base))
        os.chmod(root, 0o755)
        big_files = a.big_files if a.big_files is not None else \
            max(2, min(60, int(a.duration // 90) + 1))
        cfg = load.Config(root=root, seed=a.seed, duration=a.duration, big_files=big_files,
                          big_mib=a.big_mib, tree_dirs=a.tree_dirs, tree_files=a.tree_files,
                          readers=a.readers, gens=a.gens, renamers=a.renamers,
                          cycle_pause=a.cycle_pause, fsstress=a.fsstress)
        self.report["config"] = {k: (str(v) if isinstance(v, Path) else v)
                                 for k, v in vars(cfg).items()}
        print(f"soak: seed {a.seed}, {a.duration:g} s, layers in {root} ({big_files} big "
              f"files of {a.big_mib} MiB), fsstress: {a.fsstress or 'not used'}", flush=True)
        status = 3
        try:
            status = self._run(cfg)
        except KeyboardInterrupt:
            self.signal = self.signal or "SIGINT"
            status = 2
        except Interrupted:
            status = 2
        except Exception as e:  # the setup or a check broke: reported, cleaned up
            self.add_error("soak", self.phase, f"{type(e).__name__}: {e}")
            status = 3 if self.phase in ("setup", "build", "mount") else 1
        finally:
            self.cleanup()
            if a.keep:
                print(f"soak: kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
        if self.signal and status != 3:
            status = 2
        return self.finish(status)

    def _run(self, cfg: load.Config) -> int:
        a = self.args
        self.phase = "build"
        t = time.monotonic()
        layout = load.build_layers(cfg, self.stopping)
        if self.stopping():
            raise Interrupted
        self.report["build_s"] = round(time.monotonic() - t, 1)
        print(f"soak: layers built in {self.report['build_s']} s", flush=True)
        self.phase = "mount"
        upper, work, merged = cfg.root / "upper", cfg.root / "work", cfg.root / "merged"
        for d in (upper, work, merged):
            d.mkdir()
        ov = Overlay(cfg.lowers, upper, work, merged, options=load.OPTIONS, server=False,
                     log_path=cfg.root / "pyunionfs.log")
        self.overlays.append(ov)
        self.layer_root = cfg.root
        self.lower_dirs = sum(count_dirs(p) for p in cfg.lowers)
        ov.mount()
        os.listdir(merged)  # the daemon serves: its event loop and fds are set up
        pid = ov.pid
        assert pid is not None
        time.sleep(0.3)
        self.sample(pid)

        self.phase = "load"
        ctx = multiprocessing.get_context("fork")
        q: Any = ctx.Queue()
        stop = ctx.Event()
        replay_log = cfg.root / "replay-ops.jsonl"
        replay_seed = cfg.seed ^ 0x5EED
        jobs: list[tuple[str, Any, tuple[Any, ...]]] = []
        if cfg.fsstress:
            jobs.append(("fsstress", load.run_fsstress, (cfg.fsstress, merged, cfg.seed, q, stop)))
        else:
            for i in range(cfg.gens):
                jobs.append((f"gen{i}", load.run_gen, ("gen", merged / f"gen{i}", cfg.seed + i,
                                                       load.GEN_WEIGHTS, q, stop)))
        for i in range(cfg.renamers):
            jobs.append((f"ren{i}", load.run_gen, ("rename", merged / f"ren{i}",
                                                   cfg.seed + 100 + i, load.RENAME_WEIGHTS,
                                                   q, stop)))
        jobs.append(("replay", load.run_gen, ("replay", merged / "replay", replay_seed,
                                              load.GEN_WEIGHTS, q, stop, replay_log)))
        for i in range(cfg.readers):
            jobs.append((f"reader{i}", load.run_reader, (i, merged, layout, cfg.seed + 200 + i,
                                                         q, stop)))
        jobs.append(("toucher", load.run_toucher, (merged, layout, cfg.seed + 300, q, stop)))
        jobs.append(("big", load.run_big, (merged, layout, cfg, q, stop)))
        jobs.append(("cycler", load.run_cycler, (cfg, layout, q, stop)))
        for name, target, args in jobs:
            p = ctx.Process(target=target, args=args, name=f"soak-{name}")
            p.start()
            self.procs.append(p)

        start = time.monotonic()
        end = start + a.duration
        next_sample = start + a.sample
        next_report = start + a.report_every
        while time.monotonic() < end and not self.stopping():
            self.drain(q)
            now = time.monotonic()
            if now >= next_sample:
                next_sample += a.sample
                if self.sample(pid) is None or not ov.is_mounted:
                    self.add_error("soak", "sample", f"the daemon (pid {pid}) or its mount is "
                                   "gone")
                    break
            if now >= next_report:
                next_report += a.report_every
                self.progress()
            if any(not p.is_alive() for p in self.procs):
                dead = [p.name for p in self.procs if not p.is_alive()]
                self.add_error("soak", "workers", f"ended early: {dead} (exit codes "
                               f"{[p.exitcode for p in self.procs if not p.is_alive()]})")
                break
            time.sleep(0.2)
        self.report["load_s"] = round(time.monotonic() - start, 1)

        self.phase = "stop"
        stop.set()
        verify_s = cfg.big_files * cfg.big_mib / 50  # the big worker reads each file once
        self.join_workers(q, 60 + verify_s)
        self.sample(pid)
        if self.stopping():
            raise Interrupted

        self.phase = "final checks"
        # reads through the mount from here on: a hung daemon would block them for ever (a
        # FUSE request waits out any signal but a fatal one), so a timer kills it, ENOTCONN
        watchdog = threading.Timer(a.final_timeout, self.hung, (ov,))
        watchdog.daemon = True
        watchdog.start()
        try:
            self.final_tree_check(merged, layout)
            live = snapshot_merged(merged / "replay")
            live_upper = snapshot_upper(upper / "replay") if (upper / "replay").exists() \
                else None
            self.settle_and_sample(pid)
            self.report["fd_targets"] = fd_targets(pid, cfg.root)
            self.phase = "unmount"
            try:
                ov.unmount()
            except OverlayError as e:
                self.add_error("soak", "unmount", str(e))
        finally:
            watchdog.cancel()
        bad = [ln for ln in ov.log.splitlines() if LOG_PROBLEM.search(ln)]
        for ln in bad[:20]:
            self.add_error("daemon log", "log", ln.strip())
        if self.stopping():
            raise Interrupted

        self.phase = "kernel replay"
        self.replay(cfg, replay_seed, replay_log, live, live_upper)
        return 0

    def hung(self, ov: Overlay) -> None:
        self.add_error("soak", self.phase, f"not done within {self.args.final_timeout:g} s: "
                       "the daemon is killed")
        ov.kill()

    def join_workers(self, q: Any, timeout: float) -> None:
        """Wait for every worker to finish its op and final checks, draining the queue (a
        worker can't exit while what it put is unread); then end the stragglers by pid."""
        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            self.drain(q)
            time.sleep(0.1)
        for p in self.procs:
            if p.is_alive():
                self.add_error("soak", "stop", f"{p.name} (pid {p.pid}) did not stop within "
                               f"{timeout:.0f} s: killed")
                p.kill()
                p.join(5)
        self.drain(q)

    def settle_and_sample(self, pid: int) -> None:
        """The fd count once the kernel's asynchronous RELEASEs of the last closes are in."""
        time.sleep(1.0)
        self.sample(pid)

    def final_tree_check(self, merged: Path, layout: load.Layout) -> None:
        for rel, want in sorted(layout.tree.items()):
            try:
                got = hashlib.sha256((merged / rel).read_bytes()).hexdigest()
            except OSError as e:
                self.add_error("final-check", f"read {rel}", load.err_name(e))
                continue
            if got != want:
                self.add_error("final-check", f"read {rel}", "content differs from the lowers'")
        self.counts["final-check"] += 1

    def replay(self, cfg: load.Config, seed: int, log_path: Path, live: Any,
               live_upper: Any) -> None:
        infos = self.infos.get("replay", [])
        out: dict[str, Any] = {"compared": False}
        self.report["replay"] = out
        if not infos:
            out["reason"] = "the replayed generator reported nothing"
            self.add_error("replay", "replay", out["reason"])
            return
        info = infos[0]
        out["ops"] = info["ops"]
        if not info["clean"]:
            out["reason"] = "the replayed generator had errors during the soak: its op log " \
                "is no longer a pure function of its seed"
            return
        kroot = cfg.root / "kernel"
        lowers = load.copy_lowers(cfg, "replay", kroot)
        kupper, kwork, kmerged = kroot / "upper", kroot / "work", kroot / "merged"
        for d in (kupper, kwork, kmerged):
            d.mkdir()
        kov = Overlay(lowers, kupper, kwork, kmerged, options=load.OPTIONS, backend="kernel")
        self.overlays.append(kov)
        kov.mount()
        t = time.monotonic()
        try:
            gen = load.Gen(kmerged / "replay", seed, load.GEN_WEIGHTS)
            with open(log_path) as recorded:
                for i in range(info["ops"]):
                    want = recorded.readline().rstrip("\n")
                    try:
                        entry = gen.step()
                    except (OSError, load.Mismatch) as e:
                        out["divergence"] = f"op {i} ({want}) on the kernel: {e}"
                        break
                    if json.dumps(entry) != want:
                        out["divergence"] = f"op {i}: kernel drew {json.dumps(entry)}, " \
                            f"pyunionfs {want}"
                        break
            out["replay_s"] = round(time.monotonic() - t, 1)
            kernel = snapshot_merged(kmerged / "replay")
            kernel_upper = snapshot_upper(kupper / "replay") if (kupper / "replay").exists() \
                else None
        finally:
            with contextlib.suppress(OverlayError):
                kov.unmount()
        out["compared"] = True
        out["merged_nodes"] = len(live.nodes)
        out["upper_nodes"] = len(live_upper.nodes) if live_upper else 0
        out["merged_diff"] = snapshot_diff(kernel, live) if kernel != live else ""
        if (kernel_upper is None) != (live_upper is None):
            out["upper_diff"] = f"upper/replay exists: kernel {kernel_upper is not None}, " \
                f"pyunionfs {live_upper is not None}"
        elif kernel_upper is not None and kernel_upper != live_upper:
            out["upper_diff"] = snapshot_diff(kernel_upper, live_upper)
        else:
            out["upper_diff"] = ""
        out["equal"] = not out.get("divergence") and not out["merged_diff"] and \
            not out["upper_diff"]
        if not out["equal"]:
            what = out.get("divergence") or \
                f"merged:\n{out['merged_diff'][:3000]}\nupper:\n{out['upper_diff'][:3000]}"
            self.add_error("replay", "kernel replay", what)

    def cleanup(self) -> None:
        """Everything this run started and mounted, whatever state it is in: workers by pid,
        overlays through their Overlay (a lazy unmount where busy), a cycler's daemon left by a
        killed cycler by its pid, once its command line still names our mount point."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        for ov in reversed(self.overlays):
            try:
                ov.unmount()
            except OverlayError as e:
                self.add_error("soak", "cleanup", str(e))
        for p in self.procs:
            p.join(10)  # those stuck on a dead mount can go now
        root = Path(self.report.get("config", {}).get("root", "/nonexistent"))
        merged2 = root / "merged2"
        if mounted(merged2):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(["fusermount3", "-uz", str(merged2)], timeout=20,
                               capture_output=True, stdin=subprocess.DEVNULL)
        for pid in self.cycler_pids:
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(merged2).encode() in f.read():
                        os.kill(pid, signal.SIGTERM)

    # -- reporting -------------------------------------------------------------------------

    def progress(self) -> None:
        t = time.monotonic() - self.t0
        top = {k: v for k, v in sorted(self.counts.items()) if ":" not in k}
        last = self.samples[-1] if self.samples else (0, 0, 0, 0, 0, 0)
        print(f"soak: [{t:7.0f}s] " + ", ".join(f"{k} {v}" for k, v in top.items()) +
              f"; errors {self.error_count}; daemon rss {last[1] / 1024:.1f} MiB, "
              f"fds {last[2]} (dirs in the layers {last[4]}), threads {last[3]}", flush=True)

    def flatness(self, column: int, allowance: float, share: float, warmup: float,
                 explained_by: int | None = None) -> dict[str, Any]:
        """max(last half) <= max(first quarter) + allowance (+ share of that max), over the
        samples after the warm-up; the least-squares slope per hour alongside.  With
        ``explained_by``, growth of that column (max over the last half less max over the
        first quarter) is allowed too: the fd count may follow the number of directories,
        which the dir-fd cache holds one O_PATH fd of per layer, and no more."""
        post = [(s[0], float(s[column])) for s in self.samples if s[0] >= warmup]
        rows = [s for s in self.samples if s[0] >= warmup]
        out: dict[str, Any] = {"warmup_s": round(warmup, 1), "samples": len(post)}
        if self.samples:
            out["first"] = self.samples[0][column]
            out["last"] = self.samples[-1][column]
            out["max"] = max(s[column] for s in self.samples)
        if len(post) < 4:
            out.update(checked=False, flat=True, reason="fewer than 4 samples after warm-up")
            return out
        n = len(post)
        q1 = max(v for _, v in post[: max(1, n // 4)])
        h2 = max(v for _, v in post[n // 2:])
        bound = q1 + allowance + share * q1
        if explained_by is not None:
            grown = max(0, max(s[explained_by] for s in rows[n // 2:]) -
                        max(s[explained_by] for s in rows[: max(1, n // 4)]))
            out["allowed_for_new_dirs"] = grown
            bound += grown
        mt = sum(t for t, _ in post) / n
        mv = sum(v for _, v in post) / n
        var = sum((t - mt) ** 2 for t, _ in post)
        slope = sum((t - mt) * (v - mv) for t, v in post) / var if var else 0.0
        out.update(checked=True, first_quarter_max=q1, last_half_max=h2, bound=round(bound, 1),
                   flat=h2 <= bound, slope_per_hour=round(slope * 3600, 1))
        return out

    def finish(self, status: int) -> int:
        a = self.args
        elapsed = time.monotonic() - self.t0
        warmup = a.warmup if a.warmup is not None else min(300.0, 0.2 * a.duration)
        load_start = self.samples[0][0] if self.samples else 0.0
        rss = self.flatness(1, a.rss_allowance_mib * 1024, 0.05, load_start + warmup)
        anon = self.flatness(5, a.rss_allowance_mib * 1024, 0.05, load_start + warmup)
        rss["anon_slope_per_hour"] = anon.get("slope_per_hour")
        fds = self.flatness(2, a.fd_allowance, 0.0, load_start + warmup, explained_by=4)
        interrupted = self.signal is not None
        kinds = {k: v for k, v in sorted(self.counts.items()) if ":" not in k}
        expected = ["fsstress" if a.fsstress else "gen", "read", "readdir", "touch", "copyup",
                    "bigio", "rename", "mount_cycle", "replay"]
        missing = [k for k in expected if not self.counts.get(k)]
        replay = self.report.get("replay", {"compared": False, "reason": "not reached"})
        problems = []
        if self.error_count:
            problems.append(f"{self.error_count} errors")
        if not interrupted and status != 3:
            if not rss["flat"]:
                problems.append("daemon RSS grows")
            if not fds["flat"]:
                problems.append("daemon fd count grows")
            if missing:
                problems.append(f"no ops of {missing}")
        if status == 0 and problems:
            status = 1
        self.report.update({
            "result": "ok" if status == 0 else "interrupted" if status == 2 else "failed",
            "exit_status": status, "problems": problems, "interrupted": self.signal,
            "phase": self.phase, "elapsed_s": round(elapsed, 1), "ops": kinds,
            "ops_detail": {k: v for k, v in sorted(self.counts.items()) if ":" in k},
            "missing_kinds": missing, "error_count": self.error_count, "errors": self.errors,
            "rss_kib": rss, "fds": fds, "samples": {"columns": ["t_s", "rss_kib", "fds",
                                                                "threads", "layer_dirs",
                                                                "rss_anon_kib"],
                                                    "rows": self.samples},
            "replay": replay, "workers": self.infos,
        })
        for info in self.infos.get("bigio", []):
            r = info.get("copyup_mib_s") or []
            if r:
                self.report["copyup_mib_s"] = {"min": round(min(r), 1), "max": round(max(r), 1),
                                               "mean": round(sum(r) / len(r), 1)}
        for info in self.infos.get("mount_cycle", []):
            ms = info.get("mount_s") or []
            if ms:
                self.report["cycle_mount_s"] = {"mean": round(sum(ms) / len(ms), 3),
                                                "max": round(max(ms), 3)}
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(self.report, indent=1) + "\n")
        self.summary()
        return status

    def summary(self) -> None:
        r = self.report

        def series(d: dict[str, Any], unit: float, fmt: str) -> str:
            if "first" not in d:
                return "no samples"
            s = f"{d['first'] / unit:{fmt}} -> {d['last'] / unit:{fmt}} (max " \
                f"{d['max'] / unit:{fmt}})"
            if d.get("checked"):
                s += f"; after {d['warmup_s']:g} s warm-up: first-quarter max " \
                    f"{d['first_quarter_max'] / unit:{fmt}}, last-half max " \
                    f"{d['last_half_max'] / unit:{fmt}}, bound {d['bound'] / unit:{fmt}}" + \
                    (f" (+{d['allowed_for_new_dirs']} new dirs)" if "allowed_for_new_dirs" in d
                     else "") + ", " \
                    f"slope {d['slope_per_hour'] / unit:+{fmt}}/h: " + \
                    ("flat" if d["flat"] else "GROWS")
            else:
                s += f"; not checked: {d.get('reason')}"
            return s

        print("\n=== soak summary ===")
        print(f"result: {r['result']} (exit {r['exit_status']})" +
              (f": {'; '.join(r['problems'])}" if r["problems"] else ""))
        print(f"time: {r['elapsed_s']} s in all, load {r.get('load_s', 0)} s; seed "
              f"{r['config']['seed'] if 'config' in r else '?'}")
        print("ops: " + ", ".join(f"{k} {v}" for k, v in r["ops"].items()))
        print(f"errors: {r['error_count']}")
        for e in r["errors"][:10]:
            print(f"  [{e['t']}s] {e['kind']}: {e['op']}: {e['error'][:300]}")
        heap = r["rss_kib"].get("anon_slope_per_hour")
        print(f"daemon RSS MiB: {series(r['rss_kib'], 1024, '.1f')}" +
              (f" (heap, RssAnon: slope {heap / 1024:+.1f}/h)" if heap is not None else ""))
        print(f"daemon fds: {series(r['fds'], 1, '.0f')}")
        if "copyup_mib_s" in r:
            c = r["copyup_mib_s"]
            print(f"big copy-ups: {r['config']['big_mib']} MiB at {c['mean']} MiB/s mean "
                  f"({c['min']}..{c['max']})")
        if "cycle_mount_s" in r:
            print(f"second overlay mounts: {r['cycle_mount_s']['mean']} s mean, "
                  f"{r['cycle_mount_s']['max']} s max")
        rp = r["replay"]
        if rp.get("compared"):
            print(f"kernel replay: {rp['ops']} ops, merged {rp['merged_nodes']} nodes, upper "
                  f"{rp['upper_nodes']} nodes: " + ("identical" if rp["equal"] else "DIFFERENT"))
        else:
            print(f"kernel replay: not compared ({rp.get('reason', '?')})")
        if self.args.json:
            print(f"report: {self.args.json}")


def count_dirs(top: Path) -> int:
    return 1 + sum(len(dirs) for _, dirs, _ in os.walk(top))


def fd_targets(pid: int, root: Path) -> dict[str, Any]:
    """What the daemon's fds point at, by layer, with deleted ones apart: tells a cache that
    keeps stale entries from one that only holds what is live."""
    out: Counter[str] = Counter()
    stale: list[str] = []
    other: list[str] = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return {}
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        where = "other"
        if target.startswith(str(root) + "/"):
            rel = target[len(str(root)) + 1:]
        elif target.split("/")[1:2] in (["upper"], ["work"]):
            # through the daemon's private clone of the upper's mount, rooted at the
            # directory holding upper and work: here, ``root``
            rel = target[1:]
        else:
            rel = ""
        if rel:
            where = rel.split("/", 1)[0]
            if target.endswith(" (deleted)"):
                where += " (deleted)"
                stale.append(target)
            elif not os.path.exists(root / rel):
                where += " (gone)"
                stale.append(target)
        if where == "other":
            other.append(target)
        out[where] += 1
    dirs = {name: sum(len(d) for _, d, _ in os.walk(root / name)) + 1
            for name in ("upper", "lower0", "lower1")}
    return {"by_layer": dict(sorted(out.items())), "dirs_in_layers": dirs,
            "stale_examples": sorted(stale)[:20], "other_examples": sorted(other)[:20]}


def fsstress_binary(choice: str) -> str | None:
    if choice == "off":
        return None
    if choice == "auto":
        return shutil.which("fsstress")
    return choice


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (120)")
    p.add_argument("--dir", default="/var/tmp", help="where the layers go (/var/tmp)")
    p.add_argument("--small", action="store_true",
                   help="small sizes, 1 s samples (CI, tests/test_soak.py)")
    p.add_argument("--big-mib", type=int, help="size of each big lower file (64; --small 4)")
    p.add_argument("--big-files", type=int,
                   help="big lower files, copied up spread over the run (duration/90 + 1)")
    p.add_argument("--tree-dirs", type=int, help="tree/ dirs for the readers (16; --small 4)")
    p.add_argument("--tree-files", type=int, help="files per tree/ dir (24; --small 12)")
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--gens", type=int, default=2, help="random-op generators (besides the "
                   "replayed one)")
    p.add_argument("--renamers", type=int, default=2)
    p.add_argument("--cycle-pause", type=float, default=0.5,
                   help="seconds between mount cycles of the second overlay")
    p.add_argument("--fsstress", default="auto",
                   help="fsstress binary instead of the generators: auto (from PATH), off, PATH")
    p.add_argument("--sample", type=float, help="seconds between RSS/fd samples (5; --small 1)")
    p.add_argument("--report-every", type=float, help="seconds between progress lines (60)")
    p.add_argument("--warmup", type=float,
                   help="seconds of load before the flatness check looks (20%%, at most 300)")
    p.add_argument("--final-timeout", type=float, default=600.0,
                   help="seconds for the checks through the mount after the load (600)")
    p.add_argument("--rss-allowance-mib", type=float, default=4.0,
                   help="RSS allowance over the first quarter's max, with 5%% of it (4)")
    p.add_argument("--fd-allowance", type=int, help="(2 per worker + 8)")
    p.add_argument("--seed", type=int, help="(random, printed)")
    p.add_argument("--json", default=str(REPO / "bench-out" / "soak.json"))
    p.add_argument("--keep", action="store_true", help="keep the layers (debugging)")
    a = p.parse_args(argv)
    small = a.small
    for name, normal, little in (("big_mib", 64, 4), ("tree_dirs", 16, 4), ("tree_files", 24, 12),
                                 ("sample", 5.0, 1.0), ("report_every", 60.0, 5.0)):
        if getattr(a, name) is None:
            setattr(a, name, little if small else normal)
    if a.big_files is None and small:
        a.big_files = 3
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(3), "big")
    if a.fd_allowance is None:
        workers = a.gens + a.renamers + a.readers + 5
        a.fd_allowance = 2 * workers + 8
    a.fsstress = fsstress_binary(a.fsstress)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("soak: needs root (the kernel replay mounts overlayfs)", file=sys.stderr)
        return 3
    soak = Soak(args)
    signal.signal(signal.SIGINT, soak.on_signal)
    signal.signal(signal.SIGTERM, soak.on_signal)
    return soak.run()


if __name__ == "__main__":
    sys.exit(main())
