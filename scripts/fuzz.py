#!/usr/bin/env python3
"""Fuzz what parses untrusted bytes (tests/fuzz/): every target, or the ones named, for a
fixed time each under atheris.  Prints per target the executions, executions per second,
coverage (libFuzzer's edges ``cov`` and features ``ft``) and crashes; a crash, hang or
memory blow-up is kept as ``bench-out/fuzz/<target>/crash-*`` (``timeout-*``, ``oom-*``)
and makes the exit status non-zero.  The corpus grows in ``bench-out/fuzz/<target>/corpus``
from run to run.

    .venv/bin/python scripts/fuzz.py --seconds 30            # all targets
    .venv/bin/python scripts/fuzz.py layer_tar image --runs 20000
    .venv/bin/python scripts/fuzz.py --replay bench-out/fuzz/layer_tar/crash-ab12...
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.fuzz import TARGETS  # noqa: E402

OUT = os.path.join(REPO, "bench-out", "fuzz")
ARTIFACTS = ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")
# inputs large enough for a few tar entries, a manifest set; the small formats need less
MAX_LEN = {"layer_tar": 65536, "image": 65536}


@dataclass
class Result:
    target: str
    execs: int = 0
    per_sec: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    crashes: list[str] | None = None
    rc: int = 0
    seconds: float = 0.0


def _artifacts(d: str) -> set[str]:
    return {n for n in os.listdir(d) if n.startswith(ARTIFACTS)} if os.path.isdir(d) else set()


def run_target(target: str, seconds: int, runs: int | None, timeout: int, rss_mb: int,
               python: str, out: str = OUT) -> Result:
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    before = _artifacts(d)
    flags = [f"-max_total_time={seconds}", f"-timeout={timeout}", f"-rss_limit_mb={rss_mb}",
             f"-max_len={MAX_LEN.get(target, 4096)}", f"-artifact_prefix={d}/",
             "-print_final_stats=1"]
    if runs is not None:
        flags.append(f"-atheris_runs={runs}")
    log = os.path.join(d, "last-run.log")
    start = time.monotonic()
    with open(log, "wb") as f:
        rc = subprocess.call([python, "-m", "tests.fuzz.runner", target,
                              os.path.join(d, "corpus"), *flags],
                             cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    res = Result(target, rc=rc, seconds=time.monotonic() - start)
    with open(log, errors="replace") as f:
        text = f.read()
    for line in re.finditer(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)", text,
                            re.M):
        res.execs, res.cov, res.ft, res.corpus = (int(g) for g in line.groups())
    if units := re.search(r"stat::number_of_executed_units: (\d+)", text):
        res.execs = int(units.group(1))
    if rate := re.search(r"stat::average_exec_per_sec: (\d+)", text):
        res.per_sec = int(rate.group(1))
    elif res.seconds:
        res.per_sec = int(res.execs / res.seconds)
    res.crashes = sorted(_artifacts(d) - before)
    if rc != 0 and not res.crashes:
        res.crashes = [f"(exit status {rc}, no artifact: see {log})"]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", choices=[[], *TARGETS], metavar="TARGET",
                   help="default: all of " + ", ".join(TARGETS))
    p.add_argument("--seconds", type=int, default=30, help="per target (default 30)")
    p.add_argument("--runs", type=int, help="stop a target after this many inputs")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory limit of a target")
    p.add_argument("--replay", metavar="FILE", help="run one saved input (any target's "
                   "artifact: the target is the directory it lies in) and show the error")
    args = p.parse_args()
    if args.replay:
        target = os.path.basename(os.path.dirname(os.path.abspath(args.replay)))
        module = importlib.import_module(f"tests.fuzz.{target}")
        with open(args.replay, "rb") as f:
            module.one_input(f.read())
        print(f"{target}: {args.replay}: no finding")
        return 0
    if importlib.util.find_spec("atheris") is None:
        print("fuzz: atheris is not installed (.venv/bin/pip install atheris)", file=sys.stderr)
        return 2
    results = []
    print(f"{'target':<14}{'execs':>10}{'exec/s':>8}{'cov':>7}{'ft':>7}{'corpus':>8}  crashes")
    for target in args.targets or TARGETS:
        r = run_target(target, args.seconds, args.runs, args.timeout, args.rss_mb,
                       sys.executable)
        results.append(r)
        found = ", ".join(os.path.join("bench-out/fuzz", target, c) for c in r.crashes or [])
        print(f"{target:<14}{r.execs:>10}{r.per_sec:>8}{r.cov:>7}{r.ft:>7}{r.corpus:>8}  "
              f"{len(r.crashes or [])} {found}", flush=True)
    return 1 if any(r.crashes for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
