"""Simulated sensors: deterministic readings for demos, tests and footprint benchmarks.

Every value is a pure function of (seed, device index, metric name, tick index), never of wall
time, so a test can recompute what a pipeline should have seen with :func:`generate`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from datetime import datetime, timedelta
from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from collector.plugin import Model, Source, SourceConfig
from collector.schema import POLARS_SCHEMA, to_utc
from collector.units import Duration

log = logging.getLogger("collector.sources.simulated")
_NORMAL = statistics.NormalDist()
_KIND_FIELDS = {
    "uniform": {"min", "max"},
    "walk": {"start", "step"},
    "sine": {"period", "amplitude", "offset", "noise"},
}


class MetricSpec(Model):
    """How one simulated metric moves; fields of other kinds are rejected, not ignored."""

    kind: Literal["uniform", "walk", "sine"] = Field(
        default="uniform",
        description="`uniform` (independent draws in [min, max]), `walk` (random walk) or "
        "`sine` (periodic with gaussian noise).",
    )
    unit: str | None = Field(default=None, description="Unit of the readings, e.g. `C`.")
    min: float = Field(default=0.0, description="uniform: lowest value.")
    max: float = Field(default=30.0, description="uniform: highest value.")
    start: float = Field(default=0.0, description="walk: value at tick 0.")
    step: float = Field(default=1.0, ge=0, description="walk: largest change per tick.")
    period: Duration = Field(default=60.0, gt=0, description="sine: period, e.g. `60s`.")
    amplitude: float = Field(default=1.0, ge=0, description="sine: half the peak-to-peak swing.")
    offset: float = Field(default=0.0, description="sine: centre value.")
    noise: float = Field(default=0.0, ge=0, description="sine: standard deviation of the noise.")

    @model_validator(mode="after")
    def _fields_match_kind(self) -> MetricSpec:
        foreign = (self.model_fields_set - {"kind", "unit"}) - _KIND_FIELDS[self.kind]
        if foreign:
            raise ValueError(
                f"{', '.join(sorted(foreign))} do(es) not apply to kind {self.kind!r} "
                f"(it takes {', '.join(sorted(_KIND_FIELDS[self.kind]))})"
            )
        if self.kind == "uniform" and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        return self

    @property
    def spread(self) -> float:
        """The scale anomalies are measured in: a standard deviation-like size per kind."""
        if self.kind == "uniform":
            return (self.max - self.min) / math.sqrt(12)
        if self.kind == "walk":
            return self.step
        return self.amplitude


class Anomalies(Model):
    """Injected outliers, so detectors and alerts have something to find."""

    rate: float = Field(default=0.01, ge=0, le=1, description="Probability per reading.")
    magnitude: float = Field(default=8.0, ge=0, description="Shift, in multiples of the spread.")


class Dropouts(Model):
    """Missing readings, to exercise gap handling downstream."""

    rate: float = Field(default=0.01, ge=0, le=1, description="Probability a reading is missing.")


def _default_metrics() -> dict[str, MetricSpec]:
    return {"temperature": MetricSpec(kind="uniform", min=0, max=30, unit="C")}


class SimulatedConfig(SourceConfig):
    """Config of the `simulated` source."""

    type: Literal["simulated"] = Field(default="simulated", description="Plugin name.")
    every: Duration | None = Field(default=5.0, gt=0, description="Tick interval, e.g. `5s`.")
    seed: int = Field(default=0, description="Same seed, same values.")
    start: datetime | None = Field(
        default=None,
        description="Simulated event time of tick 0 (ts = start + tick * every); without it ts "
        "is the runtime clock.",
    )
    devices: int = Field(
        default=1,
        ge=1,
        description="More than 1 emits every metric for devices `<device>-000` .. `-NNN`.",
    )
    metrics: dict[str, MetricSpec] = Field(
        default_factory=_default_metrics,
        description="Metric name -> how it moves (default: temperature uniform in [0, 30] C).",
        min_length=1,
    )
    anomalies: Anomalies | None = Field(default=None, description="Optional injected outliers.")
    dropouts: Dropouts | None = Field(default=None, description="Optional missing readings.")
    label_anomalies: bool = Field(
        default=False, description='Add a string tag column `anomaly` = "1" / "0" (ground truth).'
    )

    @field_validator("start")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return None if value is None else to_utc(value)

    @model_validator(mode="after")
    def _declare_anomaly_tag(self) -> SimulatedConfig:
        # The runtime keeps only declared tag columns; the per-row label overrides this default.
        if self.label_anomalies:
            self.tags.setdefault("anomaly", "0")
        if self.every is None:
            sines = [m for m, spec in self.metrics.items() if spec.kind == "sine"]
            if self.start is not None or sines:
                raise ValueError("`start` and sine metrics need `every` (tick spacing), not `cron`")
        return self


def _uniform(seed: int, device_index: int, metric: str, tick: int, stream: str) -> float:
    """A reproducible draw in [0, 1): a hash, so any tick is computable without its past."""
    key = f"{seed}\x1f{device_index}\x1f{metric}\x1f{tick}\x1f{stream}".encode()
    n = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    return (n >> 11) / float(1 << 53)


def _walk_step(seed: int, device_index: int, metric: str, tick: int, step: float) -> float:
    return step * (2.0 * _uniform(seed, device_index, metric, tick, "step") - 1.0)


def walk_value(
    config: SimulatedConfig,
    device_index: int,
    metric: str,
    tick: int,
    cache: dict[tuple[int, str], tuple[int, float]] | None = None,
) -> float:
    """Random walk at ``tick``: start plus the steps of ticks 1..tick.

    ``cache`` remembers the last (tick, value) per series so sequential ticks cost O(1); without
    it (or after a jump) the walk is recomputed from tick 0, which gives the same number.
    """
    spec = config.metrics[metric]
    key = (device_index, metric)
    done, value = 0, spec.start
    if cache is not None and key in cache and cache[key][0] <= tick:
        done, value = cache[key]
    for t in range(done + 1, tick + 1):
        value += _walk_step(config.seed, device_index, metric, t, spec.step)
    if cache is not None:
        cache[key] = (tick, value)
    return value


def device_names(config: SimulatedConfig, device: str) -> list[str]:
    """The simulated device ids: the runtime's own id, or ``<device>-000`` .. for a fleet."""
    if config.devices == 1:
        return [device]
    width = max(3, len(str(config.devices - 1)))
    return [f"{device}-{i:0{width}d}" for i in range(config.devices)]


