"""How much the collector can push: replay → filter → 1-min window → lake, vs plain Polars.

Both sides start from the same Parquet file of narrow rows (ts, device, metric, value; 100
devices, two metrics at 1 Hz, ~0.5 % impossible values for the filter to drop) and end with the
same Hive-partitioned, zstd Parquet aggregates on disk:

- **collector**: ``collector run CFG --once`` in a subprocess, end to end: startup, replay, the
  fsynced device log, filter, window, batcher, spool, lake sink;
- **baseline**: one Polars script in a subprocess (scan → filter → truncate + group_by →
  partitioned Parquet write): the practical limit of any Python agent on this machine;
- **baseline, reproducible**: the same script on Polars' eager API (read, then group_by),
  the way plain Polars gives the same aggregates on every run of the same file.

Rows/s = input rows / wall seconds of the process. The ratio collector/baseline is the figure;
both totals of ``count`` are compared so a fast wrong run cannot pass for a fast right one.
With ``--repeat`` > 1 each side's lakes are also compared between runs: the number of
aggregates whose ``mean`` differs from the first run's (float sums that depend on how the
engine split the work), since the collector promises the same output however it batched.

    python -m benchmarks.throughput [--rows 10000000] [--repeat 1] [--profile]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    OUT,
    check_ok,
    collector_cmd,
    run_measured,
    table,
    write_json,
    write_yaml,
)

DEVICES = 100
METRICS = ("temperature", "humidity")
START_US = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
WHERE = "value BETWEEN -40 AND 85"
SEED = 20240101


def input_path(rows: int) -> Path:
    return OUT / f"throughput-input-{rows}.parquet"


def generate(rows: int) -> Path:
    """The input file, generated once per size with a fixed seed and cached in benchmarks/out."""
    import numpy as np
    import polars as pl

    path = input_path(rows)
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    per_tick = DEVICES * len(METRICS)
    i = np.arange(rows, dtype=np.int64)
    tick = i // per_tick
    device = (i // len(METRICS)) % DEVICES
    metric = i % len(METRICS)
    base = np.where(metric == 0, 15.0, 30.0)
    spread = np.where(metric == 0, 15.0, 40.0)
    value = base + rng.random(rows) * spread
    value[rng.random(rows) < 0.005] = 999.0  # a broken sensor: the filter's job
    names = pl.Series([f"dev-{d:03d}" for d in range(DEVICES)])
    df = pl.DataFrame(
        {
            "ts": pl.Series(START_US + tick * 1_000_000).cast(pl.Datetime("us", "UTC")),
            "device": names.gather(pl.Series(device)),
            "metric": pl.Series(list(METRICS)).gather(pl.Series(metric)),
            "value": value,
        }
    )
    tmp = path.with_suffix(".tmp")
    df.write_parquet(tmp, compression="zstd", row_group_size=1_000_000)
    tmp.replace(path)
    return path


def collector_config(src: Path, lake: Path, chunk_rows: int | None) -> dict[str, Any]:
    replay: dict[str, Any] = {
        "name": "replay",
        "type": "replay",
        "path": str(src),
        "device_column": "device",
        "speed": "max",
    }
    if chunk_rows:
        replay["chunk_rows"] = chunk_rows
    return {
        "device": "bench",
        "telemetry": {"enabled": False},
        "sources": [replay],
        "transforms": [
            {"type": "filter", "where": WHERE},
            {"type": "window", "every": "1m", "aggs": ["mean", "min", "max", "count"]},
        ],
        "sinks": [
            {
                "name": "lake",
                "type": "lake",
                "path": str(lake),
                "batch": {"max_rows": 1_000_000, "max_bytes": "256MiB", "max_age": "1h"},
            }
        ],
    }


SIDES = ("baseline", "baseline_eager", "collector")


def baseline(src: str, dest: str, eager: bool = False) -> None:
    """The same reads, filter, aggregation and partitioned zstd Parquet write, in one process.

    ``eager``: read the file, then group, with no query engine over the scan: each group's
    float sum then follows row order, and every run gives the same aggregates.
    """
    import polars as pl

    frame: Any = pl.read_parquet(src) if eager else pl.scan_parquet(src)
    out = (
        frame.filter(pl.col("value").is_between(-40, 85))
        .group_by(pl.col("ts").dt.truncate("1m"), "device", "metric")
        .agg(
            pl.col("value").mean().alias("mean"),
            pl.col("value").min().alias("min"),
            pl.col("value").max().alias("max"),
            pl.col("value").count().cast(pl.Int64).alias("count"),
        )
        .with_columns(
            pl.lit("replay").alias("source"), pl.col("ts").dt.strftime("%Y-%m-%d").alias("date")
        )
    )
    if not eager:
        out = out.collect()
    out.write_parquet(dest, partition_by=["metric", "date"], compression="zstd", mkdir=True)


def lake_summary(root: Path) -> dict[str, Any]:
    """Aggregate rows, the sum of `count` (readings that passed the filter) and file count."""
    import polars as pl

    files = sorted(root.rglob("*.parquet"))
    if not files:
        return {"files": 0, "rows": 0, "readings": 0}
    df = (
        pl.scan_parquet(root, hive_partitioning=True)
        .select(pl.len().alias("rows"), pl.col("count").sum().alias("readings"))
        .collect()
    )
    return {"files": len(files), "rows": int(df["rows"][0]), "readings": int(df["readings"][0])}


def lake_means(root: Path) -> Any:
    """Each aggregate's ``mean`` in key order, to compare one run's lake with another's."""
    import polars as pl

    key = ["ts", "device", "metric"]
    return pl.scan_parquet(root, hive_partitioning=True).select(*key, "mean").collect().sort(key)


