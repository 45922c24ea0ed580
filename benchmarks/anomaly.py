"""The built-in anomaly detector on realistic series: windows found and false alarms per method.

Every method (``zscore``, ``ewma``, ``robust``) runs at its defaults through the real ``infer``
transform (``model: {kind: builtin, method: M}``), in micro-batches, on three data sets:

- **generated** (always runs; shipped-size, made here from a seed): 6 series x 4 weeks at
  5-minute steps. Each is ``level + drift + daily cycle (+ weekday effect) + noise``, with
  Student-t (3 d.o.f.) noise whose size grows with the daily load, 0-2 benign level steps of up
  to 2 noise sd, a slow drift of up to 4 sd over the 4 weeks; two series have no daily cycle.
  None of that is labelled: a detector should stay quiet through it.
- **air-quality** (when ``../shared/data/air-quality-uci.csv`` is there, else skipped with a
  message): 12 real hourly series of the UCI Air Quality set (9,357 readings each, a year;
  ``-200`` = missing, dropped as a ``filter`` would). Real faults in them are unlabelled, so
  they count as false alarms for every method alike.
- **simulated**: the ``simulated`` source with 1 % injected single-reading anomalies of 8 spreads,
  as in ``tests/transforms/test_infer_builtin.py``: per-reading recall and false-positive rate.

Injection procedure (generated and air-quality, seeded): per series, anomalies at random
positions after the first 10 % of the series, at least ``len / (k + 1) / 2`` readings apart,
their kind cycling through: **spike** (one reading, 8-12 sd), **burst** (6-24 readings offset by
5-8 sd), **shift** (a permanent offset of 6-10 sd: the series stays there, the detector must
adapt), **noise** (24-72 readings with 6x the noise), **ramp** (a drift up to 10 sd over 36-72
readings, then back: a failure and its repair). ``sd`` is the series' own noise: 1.4826 x the
MAD of its first differences / sqrt(2). Each anomaly's labelled window runs from 6 readings
before its start to 24 readings after its end (a shift's end is its start).

Scoring, per method: a window is **found** when a reading in it has ``prediction = 1``; a
**false-alarm event** is an ``alarm`` (an event's first reading; for zscore/ewma, the start of a
run of flagged readings) outside every window, reported per 10,000 scored readings. Besides the
defaults, ``robust`` runs at ``threshold`` 3 and 5 (its one sensitivity knob), with
``min_duration: 2`` and with ``incidents: false`` (one alarm per series event instead of per
device incident; every series of a data set is on one device, as the sensors of the air-quality
station are), and ``zscore`` with ``incidents: true``, so the share of the gain that comes from
counting a device incident once is visible for both. For ``robust`` the run also reports, per
injected spike, how many readings outside every window score at least as high: a spike many
ordinary readings outscore is inside its series' own noise tail, out of reach of any
per-reading detector at a low false-alarm rate.
On the generated set, where each series' true signal and noise sd are known, the same count is
made for an oracle that judges each reading by its distance from the true signal in true noise
sds (``spike_oracle``): the fewest false-alarm events any per-series threshold on that
distance must accept to find k of the spikes, a floor no detector that has to estimate signal
and noise from the readings gets under.

    python -m benchmarks.anomaly [--data ../shared/data/air-quality-uci.csv]
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks._common import ROOT, write_json

METHODS = ("zscore", "ewma", "robust")
VARIANTS: dict[str, dict[str, Any]] = {
    "zscore": {"method": "zscore"}, "ewma": {"method": "ewma"}, "robust": {"method": "robust"},
    "robust, threshold 3": {"method": "robust", "threshold": 3.0},
    "robust, threshold 5": {"method": "robust", "threshold": 5.0},
    "robust, min_duration 2": {"method": "robust", "min_duration": 2},
    "robust, incidents off": {"method": "robust", "incidents": False},
    "zscore, incidents on": {"method": "zscore", "incidents": True},
}
AIR_QUALITY = ROOT.parent / "shared" / "data" / "air-quality-uci.csv"
AIR_COLUMNS = ("CO_GT", "PT08_S1_CO", "C6H6_GT", "PT08_S2_NMHC", "NOx_GT", "PT08_S3_NOx",
               "NO2_GT", "PT08_S4_NO2", "PT08_S5_O3", "T", "RH", "AH")
KINDS = ("spike", "burst", "shift", "noise", "ramp")
PRE, POST = 6, 24
T0 = datetime(2024, 1, 1, tzinfo=UTC)
SIM = {
    "seed": 42, "every": "5s", "start": "2024-01-01T00:00:00Z", "devices": 2,
    "metrics": {
        "temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"},
        "pressure": {"kind": "walk", "start": 1000, "step": 0.5, "unit": "hPa"},
        "vibration": {"kind": "sine", "period": "60s", "amplitude": 1, "noise": 0.05},
    },
    "anomalies": {"rate": 0.01, "magnitude": 8}, "dropouts": {"rate": 0.01},
    "label_anomalies": True,
}


# -- data ------------------------------------------------------------------------------------


def _t3(rng: random.Random) -> float:
    """Student-t with 3 degrees of freedom, scaled to unit sd."""
    chi2 = sum(rng.gauss(0, 1) ** 2 for _ in range(3))
    return rng.gauss(0, 1) / math.sqrt(chi2 / 3) / math.sqrt(3)


def generated_series(index: int, n: int, rng: random.Random,
                     noise: list[tuple[float, float]] | None = None) -> list[float]:
    """One clean (unlabelled) series at 5-minute steps starting on a Monday 00:00 UTC.

    ``noise`` (if given) receives each reading's (standardised noise draw, noise sd): what an
    oracle knowing the series' signal and noise exactly would judge a reading by.
    """
    level = rng.uniform(10, 100)
    sd = level * rng.uniform(0.01, 0.05)
    daily = 0.0 if index % 3 == 2 else sd * rng.uniform(3, 10)
    weekday = daily * rng.uniform(0, 0.5)
    load_noise = rng.uniform(0, 1.5)
    drift = sd * rng.uniform(-4, 4)
    steps = sorted(rng.randrange(n // 10, n) for _ in range(rng.randint(0, 2)))
    step_size = [sd * rng.uniform(-2, 2) for _ in steps]
    out, offset = [], 0.0
    for i in range(n):
        hours = i / 12
        cycle = 0.5 - 0.5 * math.cos(2 * math.pi * ((hours - 3) % 24) / 24)  # 0 at 3h, 1 at 15h
        weekend = (i // 288) % 7 >= 5
        offset = sum(s for at, s in zip(steps, step_size, strict=True) if i >= at)
        value = (level + drift * i / n + offset + daily * cycle
                 - (weekday * cycle if weekend else 0.0))
        spread, draw = sd * (1 + load_noise * cycle), _t3(rng)
        value += spread * draw
        out.append(value)
        if noise is not None:
            noise.append((draw, spread))
    return out


def noise_sd(values: list[float]) -> float:
    """Robust noise estimate: 1.4826 x MAD of first differences / sqrt(2)."""
    diffs = sorted(abs(b - a) for a, b in itertools.pairwise(values))
    if not diffs:
        return 1.0
    return max(1.4826 * diffs[len(diffs) // 2] / math.sqrt(2), 1e-9)


def inject(values: list[float | None], k: int, rng: random.Random
           ) -> tuple[list[float | None], list[tuple[int, int, str]]]:
    """``k`` anomalies by the procedure in the module doc: (values, [(start, end, kind)])."""
    present = [v for v in values if v is not None]
    sd = noise_sd(present)
    n = len(values)
    gap = max(n // (k + 1) // 2, 100)
    starts: list[int] = []
    while len(starts) < k:
        at = rng.randrange(n // 10, n - 100)
        if all(abs(at - s) >= gap for s in starts):
            starts.append(at)
    starts.sort()
    out = list(values)
    labels = []
    for j, at in enumerate(starts):
        kind = KINDS[(j + rng.randrange(len(KINDS))) % len(KINDS)]
        sign = rng.choice((-1.0, 1.0))
        if kind == "spike":
            end = at
            changes = {at: sign * sd * rng.uniform(8, 12)}
        elif kind == "burst":
            end = at + rng.randint(6, 24) - 1
            size = sign * sd * rng.uniform(5, 8)
            changes = {i: size for i in range(at, end + 1)}
        elif kind == "shift":
            end = at
            size = sign * sd * rng.uniform(6, 10)
            changes = {i: size for i in range(at, n)}
        elif kind == "noise":
            end = at + rng.randint(24, 72) - 1
            changes = {i: sd * 6 * rng.gauss(0, 1) for i in range(at, end + 1)}
        else:
            length = rng.randint(36, 72)
            end = at + length - 1
            top = sign * sd * 10
            changes = {i: top * (i - at + 1) / length for i in range(at, end + 1)}
        for i, delta in changes.items():
            if i < n and out[i] is not None:
                out[i] = out[i] + delta  # type: ignore[operator]
        labels.append((at, min(end, n - 1), kind))
    return out, labels


def frame_of(series: dict[str, list[float | None]], step: timedelta, start: datetime
             ) -> pl.DataFrame:
    frames = [
        pl.DataFrame({
            "ts": [start + step * i for i in range(len(values))],
            "device": "bench", "source": "bench", "metric": name,
            "value": pl.Series(values, dtype=pl.Float64), "unit": None, "i": range(len(values)),
        })
        for name, values in series.items()
    ]
    return (pl.concat(frames).cast({"ts": pl.Datetime("us", "UTC"), "unit": pl.String})
            .sort("ts", "metric"))


def generated(seed: int, oracle: dict[str, list[float]] | None = None
              ) -> tuple[pl.DataFrame, dict[str, list[tuple[int, int, str]]]]:
    """The generated set; ``oracle`` (if given) receives per series each reading's distance
    from the series' true signal in units of its true noise sd (injected anomalies included)."""
    rng = random.Random(seed)
    series, labels = {}, {}
    for s in range(6):
        noise: list[tuple[float, float]] = []
        clean = generated_series(s, 4 * 7 * 288, rng, noise)
        name = f"gen{s}"
        series[name], labels[name] = inject(list(clean), 5, rng)
        if oracle is not None:
            oracle[name] = [abs(draw + (v - c) / spread)  # type: ignore[operator]
                            for v, c, (draw, spread) in zip(series[name], clean, noise,
                                                            strict=True)]
    return frame_of(series, timedelta(minutes=5), T0), labels


