"""Support for test_stress_kill.py: a mount we may kill, the workload child, the checks.

The workload runs in a child process (``python killsupport.py SPEC.json``), so that a
killed daemon only fails *its* system calls (ENOTCONN) and never blocks pytest.  The
child reports on stdout, one line each, unbuffered:

    go          about to start (the kill delay is measured from here)
    +N          one operation completed (N: bytes written, or 1)
    bad MSG     an operation gave a result the overlay rules don't allow (a test failure)
    err ERRNO   an operation failed (after the kill: ENOTCONN or ECONNABORTED)
    done        everything completed

The parent knows exactly which operations the child saw complete ("acked"); since the
child runs them one after another, the state after a kill must be the state after the
first k operations with k = acked (the last one's effect was lost or never started) or
k = acked + 1 (the daemon finished it, but its reply died with it).
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys

ACK_CHUNK = 64 * 1024  # bytes per write() of the copy-up workloads: one FUSE request each


def blob(seed: int, n: int) -> bytes:
    """``n`` deterministic bytes: parent and child compute the same data from the seed."""
    return random.Random(seed).randbytes(n)


def _say(line: str) -> None:
    os.write(1, line.encode() + b"\n")


def _write_all(fd: int, data: bytes) -> None:
    for off in range(0, len(data), ACK_CHUNK):
        chunk = data[off:off + ACK_CHUNK]
        n = os.write(fd, chunk)
        if n != len(chunk):
            _say(f"bad short write {n} of {len(chunk)}")
            sys.exit(3)
        _say(f"+{n}")


def _copyup(spec: dict) -> None:
    path, variant = spec["path"], spec["variant"]
    if variant == "chmod":
        os.chmod(path, spec["mode"])
        _say("+1")
    elif variant == "append":
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        _write_all(fd, blob(spec["seed"], spec["size"]))
        os.close(fd)
    elif variant == "patch":
        fd = os.open(path, os.O_WRONLY)
        data = blob(spec["seed"], spec["size"])
        if os.pwrite(fd, data, spec["offset"]) != len(data):
            _say("bad short pwrite")
            sys.exit(3)
        _say(f"+{len(data)}")
        os.close(fd)
    elif variant == "trunc":
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        _write_all(fd, blob(spec["seed"], spec["size"]))
        os.close(fd)
    else:
        raise ValueError(variant)


def _ops(spec: dict) -> None:
    """Namespace and attribute operations, in order; one ack each."""
    root = spec["root"]
    for op in spec["ops"]:
        kind = op[0]
        p = [os.path.join(root, a) for a in op[1:] if isinstance(a, str)]
        if kind == "rename":
            os.rename(p[0], p[1])
        elif kind == "mkdir":
            os.mkdir(p[0], 0o755)
        elif kind == "exdev":
            try:
                os.rename(p[0], p[1])
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
            else:
                _say(f"bad rename of lower/merged dir {op[1]} -> {op[2]} succeeded (want EXDEV)")
                sys.exit(3)
        elif kind == "chmod":
            os.chmod(p[0], op[2])
        elif kind == "touch":
            os.utime(p[0], ns=(op[2], op[2]))
        else:
            raise ValueError(kind)
        _say("+1")


def child_main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    _say("go")
    try:
        if spec["kind"] == "copyup":
            _copyup(spec)
        else:
            _ops(spec)
    except OSError as e:
        _say(f"err {e.errno} {e}")
        return 1
    _say("done")
    return 0


def parse_report(out: bytes) -> tuple[int, int, bool, list[str], list[str]]:
    """(acked operations, acked bytes, done, errors, bad results) from the child's stdout."""
    ops = nbytes = 0
    done = False
    errs: list[str] = []
    bad: list[str] = []
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("+"):
            ops += 1
            nbytes += int(line[1:])
        elif line == "done":
            done = True
        elif line.startswith("err "):
            errs.append(line[4:])
        elif line.startswith("bad "):
            bad.append(line[4:])
    return ops, nbytes, done, errs, bad


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1]))