def differing_means(lakes: list[Any]) -> int | None:
    """Aggregates whose ``mean`` differs (bitwise) between the first run and any later one."""
    if len(lakes) < 2:
        return None
    first = lakes[0]
    worst = 0
    for other in lakes[1:]:
        if not other.drop("mean").equals(first.drop("mean")):
            raise SystemExit("two runs of one side wrote different windows")
        worst = max(worst, int((other.get_column("mean") != first.get_column("mean")).sum()))
    return worst


def expected_readings(src: Path) -> int:
    import polars as pl

    return int(
        pl.scan_parquet(src)
        .filter(pl.col("value").is_between(-40, 85))
        .select(pl.len())
        .collect()
        .item()
    )


def run_collector(
    src: Path, work: Path, chunk_rows: int | None, wrap: list[str] | None = None
) -> tuple[Any, Path]:
    lake = work / "lake"
    cfg = write_yaml(work / "throughput.yaml", collector_config(src, lake, chunk_rows))
    cmd = collector_cmd(cfg, "--once", "--data-dir", str(work / "data"), "--log-level", "warning")
    res = run_measured([*(wrap or []), *cmd], cwd=work)
    check_ok(res, "collector run")
    return res, lake


def run_baseline(src: Path, work: Path, eager: bool) -> tuple[Any, Path]:
    lake = work / "baseline"
    flag = "--_baseline_eager" if eager else "--_baseline"
    res = run_measured(
        [sys.executable, "-m", "benchmarks.throughput", flag, str(src), str(lake)], cwd=work
    )
    check_ok(res, "baseline")
    return res, lake


def profile(src: Path, chunk_rows: int | None) -> Path | None:
    """py-spy samples of one collector run, every thread (raw collapsed stacks).

    py-spy and not pyinstrument: the work runs in the pipeline and source threads, which
    pyinstrument's command line does not sample. ``pip install py-spy`` if it is missing.
    """
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        print("py-spy not found (pip install py-spy): no profile taken")
        return None
    OUT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-prof-"))
    dest = OUT / "throughput-profile.txt"
    try:
        run_collector(
            src,
            work,
            chunk_rows,
            wrap=[pyspy, "record", "-r", "200", "--threads", "-f", "raw", "-o", str(dest), "--"],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"profile: {dest} (collapsed stacks; flamegraph.pl or speedscope read it)")
    return dest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="input rows (default 10M)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each side; the best is kept")
    ap.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="replay chunk_rows (default: the source's default)",
    )
    ap.add_argument("--profile", action="store_true", help="also profile one collector run")
    ap.add_argument("--_baseline", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_baseline_eager", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._baseline or args._baseline_eager:
        baseline(*(args._baseline or args._baseline_eager), eager=bool(args._baseline_eager))
        return {}

    t = time.perf_counter()
    src = generate(args.rows)
    gen_s = time.perf_counter() - t
    want = expected_readings(src)
    runs: dict[str, list[Any]] = {side: [] for side in SIDES}
    means: dict[str, list[Any]] = {side: [] for side in SIDES}
    summaries: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeat):
        for side in SIDES:
            work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
            try:
                if side == "collector":
                    res, lake = run_collector(src, work, args.chunk_rows)
                else:
                    res, lake = run_baseline(src, work, eager=side == "baseline_eager")
                summary = lake_summary(lake)
                means[side].append(lake_means(lake))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if summary["readings"] != want:
                raise SystemExit(
                    f"{side}: lake holds {summary['readings']} readings, expected {want}"
                )
            runs[side].append(res)
            summaries[side] = summary
    best = {side: min(rs, key=lambda r: r.wall_s) for side, rs in runs.items()}
    rate = {side: args.rows / r.wall_s for side, r in best.items()}
    ratio = rate["collector"] / rate["baseline"]
    result: dict[str, Any] = {
        "rows": args.rows,
        "devices": DEVICES,
        "metrics": list(METRICS),
        "filter": WHERE,
        "input_bytes": src.stat().st_size,
        "generate_s": round(gen_s, 1),
        "readings_after_filter": want,
        "chunk_rows": args.chunk_rows,
        **{
            side: {
                **best[side].as_dict(),
                "rows_per_s": round(rate[side]),
                "lake": summaries[side],
                "all_wall_s": [round(r.wall_s, 2) for r in runs[side]],
                "runs": len(runs[side]),
                "means_differing_between_runs": differing_means(means[side]),
            }
            for side in SIDES
        },
        "ratio": round(ratio, 3),
        "ratio_to_reproducible": round(rate["collector"] / rate["baseline_eager"], 3),
        "target_ratio": 0.7,
    }
    for side in SIDES:
        result[side].pop("stderr_tail", None)
    if args.profile:
        prof = profile(src, args.chunk_rows)
        result["profile"] = str(prof) if prof else None
    write_json("throughput", result)
    rows = [
        (
            side.replace("_eager", ", reproducible"),
            f"{best[side].wall_s:.1f}",
            f"{rate[side]:,.0f}",
            f"{best[side].cpu_s:.1f}",
            f"{best[side].peak_rss_mb:.0f}",
            summaries[side]["rows"],
            str(result[side]["means_differing_between_runs"]),
        )
        for side in SIDES
    ]
    table(
        f"Throughput: {args.rows:,} rows → filter → 1-min window → Parquet lake",
        ["", "wall s", "rows/s", "CPU s", "peak RSS MB", "aggregate rows", "means ≠ run 1"],
        rows,
        caption=f"ratio collector/baseline = {ratio:.2f} (target ≥ 0.7); collector/reproducible "
        f"baseline = {result['ratio_to_reproducible']:.2f}",
    )
    return result


if __name__ == "__main__":
    main()