def oracle_spike_cost(oracle: dict[str, list[float]],
                      labels: dict[str, list[tuple[int, int, str]]], merge: int = 13
                      ) -> dict[str, Any]:
    """What finding the injected spikes costs a per-series detector that knows each series'
    true signal and noise sd exactly (no detector knows more about a lone reading).

    Per spike: the ordinary readings (outside every window) of its series at least as far from
    the signal, in noise sds, as the spike reading; any threshold on that distance flags all of
    them with it. They are counted as false-alarm events, readings less than ``merge`` apart
    counted as one (as robust's cool-down would). ``min_false_for`` gives, for k spikes, the
    fewest such events with the best threshold per series (the best k spikes to go for).
    """
    spikes: list[tuple[str, int]] = []
    for metric, windows in labels.items():
        spans = [(a - PRE, b + POST) for a, b, _ in windows]
        normal = [(i, x) for i, x in enumerate(oracle[metric])
                  if not any(lo <= i <= hi for lo, hi in spans)]
        for at, _, kind in windows:
            if kind == "spike":
                flagged = [i for i, x in normal if x >= oracle[metric][at]]
                events = sum(1 for j, i in enumerate(flagged)
                             if j == 0 or i - flagged[j - 1] >= merge)
                spikes.append((metric, events))
    best: dict[int, int] = {}
    for mask in range(1, 1 << len(spikes)):
        chosen = [spikes[j] for j in range(len(spikes)) if mask >> j & 1]
        per_series: dict[str, int] = {}
        for metric, cost in chosen:
            per_series[metric] = max(per_series.get(metric, 0), cost)
        k, total = len(chosen), sum(per_series.values())
        best[k] = min(best.get(k, total), total)
    return {"buried": sorted(c for _, c in spikes),
            "min_false_for": {str(k): best[k] for k in sorted(best)}}


