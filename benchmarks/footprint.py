"""How little the collector costs on a small device: 100 sensors at 1 Hz into the lake for 60 s.

``collector run CFG --for 60s`` in a subprocess (simulated source, 100 devices x 1 metric every
second, 1-min window, local lake, telemetry on): peak RSS (the kernel's ``VmHWM``) and CPU
seconds (``wait4``) of the collector process. CPU is reported twice: over the whole run
(startup included) and over the steady state (from 10 s after start to the end), each as a
percentage of one core.

The floor is measured too: a plain Polars script doing the same work without an agent (each
second's readings built as a frame, appended to a zstd Arrow IPC file and read back, as the
device log does; every minute grouped into 1-min windows and written as zstd Parquet). What
the collector needs beyond that figure is its own.

Lazy imports are shown by two smaller figures: the RSS after ``import collector.cli`` alone,
and after loading this config and building the runtime, with the heavy optional libraries that
got imported on the way (there should be none).

    python -m benchmarks.footprint [--seconds 60] [--devices 100]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._common import (
    check_ok,
    collector_cmd,
    probe,
    run_measured,
    table,
    write_json,
    write_yaml,
)

TARGET_RSS_MB = 80
TARGET_CPU_PCT = 1.0
"""Issue 19's targets: below Bytewax on both, half the memory of the pre-Polars-only runtime."""
STEADY_AFTER_S = 10.0


def config(data_dir: Path, devices: int) -> dict[str, Any]:
    return {
        "device": "edge",
        "data_dir": str(data_dir),
        "telemetry": {"enabled": True, "port": 0},
        "sources": [
            {
                "name": "sensors",
                "type": "simulated",
                "every": "1s",
                "seed": 1,
                "devices": devices,
                "metrics": {"temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"}},
            }
        ],
        "transforms": [{"type": "window", "every": "1m", "aggs": ["mean", "min", "max", "count"]}],
        "sinks": [{"name": "lake", "type": "lake", "path": str(data_dir / "lake")}],
    }


_PLAIN = """
import io, sys
import polars as pl
seconds, devices, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
names = [f"sensor-{i:03d}" for i in range(devices)]
held = []
with open(out + "/log.arrows", "ab") as log:
    for sec in range(seconds):
        df = pl.DataFrame(
            {"ts": [sec * 1_000_000] * devices, "device": names,
             "metric": ["temperature"] * devices, "value": [float(i) for i in range(devices)]}
        ).with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))
        buf = io.BytesIO()
        df.write_ipc_stream(buf, compression="zstd")
        log.write(buf.getvalue())
        held.append(pl.read_ipc_stream(buf.getvalue()))
        if sec % 60 == 59 or sec == seconds - 1:
            v = pl.col("value")
            pl.concat(held).group_by(pl.col("ts").dt.truncate("1m"), "device", "metric").agg(
                v.mean().alias("mean"), v.min().alias("min"), v.max().alias("max"),
                v.count().alias("count"),
            ).write_parquet(f"{out}/{sec}.parquet", compression="zstd")
            held = []
"""
"""Polars alone, doing W2's work at full speed (peak RSS does not depend on the pace)."""


def _plain_polars(seconds: float, devices: int, work: Path) -> Any:
    out = work / "plain"
    out.mkdir()
    cmd = [sys.executable, "-c", _PLAIN, str(max(60, int(seconds))), str(devices), str(out)]
    res = run_measured(cmd, cwd=work)
    check_ok(res, "plain Polars script")
    return res


RUNTIME_DEPS = (
    "pydantic",
    "asyncio",
    "yaml",
    "click",
    "apscheduler.schedulers.asyncio",
    "http.server",
)
"""What the collector's runtime imports besides Polars for this config, nothing run: config
models, the event loop, YAML, the CLI, the scheduler, and the telemetry endpoint."""


