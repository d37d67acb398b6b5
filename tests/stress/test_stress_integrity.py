"""Data integrity under random I/O: tests/stress/fsx.py on a pyunionfs mount, on a new file and on a
lower file that is copied up mid-run (it starts by only reading), then the view checks (views.py):
the tree and checksums equal right after, after drop_caches, after a remount, under the kernel.

fallocate ops run only when a probe fallocate on the mount works; the summary says which.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from overlay_harness import PYTHON, Dir, File
from views import LONG, SEED, budget, check_views, lowers_raw, report, watchdog_seconds

FSX = Path(__file__).resolve().with_name("fsx.py")
OPS = int(budget(20_000, 400_000))
SECONDS = budget(0, 80)  # the long profile also stops on time (0: no limit)
TIMEOUT = 120 if not LONG else SECONDS + 180

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate_problem(root: Path) -> str | None:
    """None if fallocate (mode 0, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE) works on the mount, else why
    not. The probe file is removed again (it is new, so nothing is left in the upper)."""
    probe = root / ".fsx-fallocate-probe"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, b"x" * 8192, 0)
        for mode, what in ((0, "mode 0"), (1, "KEEP_SIZE"), (3, "PUNCH_HOLE|KEEP_SIZE")):
            if _libc.fallocate(fd, mode, 0, 16384 if mode == 0 else 4096) != 0:
                e = ctypes.get_errno()
                return f"fallocate {what} on the mount: {errno.errorcode.get(e, e)}"
        if os.pread(fd, 4096, 0) != bytes(4096) or os.fstat(fd).st_size != 16384:
            return "fallocate probe: punched range not zero or size wrong"
        return None
    finally:
        os.close(fd)
        os.unlink(probe)


def run_fsx(args: list[str], label: str) -> str:
    cmd = [PYTHON, str(FSX), *args]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        pytest.fail(f"{label}: fsx did not finish in {TIMEOUT}s: {' '.join(cmd)}\n{out or ''}")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, (f"{label}: fsx failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}"
                               f"\ncommand: {' '.join(cmd)}")
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("fsx: ok"), r.stdout
    fields = dict(f.split("=", 1) for f in last.split() if "=" in f and not f.startswith("["))
    report(f"stress integrity {label}: fsx seed={fields['seed']} {fields['ops']} ops, "
           f"{int(fields['read']) >> 20} MiB read and checked, {int(fields['written']) >> 20} MiB "
           f"written, first writing op {fields['first_write']}, {elapsed:.1f}s")
    return last


def fsx_flags(root: Path, seed: int, ops: int = OPS) -> tuple[list[str], str]:
    flags = ["--seed", str(seed), "--ops", str(ops), "--mmap"]
    if SECONDS:
        flags += ["--seconds", str(SECONDS)]
    problem = fallocate_problem(root)
    if problem is None:
        flags.append("--fallocate")
        return flags, "fallocate on"
    return flags, f"fallocate off ({problem})"


# A merged view with lower content around the tested files, so the checks afterwards compare a
# real overlay (copied-up parents, a hidden lower version, untouched neighbours).
def _lowers(big: bytes, sparse: bool) -> list[dict]:
    rng = random.Random(99)
    top = {
        "data": Dir(mode=0o750),
        "data/neighbour": File(rng.randbytes(5000)),
        "data/sub/deep": File("deep\n"),
        "keep": File("untouched\n"),
    }
    if sparse:  # 64 KiB of data, then 1 MiB + 64 KiB of hole: copy-up must give zeros there
        top["data/big"] = File(big[:65536], size=65536 + (1 << 20) + 65536)
    else:
        top["data/big"] = File(big)
    bottom = {"data/big": File(b"hidden lower version\n" * 100), "data/only-below": File("b\n")}
    return [top, bottom]


@pytest.mark.watchdog(watchdog_seconds(SECONDS))
def test_fsx_new_file(make_stack, mounter):
    paths = make_stack(lowers=_lowers(random.Random(1).randbytes(200_000), sparse=False))
    before = lowers_raw(paths)
    m = mounter(paths)
    flags, falloc = fsx_flags(m.root, seed=SEED + 101)
    run_fsx([*flags, "--create", str(m.root / "data" / "new")], f"new file ({falloc})")
    assert (m.root / "keep").read_bytes() == b"untouched\n"
    check_views(paths, m, "fsx new file", before, mounter)


@pytest.mark.watchdog(watchdog_seconds(SECONDS))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_fsx_lower_file_copied_up_mid_run(make_stack, mounter, sparse):
    big = random.Random(2).randbytes(256 * 1024)
    paths = make_stack(lowers=_lowers(big, sparse))
    before = lowers_raw(paths)
    lower_file = paths.lowers[0] / "data" / "big"
    m = mounter(paths)
    # the sparse file is 1.1 MiB: more data per op, so fewer ops in the bounded profile
    flags, falloc = fsx_flags(m.root, seed=SEED + 202 + sparse,
                             ops=OPS // 2 if sparse else OPS)
    if sparse:
        # the file is bigger than fsx's default limits: let them cover it
        flags += ["--maxlen", str(lower_file.stat().st_size)]
    assert not (paths.upper / "data").exists()
    # dense: the copy-up comes from an open for writing; sparse: from truncate(path), while
    # the read-only fds (plain, O_DIRECT) stay open and must then read the upper file
    first = ["--first-op", "truncate_path"] if sparse else ["--first-op", "write"]
    run_fsx([*flags, "--read-first", "500", *first, "--initial-from", str(lower_file),
             str(m.root / "data" / "big")],
            f"lower {'sparse' if sparse else 'dense'} file, 500 read-only ops, then copy-up by "
            f"{first[1]} ({falloc})")
    assert (paths.upper / "data" / "big").is_file(), "no copy-up happened"
    check_views(paths, m, f"fsx copy-up {'sparse' if sparse else 'dense'}", before, mounter)


def test_fsx_reports_a_mismatch_with_its_replay(tmp_path):
    """The checker itself: a model that disagrees with the file must fail with the seed, the op,
    the last ops, the differing offsets and a replay command (plain file, no mount)."""
    f = tmp_path / "f"
    r = subprocess.run([PYTHON, str(FSX), "--seed", "3", "--ops", "2000", "--create",
                        "--selftest-flip", "150", str(f)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert "fsx: FAILURE seed=3 op=150" in out, out
    assert "differing bytes: 0x1 in 1 range(s)" in out, out
    shown = [int(ln.split()[0]) for ln in out.splitlines() if re.match(r"\s+\d+ ", ln)]
    assert shown == list(range(131, 151)), out  # the last 20 ops
    assert "replay: python tests/stress/fsx.py --seed 3 --ops 150" in out, out
    # the same seed without the flip passes: the failure came from the model, not the file
    ok = subprocess.run([PYTHON, str(FSX), "--seed", "3", "--ops", "2000", "--create", str(f)],
                        capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("fsx: ok seed=3 ops=2000"), ok.stdout
