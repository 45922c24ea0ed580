"""What start-up costs a user: `collector run CFG --once` on a 10-row file, and `collector --help`.

On an edge device the collector is often started by cron, a systemd timer or a shell loop for a
handful of readings, so its fixed cost (interpreter, imports, config, runtime, first write) is
what the user waits for and pays in CPU every time; a 10 M-row benchmark hides it.

- **run --once**: a 10-row narrow CSV replayed (speed max) through a 1-min window into a local
  lake, `collector run CFG --once` in a subprocess with a fresh data dir and lake each run (no
  saved replay position, no spool left over): wall time (median and min of N runs), CPU
  seconds and peak RSS (``VmHWM``). Every run must exit 0 and leave all 10 readings in the lake.
- **--help**: `collector --help`, median and min of N runs: what typing the command costs.
- **context**: `python -c pass` and `python -c "import polars"`, median of N runs: the floor
  any Python agent pays, and what a Polars-based one pays before its own code runs.
- **imports**: one more (untimed) run of the same --once under ``python -X importtime``: which
  optional heavy libraries (``benchmarks._common.HEAVY``) the run really imported, and the
  slowest packages to import. This config names no plugin that needs pyarrow, so pyarrow must
  not be among them: the runtime is Polars-only since db62369 and pyarrow is loaded only by
  the sinks/features that need it.

    python -m benchmarks.startup [--runs 7]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._common import (
    ProcResult,
    check_ok,
    collector_cmd,
    run_measured,
    table,
    trace_imports,
    write_json,
    write_yaml,
)

ROWS = 10
TARGET_ONCE_S = 0.35
TARGET_HELP_S = 0.15
MUST_NOT_IMPORT = ("pyarrow",)
"""Heavy libraries this config gives no reason to load (a failure of lazy imports if it does)."""


def write_input(path: Path, rows: int = ROWS) -> Path:
    """A narrow CSV (ts, device, metric, value): two devices, one reading a second."""
    lines = ["ts,device,metric,value"]
    lines += [
        f"2024-01-01T00:00:{i:02d}Z,dev-{i % 2:03d},temperature,{20 + i * 0.5}" for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def config(src: Path, lake: Path) -> dict[str, Any]:
    """The smallest useful pipeline: replay → 1-min window → local lake, no telemetry."""
    return {
        "device": "bench",
        "telemetry": {"enabled": False},
        "sources": [
            {
                "name": "replay",
                "type": "replay",
                "path": str(src),
                "device_column": "device",
                "speed": "max",
            }
        ],
        "transforms": [{"type": "window", "every": "1m", "aggs": ["mean", "min", "max", "count"]}],
        "sinks": [{"name": "lake", "type": "lake", "path": str(lake)}],
    }


def _lake_readings(root: Path) -> int:
    import polars as pl

    if not any(root.rglob("*.parquet")):
        return 0
    return int(
        pl.scan_parquet(root, hive_partitioning=True).select(pl.col("count").sum()).collect().item()
    )


def once_cmd(cfg: Path, data: Path) -> list[str]:
    return collector_cmd(cfg, "--once", "--data-dir", str(data), "--log-level", "warning")


def help_cmd() -> list[str]:
    return [sys.executable, "-m", "collector", "--help"]


def _stats(runs: list[ProcResult]) -> dict[str, Any]:
    walls = [r.wall_s for r in runs]
    return {
        "runs": len(runs),
        "median_wall_s": round(statistics.median(walls), 3),
        "min_wall_s": round(min(walls), 3),
        "max_wall_s": round(max(walls), 3),
        "all_wall_s": [round(w, 3) for w in walls],
        "median_cpu_s": round(statistics.median(r.cpu_s for r in runs), 3),
        "peak_rss_mb": round(max(r.peak_rss_mb for r in runs), 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="timed runs of each command (default 7)")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        src = write_input(work / "readings.csv")
        once: list[ProcResult] = []
        for i in range(args.runs):
            lake = work / f"lake-{i}"
            cfg = write_yaml(work / f"startup-{i}.yaml", config(src, lake))
            res = run_measured(once_cmd(cfg, work / f"data-{i}"), cwd=work)
            check_ok(res, "collector run --once")
            got = _lake_readings(lake)
            if got != ROWS:
                raise SystemExit(f"run {i}: the lake holds {got} readings, expected {ROWS}")
            once.append(res)
        helps: list[ProcResult] = []
        for _ in range(args.runs):
            res = run_measured(help_cmd(), cwd=work)
            check_ok(res, "collector --help")
            helps.append(res)
        floors = {
            "python_wall_s": [sys.executable, "-c", "pass"],
            "import_polars_wall_s": [sys.executable, "-c", "import polars"],
        }
        context: dict[str, float] = {}
        for key, cmd in floors.items():
            walls = []
            for _ in range(args.runs):
                res = run_measured(cmd, cwd=work)
                check_ok(res, " ".join(cmd[1:]))
                walls.append(res.wall_s)
            context[key] = round(statistics.median(walls), 3)
        cfg = write_yaml(work / "startup-trace.yaml", config(src, work / "lake-trace"))
        once_trace = trace_imports(once_cmd(cfg, work / "data-trace"), cwd=work)
        help_trace = trace_imports(help_cmd(), cwd=work)
        if once_trace.returncode != 0:
            raise SystemExit(f"collector run --once under -X importtime: {once_trace.returncode}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    heavy = once_trace.heavy()
    forbidden = sorted(set(heavy) & set(MUST_NOT_IMPORT))
    o, h = _stats(once), _stats(helps)
    result: dict[str, Any] = {
        "rows": ROWS,
        "once": {
            **o,
            "heavy_modules_loaded": heavy,
            "modules_loaded": len(once_trace.modules),
            "slowest_imports_ms": dict(once_trace.slowest(6)),
        },
        "help": {
            **h,
            "heavy_modules_loaded": help_trace.heavy(),
            "imports_polars": "polars" in {m.split(".", 1)[0] for m in help_trace.modules},
            "polars_imported_by": help_trace.first_importer("polars"),
            "modules_loaded": len(help_trace.modules),
            "slowest_imports_ms": dict(help_trace.slowest(4)),
        },
        "context": context,
        "must_not_import": list(MUST_NOT_IMPORT),
        "forbidden_loaded": forbidden,
        "targets": {"once_wall_s": TARGET_ONCE_S, "help_wall_s": TARGET_HELP_S},
        "met": {
            "once": o["median_wall_s"] <= TARGET_ONCE_S,
            "help": h["median_wall_s"] <= TARGET_HELP_S,
            "no_pyarrow": not forbidden,
        },
    }
    write_json("startup", result)
    slow = ", ".join(f"{k} {v:g} ms" for k, v in result["once"]["slowest_imports_ms"].items())
    table(
        f"Start-up: `collector run --once` on a {ROWS}-row CSV (replay → window → lake), "
        f"`collector --help`; {args.runs} runs each",
        ["measure", "value", "target"],
        [
            (
                "run --once wall, median (min)",
                f"{o['median_wall_s']:.3f} s ({o['min_wall_s']:.3f} s)",
                f"≤ {TARGET_ONCE_S} s",
            ),
            ("run --once CPU, median", f"{o['median_cpu_s']:.3f} s", ""),
            ("run --once peak RSS", f"{o['peak_rss_mb']:.0f} MB", ""),
            (
                "--help wall, median (min)",
                f"{h['median_wall_s']:.3f} s ({h['min_wall_s']:.3f} s)",
                f"≤ {TARGET_HELP_S} s",
            ),
            (
                "--help imports polars",
                f"yes, through {result['help']['polars_imported_by']}"
                if result["help"]["imports_polars"]
                else "no",
                "no",
            ),
            ("`python -c pass`, median", f"{context['python_wall_s']:.3f} s", ""),
            ("`import polars`, median", f"{context['import_polars_wall_s']:.3f} s", ""),
            ("heavy optional modules imported by --once", ", ".join(heavy) or "none", "no pyarrow"),
            ("slowest imports of --once (cumulative)", slow, ""),
        ],
    )
    if forbidden:
        print(f"!! the run imported {', '.join(forbidden)}, which this config does not need")
    return result


if __name__ == "__main__":
    main()