def _cpu_at(pid: int, delay: float, out: dict[str, float]) -> None:
    """CPU seconds and time of the child ``delay`` s after start: the steady state's origin."""
    import psutil

    time.sleep(delay)
    try:
        c = psutil.Process(pid).cpu_times()
        out["cpu"] = c.user + c.system
        out["at"] = time.perf_counter()
    except psutil.Error:
        pass


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--devices", type=int, default=100)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-footprint-"))
    try:
        cfg = write_yaml(work / "footprint.yaml", config(work / "data", args.devices))
        light = probe("cli")
        built = probe("runtime", str(cfg), str(work / "probe"))
        mark: dict[str, float] = {}
        started = time.perf_counter()

        def on_start(pid: int) -> None:
            threading.Thread(target=_cpu_at, args=(pid, STEADY_AFTER_S, mark), daemon=True).start()

        res = run_measured(
            collector_cmd(cfg, "--for", f"{args.seconds:g}s", "--log-level", "warning"),
            cwd=work,
            sample_every=1.0,
            on_start=on_start,
        )
        check_ok(res, "collector run")
        ended = started + res.wall_s
        steady_pct = None
        if mark:
            steady_pct = 100 * (res.cpu_s - mark["cpu"]) / (ended - mark["at"])
        lake = list((work / "data" / "lake").rglob("*.parquet"))
        readings = _lake_readings(work / "data" / "lake")
        plain = _plain_polars(args.seconds, args.devices, work)
        polars_mb = probe("imports", "polars")["imports_mb"]
        deps_mb = probe("imports", "polars", *RUNTIME_DEPS)["imports_mb"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    whole_pct = 100 * res.cpu_s / res.wall_s
    result = {
        "devices": args.devices,
        "hz": 1,
        "metrics": 1,
        "seconds": args.seconds,
        "collector": res.as_dict(),
        "cpu_pct_of_one_core": round(whole_pct, 2),
        "steady_cpu_pct_of_one_core": None if steady_pct is None else round(steady_pct, 2),
        "steady_from_s": STEADY_AFTER_S,
        "lake_files": len(lake),
        "lake_readings": readings,
        "plain_polars_peak_rss_mb": round(plain.peak_rss_mb, 1),
        "plain_polars_peak_anon_mb": round(plain.peak_anon_mb, 1),
        "import_polars_rss_mb": round(polars_mb, 1),
        "import_runtime_deps_rss_mb": round(deps_mb, 1),
        "runtime_deps": list(RUNTIME_DEPS),
        "import_cli_rss_mb": round(light["import_cli_mb"], 1),
        "runtime_built_rss_mb": round(built["runtime_mb"], 1),
        "heavy_modules_loaded": built["heavy_loaded"],
        "targets": {"peak_rss_mb": TARGET_RSS_MB, "cpu_pct": TARGET_CPU_PCT},
    }
    result["collector"].pop("stderr_tail", None)
    write_json("footprint", result)
    table(
        f"Footprint: {args.devices} sensors at 1 Hz → 1-min window → lake, {args.seconds:g} s",
        ["measure", "value", "target"],
        [
            ("peak RSS (VmHWM)", f"{res.peak_rss_mb:.0f} MB", f"≤ {TARGET_RSS_MB} MB"),
            ("  of which private (RssAnon)", f"{res.peak_anon_mb:.0f} MB", ""),
            (
                "plain Polars, same work, no agent",
                f"{plain.peak_rss_mb:.0f} MB (private {plain.peak_anon_mb:.0f} MB)",
                "",
            ),
            (
                "CPU, whole run",
                f"{res.cpu_s:.2f} s = {whole_pct:.2f} % of one core",
                f"≤ {TARGET_CPU_PCT} %",
            ),
            (
                "CPU, steady state",
                "-" if steady_pct is None else f"{steady_pct:.2f} % of one core",
                f"≤ {TARGET_CPU_PCT} %",
            ),
            (
                "imports alone: polars; + the runtime's other libraries",
                f"{polars_mb:.0f} MB; {deps_mb:.0f} MB (+{deps_mb - polars_mb:.0f})",
                "",
            ),
            ("RSS after `import collector.cli`", f"{light['import_cli_mb']:.0f} MB", ""),
            ("RSS with config + runtime built", f"{built['runtime_mb']:.0f} MB", ""),
            ("heavy optional modules imported", ", ".join(built["heavy_loaded"]) or "none", ""),
            ("readings in the lake", f"{readings:,}", ""),
        ],
    )
    return result


def _lake_readings(root: Path) -> int:
    import polars as pl

    if not any(root.rglob("*.parquet")):
        return 0
    return int(
        pl.scan_parquet(root, hive_partitioning=True).select(pl.col("count").sum()).collect().item()
    )


if __name__ == "__main__":
    main()
