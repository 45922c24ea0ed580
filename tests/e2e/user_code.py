"""User functions for `python` sources in end-to-end tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

BASE = datetime(2024, 5, 1, tzinfo=UTC)


def burst() -> list[dict]:
    """200 readings with values 0..199, one per second of event time."""
    return [{"ts": BASE + timedelta(seconds=i), "metric": "level", "value": float(i)}
            for i in range(200)]


def nothing() -> list[dict]:
    """No readings: a run that only delivers what is already spooled."""
    return []
