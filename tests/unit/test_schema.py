"""Row-level isolation in ``normalize``: one poison value costs itself, never its tick.

Every test feeds good rows with poison among them and asserts which readings come out and what
went to ``reject`` (the source's dead letter) with which reason.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from collector.schema import POLARS_SCHEMA, RejectedValue, normalize

NOW = datetime(2024, 1, 1, tzinfo=UTC)


class Bin:
    """A stand-in for ``ctx.reject``: keeps what it is given."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, str]] = []

    def __call__(self, raw: Any, reason: str) -> None:
        assert isinstance(raw, str)  # ctx.reject takes text
        self.items.append((raw, reason))

    @property
    def reasons(self) -> list[str]:
        return [reason for _, reason in self.items]


def run(data: Any, **kw: Any) -> tuple[pl.DataFrame, Bin]:
    rejected = Bin()
    df = normalize(data, device="d1", source="py", now=NOW, reject=rejected, **kw)
    assert dict(df.schema) == {**POLARS_SCHEMA, **{t: pl.String() for t in kw.get("tags", {})}}
    return df, rejected


def good_rows(n: int = 100) -> list[dict[str, Any]]:
    return [{"ts": NOW + timedelta(seconds=i), "metric": "t", "value": float(i)} for i in range(n)]


POISON = [
    ({"metric": "t", "value": "warm"}, "'warm' is not a number"),
    ({"metric": "t", "value": 10**400}, "out of float range"),
    ({"metric": "t", "value": float("inf")}, "not finite"),
    ({"metric": "t", "value": float("-inf")}, "not finite"),
    ({"metric": "t", "value": {"nested": 1}}, "nested value"),
    ({"metric": "t", "value": [1, 2]}, "nested value"),
    ({"metric": "t", "value": object()}, "is not a number"),
    ({"ts": "yesterday-ish", "metric": "t", "value": 1.0}, "ts:"),
    ({"ts": 10**400, "metric": "t", "value": 1.0}, "ts:"),
    ({"ts": float("nan"), "metric": "t", "value": 1.0}, "ts:"),
    ({"ts": None, "metric": "t", "value": 1.0}, "ts:"),
    ({"metric": None, "value": 1.0}, "no metric name"),
    ({"metric": "", "value": 1.0}, "no metric name"),
]


@pytest.mark.parametrize(("poison", "reason"), POISON, ids=[r for _, r in POISON])
@pytest.mark.parametrize("where", [0, 50, 100])
def test_one_poison_row_among_100_good_ones_costs_only_itself(
    poison: dict[str, Any], reason: str, where: int
) -> None:
    rows = good_rows()
    rows.insert(where, poison)
    df, rejected = run(rows)
    assert df["value"].to_list() == [float(i) for i in range(100)]
    assert df["ts"].to_list() == [NOW + timedelta(seconds=i) for i in range(100)]
    assert len(rejected.items) == 1
    assert reason in rejected.reasons[0]
    assert rejected.items[0][0]  # the raw row is kept as text


def test_without_reject_a_poison_row_still_raises() -> None:
    with pytest.raises(RejectedValue, match="out of float range"):
        normalize(
            [*good_rows(3), {"metric": "t", "value": 10**400}], device="d", source="s", now=NOW
        )


def test_decided_values_nan_none_empty_bool_numeric_text_and_huge_names() -> None:
    name = "m" * 1_000_000  # sinks bound long names; normalize passes them through
    rows = [
        {"metric": "nan", "value": float("nan")},
        {"metric": "none", "value": None},
        {"metric": "empty", "value": "  "},
        {"metric": "na", "value": "NA"},
        {"metric": "true", "value": True},
        {"metric": "text", "value": " 21.5 "},
        {"metric": "big", "value": 2**70},
        {"metric": name, "value": 1.0},
        {"metric": 7, "value": 1.0},
    ]
    df, rejected = run(rows)
    assert rejected.items == []
    got = dict(zip(df["metric"], df["value"], strict=True))
    assert got == {
        "nan": None,
        "none": None,
        "empty": None,
        "na": None,
        "true": 1.0,
        "text": 21.5,
        "big": float(2**70),
        name: 1.0,
        "7": 1.0,
    }


