#!/usr/bin/env python3
"""Long conformance profile: random layer stacks and operations, kernel overlayfs as the oracle.

    scripts/conformance.py [--examples N] [--steps S] [--seed X]

Drives tests/conformance.py's state machine with hypothesis (real randomness unless --seed; failing
examples are kept in .hypothesis/ and replayed first next time). Hypothesis stops at the first
divergence and shrinks it to a minimal reproducer, which is printed; turn it into a named regression
test in tests/test_conformance.py. The last line is always
    N examples, M operations, K divergences (T s)
and the exit status is non-zero when K > 0.  Needs root, /dev/fuse and kernel overlayfs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.chdir(REPO)  # .hypothesis/ database under the repo

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.database import DirectoryBasedExampleDatabase  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=int(os.environ.get("EXAMPLES") or 20000))
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS") or 30),
                    help="maximum operations per example")
    ap.add_argument("--seed", type=int, default=None, help="fixed seed (default: random)")
    ap.add_argument("--minutes", type=float, default=float(os.environ.get("MINUTES") or 0),
                    help="stop starting new examples after this many minutes (0: no limit)")
    ap.add_argument("--options", default=os.environ.get("OPTIONS", ""),
                    help="mount options for both sides, e.g. redirect_dir=on")
    args = ap.parse_args()
    if args.options:
        os.environ["CONFORMANCE_OPTIONS"] = args.options

    from overlay_harness import environment_problem
    problem = environment_problem()
    if problem:
        print(f"conformance: cannot run: {problem}", file=sys.stderr)
        return 2
    import conformance

    s = settings(max_examples=args.examples, stateful_step_count=args.steps, deadline=None,
                 suppress_health_check=list(HealthCheck),
                 database=DirectoryBasedExampleDatabase(str(REPO / ".hypothesis" / "conformance")),
                 print_blob=True)
    if args.seed is not None:
        from hypothesis import seed
        machine = seed(args.seed)(conformance.ConformanceMachine)
    else:
        machine = conformance.ConformanceMachine
    divergences = 0
    start = time.monotonic()
    try:
        # Run in chunks so that a time budget ends the run between examples, never inside one
        # (an interrupt mid-mount would look like a failure to hypothesis).
        while conformance.STATS["examples"] < args.examples:
            if args.minutes and time.monotonic() - start > args.minutes * 60:
                print(f"conformance: time budget of {args.minutes} min used", file=sys.stderr)
                break
            chunk = min(50, args.examples - conformance.STATS["examples"])
            run_state_machine_as_test(machine, settings=settings(s, max_examples=chunk))
    except conformance.Divergence:
        divergences = 1
        traceback.print_exc()
    except KeyboardInterrupt:
        print("conformance: interrupted", file=sys.stderr)
        divergences = -1
    except Exception:  # noqa: BLE001 - a harness/daemon failure is a divergence too
        divergences = 1
        traceback.print_exc()
    elapsed = time.monotonic() - start
    st = conformance.STATS
    print(f"conformance: {st['skipped_linked']} operations not issued on lower hard links "
          f"(deliberate difference); known bugs avoided: {sorted(conformance.KNOWN_BUGS)}; "
          f"deliberate differences avoided: {sorted(conformance.DELIBERATE)}")
    print(f"{st['examples']} examples, {st['operations']} operations, "
          f"{max(divergences, 0)} divergences ({elapsed:.0f} s)")
    return 0 if divergences == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