def air_quality(path: Path, seed: int
                ) -> tuple[pl.DataFrame, dict[str, list[tuple[int, int, str]]]] | None:
    if not path.exists():
        return None
    raw = pl.read_csv(path, infer_schema_length=0)
    rng = random.Random(seed)
    series, labels = {}, {}
    for col in AIR_COLUMNS:
        values: list[float | None] = [
            None if v is None or float(v) == -200 else float(v) for v in raw[col].to_list()
        ]
        if sum(v is not None for v in values) < len(values) // 2:
            continue
        series[col], labels[col] = inject(values, 6, rng)
    start = datetime(2004, 3, 10, 18, tzinfo=UTC)
    df = frame_of(series, timedelta(hours=1), start).filter(pl.col("value").is_not_null())
    return df, labels


# -- evaluation ------------------------------------------------------------------------------


def run_method(df: pl.DataFrame, model: dict[str, Any], batch: int = 2000) -> pl.DataFrame:
    from collector.plugin import Context
    from collector.transforms.infer import InferConfig, InferTransform

    cfg = InferConfig.model_validate({"type": "infer", "model": {"kind": "builtin", **model}})
    t = InferTransform(cfg, Context(device="bench", component="infer", data_dir=Path(".")))
    return pl.concat([t.apply(df.slice(i, batch)) for i in range(0, df.height, batch)])


