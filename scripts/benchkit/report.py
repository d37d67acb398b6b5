"""Results and the tables printed from them: medians, ratios to fuse-overlayfs and to the
kernel, targets, figures, the layer-count and RSS tables."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from benchkit.common import FS_NAMES, KIB, LAYERS_MOUNT_TARGET_S, LAYERS_RATIO_TARGET, MIB, Profile
from benchkit.workloads import FIGURES, Workload


@dataclass
class Result:
    runs: list[float] = field(default_factory=list)
    error: str | None = None
    na: str | None = None  # not possible here (reason); not an error
    figures: list[dict[str, float]] = field(default_factory=list)  # per run (Ctx.figures)

    @property
    def median(self) -> float | None:
        if not self.runs or self.error is not None or self.na is not None:
            return None
        return statistics.median(self.runs)

    def figure(self, key: str) -> float | None:
        """The median of a measured figure over the runs (None: failed, or not measured)."""
        values = [f[key] for f in self.figures if key in f]
        if not values or self.median is None:
            return None
        return statistics.median(values)

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "median_s": self.median,
            "runs_s": self.runs,
            "error": self.error,
            "na": self.na,
        }
        if self.figures:
            out.update({k: self.figure(k) for k in FIGURES if any(k in f for f in self.figures)})
            out["figures_runs"] = self.figures
        return out


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t >= 1:
        return f"{t:.2f} s"
    if t >= 0.01:
        return f"{t * 1000:.0f} ms"
    return f"{t * 1000:.1f} ms"


def cell(res: Result | None, reason: str | None) -> str:
    if reason is not None:
        return "n/a"
    if res is None:
        return "-"
    if res.na is not None:
        return "n/a"
    if res.error is not None:
        return "timeout" if res.error == "timeout" else "ERR"
    return fmt_time(res.median)


def ratio_of(a: Result | None, b: Result | None) -> float | None:
    if a is None or b is None or a.median is None or b.median is None or b.median <= 0:
        return None
    return a.median / b.median


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}"


def mark(ok: bool | None) -> str:
    return "-" if ok is None else "pass" if ok else "FAIL"


def print_rows(headers: list[str], rows: list[list[str]], left: int = 1) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def fmt(row: list[str]) -> str:
        return "  ".join(
            c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(row)
        ).rstrip()

    line = fmt(headers)
    print(line)
    print("-" * len(line))
    for row in rows:
        print(fmt(row))


def main_rows(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    rows, summary = [], {}
    for w in workloads:
        r = results[w.key]
        py, fo, kern = r.get("pyunionfs"), r.get("fuse-overlayfs"), r.get("kernel")
        py_fo, py_k = ratio_of(py, fo), ratio_of(py, kern)
        # requests the timed part sent to the pyunionfs daemon (pyunionfs stats), median
        reqs = py.figure("requests") if py is not None else None
        ok: bool | None = None
        if w.target is not None and w.target.kind == "ratio" and py_fo is not None:
            ok = py_fo <= w.target.value
        elif w.target is not None and w.target.kind == "kernel" and py_k is not None:
            ok = py_k <= w.target.value
        elif (
            w.target is not None
            and w.target.kind == "abs"
            and py is not None
            and py.median is not None
        ):
            ok = py.median <= w.target.value
        rows.append(
            [
                w.key,
                *(cell(r.get(fs), unavailable.get(fs)) for fs in FS_NAMES),
                fmt_ratio(py_fo),
                fmt_ratio(py_k),
                f"{reqs:,.0f}" if reqs is not None else "-",
                w.target.text() if w.target else "-",
                mark(ok),
            ]
        )
        summary[w.key] = {"py_fo": py_fo, "py_kernel": py_k, "py_requests": reqs, "pass": ok}
    return rows, summary


def rate_rows(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
    p: Profile,
) -> list[list[str]]:
    """Operations per second (of the median run) for the workloads that count them."""
    rows = []
    for w in workloads:
        if w.extra is None:
            continue
        row = [w.key]
        for fs in FS_NAMES:
            r = results[w.key].get(fs)
            rate = w.extra(r.median, p).get("ops_per_s") if r and r.median else None
            row.append(cell(r, unavailable.get(fs)) if rate is None else f"{rate:,.0f}/s")
        rows.append(row)
    return rows


def fmt_figure(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if FIGURES.get(key, ("", ""))[1] != "bytes":
        return f"{v:,.0f}"
    if abs(v) >= MIB:
        return f"{v / MIB:.1f} MiB"
    return f"{v / KIB:.0f} KiB" if abs(v) >= KIB else f"{v:.0f} B"


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def figure_rows(
    workloads: list[Workload],
    results: dict[str, dict[str, Result]],
    unavailable: dict[str, str],
) -> tuple[list[list[str]], dict[str, dict[str, Any]]]:
    """The figures workloads measured besides the time (medians), with py/fo and py/kernel."""
    rows: list[list[str]] = []
    summary: dict[str, dict[str, Any]] = {}
    for w in workloads:
        r = results[w.key]
        for key, (label, _unit) in FIGURES.items():
            vals = {fs: (r[fs].figure(key) if fs in r else None) for fs in FS_NAMES}
            if all(v is None for v in vals.values()):
                continue
            py_fo, py_k = (_div(vals["pyunionfs"], vals[o]) for o in ("fuse-overlayfs", "kernel"))
            cells = [
                fmt_figure(key, vals[fs])
                if vals[fs] is not None
                else cell(r.get(fs), unavailable.get(fs))
                for fs in FS_NAMES
            ]
            rows.append([f"{w.key}: {label}", *cells, fmt_ratio(py_fo), fmt_ratio(py_k)])
            summary.setdefault(w.key, {}).update({f"{key}_py_fo": py_fo, f"{key}_py_kernel": py_k})
    return rows, summary


def layer_rows(
    res: dict[str, dict[str, dict[int, Result]]], counts: list[int], unavailable: dict[str, str]
) -> tuple[list[list[str]], dict[str, Any]]:
    rows, summary = [], {}
    for measure, by_fs in res.items():
        for fs in FS_NAMES:
            if fs not in by_fs:
                continue
            cells = by_fs[fs]
            r128 = ratio_of(cells.get(128), cells.get(1))
            target, ok = "-", None
            if fs == "pyunionfs":
                target = f"128/1 <= {LAYERS_RATIO_TARGET:.1f}"
                oks = [] if r128 is None else [r128 <= LAYERS_RATIO_TARGET]
                if measure == "mount_ready" and 500 in cells:
                    target += f", N=500 < {LAYERS_MOUNT_TARGET_S:.0f} s"
                    m500 = cells[500].median
                    oks += [] if m500 is None else [m500 < LAYERS_MOUNT_TARGET_S]
                ok = all(oks) if oks else None
                summary[measure] = {"ratio_128_1": r128, "pass": ok}
            rows.append(
                [
                    measure,
                    fs,
                    *(cell(cells.get(n), unavailable.get(fs)) for n in counts),
                    fmt_ratio(r128),
                    target,
                    mark(ok),
                ]
            )
    return rows, summary


def rss_rows(rss: dict[str, dict[str, Any]]) -> list[list[str]]:
    def mib(k: Any) -> str:
        return "-" if k is None else f"{k / KIB:.1f} MiB"

    rows = []
    for fs, r in rss.items():
        if r.get("error"):
            rows.append([fs, "ERR", "", "", "", "", "", r["error"][:60]])
            continue
        kpi, back = r.get("kib_per_inode"), r.get("back_near_base")
        rows.append(
            [
                fs,
                str(r.get("entries", "-")),
                mib(r.get("rss_mount_kib")),
                mib(r.get("rss_stat_kib")),
                mib(r.get("rss_drop_kib")),
                "-" if kpi is None else f"{kpi:.2f}",
                "-" if back is None else "yes" if back else "no",
                mark(r.get("pass")),
            ]
        )
    return rows


def print_errors(errors: list[tuple[str, str, str]]) -> None:
    """The first error of each filesystem in full, the others by name only."""
    seen: dict[str, list[str]] = {}
    for fs, where, msg in errors:
        if fs not in seen:
            print(f"  error: {fs} {where}: {msg}")
            seen[fs] = []
        else:
            seen[fs].append(where)
    for fs, more in seen.items():
        if more:
            print(
                f"  error: {fs} also failed in: {', '.join(more)} (messages in the log and --json)"
            )


