"""How fast the dashboard's queries are on a month of data: 1-day vs 30-day view.

Generates a 30-day lake of 100 devices x 3 metrics of 1-minute window aggregates (the layout the
``lake`` sink writes, ~13 M rows), then times what one page load computes through
:mod:`dashboards.data` (listing with partition pruning, auto-resolution series, latest tiles,
threshold table, histogram, freshness) for a 1-day and a 30-day range. Median of several runs.

    python -m benchmarks.dashboard_bench [--lake DIR] [--repeat 5] [--days 30] [--devices 100]

``--lake DIR`` keeps (and reuses) the generated lake; otherwise it lives in a temp folder.
Results go to stdout and ``benchmarks/out/dashboard.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from collector.commands.export import LakeQuery, list_files
from dashboards import data
from sample_data.make_lake import aggregate_table, write_lake

START = datetime(2024, 5, 1, tzinfo=UTC)
OUT = Path(__file__).resolve().parent / "out" / "dashboard.json"


def generate(root: Path, days: int, devices: int) -> dict[str, Any]:
    """One day at a time, so memory stays at one day's rows."""
    names = [f"edge-{i:03d}" for i in range(devices)]
    t0 = time.perf_counter()
    files = 0
    for day in range(days):
        table = aggregate_table(
            start=START + timedelta(days=day), days=1, devices=names, seed=1000 + day, gap=None
        )
        files += write_lake(table, root, prefix=f"bench{day:02d}")
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    return {"files": files, "bytes": size, "seconds": round(time.perf_counter() - t0, 1)}


def page_load(root: Path, start: datetime, end: datetime, metric: str) -> dict[str, Any]:
    """Everything the page computes for one metric and every device over [start, end)."""
    timings: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t
        return out

    query = LakeQuery(str(root), since=start, until=end, metrics=(metric,))
    files = timed("list", lambda: list_files(query))
    stats = timed("scan", lambda: data.to_stats(data.lake_frame(query, files)).collect().lazy())
    rows, bucket = timed("series", lambda: data.series(stats, start=start, end=end))
    timed("latest", lambda: data.latest(stats))
    timed(
        "exceedances",
        lambda: data.exceedances(stats, {metric: data.Threshold(high=30.0)}, limit=500),
    )
    timed("histogram", lambda: data.histogram(stats))
    timed("freshness", lambda: data.freshness(stats, now=end))
    timings["total"] = sum(timings.values())
    return {
        "timings": timings,
        "files": len(files),
        "rows": stats.select(pl.len()).collect().item(),
        "points": rows.height,
        "bucket": data.format_bucket(bucket),
    }


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "polars": pl.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lake", type=Path, help="keep/reuse the generated lake here")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--devices", type=int, default=100)
    args = parser.parse_args()

    tmp = None if args.lake else Path(tempfile.mkdtemp(prefix="dashboard-bench-"))
    root = args.lake or tmp / "lake"  # type: ignore[operator]
    try:
        if root.is_dir() and any(root.rglob("*.parquet")):
            gen = {
                "reused": str(root),
                "files": len(list(root.rglob("*.parquet"))),
                "bytes": sum(p.stat().st_size for p in root.rglob("*.parquet")),
            }
        else:
            print(f"generating {args.days} days x {args.devices} devices into {root} ...")
            gen = generate(root, args.days, args.devices)
        end = START + timedelta(days=args.days)
        views = {"1 day": end - timedelta(days=1), f"{args.days} days": START}
        results: dict[str, Any] = {}
        for name, start in views.items():
            runs = [page_load(root, start, end, "temperature") for _ in range(args.repeat)]
            keys = runs[0]["timings"]
            results[name] = {
                "files": runs[0]["files"],
                "rows": runs[0]["rows"],
                "points": runs[0]["points"],
                "bucket": runs[0]["bucket"],
                "median_s": {
                    k: round(statistics.median(r["timings"][k] for r in runs), 4) for k in keys
                },
            }
        report = {
            "lake": gen,
            "days": args.days,
            "devices": args.devices,
            "metrics": 3,
            "repeat": args.repeat,
            "machine": machine(),
            "views": results,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        _print(report)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(report, indent=2))
        print(f"wrote {OUT}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _print(report: dict[str, Any]) -> None:
    m = report["machine"]
    lake = report["lake"]
    print(
        f"\nlake: {report['days']} days x {report['devices']} devices x 3 metrics, "
        f"1-minute aggregates, {lake['files']} files, {lake['bytes'] / 1e6:.0f} MB; "
        f"{m['cores']} cores, {m.get('ram_gb', '?')} GB RAM, polars {m['polars']}"
    )
    steps = list(next(iter(report["views"].values()))["median_s"])
    header = f"{'view':<10}{'files':>7}{'rows':>11}{'points':>8}{'bucket':>8}" + "".join(
        f"{s:>12}" for s in steps
    )
    print(header)
    for name, v in report["views"].items():
        print(
            f"{name:<10}{v['files']:>7}{v['rows']:>11,}{v['points']:>8,}{v['bucket']:>8}"
            + "".join(f"{v['median_s'][s] * 1000:>10.0f}ms" for s in steps)
        )


if __name__ == "__main__":
    raise SystemExit(main())