def score_windows(out: pl.DataFrame, labels: dict[str, list[tuple[int, int, str]]]
                  ) -> dict[str, Any]:
    found = total = false_alarms = scored = 0
    by_kind: dict[str, list[int]] = {}
    for metric, windows in labels.items():
        s = out.filter(pl.col("metric") == metric)
        scored += s.filter(pl.col("prediction").is_not_null()).height
        flagged = set(s.filter(pl.col("prediction") == 1.0)["i"].to_list())
        alarms = s.filter(pl.col("alarm").fill_null(False))["i"].to_list()
        spans = [(a - PRE, b + POST) for a, b, _ in windows]
        for (lo, hi), (_, _, kind) in zip(spans, windows, strict=True):
            hit = any(lo <= i <= hi for i in flagged)
            found += hit
            total += 1
            by_kind.setdefault(kind, [0, 0])
            by_kind[kind][0] += hit
            by_kind[kind][1] += 1
        false_alarms += sum(1 for i in alarms if not any(lo <= i <= hi for lo, hi in spans))
    return {
        "windows": total, "found": found, "false_alarms": false_alarms, "scored": scored,
        "false_alarms_per_10k": round(false_alarms / max(scored, 1) * 1e4, 2),
        "found_by_kind": {k: f"{v[0]}/{v[1]}" for k, v in sorted(by_kind.items())},
    }


