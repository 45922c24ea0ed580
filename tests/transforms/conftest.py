"""Fixtures for transform tests: a context with a hand-driven clock, simulated streams, moto."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.plugin import Context
from collector.schema import normalize
from collector.sources.simulated import SimulatedConfig, generate
from collector.testing import FakeClock, moto_server
from tests.sinks.aws.conftest import aws_env  # noqa: F401  (a fixture, shared with the AWS sinks)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _forget_user_modules() -> Iterator[None]:
    """Python models import from tmp folders: leave no path or module behind for other tests."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [m for m in sys.modules if m.startswith("infer_test_")]:
        del sys.modules[name]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def make_ctx(tmp_path: Path, clock: FakeClock) -> Callable[[str], Context]:
    def make(component: str = "infer") -> Context:
        return Context(device="d1", component=component, data_dir=tmp_path, clock=clock.now)

    return make


def simulated_batches(config: dict[str, Any], ticks: int, per_batch: int) -> list[pl.DataFrame]:
    """Canonical frames of a seeded simulated run, cut into micro-batches of ``per_batch`` ticks.

    Built from the source's own ``generate`` and the runtime's ``normalize``, so the transform
    sees exactly what it would see behind a ``simulated`` source (including the `anomaly` tag).
    """
    sim = SimulatedConfig.model_validate({"name": "sim", **config})
    cache: dict[tuple[int, str], tuple[int, float]] = {}
    out = []
    for start in range(0, ticks, per_batch):
        rows = [
            row
            for tick in range(start, min(start + per_batch, ticks))
            for row in generate(sim, "d1", tick, T0, cache=cache)
        ]
        out.append(normalize(rows, device="d1", source="sim", now=T0, tags=sim.tags))
    return out


@pytest.fixture
def moto_endpoint(tmp_path: Path) -> Iterator[str]:
    """A moto server on a free port (a real HTTP peer for the `s3` sink)."""
    with moto_server(tmp_path / "moto.log") as url:
        yield url


def labelled_readings(seed: int, per_device: int, devices: tuple[str, ...] = ("d1", "d2"),
                      metric: str = "temperature") -> pl.DataFrame:
    """Readings around 20 (sd 1) with events of random size; ``label`` = 1 when |shift| >= 4 sd.

    ``magnitude`` is the shift in sd, so tests can tell clear anomalies (>= 6 sd) from the
    borderline ones (around 4 sd) a model should be unsure about.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = []
    for device in devices:
        base = 20.0 + rng.normal(0.0, 1.0, per_device)
        event = rng.random(per_device) < 0.05
        magnitude = np.where(event, rng.uniform(0.0, 9.0, per_device), 0.0)
        sign = np.where(rng.random(per_device) < 0.5, -1.0, 1.0)
        frames.append(pl.DataFrame({
            "ts": [T0 + timedelta(seconds=5 * i) for i in range(per_device)],
            "device": device,
            "source": "feed",
            "metric": metric,
            "value": base + sign * magnitude,
            "unit": "C",
            "magnitude": magnitude,
            "label": (magnitude >= 4.0).astype("int64"),
        }))
    return pl.concat(frames).cast({"ts": pl.Datetime("us", "UTC")}).sort("ts", "device")