def generate(
    config: SimulatedConfig,
    device: str,
    tick: int,
    now: datetime,
    *,
    cache: dict[tuple[int, str], tuple[int, float]] | None = None,
) -> list[dict[str, Any]]:
    """The narrow rows of one tick for every simulated device (pure, apart from ``cache``)."""
    every = config.every or 0.0
    ts = now if config.start is None else config.start + timedelta(seconds=tick * every)
    ts = to_utc(ts)
    seed = config.seed
    rows: list[dict[str, Any]] = []
    for index, dev in enumerate(device_names(config, device)):
        for metric, spec in config.metrics.items():
            if spec.kind == "walk":
                # The walk advances even when this reading drops out or is an anomaly.
                value = walk_value(config, index, metric, tick, cache)
            elif spec.kind == "uniform":
                u = _uniform(seed, index, metric, tick, "value")
                value = spec.min + (spec.max - spec.min) * u
            else:
                phase = 2 * math.pi * (tick * every) / spec.period
                value = spec.offset + spec.amplitude * math.sin(phase)
                if spec.noise:
                    u = min(max(_uniform(seed, index, metric, tick, "noise"), 1e-12), 1 - 1e-12)
                    value += spec.noise * _NORMAL.inv_cdf(u)
            dropouts = config.dropouts
            if dropouts and _uniform(seed, index, metric, tick, "drop") < dropouts.rate:
                continue
            anomaly = bool(
                config.anomalies
                and _uniform(seed, index, metric, tick, "anomaly") < config.anomalies.rate
            )
            if anomaly and config.anomalies:
                sign = 1.0 if _uniform(seed, index, metric, tick, "sign") < 0.5 else -1.0
                value += sign * config.anomalies.magnitude * spec.spread
            row: dict[str, Any] = {"ts": ts, "metric": metric, "value": value, "unit": spec.unit}
            if config.devices > 1:
                row["device"] = dev
            if config.label_anomalies:
                row["anomaly"] = "1" if anomaly else "0"
            rows.append(row)
    return rows


class SimulatedSource(Source):
    """Deterministic simulated sensors (uniform, random walk, sine) with anomalies and dropouts."""

    Config = SimulatedConfig
    description = "Simulated sensors: uniform, random walk or sine, with anomalies and dropouts."
    example = """\
- name: room
  type: simulated
  every: 5s
  seed: 42
  metrics:
    temperature: {kind: uniform, min: 0, max: 30, unit: C}
    pressure: {kind: walk, start: 1000, step: 0.5, unit: hPa}
"""
    requires = {}

    def __init__(self, config: SimulatedConfig, ctx: Any) -> None:
        super().__init__(config, ctx)
        self.tick = 0
        self._walks: dict[tuple[int, str], tuple[int, float]] = {}

    def position(self) -> dict[str, Any] | None:
        """The next tick, when ticks fix event times (``start`` set); else None (clock times).

        ``start`` and ``every`` travel with it: a restart with other values is another
        timeline, which begins at tick 0.
        """
        if self.config.start is None:
            return None
        return {
            "tick": self.tick,
            "start": self.config.start.isoformat(),
            "every": self.config.every,
        }

    def resume(self, position: dict[str, Any]) -> None:
        """Continue the tick counter, so event times after a restart never repeat."""
        cfg = self.config
        if cfg.start is None or not position:
            return
        same = position.get("start") == cfg.start.isoformat() and position.get("every") == cfg.every
        tick = position.get("tick")
        if not same or not isinstance(tick, int) or tick < 0:
            log.info(
                "simulated %s: `start`/`every` changed since the last run: starting at tick 0",
                self.ctx.component,
            )
            return
        self.tick = tick

    def read(self) -> pl.DataFrame:
        rows = generate(
            self.config, self.ctx.device, self.tick, self.ctx.clock(), cache=self._walks
        )
        self.tick += 1
        # Built canonical (every column, in order), so the runtime's conform pass has nothing
        # to do: at 100 sensors every second that pass was a fifth of the steady CPU.
        for row in rows:
            row.setdefault("device", self.ctx.device)
            row["source"] = self.ctx.component
        schema = dict(POLARS_SCHEMA)
        if self.config.label_anomalies:
            schema["anomaly"] = pl.String()
        return pl.DataFrame(rows, schema=schema)