def spikes_buried(out: pl.DataFrame, labels: dict[str, list[tuple[int, int, str]]]
                  ) -> list[int]:
    """Per injected spike: how many readings outside every window score at least as high.

    A spike that many ordinary readings of its own series outscore is inside that series' noise
    tail: no per-reading detector can flag it without flagging those readings too.
    """
    buried = []
    for metric, windows in labels.items():
        s = out.filter(pl.col("metric") == metric)
        spans = [(a - PRE, b + POST) for a, b, _ in windows]
        inside = pl.any_horizontal(
            [pl.col("i").is_between(lo, hi) for lo, hi in spans] or [pl.lit(False)]
        )
        normal = s.filter(~inside & pl.col("score").is_not_null())["score"]
        for at, _, kind in windows:
            hit = s.filter(pl.col("i") == at)["score"].to_list()
            if kind == "spike" and hit and hit[0] is not None:
                buried.append(int((normal >= hit[0]).sum()))
    return sorted(buried)


def simulated() -> dict[str, Any]:
    from collector.schema import normalize
    from collector.sources.simulated import SimulatedConfig, generate

    sim = SimulatedConfig.model_validate({"name": "sim", **SIM})
    cache: dict[tuple[int, str], tuple[int, float]] = {}
    rows = [r for tick in range(3000) for r in generate(sim, "d1", tick, T0, cache=cache)]
    df = normalize(rows, device="d1", source="sim", now=T0, tags=sim.tags)
    out: dict[str, Any] = {}
    for method in METHODS:
        extra = {"alpha": 0.5} if method == "ewma" else {}
        res = run_method(df, {"method": method, **extra}, batch=150)
        per = {}
        for metric in SIM["metrics"]:
            m = res.filter(pl.col("metric") == metric)
            flagged = pl.col("prediction").fill_null(0.0) == 1.0
            truth = pl.col("anomaly") == "1"
            pos, neg = m.filter(truth), m.filter(~truth)
            per[metric] = {
                "recall": round(pos.filter(flagged).height / pos.height, 3),
                "fpr": round(neg.filter(flagged).height / neg.height, 4),
            }
        out[method] = per
    return out


def evaluate(name: str, data: tuple[pl.DataFrame, dict[str, Any]]) -> dict[str, Any]:
    df, labels = data
    result: dict[str, Any] = {"readings": df.height, "series": len(labels), "methods": {}}
    for method, model in VARIANTS.items():
        t = time.perf_counter()
        out = run_method(df, model)
        res = score_windows(out, labels)
        res["us_per_reading"] = round((time.perf_counter() - t) / df.height * 1e6, 1)
        if method == "robust":
            res["spikes_buried"] = spikes_buried(out, labels)
        result["methods"][method] = res
        print(f"{name:12} {method:22} found {res['found']}/{res['windows']} windows "
              f"{res['found_by_kind']}, {res['false_alarms']} false alarms "
              f"({res['false_alarms_per_10k']} per 10k readings), "
              f"{res['us_per_reading']} us/reading", flush=True)
        if "spikes_buried" in res:
            print(f"{name:12} {'':22} readings outside any window scoring at least as high as "
                  f"each injected spike: {res['spikes_buried']}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=AIR_QUALITY, help="the UCI air-quality CSV")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    payload: dict[str, Any] = {"datasets": {}}
    oracle: dict[str, list[float]] = {}
    gen = generated(args.seed, oracle)
    payload["datasets"]["generated"] = evaluate("generated", gen)
    payload["datasets"]["generated"]["spike_oracle"] = spike_oracle = oracle_spike_cost(
        oracle, gen[1])
    print(f"generated    oracle (true signal and noise sd known): ordinary events as far out "
          f"as each spike {spike_oracle['buried']}; fewest flagged to find k spikes "
          f"{spike_oracle['min_false_for']}", flush=True)
    air = air_quality(args.data, args.seed)
    if air is None:
        print(f"air-quality: {args.data} not found, skipped (it is not shipped with the project)")
    else:
        payload["datasets"]["air-quality"] = evaluate("air-quality", air)
    payload["simulated"] = simulated()
    for method, per in payload["simulated"].items():
        print(f"simulated    {method:7} " + ", ".join(
            f"{m}: recall {v['recall']}, FPR {v['fpr']}" for m, v in per.items()))
    write_json("anomaly", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
