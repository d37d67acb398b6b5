"""Requests counted per operation, with the time their handlers took, and how a live mount is
asked for them (``pyunionfs stats MERGED``).

The daemon answers on an abstract UNIX socket named after its mount's device number, read
from the mount table: asking never touches the mount itself (so it can't hang on a busy
daemon) and leaves nothing in the file system.  Only a process of the daemon's own user (or
root) gets an answer: the peer's credentials are checked.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from unionfs import mounttable


class Stats:
    """Per-operation request counts and the time their handlers took (nanoseconds of wall
    time: a clock the vDSO reads without a system call; a handler that waits for a thread
    counts its wait too)."""

    __slots__ = ("calls", "cpu_ns", "errors", "started", "mount", "gauges", "given_back")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.cpu_ns: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.started = time.monotonic()
        self.mount: dict[str, Any] = {}  # which mount this daemon serves (dev, id, point)
        # What the daemon holds now (nodes the kernel holds, open files), read when asked.
        self.gauges: Callable[[], dict[str, int]] = dict
        self.given_back = 0  # times memory went back after the kernel forgot (ops)

    def record(self, op: str, ns: int, failed: bool) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        self.cpu_ns[op] = self.cpu_ns.get(op, 0) + ns
        if failed:
            self.errors[op] = self.errors.get(op, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "mount": self.mount,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 3),
            "daemon_cpu_s": round(use.ru_utime + use.ru_stime, 4),
            "max_rss_kib": use.ru_maxrss,
            "rss_kib": _vm_rss_kib(),
            "memory_given_back": self.given_back,
            **self.gauges(),
            "requests": sum(self.calls.values()),
            "ops": {op: {"calls": n, "errors": self.errors.get(op, 0),
                         "handler_s": round(self.cpu_ns[op] / 1e9, 6)}
                    for op, n in sorted(self.calls.items())},
        }


def _peer_allowed(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.geteuid())


def answer(conn: socket.socket, stats: Stats) -> None:
    """One query, answered at once (the caller's part of the loop: it never blocks)."""
    try:
        if _peer_allowed(conn):
            conn.sendall(json.dumps(stats.snapshot()).encode())
    except OSError:
        pass
    finally:
        conn.close()


class StatsError(Exception):
    pass


def _ask(name: bytes, timeout: float) -> dict[str, Any] | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(name)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except OSError as err:
        raise StatsError(f"asking a pyunionfs daemon: {err.strerror or err}") from None
    finally:
        s.close()
    if not chunks:
        raise StatsError("the daemon answers only its own user and root")
    data: dict[str, Any] = json.loads(b"".join(chunks))
    return data


def fetch(merged: str, timeout: float = 5.0) -> dict[str, Any]:
    """The counts of the pyunionfs daemon serving ``merged``."""
    e = mounttable.entry(merged)
    if e is None:
        raise StatsError(f"'{merged}' is not a mount point")
    if e.fstype != "fuse.pyunionfs":
        raise StatsError(f"'{merged}' is a {e.fstype} mount, not pyunionfs")
    for name in mounttable.socket_names(e.dev):
        data = _ask(name, timeout)
        if data is not None and data.get("mount") == {"dev": e.dev, "id": e.mount_id,
                                                      "point": e.point}:
            return data
    raise StatsError(f"the daemon of '{merged}' does not answer (another network namespace, "
                     "an older pyunionfs, or it is gone)")


def _vm_rss_kib() -> int:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def render(data: dict[str, Any]) -> str:
    ops = data["ops"]
    total = max(1, data["requests"])
    lines = [f"pid {data['pid']}, up {data['uptime_s']:.1f} s, {data['requests']} requests, "
             f"daemon CPU {data['daemon_cpu_s']:.3f} s "
             f"({data['daemon_cpu_s'] * 1e6 / total:.1f} us per request), "
             f"RSS {data.get('rss_kib', 0) / 1024:.1f} MiB (max "
             f"{data['max_rss_kib'] / 1024:.1f}), {data.get('nodes', 0)} nodes held, "
             f"{data.get('open_files', 0)} files open",
             f"{'operation':<14}{'calls':>10}{'errors':>8}{'handler time':>14}{'per call':>11}"]
    for op, r in sorted(ops.items(), key=lambda kv: -kv[1]["calls"]):
        per = r["handler_s"] * 1e6 / max(1, r["calls"])
        lines.append(f"{op:<14}{r['calls']:>10}{r['errors']:>8}{r['handler_s']:>13.3f}s"
                     f"{per:>9.1f}us")
    return "\n".join(lines)
