"""Poison data at the sources (issue 13 rows 5-7), through the real runtime (``run_once``).

Each test asserts on what landed: every good reading delivered exactly once, every bad cell or
value in ``<data_dir>/dead-letter/<source>.ndjson`` with its reason, and a finite source that
ends instead of being restarted from the top.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collector.testing import ListSink, run_once

T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _clean_sink() -> Any:
    ListSink.reset()
    yield
    ListSink.reset()


def config(source: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    return {
        "device": "edge-01",
        "data_dir": str(data_dir),
        "sources": [source],
        "sinks": [{"type": "collector.testing:ListSink", "name": "out"}],
    }


def dead_letters(data_dir: Path, source: str) -> list[dict[str, Any]]:
    path = data_dir / "dead-letter" / f"{source}.ndjson"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def delivered() -> list[tuple[Any, ...]]:
    df = ListSink.rows("out")
    if df.is_empty():
        return []
    return list(zip(df["ts"], df["metric"], df["value"], strict=True))


def wide_csv(path: Path, rows: int, bad: dict[tuple[int, str], str]) -> set[tuple[Any, ...]]:
    """A wide CSV (ts, temp, hum, label); ``bad`` puts text into some cells. Returns the good
    readings it holds."""
    lines, good = ["ts,temp,hum,label"], set()
    for i in range(rows):
        ts = T0 + timedelta(seconds=i)
        cells = {"temp": f"{20 + i / 10:.1f}", "hum": str(40 + i)}
        for (row, col), text in bad.items():
            if row == i:
                cells[col] = text
        lines.append(f"{ts:%Y-%m-%dT%H:%M:%SZ},{cells['temp']},{cells['hum']},site-{i % 3}")
        for col, text in cells.items():
            if (i, col) not in bad:
                good.add((ts, col, float(text)))
    path.write_text("\n".join(lines) + "\n")
    return good


@pytest.mark.parametrize("named_columns", [True, False])
def test_wide_replay_with_bad_cells_dead_letters_them_and_ends(
    tmp_path: Path, named_columns: bool
) -> None:
    csv = tmp_path / "rec.csv"
    bad = {(3, "temp"): "ERR", (7, "hum"): "inf", (30, "temp"): "12..5"}
    good = wide_csv(csv, 50, bad)
    source: dict[str, Any] = {
        "name": "rec",
        "type": "replay",
        "path": str(csv),
        "layout": "wide",
        "speed": "max",
        "chunk_rows": 20,
    }
    if named_columns:
        source["columns"] = ["temp", "hum"]
    data_dir = tmp_path / "data"
    assert run_once(config(source, data_dir), data_dir) == 0  # --once ended: no restart loop
    got = delivered()
    assert len(got) == len(good)  # each good cell once (a restart would repeat early rows)
    assert set(got) == good  # neither metric dropped; `label` (text) is no metric
    rejected = dead_letters(data_dir, "rec")
    assert len(rejected) == len(bad)
    for rec in rejected:
        raw = json.loads(rec["raw"])  # the whole source row, as recorded
        column = next(c for c in ("temp", "hum") if f"'{c}'" in rec["reason"])
        row = int(
            datetime.fromisoformat(raw["ts"].replace("Z", "+00:00")).timestamp() - T0.timestamp()
        )
        assert bad[(row, column)] == raw[column]
        assert ("not finite" if raw[column] == "inf" else "not a number") in rec["reason"]


def test_replay_run_twice_gives_each_row_once(tmp_path: Path) -> None:
    csv = tmp_path / "rec.csv"
    good = wide_csv(csv, 5, {})
    source = {"name": "rec", "type": "replay", "path": str(csv), "layout": "wide", "speed": "max"}
    data_dir = tmp_path / "data"
    assert run_once(config(source, data_dir), data_dir) == 0
    assert run_once(config(source, data_dir), data_dir) == 0
    got = delivered()
    assert set(got) == good
    assert len(got) == len(good), "the second --once replayed the file again"


USER_CODE = """
from datetime import datetime, timedelta, timezone

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def read():
    rows = [{"ts": T0 + timedelta(seconds=i), "metric": "t", "value": float(i)} for i in range(100)]
    rows.insert(10, {"ts": T0, "metric": "t", "value": "warm"})
    rows.insert(20, {"ts": T0, "metric": "t", "value": 10**400})
    rows.insert(30, {"ts": "not a time", "metric": "t", "value": 1.0})
    rows.insert(40, {"ts": T0, "metric": "t", "value": float("inf")})
    rows.insert(50, {"ts": T0, "metric": "t", "value": {"nested": True}})
    return rows
"""


def test_python_source_poison_values_cost_only_themselves(tmp_path: Path) -> None:
    (tmp_path / "poison_user_code.py").write_text(USER_CODE)
    source = {
        "name": "py",
        "type": "python",
        "function": "poison_user_code:read",
        "path": str(tmp_path),
        "every": "1h",
    }
    data_dir = tmp_path / "data"
    assert run_once(config(source, data_dir), data_dir) == 0
    got = delivered()
    assert sorted(v for _, _, v in got) == [float(i) for i in range(100)]
    reasons = [rec["reason"] for rec in dead_letters(data_dir, "py")]
    assert len(reasons) == 5
    for expected in ("not a number", "out of float range", "ts:", "not finite", "nested"):
        assert any(expected in r for r in reasons), (expected, reasons)
