#!/usr/bin/env python3
"""Layer tars: ``pyunionfs layer apply`` against ``tar -x`` and ``pyunionfs layer export``
against ``tar -c`` on the same data, side by side in one run, as ratios (the machines here are
noisy: absolute times mean little).  ``make bench`` runs it after bench.py.

    scripts/bench_layers.py [-n ROUNDS] [--files N] [--big-mib M]

The data: the Python standard library (thousands of small files, a real layer's shape) and one
big file (throughput).  Each timing is the median of the rounds, caches warm for both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = [sys.executable, "-m", "unionfs"]


def _run(cmd: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=cwd or REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=1200)
    return time.perf_counter() - t0


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def build_data(base: Path, files: int, big_mib: int) -> Path:
    src = base / "src"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for root, dirs, names in os.walk(stdlib):
        if n >= files:
            break
        dirs[:] = [d for d in dirs if d not in ("site-packages", "__pycache__")]
        rel = Path(root).relative_to(stdlib)
        for name in names:
            if n >= files:
                break
            (src / rel).mkdir(parents=True, exist_ok=True)
            try:
                shutil.copy2(Path(root) / name, src / rel / name, follow_symlinks=False)
            except OSError:
                continue
            n += 1
    with open(src / "big.bin", "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(big_mib):
            f.write(block)
    return src


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--big-mib", type=int, default=64)
    args = ap.parse_args()
    if not shutil.which("tar"):
        print("bench_layers: tar not found", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="pyunionfs-bench-layers-", dir="/var/tmp"))
    try:
        src = build_data(base, args.files, args.big_mib)
        plain, gz = base / "layer.tar", base / "layer.tar.gz"
        _run(["tar", "-cf", str(plain), "-C", str(src), "."])
        _run(["tar", "-czf", str(gz), "-C", str(src), "."])
        rows = []
        cases = [
            ("apply .tar", lambda d: ["tar", "-xf", str(plain), "-C", str(d)],
             lambda d: [*PY, "layer", "apply", "-q", str(plain), str(d)], True),
            ("apply .tar.gz", lambda d: ["tar", "-xzf", str(gz), "-C", str(d)],
             lambda d: [*PY, "layer", "apply", "-q", str(gz), str(d)], True),
            ("export .tar", lambda d: ["tar", "-cf", str(d / "o.tar"), "-C", str(src), "."],
             lambda d: [*PY, "layer", "export", "-q", str(src), "-o", str(d / "o.tar")], False),
            ("export .tar.gz", lambda d: ["tar", "-czf", str(d / "o.tgz"), "-C", str(src), "."],
             lambda d: [*PY, "layer", "export", "-q", str(src), "-o", str(d / "o.tar.gz")],
             False),
        ]
        for what, tar_cmd, py_cmd, into_new in cases:
            times: dict[str, list[float]] = {"tar": [], "pyunionfs": []}
            for _ in range(args.rounds):
                for side, cmd in (("tar", tar_cmd), ("pyunionfs", py_cmd)):
                    out = _fresh(base / f"out-{side}")
                    if side == "tar" or not into_new:
                        out.mkdir()
                    times[side].append(_run(cmd(out)))
            t, p = statistics.median(times["tar"]), statistics.median(times["pyunionfs"])
            rows.append((what, t, p))
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        print(f"layer tars: {args.files} files + {args.big_mib} MiB, {size / 2**20:.0f} MiB in "
              f"all, median of {args.rounds}")
        print(f"{'workload':<16}{'tar':>10}{'pyunionfs':>12}{'py/tar':>9}")
        for what, t, p in rows:
            print(f"{what:<16}{t:>9.2f}s{p:>11.2f}s{p / t:>9.2f}")
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
