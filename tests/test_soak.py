"""The soak (scripts/soak.py, `make soak`) run for ~15 s at its small sizes, so that it can't rot.

A smoke test of the soak itself, not a soak: it asserts the report of a short run (exit 0, no
error, ops of every kind, RSS and fds checked and flat, the kernel replay compared and equal)
and that the run left nothing mounted and no process behind.  About 30 s in all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from overlay_harness import IMPL, USERNS, environment_problem

REPO = Path(__file__).resolve().parent.parent
SOAK = REPO / "scripts" / "soak.py"
DURATION = 15
RUN_TIMEOUT = 150  # the soak's own stop, final checks and replay take ~10 s of it

KINDS = ("gen", "read", "readdir", "touch", "copyup", "bigio", "rename", "mount_cycle",
         "replay")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(RUN_TIMEOUT + 30),
    pytest.mark.skipif(USERNS, reason="the soak's kernel replay mounts overlayfs as real root"),
    pytest.mark.skipif(IMPL == "kernel", reason="the soak measures the pyunionfs daemon"),
]


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    with open("/proc/mounts") as f:
        return [ln.split(" ")[1] for ln in f if ln.split(" ")[1].startswith(prefix)]


def _processes_naming(text: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def test_short_soak_is_clean(tmp_path: Path) -> None:
    problem = environment_problem()
    if problem:
        pytest.skip(f"soak: {problem}")
    if os.geteuid() != 0:
        pytest.skip("soak: needs root (its replay mounts kernel overlayfs)")
    scratch = tmp_path / "layers"
    scratch.mkdir()
    report_path = tmp_path / "soak.json"
    cmd = [sys.executable, str(SOAK), "--duration", str(DURATION), "--small", "--seed", "25",
           "--fsstress", "off", "--dir", str(scratch), "--json", str(report_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        left_mounted = _mounts_under(tmp_path)
    output = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert not left_mounted, f"the soak left mounts: {left_mounted}\n{output}"
    # its workers and daemons all name the scratch dir on their command line or are forks of
    # the soak: none may outlive it
    assert not _processes_naming(str(scratch)), f"processes left behind\n{output}"
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())
    assert proc.returncode == 0, f"exit {proc.returncode}: {report['problems']}\n{output}"
    assert report["result"] == "ok" and report["error_count"] == 0, output
    missing = [k for k in KINDS if not report["ops"].get(k)]
    assert not missing, f"no ops of {missing}: {report['ops']}"
    for series in ("rss_kib", "fds"):
        assert report[series]["checked"] and report[series]["flat"], report[series]
    replay = report["replay"]
    assert replay["compared"] and replay["equal"], replay
    assert replay["ops"] > 100, replay
    assert not list(scratch.iterdir()), "the soak left its layers behind"