def test_wide_rows_reject_only_the_bad_field() -> None:
    rows = [
        {"ts": NOW, "temperature": 21.5, "humidity": 10**400, "status": "ok"},
        {"ts": NOW, "temperature": float("inf"), "humidity": 40, "gps": {"lat": 1}},
        {"ts": "not a time", "temperature": 1.0},
        {"temperature": 22.0, "on": False},
    ]
    df, rejected = run(rows)
    assert sorted(zip(df["metric"], df["value"], strict=True)) == [
        ("humidity", 40.0),
        ("on", 0.0),
        ("temperature", 21.5),
        ("temperature", 22.0),
    ]
    assert sorted(rejected.reasons) == sorted(
        [
            "humidity: out of float range",
            "temperature: not finite (inf)",
            "gps: a nested value (dict) is not a number",
            "ts: Invalid isoformat string: 'not a time'",
        ]
    )
    assert json.loads(rejected.items[0][0])["status"] == "ok"  # the whole row, as JSON text


def test_things_that_are_not_rows_are_rejected_not_fatal() -> None:
    df, rejected = run([{"metric": "t", "value": 1.0}, 42.0, "t=1", None])
    assert df["value"].to_list() == [1.0]
    assert len(rejected.items) == 3
    df, rejected = run("temperature=21")
    assert df.is_empty() and rejected.reasons == ["a str is not a reading (a dict)"]
    df, rejected = run(3.5)
    assert df.is_empty() and rejected.reasons == ["a float is not a reading (a dict)"]


def frame(values: list[Any], **extra: list[Any]) -> pl.DataFrame:
    n = len(values)
    cols: dict[str, Any] = {"metric": ["t"] * n, "value": values, **extra}
    return pl.DataFrame(cols, strict=False)


def test_frame_fast_path_rejects_only_cells_that_fail_to_cast() -> None:
    ts = [(NOW + timedelta(seconds=i)).isoformat() for i in range(6)]
    ts[4] = "garbage"
    data = frame(["1.5", "warm", "", "inf", "4", "nan"], ts=ts)
    df, rejected = run(data)
    assert df["value"].to_list() == [1.5, None, None]  # "" and "nan" are no reading
    assert df["ts"].to_list() == [NOW, NOW + timedelta(seconds=2), NOW + timedelta(seconds=5)]
    assert sorted(rejected.reasons) == sorted(
        ["'warm' is not a number", "not finite (inf)", "ts: cannot read a time from 'garbage'"]
    )


def test_frame_numeric_columns_inf_nulls_and_arrow() -> None:
    data = pl.DataFrame(
        {
            "ts": [NOW, None, NOW, NOW],
            "metric": ["a", "b", None, "d"],
            "value": [float("inf"), 1.0, 2.0, float("nan")],
            "unit": ["C", None, None, None],
        }
    )
    df, rejected = run(data.to_arrow(), units={"d": "%"})
    assert df.to_dicts() == [
        {"ts": NOW, "device": "d1", "source": "py", "metric": "d", "value": None, "unit": "%"}
    ]
    assert sorted(rejected.reasons) == sorted(
        ["not finite (inf)", "ts: cannot read a time from None", "no metric name"]
    )


def test_frame_epoch_seconds_and_out_of_range_epochs() -> None:
    data = pl.DataFrame({"ts": [NOW.timestamp(), 1e30], "metric": ["a", "b"], "value": [1, 2]})
    df, rejected = run(data)
    assert df["ts"].to_list() == [NOW] and df["metric"].to_list() == ["a"]
    assert len(rejected.items) == 1 and rejected.reasons[0].startswith("ts:")


def test_frame_with_an_unreadable_column_falls_back_row_by_row() -> None:
    data = pl.DataFrame(
        {"metric": ["a", "b", "c"], "value": [1.0, 2.0, 3.0], "unit": [["x"], None, None]}
    )
    df, rejected = run(data)  # a list in `unit` cannot be cast: the per-row path takes over
    assert df["metric"].to_list() == ["a", "b", "c"]
    nested = frame([[1.0], None, [2.0]], ts=[NOW, NOW, NOW])
    df, rejected = run(nested)
    assert df["value"].to_list() == [None] and len(rejected.items) == 2
    assert all("nested" in r for r in rejected.reasons)


def test_wide_frame_goes_row_by_row_and_keeps_tags() -> None:
    data = pl.DataFrame({"ts": [NOW, NOW], "site": ["a", "b"], "t": [1.0, float("inf")]})
    df, rejected = run(data, tags={"site": "?"})
    assert df.select("metric", "value", "site").rows() == [("t", 1.0, "a")]
    assert rejected.reasons == ["t: not finite (inf)"]


def test_good_frames_are_unchanged_by_the_checks() -> None:
    data = pa.table(
        {
            "ts": pa.array([NOW] * 3, pa.timestamp("us", tz="UTC")),
            "metric": ["a", "b", "c"],
            "value": [1.0, None, 3.0],
        }
    )
    df, rejected = run(data)
    assert rejected.items == [] and df["value"].to_list() == [1.0, None, 3.0]
