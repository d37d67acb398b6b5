"""Faults below us, at random (the long forms of tests/test_faults.py).

* a storm: rounds of one random rule on faultfs (an operation, a path pattern in UPPER or
  WORK, EIO/ENOSPC/EDQUOT, a count) and one random change through the mount; a model of
  the merged tree follows the changes that succeeded.  Every failure must be the rule's
  errno (or one the model explains), the tree must stay the model's, nothing half-built
  may stay in UPPER or WORK/work, the daemon must serve on; at the end a remount straight
  over the backing directory shows the model too.
* power cuts at random moments of a workload child (appends to lower files, i.e. copy-ups,
  and new files, each fsynced or not): unsynced data is dropped, the daemon SIGKILLed, the
  stack remounted over the backing dir; each file must hold a state it had at a sync the
  child saw acknowledged, or a later synced one: never less than its lower data.

One summary line goes to stdout and PYUNIONFS_STRESS_REPORT.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultfs import FaultFS
from overlay_harness import IMPL, USERNS, File, Mount, PyUnionMount, StackPaths
from test_faults import on_faultfs
from views import LONG, SEED, budget, report, watchdog_seconds

pytestmark = [
    pytest.mark.watchdog(watchdog_seconds(600)),
    pytest.mark.skipif(IMPL == "kernel", reason="faults pyunionfs's upper"),
    pytest.mark.skipif(USERNS, reason="mounts FUSE from the initial namespace"),
]

FIGURES: dict[str, str] = {}
ERRNOS = ["EIO", "ENOSPC", "EDQUOT"]
OPS = ["write", "fsync", "create", "mkdir", "rename", "setxattr", "setattr", "unlink",
       "mknod", "link", "fallocate"]
PATHS = ["upper/*", "work/work/#*", "*", "upper/d*/*"]


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    if FIGURES:
        print()
        report("faults stress: " + "; ".join(FIGURES.values()) + f" (seed {SEED}"
               + (", long)" if LONG else ")"))


def _stack(make_stack: Callable[..., StackPaths], lowers: list[Any], track: bool
           ) -> tuple[FaultFS, StackPaths, Path]:
    return on_faultfs(make_stack(lowers, upper={}), track=track)


def _leftovers(backing: Path) -> list[str]:
    out = [n for n in os.listdir(backing / "work" / "work") if n != "#whiteout"]
    for d, dirs, files in os.walk(backing / "upper"):
        out += [os.path.join(d, n) for n in dirs + files if n.startswith("#")]
    return out


def _tree(m: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for d, dirs, files in os.walk(m):
        rel = os.path.relpath(d, m)
        for n in dirs:
            out[os.path.normpath(os.path.join(rel, n))] = None
        for n in files:
            out[os.path.normpath(os.path.join(rel, n))] = Path(d, n).read_bytes()
    return out


# --------------------------------------------------------------------------------------------------
# The storm
# --------------------------------------------------------------------------------------------------

STORM_ROUNDS = int(budget(120, 1500))


def _change(rng: random.Random, m: Path, model: dict[str, bytes | None]) -> tuple[str, Any]:
    """One random change: (description, a function applying it to ``model`` if it worked)."""
    files = sorted(k for k, v in model.items() if v is not None)
    dirs = sorted(k for k, v in model.items() if v is None)
    kind = rng.choice(["append", "append", "new", "mkdir", "rename", "xattr", "unlink",
                       "truncate", "chmod"])
    name = rng.choice(files) if files else "f0"
    data = rng.randbytes(rng.choice([10, 5000, 70_000]))
    if kind == "append":
        def do() -> None:
            with open(m / name, "ab") as f:
                f.write(data)
                if rng.random() < 0.5:
                    os.fsync(f.fileno())
        return f"append {name}", (do, lambda: model.__setitem__(name, model[name] + data))  # type: ignore[operator]
    if kind == "new":
        new = f"{rng.choice(dirs)}/n{rng.randrange(1000)}"
        def create() -> None:
            # closed here: a write failing in a garbage-collected file's flush is lost
            with open(m / new, "xb") as f:
                f.write(data)
        return f"new {new}", (create, lambda: model.__setitem__(new, data))
    if kind == "mkdir":
        new = f"d{rng.randrange(100)}"
        return f"mkdir {new}", (lambda: (m / new).mkdir(), lambda: model.__setitem__(new, None))
    if kind == "rename":
        to = f"{rng.choice(dirs)}/r{rng.randrange(1000)}"

        def moved() -> None:
            model[to] = model.pop(name)
        return f"rename {name} {to}", (lambda: os.rename(m / name, m / to), moved)
    if kind == "xattr":
        return f"xattr {name}", (lambda: os.setxattr(m / name, "user.k", data[:100]),
                                 lambda: None)
    if kind == "unlink":
        return f"unlink {name}", (lambda: (m / name).unlink(), lambda: model.pop(name))
    if kind == "truncate":
        size = rng.randrange(0, 100_000)

        def cut() -> None:
            old = model[name]
            assert old is not None
            model[name] = old[:size] + b"\0" * max(0, size - len(old))
        return f"truncate {name} {size}", (lambda: os.truncate(m / name, size), cut)
    return f"chmod {name}", (lambda: os.chmod(m / name, 0o600), lambda: None)


def _created_then_failed(what: str, now: dict[str, bytes | None],
                         model: dict[str, bytes | None]) -> bool:
    """A "new" change is a create and a write: the create may have worked and the write
    failed, leaving the file with a part of its data (as on any filesystem)."""
    if not what.startswith("new "):
        return False
    new = what.split(" ", 1)[1]
    want, got = model.get(new), now.get(new)
    return set(now) == set(model) and all(now[k] == model[k] for k in now if k != new) \
        and want is not None and got is not None and want.startswith(got)


def test_fault_storm(make_stack: Callable[..., StackPaths], mounter: Callable[..., Mount],
                     _registry: Any) -> None:
    rng = random.Random(SEED)
    lowers = [{**{f"d{i}/f{j}": File(rng.randbytes(rng.randrange(1, 300_000)))
                  for i in range(4) for j in range(6)}, "d0/sub/x": File("x")}]
    ffs, paths, backing = _stack(make_stack, lowers, track=False)
    m = None
    tried = failed = 0
    errs: dict[str, int] = {}
    try:
        m = PyUnionMount(paths)
        _registry.items.append(m)
        model = _tree(m.root)
        for r in range(STORM_ROUNDS):
            rule = {"op": rng.choice(OPS), "path": rng.choice(PATHS),
                    "errno": rng.choice(ERRNOS), "count": rng.choice([1, 1, 2, -1]),
                    "skip": rng.choice([0, 0, 1, 3])}
            what, (do, apply) = _change(rng, m.root, model)
            with ffs.failing(rule):
                tried += 1
                try:
                    do()
                except OSError as e:
                    name = errno.errorcode.get(e.errno or 0, "?")
                    fired = ffs.stats()["rules"][0]["fired"]
                    failed += 1
                    errs[name] = errs.get(name, 0) + 1
                    assert fired and name == rule["errno"] or name in (
                        "ENOENT", "EEXIST", "ENOTDIR", "EISDIR", "EXDEV"), (
                        f"round {r}: {what} under {rule}: {name} (rule fired {fired}x)")
                    if fired:
                        # a failed change may only leave what a complete one would, where
                        # the fault came after the point of no return (an fsync's write)
                        now = _tree(m.root)
                        if now != model:
                            apply()
                            assert now == model or what.startswith("append") \
                                or _created_then_failed(what, now, model), (
                                f"round {r}: {what} failed with {name} but changed the tree")
                            model = now
                else:
                    apply()
            assert not _leftovers(backing), (r, what, rule, _leftovers(backing))
            if r % 10 == 0:
                assert _tree(m.root) == model, f"round {r}: tree is not the model's"
        assert _tree(m.root) == model
        assert "internal error" not in m.log_tail(1000), m.log_tail(60)
        m.stop()
        ffs.stop()
        again = mounter(StackPaths(paths.base, paths.lowers, backing / "upper",
                                   backing / "work", paths.merged))
        assert _tree(again.root) == model, "the remount differs from the model"
    finally:
        if m is not None:
            m.stop()
        ffs.stop()
    FIGURES["storm"] = (f"storm: {tried} faulted changes, {failed} failed "
                        f"({', '.join(f'{k} {v}' for k, v in sorted(errs.items()))}), "
                        "tree = model, no leftovers, remount = model")


# --------------------------------------------------------------------------------------------------
# Power cuts at random moments
# --------------------------------------------------------------------------------------------------

CUTS = max(2, int(budget(4, 40)))

CHILD = r"""
import json, os, sys
items = json.load(open(sys.argv[1]))
def say(s):
    os.write(1, (s + "\n").encode())
