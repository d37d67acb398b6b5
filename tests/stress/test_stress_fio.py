"""fio with verification on a pyunionfs mount: random and sequential writes (buffered and O_DIRECT,
fixed and mixed block sizes, one job over a lower file that fio's open copies up), each read back
and checked by fio (crc32c/md5/sha256 headers, verify_fatal). Then the view checks (views.py),
where fio --verify_only checks every block again after drop_caches, after a remount and under the
kernel's overlayfs — and, as a control, must fail once a block of the upper is corrupted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from overlay_harness import File
from views import LONG, budget, check_views, lowers_raw, report, watchdog_seconds

FIO = shutil.which("fio")
SIZE_MIB = int(budget(12, 64))  # per job
LOWER_NAME = "lowerjob.0.0"   # fio's own name for job "lowerjob"'s file: it finds it in the lower
TIMEOUT = 120 if not LONG else 600  # per fio run

JOBS = {
    # name: options
    "rand4k": {"rw": "randwrite", "bs": "4k", "verify": "crc32c"},
    "mixbs": {"rw": "randwrite", "bsrange": "1k-128k", "verify": "md5"},
    "seqdirect": {"rw": "write", "bs": "64k", "direct": "1", "verify": "sha256"},
    "lowerjob": {"rw": "randwrite", "bs": "16k", "verify": "crc32c"},
}


def job_file(path: Path, directory: Path) -> Path:
    lines = ["[global]", f"directory={directory}", "ioengine=psync", f"size={SIZE_MIB}m",
             "do_verify=1", "verify_fatal=1", "randrepeat=1", "fsync_on_close=1",
             "invalidate=1", "group_reporting=0"]
    for name, opts in JOBS.items():
        lines.append(f"[{name}]")
        lines += [f"{k}={v}" for k, v in opts.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_fio(jobfile: Path, out: Path, *extra: str, expect_ok: bool = True
            ) -> tuple[int, int, str]:
    """Run fio; return (bytes written, bytes read back and verified, stderr)."""
    cmd = [FIO, "--output-format=json", f"--output={out}", *extra, str(jobfile)]
    try:
        # fio leaves its verify state files (*-verify.state) in its working directory
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                           cwd=out.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fio did not finish in {TIMEOUT}s: {' '.join(cmd)}")
    if not expect_ok:
        return 0, 0, r.stderr + (out.read_text(errors="replace") if out.exists() else "")
    text = out.read_text(errors="replace") if out.exists() else ""
    assert r.returncode == 0, \
        f"fio failed (rc {r.returncode}): {' '.join(cmd)}\n{r.stderr}\n{text[-3000:]}"
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    errors = {j["jobname"]: j["error"] for j in data["jobs"] if j["error"]}
    assert not errors, f"fio job errors: {errors}\n{r.stderr}"
    written = sum(j["write"]["io_bytes"] for j in data["jobs"])
    verified = sum(j["read"]["io_bytes"] for j in data["jobs"])
    return written, verified, r.stderr


@pytest.mark.skipif(FIO is None, reason="fio is not installed (apt-get install fio; make stress "
                                        "and make test install it)")
@pytest.mark.watchdog(watchdog_seconds(300))
def test_fio_verify(make_stack, mounter, tmp_path):
    size = SIZE_MIB << 20
    rng = random.Random(5)
    paths = make_stack(lowers=[{
        "fio/" + LOWER_NAME: File(rng.randbytes(1 << 20), size=size),  # 1 MiB data, then holes
        "fio/neighbour": File("left alone\n"),
    }])
    before = lowers_raw(paths)
    m = mounter(paths)
    t0 = time.monotonic()
    jobs = job_file(tmp_path / "jobs.fio", m.root / "fio")
    written, verified, _ = run_fio(jobs, tmp_path / "run.json")
    elapsed = time.monotonic() - t0
    expect = size * len(JOBS)
    assert written == expect and verified == expect, (written, verified, expect)
    assert (paths.upper / "fio" / LOWER_NAME).stat().st_size == size, "the lower file not copied up"
    report(f"stress fio: {len(JOBS)} jobs ({', '.join(JOBS)}), {written >> 20} MiB written, "
           f"{verified >> 20} MiB verified in {elapsed:.1f}s")

    again: dict[str, int] = {}

    def verify_only(root: Path, stage: str) -> None:
        if stage == "live":
            return  # just verified by the run itself
        jf = job_file(tmp_path / f"verify-{stage}.fio", root / "fio")
        _, v, _ = run_fio(jf, tmp_path / f"verify-{stage}.json", "--verify_only")
        assert v == expect, f"{stage}: fio --verify_only read {v} bytes, expected {expect}"
        again[stage] = v

    check_views(paths, m, "fio", before, mounter, extra=verify_only)
    assert {"remount", "kernel"} <= set(again), again

    # The control: one corrupted block in the upper, and --verify_only must notice it.
    victim = paths.upper / "fio" / "rand4k.0.0"
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    m2 = mounter(paths)
    try:
        _, _, err = run_fio(job_file(tmp_path / "control.fio", m2.root / "fio"),
                            tmp_path / "control.json", "--verify_only", expect_ok=False)
    finally:
        m2.stop()
    assert "rand4k.0.0" in err and ("bad" in err or "verify" in err), \
        f"--verify_only missed a corrupted block:\n{err[-2000:]}"
    report(f"stress fio: re-verified {sum(again.values()) >> 20} MiB with --verify_only "
           f"({', '.join(sorted(again))}); a corrupted block was caught")
