"""Smoke test of scripts/bench.py: the quick profile runs end to end and cleans up.

No timing is asserted: only that every pyunionfs workload produced a median, that the script
exited 0 and that nothing is left mounted under its scratch dir.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from overlay_harness import environment_problem

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench.py"
RUN_TIMEOUT = 240


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/mounts") as f:
        return [ln.split(" ")[1] for ln in f if ln.split(" ")[1].startswith(prefix)]


@pytest.mark.timeout(RUN_TIMEOUT + 90)
def test_bench_quick_runs_and_cleans_up(tmp_path: Path) -> None:
    problem = environment_problem()
    if problem:
        pytest.skip(f"bench smoke test: {problem}")
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    cmd = [sys.executable, str(BENCH), "--quick", "--fs", "pyunionfs,kernel",
           "--json", str(out), "--dir", str(scratch)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # bench.py unmounts what it mounted on SIGTERM
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"bench.py --quick took more than {RUN_TIMEOUT} s:\n{output[-3000:]}")
    assert proc.returncode == 0, f"bench.py exited with {proc.returncode}:\n{output[-3000:]}"
    assert not _mounts_under(scratch), f"mounts left behind: {_mounts_under(scratch)}"
    assert not list(scratch.iterdir()), "the scratch dir was not removed"

    data = json.loads(out.read_text())
    assert data["errors"] == []
    missing = [key for key, r in data["results"].items() if r["pyunionfs"]["median_s"] is None]
    assert not missing, f"no pyunionfs median for {missing}"
    wanted = {"mount_ready", "find_cold", "imports", "untar", "rm_rf", "append_8"}
    assert wanted <= set(data["results"])
    assert data["results"]["append_8"]["pyunionfs"]["ops_per_s"] > 0
    for measure, by_fs in data["layer_scaling"].items():
        for n, r in by_fs["pyunionfs"].items():
            assert r["median_s"] is not None, f"layers {measure} N={n}: {r}"
    rss = data["rss"]["pyunionfs"]
    assert rss["error"] is None and rss["entries"] > 0, rss