try:
    for i, it in enumerate(items):
        data = bytes.fromhex(it["data"])
        flags = os.O_WRONLY | (os.O_APPEND if it["kind"] == "append" else os.O_CREAT | os.O_EXCL)
        fd = os.open(it["path"], flags, 0o644)
        say(f"open {i}")
        os.write(fd, data)
        say(f"write {i}")
        if it["sync"]:
            os.fsync(fd)
            say(f"sync {i}")
        os.close(fd)
except OSError as e:
    say(f"err {e.errno}")
say("end")
"""


def test_power_cuts_at_random_moments(make_stack: Callable[..., StackPaths],
                                      mounter: Callable[..., Mount], _registry: Any,
                                      tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    intact = torn = reverted = checked = 0
    for cut in range(CUTS):
        lows = {f"l{i}": rng.randbytes(rng.randrange(1, 3 << 20)) for i in range(12)}
        ffs, paths, backing = _stack(make_stack, [{k: File(v) for k, v in lows.items()}],
                                     track=True)
        m = None
        try:
            m = PyUnionMount(paths)
            _registry.items.append(m)
            items: list[dict[str, Any]] = []
            for i in range(24):
                data = rng.randbytes(rng.choice([100, 20_000, 300_000]))
                if i % 2 == 0:
                    items.append({"kind": "append", "name": f"l{i // 2}", "data": data.hex(),
                                  "sync": rng.random() < 0.5})
                else:
                    items.append({"kind": "new", "name": f"n{i}", "data": data.hex(),
                                  "sync": rng.random() < 0.5})
            for it in items:
                it["path"] = str(m.root / it["name"])
            spec = tmp_path / f"spec{cut}.json"
            spec.write_text(json.dumps(items))
            child = subprocess.Popen([sys.executable, str(script), str(spec)],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.05, 1.5))
            res = ffs.power_cut()
            reverted += res["reverted"]
            m.overlay.kill()
            try:
                out, _ = child.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                out, _ = child.communicate(timeout=10)
            acks = set(out.decode().split("\n"))
            m.stop()
            ffs.stop()
            again = mounter(StackPaths(paths.base, paths.lowers, backing / "upper",
                                       backing / "work", paths.merged))
            for i, it in enumerate(items):
                data = bytes.fromhex(it["data"])
                base = lows[it["name"]] if it["kind"] == "append" else b""
                ok: set[bytes | None]
                if f"sync {i}" in acks:
                    ok = {base + data}
                elif it["sync"] and f"write {i}" in acks:
                    ok = {base, base + data}
                else:
                    ok = {base}
                p = again.root / it["name"]
                got = p.read_bytes() if p.exists() else (None if it["kind"] == "new" else b"?")
                if it["kind"] == "new" and f"sync {i}" not in acks:
                    ok.add(None)  # (a name without data is durable here: b"" is in ok)
                checked += 1
                if got in ok:
                    intact += 1
                else:
                    torn += 1
                    raise AssertionError(f"cut {cut}: {it['name']} ({it['kind']}, sync "
                                         f"{it['sync']}) has {None if got is None else len(got)}"
                                         f" bytes, allowed {sorted(len(o or b'') for o in ok)}")
            assert not [n for n in os.listdir(backing / "upper") if n.startswith("#")]
            assert os.listdir(backing / "work" / "work") == []
            again.stop()
        finally:
            if m is not None:
                m.stop()
            ffs.stop()
    FIGURES["power cuts"] = (f"{CUTS} power cuts: {reverted} files reverted, {checked} files "
                             f"checked, {intact} as synced, {torn} torn")
