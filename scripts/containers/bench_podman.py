#!/usr/bin/env python3
"""Time `podman run --rm IMG true` on the overlay storage driver with the kernel's overlayfs
(no mount_program), fuse-overlayfs and pyunionfs as mount_program: one isolated store each
(scripts/containers/podman_env.py), runs interleaved (the order rotates every round), median
of N per driver and the ratios pyunionfs/fuse-overlayfs and pyunionfs/kernel.

    scripts/containers/bench_podman.py [-n 10] [--rootless] [--drivers native,fuse-overlayfs,pyunionfs]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import podman_env as pe  # noqa: E402

LABEL = {"native": "kernel overlay", "fuse-overlayfs": "fuse-overlayfs", "pyunionfs": "pyunionfs"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--repeats", type=int, default=10, help="timed runs per driver (10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per driver first (1)")
    p.add_argument("--drivers", default="native,fuse-overlayfs,pyunionfs",
                   help="comma list of native, fuse-overlayfs, pyunionfs")
    p.add_argument("--rootless", action="store_true",
                   help=f"run podman as the test user {pe.TEST_USER} (created if missing)")
    p.add_argument("--command", default="true", help="command run in the container (true)")
    p.add_argument("--json", metavar="FILE", help="also write the raw times to FILE")
    args = p.parse_args(argv)
    args.drivers = [d.strip() for d in args.drivers.split(",") if d.strip()]
    bad = [d for d in args.drivers if d not in pe.DRIVERS]
    if bad:
        p.error(f"unknown driver(s) {', '.join(bad)} (one of {', '.join(pe.DRIVERS)})")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def time_run(env: pe.PodmanEnv, command: str) -> float:
    t0 = time.perf_counter()
    env.podman("run", "--rm", pe.BASE_IMAGE, "sh", "-c", command, timeout=120)
    return time.perf_counter() - t0


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_podman: run as root (the stores, runuser and /dev/fuse ACLs need it)",
              file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {d: [] for d in args.drivers}
    mode = "rootless" if args.rootless else "root"
    with contextlib.ExitStack() as stack:
        stack.enter_context(pe.host_state_guard())
        user = None
        if args.rootless:
            pw = pe.ensure_test_user()
            user = pw.pw_name
            stack.enter_context(pe.acl_grant("/dev/fuse", pw.pw_uid, "rw"))
            if "pyunionfs" in args.drivers:
                for d in pe.untraversable_dirs(pe.pyunionfs_paths()):
                    stack.enter_context(pe.acl_grant(d, pw.pw_uid, "--x"))
        envs: dict[str, pe.PodmanEnv] = {}
        for d in args.drivers:
            env = pe.PodmanEnv.create(d, user, wrapped=False)  # as a user configures it
            stack.callback(env.close)
            envs[d] = env
            env.import_base_image()
            for _ in range(args.warmup):
                time_run(env, args.command)
        order = list(args.drivers)
        for i in range(args.repeats):
            for d in order:
                times[d].append(time_run(envs[d], args.command))
            order = order[1:] + order[:1]
            if sys.stderr.isatty():
                print(f"\rround {i + 1}/{args.repeats}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)

    med = {d: statistics.median(t) for d, t in times.items()}
    print(f"podman run --rm IMG sh -c {args.command!r}, as {mode}, median of {args.repeats} "
          "(interleaved)")
    print(f"{'driver':<16} {'median s':>9} {'min s':>7} {'max s':>7}")
    for d in args.drivers:
        t = times[d]
        print(f"{LABEL[d]:<16} {med[d]:>9.3f} {min(t):>7.3f} {max(t):>7.3f}")
    py = med.get("pyunionfs")
    print(f"pyunionfs / fuse-overlayfs: {ratio(py, med.get('fuse-overlayfs'))}   "
          f"pyunionfs / kernel: {ratio(py, med.get('native'))}")
    if args.json:
        Path(args.json).write_text(json.dumps({"mode": mode, "command": args.command,
                                               "times": times, "median": med}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
