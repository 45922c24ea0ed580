"""Feature frames for models, built with Polars from narrow readings.

The same code builds features for training (:func:`feature_frame`, stateless, over a whole
history) and on the device (:class:`FeatureHistory`, which carries the tail of each series across
micro-batches), so a model sees at run time exactly the columns it was trained on.

Two shapes:

- per reading (default): ``value`` plus ``lag_K`` (the K-th previous reading of the same
  device/source/metric) and ``mean_N``/``std_N`` (over the N previous readings, the current one
  excluded, so a spike does not hide itself);
- ``pivot``: one row per (device, ts) with one column per listed metric, for a model over several
  sensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import polars as pl

from collector.schema import KEY_COLUMNS

WINDOW_ORDER = "__infer_order"


class FeatureSpec(Protocol):
    """What feature building needs to know (the ``features`` block of an ``infer`` config)."""

    value_column: str
    lags: Sequence[int]
    rolling: Sequence[int]
    pivot: Sequence[str] | None


def feature_names(spec: FeatureSpec) -> list[str]:
    """Model input columns, in the order the model receives them."""
    if spec.pivot:
        return list(spec.pivot)
    names = [spec.value_column]
    names += [f"lag_{k}" for k in spec.lags]
    for n in spec.rolling:
        names += [f"mean_{n}", f"std_{n}"]
    return names


def history_length(spec: FeatureSpec) -> int:
    """Previous readings per series a row's features need (0: the row alone is enough)."""
    if spec.pivot:
        return 0
    return max([*spec.lags, *spec.rolling, 0])


def key_columns(df: pl.DataFrame) -> list[str]:
    """The series key: device/source/metric, as far as the frame has them."""
    return [c for c in KEY_COLUMNS if c in df.columns]


def row_feature_exprs(spec: FeatureSpec, keys: Sequence[str]) -> list[pl.Expr]:
    """Lag and rolling features over rows already in time order within each series."""
    v = pl.col(spec.value_column).cast(pl.Float64)

    def per_series(expr: pl.Expr) -> pl.Expr:
        return expr.over(keys) if keys else expr

    exprs = [per_series(v.shift(k)).alias(f"lag_{k}") for k in spec.lags]
    for n in spec.rolling:
        prev = v.shift(1)
        exprs.append(per_series(prev.rolling_mean(n, min_samples=n)).alias(f"mean_{n}"))
        exprs.append(per_series(prev.rolling_std(n, min_samples=n)).alias(f"std_{n}"))
    return exprs


def window_expr(spec: FeatureSpec, keys: Sequence[str], name: str) -> pl.Expr:
    """The raw readings a row's features came from: the previous ones and the row's own value."""
    v = pl.col(spec.value_column).cast(pl.Float64)
    h = history_length(spec)
    parts = [(v.shift(k).over(keys) if keys else v.shift(k)) for k in range(h, 0, -1)]
    return pl.concat_list([*parts, v]).list.drop_nulls().alias(name)


def feature_frame(df: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """Features for training: the input rows (same order) with feature columns added.

    Per-reading features are null where a series has too little history; drop those rows
    (``.drop_nulls(feature_names(spec))``) before fitting. With ``pivot`` the result is the wide
    frame, one row per (device, ts), the listed metrics as columns.
    """
    if spec.pivot:
        return pivot_frame(df, spec)
    keys = key_columns(df)
    ordered = df.with_row_index(WINDOW_ORDER).sort([*keys, "ts"], maintain_order=True)
    out = ordered.with_columns(row_feature_exprs(spec, keys))
    return out.sort(WINDOW_ORDER).drop(WINDOW_ORDER)


def pivot_frame(df: pl.DataFrame, spec: FeatureSpec) -> pl.DataFrame:
    """One row per (device, ts) with the ``pivot`` metrics as columns (null when missing)."""
    assert spec.pivot
    index = [c for c in ("device", "ts") if c in df.columns]
    rows = df.filter(pl.col("metric").is_in(list(spec.pivot)))
    if rows.is_empty():
        schema = {c: df.schema[c] for c in index}
        schema.update({m: pl.Float64() for m in spec.pivot})
        return pl.DataFrame(schema=schema)
    wide = rows.pivot(
        on="metric",
        on_columns=list(spec.pivot),
        index=index,
        values=spec.value_column,
        aggregate_function="last",
    )
    return wide.with_columns(pl.col(m).cast(pl.Float64) for m in spec.pivot)


class FeatureHistory:
    """Per-reading features over a stream: remembers each series' last readings between batches.

    State is a dict of plain lists, so it goes into the transform's checkpoint as JSON.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.length = history_length(spec)
        self.tails: dict[tuple[str, ...], list[float]] = {}

    def build(
        self, rows: pl.DataFrame, spec: FeatureSpec, window_column: str | None, row: str
    ) -> pl.DataFrame:
        """``rows`` (non-null values, any order) with features, in time order per series.

        Keeps the ``row`` column (an integer id) the caller uses to put results back in order.
        """
        keys = key_columns(rows)
        v = spec.value_column
        batch = rows.select([*keys, "ts", v, row]).with_columns(pl.col(v).cast(pl.Float64))
        batch = batch.sort("ts", maintain_order=True)
        history = self._history_frame(keys, v, row, batch.schema)
        both = pl.concat([history, batch], how="vertical")
        exprs = row_feature_exprs(spec, keys)
        if window_column:
            exprs.append(window_expr(spec, keys, window_column))
        out = both.with_columns(exprs)
        if self.length:
            tails = both.group_by(keys, maintain_order=True).agg(pl.col(v).tail(self.length))
            for rec in tails.iter_rows():
                self.tails[tuple(rec[:-1])] = list(rec[-1])
        return out.filter(pl.col(row).is_not_null())

    def _history_frame(
        self, keys: list[str], value_column: str, row: str, schema: pl.Schema
    ) -> pl.DataFrame:
        rows = [
            (*key, value)
            for key, values in self.tails.items()
            for value in values
            if len(key) == len(keys)
        ]
        cols = [*keys, value_column]
        frame = pl.DataFrame(rows, schema={c: schema[c] for c in cols}, orient="row")
        return frame.with_columns(
            pl.lit(None, schema["ts"]).alias("ts"), pl.lit(None, schema[row]).alias(row)
        ).select(schema.names())
