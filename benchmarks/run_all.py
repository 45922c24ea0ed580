"""Run every benchmark in one go and rewrite the README's table from their JSON (`make bench`).

Each benchmark runs in its own interpreter (so one's memory never inflates the next one's
figures) and writes ``benchmarks/out/<name>.json``; the README table between
``<!-- bench:start -->`` and ``<!-- bench:end -->`` is rebuilt from those files, machine
included. ``--only``/``--skip`` re-run a subset; the others keep their last JSON (its date is in
the table). Without the markers in README.md the table is printed instead.

    python -m benchmarks.run_all [--quick] [--only throughput,footprint] [--no-readme]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import OUT, ROOT, env, machine_line

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
ORDER = ("throughput", "footprint", "economics", "recovery", "dashboard", "anomaly")
FULL: dict[str, list[str]] = {
    "throughput": ["--rows", "10000000", "--repeat", "3"],
    "footprint": ["--seconds", "60"],
    "economics": [],
    "recovery": ["--size", "1GB"],
    "dashboard": [],
    "anomaly": [],
}
QUICK: dict[str, list[str]] = {
    "throughput": ["--rows", "1000000"],
    "footprint": ["--seconds", "20"],
    "economics": [],
    "recovery": ["--size", "100MB"],
    "dashboard": ["--days", "3", "--repeat", "2"],
    "anomaly": [],
}
MODULES = {"dashboard": "benchmarks.dashboard_bench"}


def run(name: str, args: list[str]) -> float:
    module = MODULES.get(name, f"benchmarks.{name}")
    if not (ROOT / (module.replace(".", "/") + ".py")).exists():
        print(f"-- {name}: {module} not found, skipped")
        return 0.0
    print(f"== {name}: python -m {module} {' '.join(args)}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env())
    if proc.returncode != 0:
        print(f"!! {name} failed with exit code {proc.returncode}", file=sys.stderr)
    return time.perf_counter() - t


def load(name: str) -> dict[str, Any] | None:
    path = OUT / f"{name}.json"
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except json.JSONDecodeError:
        return None


def _m(doc: dict[str, Any]) -> str:
    m = doc.get("machine") or {}
    return f"{m.get('cores', '?')} cores, {m.get('ram_gb', '?')} GB"


def _x(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}x" if v >= 100 else f"{v:.1f}x".replace(".0x", "x")


def _k(x: float) -> str:
    return f"{x / 1e6:.2f} M" if x >= 1e6 else f"{x / 1e3:.0f} k"


def rows_throughput(d: dict[str, Any]) -> list[list[str]]:
    c, b = d["collector"], d["baseline"]
    return [
        [
            f"Throughput: replay of {d['rows'] / 1e6:g} M narrow rows ({d['devices']} devices) → "
            "filter → 1-min window → Parquet lake, `collector run --once` end to end",
            f"{_k(c['rows_per_s'])} rows/s ({c['wall_s']:.1f} s, "
            f"peak RSS {c['peak_rss_mb']:.0f} MB) = **{d['ratio']:.2f}x** the baseline",
            f"plain Polars script: {_k(b['rows_per_s'])} rows/s ({b['wall_s']:.1f} s)",
            "≥ 0.7x",
            _m(d),
        ]
    ]


def rows_footprint(d: dict[str, Any]) -> list[list[str]]:
    c = d["collector"]
    steady = d.get("steady_cpu_pct_of_one_core")
    cpu = f"{d['cpu_pct_of_one_core']:.2f} % of one core over the run"
    if steady is not None:
        cpu = f"{steady:.2f} % steady, {cpu} (startup included)"
    return [
        [
            f"Footprint: {d['devices']} simulated sensors at 1 Hz → 1-min window → lake, "
            f"{d['seconds']:g} s",
            f"peak RSS **{c['peak_rss_mb']:.0f} MB**; CPU **{cpu}**",
            f"`import collector.cli`: {d['import_cli_rss_mb']:.0f} MB; optional heavy modules "
            f"loaded: {', '.join(d['heavy_modules_loaded']) or 'none'}",
            "≤ 150 MB, ≤ 2 %",
            _m(d),
        ]
    ]


ECONOMICS_DESIGNS = (
    "firehose, 1-min aggregates packed",
    "firehose, 1-min aggregates + gzip",
    "firehose, 1-min aggregates + gzip, 15-min batches",
    "s3 lake, 1-min aggregates (Parquet)",
)
MQTT_DESIGNS = (
    "mqtt to IoT Core, raw readings packed",
    "mqtt to IoT Core, 1-min aggregates packed",
)


def rows_economics(d: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, sc in d["scenarios"].items():
        base = sc["per_reading"]
        for design in ECONOMICS_DESIGNS:
            x = sc["designs"].get(design)
            if x is None:
                continue
            default = sc["designs"].get("firehose, 1-min aggregates + gzip") or {}
            if "15-min" in design and (default.get("fewer_calls_x") or 0) >= 100:
                continue  # the default batch age already clears the target here
            billable = (
                f"**{_x(x['fewer_billable_x'])}** fewer billable bytes, "
                if x.get("fewer_billable_x")
                else ""
            )
            out.append(
                [
                    f"Economics, {name}: {design}",
                    f"{billable}**{_x(x['fewer_calls_x'])}** fewer calls, "
                    f"**{_x(x['fewer_bytes_x'])}** fewer bytes ({x['calls']:,} calls, "
                    f"{x['payload_bytes'] / 1e3:,.0f} kB, "
                    f"{x['s3_puts']:,} S3 PUTs)",
                    f"one JSON publish per reading: {base['calls']:,} calls, "
                    f"{base['payload_bytes'] / 1e3:,.0f} kB, "
                    f"{base['billable_bytes'] / 1e6:,.1f} MB billable",
                    "≥ 50x billable, ≥ 100x calls, ≥ 10x bytes",
                    _m(d),
                ]
            )
    return out


def rows_mqtt(d: dict[str, Any]) -> list[list[str]]:
    """IoT Core meters messages in 5 KB units: packed messages against one per reading."""
    out = []
    for name, sc in d["scenarios"].items():
        readings = sc["per_reading"]["calls"]
        for design in MQTT_DESIGNS:
            x = sc["designs"].get(design)
            if x is None:
                continue
            units = x["iot_metered_units"]
            out.append(
                [
                    f"Economics, {name}: {design} (sink defaults)",
                    f"**{_x(readings / units)}** fewer metered 5 KB units, "
                    f"**{_x(readings / x['calls'])}** fewer messages ({x['calls']:,} messages, "
                    f"{units:,} units, {x['payload_bytes'] / 1e3:,.0f} kB)",
                    f"one publish per reading: {readings:,} messages, {readings:,} metered units",
                    "",
                    _m(d),
                ]
            )
    return out


def rows_recovery(d: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"Recovery: {d['spool_bytes'] / 1e9:.2f} GB spool backlog ({d['spool_files']:,} files) "
            "drained to S3 (moto server on the same machine)",
            f"**{d['mb_per_s']:.1f} MB/s** end to end ({d['drain']['wall_s']:.0f} s), "
            f"{d['net_mb_per_s']:.1f} MB/s net of the {d['fixed_cost']['wall_s']:.1f} s fixed cost",
            "",
            "",
            _m(d),
        ]
    ]


def rows_dashboard(d: dict[str, Any]) -> list[list[str]]:
    out = []
    for view, v in (d.get("views") or {}).items():
        total = (v.get("median_s") or {}).get("total")
        if total is None:
            continue
        out.append(
            [
                f"Dashboard page load, {view} view ({d.get('devices')} devices, {v.get('files')} "
                f"files, {v.get('rows', 0):,} rows)",
                f"**{total:.2f} s** median",
                "",
                "",
                _m(d),
            ]
        )
    return out


def rows_anomaly(d: dict[str, Any]) -> list[list[str]]:
    out = []
    for name, ds in (d.get("datasets") or {}).items():
        m = ds["methods"]
        z, r = m["zscore"], m["robust"]
        fewer = z["false_alarms_per_10k"] / max(r["false_alarms_per_10k"], 1e-9)
        others = "; ".join(
            f"{k}: {v['found']}/{v['windows']}, {v['false_alarms_per_10k']:g}" for k, v in m.items()
            if k != "robust"
        )
        out.append([
            f"Anomaly detector, {name} ({ds['series']} series, {ds['readings']:,} readings, "
            "injected anomalies): windows found, false-alarm events per 10k readings",
            f"robust (default): **{r['found']}/{r['windows']}** windows, "
            f"**{r['false_alarms_per_10k']:g}** false alarms = {fewer:.1f}x fewer than zscore",
            others,
            "≥ zscore's windows, 20x fewer false alarms",
            _m(d),
        ])
    return out


BUILDERS = {
    "throughput": rows_throughput,
    "footprint": rows_footprint,
    "economics": lambda d: rows_economics(d) + rows_mqtt(d),
    "recovery": rows_recovery,
    "dashboard": rows_dashboard,
    "anomaly": rows_anomaly,
}


def notes() -> list[str]:
    """What a reader needs to read the figures right; only for benchmarks that have JSON."""
    out: list[str] = []
    t = load("throughput")
    if t and t.get("ratio", 1) < t.get("target_ratio", 0.7):
        out.append(
            f"- **Throughput is {t['ratio']:.2f}x the plain Polars script, short of 0.7x.** "
            "The script is one fused, multi-threaded streaming query with no guarantees. The "
            "collector does work it does not: every reading is appended to the fsynced device "
            "log before any processing (nothing is lost on a crash), read back and run through "
            "the transforms in 200,000-row event-time micro-batches (windows with watermark and "
            "lateness, checkpoints), then spooled and written as fsynced, atomically renamed "
            "files. After profiling (py-spy), the log is zstd-compressed, time-ordered "
            "input skips the window's late-row checks and sorts, and replay hands on "
            "200,000-row chunks, which more than doubled the ratio (it was 0.12x). What remains "
            "is the window aggregation itself, the fsynced log (encode, write, fsync, read, "
            "decode), per-batch conversions and start-up; 0.7x would need a replay that logs "
            "file offsets instead of rows, which gives up the per-row log."
        )
    f = load("footprint")
    if f:
        anon = f.get("collector", {}).get("peak_anon_mb")
        private = f" (private memory {anon:.0f} MB)" if anon else ""
        out.append(
            f"- Footprint: most of the RSS{private} is the shared libraries of Polars and "
            "PyArrow, mapped once whatever the load; numpy is imported by PyArrow itself. "
            "Cloud SDKs, serial/Modbus/MQTT clients, scikit-learn and ONNX load only when a "
            "config uses them, sqlglot (8 MB) only when it has SQL (`where:`, `derive`, `sql`), "
            "and prometheus_client (3 MB) at the first scrape of `/metrics`, which this run "
            "does not make. CPU seconds of the same code vary between runs on this VM: from "
            "1.1 % to about 4 % of one core steady (lower when other processes keep the cores "
            "busy), so the 2 % target is met in some runs and missed in others."
        )
    if load("economics"):
        out.append(
            "- Economics: calls count the device's own requests (IoT Core publishes for the "
            "per-reading design); the talk's IoT rule then makes as many Firehose `PutRecord` "
            "calls again, which doubles the real gap. A slow sensor (the demo: 12 readings a "
            "minute) gives 5-6 one-minute aggregates per default 5-minute batch, so calls and "
            "records are bounded by the number of batches: `batch.max_age: 15m` (Firehose's "
            "own longest buffer) clears 100x. Firehose writes its S3 objects per buffer "
            "interval in both designs."
        )
        out.append(
            "- MQTT: IoT Core meters each message in 5 KB units, so a packed message of ~125 KB "
            "counts 25; at the sink's default 1-minute batches the demo's batch holds 12 "
            "readings, one message each (`batch.max_age: 5m` gives 60x messages, 20x units). "
            "Raw packed payloads are larger than one bare reading each because every line "
            "carries `record_id`. Basic Ingest topics remove the messaging charge altogether."
        )
    if load("recovery"):
        out.append(
            "- Recovery: the moto server runs on the same cores as the collector, so the rate "
            "is a lower bound of what the collector sustains against real S3."
        )
    if load("anomaly"):
        out.append(
            "- Anomaly detector (`python -m benchmarks.anomaly`, procedure in its docstring): "
            "**the 20x target is not reached.** At its defaults `robust` raises 2.6x "
            "(generated) to 5.4x (air quality) fewer false-alarm events than `zscore`, finds "
            "more windows on the real air-quality series (28 vs 24 of 72) and 2 fewer on the "
            "generated ones (24 vs 26 of 30); most of its remaining false alarms are single "
            "readings in heavy-tailed noise. `min_duration: 2` cuts them to 7.9 and 3.3 per 10k "
            "(14x and 12x fewer) at the cost of windows (17/30, 12/72): lone spikes no longer "
            "alarm unless they score above `spike_threshold`. On the simulated case `robust` "
            "has recall 0.98 and FPR ≤ 0.2 % on all three metrics (zscore: 0.70 on the random "
            "walk)."
        )
    return out


def markdown() -> str:
    lines = [
        "| Benchmark | Collector | Baseline / context (same run) | Target | Machine |",
        "| --- | --- | --- | --- | --- |",
    ]
    dates: list[str] = []
    machine = None
    for name in ORDER:
        doc = load(name)
        if doc is None:
            continue
        try:
            rows = BUILDERS[name](doc)
        except (KeyError, TypeError, ValueError) as exc:
            print(f"!! {name}.json is not in the expected shape ({exc}); left out")
            continue
        machine = machine or doc.get("machine")
        dates.append(str(doc.get("at") or doc.get("when") or "?")[:10])
        for r in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    when = ", ".join(sorted(set(dates))) or "never"
    head = (
        f"Measured by `make bench` ({when}) on {machine_line(machine) if machine else '?'}. "
        "Each figure and its baseline come from the same run; raw numbers in "
        "`benchmarks/out/*.json`."
    )
    extra = notes()
    return "\n".join([head, "", *lines, *(["", *extra] if extra else [])])


def rewrite_readme(table_md: str, readme: Path) -> bool:
    text = readme.read_text() if readme.exists() else ""
    if START not in text or END not in text:
        return False
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    new = pattern.sub(lambda _: f"{START}\n{table_md}\n{END}", text, count=1)
    readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a couple of minutes)")
    ap.add_argument("--only", default="", help="comma-separated subset to run")
    ap.add_argument("--skip", default="", help="comma-separated benchmarks not to run")
    ap.add_argument("--no-readme", action="store_true", help="print the table only")
    args = ap.parse_args(argv)
    only = {x for x in args.only.split(",") if x}
    skip = {x for x in args.skip.split(",") if x}
    unknown = (only | skip) - set(ORDER)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))} (have {', '.join(ORDER)})")
    sizes = QUICK if args.quick else FULL
    spent = {}
    for name in ORDER:
        if (only and name not in only) or name in skip:
            continue
        spent[name] = run(name, sizes[name])
    print("time per benchmark: " + ", ".join(f"{k} {v:.0f}s" for k, v in spent.items()))
    table_md = markdown()
    readme = ROOT / "README.md"
    if not args.no_readme and rewrite_readme(table_md, readme):
        print(f"README.md table rewritten ({START} … {END})")
    else:
        if not args.no_readme:
            print(f"README.md has no {START} / {END} markers: table printed, README untouched")
        print(table_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
