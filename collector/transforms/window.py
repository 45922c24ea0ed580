"""Tumbling event-time windows with allowed lateness: aggregate on the edge, ship less.

A window ``[start, start + every)`` is emitted once it is closed, i.e. once the watermark (the
largest event time seen minus ``allowed_lateness``) reaches its end. A row that arrives for a
window that is already closed is dropped and counted (``late_rows_total``). The watermark a row
is judged by is the one left by the rows before it (a cumulative max), so the output does not
depend on how the stream was cut into batches, and a checkpoint taken between batches resumes
to the very same output.

State is the raw rows of open windows only (p50/p95 need raw values), bucketed by window start
so that closing a window never rescans the others.

A stop (``flush``) emits every open window that got rows since the last stop as a ``partial``
row but keeps it open: the checkpoint carries it over the restart, the window goes on filling,
and once it closes its complete row (``partial=false``) supersedes the partial one. Readers
(`collector export`, the dashboard, the catalog's view) show one row per window.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field, model_validator

from collector.errors import TransformError
from collector.plugin import Context, Transform, TransformConfig
from collector.schema import KEY_COLUMNS
from collector.units import Duration

Agg = Literal["mean", "min", "max", "sum", "count", "first", "last", "std", "p50", "p95"]
_TS = "__ts"
_W = "__w"
_MAX_PIECES = 16
_RESERVED = {"ts", "unit", "partial"}


class WindowConfig(TransformConfig):
    """Config of the `window` transform."""

    type: Literal["window"] = Field(default="window", description="Plugin name.")
    every: Duration = Field(default=60.0, gt=0, description="Window length, e.g. `1m`.")
    by: list[str] = Field(
        default_factory=lambda: list(KEY_COLUMNS), description="Group columns within a window."
    )
    field: str = Field(default="value", description="Numeric column aggregated.")
    aggs: list[Agg] = Field(
        default_factory=lambda: ["mean", "min", "max", "count"],
        min_length=1,
        description="Aggregates, each an output column: mean, min, max, sum, count (non-null "
        "values), first, last (by event time), std (sample), p50, p95 (linear interpolation).",
    )
    allowed_lateness: Duration = Field(
        default=0.0, ge=0, description="How long after its end a window still accepts rows."
    )

    @model_validator(mode="after")
    def _names_do_not_clash(self) -> WindowConfig:
        if len(set(self.aggs)) != len(self.aggs):
            raise ValueError("aggs: each aggregate may appear once")
        if len(set(self.by)) != len(self.by):
            raise ValueError("by: each column may appear once")
        clash = (set(self.by) & (_RESERVED | set(self.aggs))) | ({self.field} & set(self.by))
        if clash:
            raise ValueError(
                f"by: {', '.join(sorted(clash))} cannot be a group column (it is the window "
                "start, an output column or the aggregated field)"
            )
        return self


_NOTHING: dict[tuple[Any, ...], pl.DataFrame] = {}
"""A window's result when no window closed, per config and input schema (a handful)."""


def _agg_expr(agg: str, field: str) -> pl.Expr:
    col = pl.col(field)
    exprs = {
        "mean": col.mean(),
        "min": col.min(),
        "max": col.max(),
        "sum": col.sum(),
        "count": col.count().cast(pl.Int64),
        "first": col.first(ignore_nulls=True),
        "last": col.last(ignore_nulls=True),
        "std": col.std(),
        "p50": col.quantile(0.5, interpolation="linear"),
        "p95": col.quantile(0.95, interpolation="linear"),
    }
    return exprs[agg].alias(agg)


class WindowTransform(Transform):
    """Tumbling event-time window aggregates, emitted when closed; flush emits partial ones."""

    Config = WindowConfig
    description = "Tumbling event-time window aggregates with allowed lateness."
    example = """\
- type: window
  every: 1m
  aggs: [mean, min, max, count, p95]
  allowed_lateness: 10s
"""
    requires = {}

    def __init__(self, config: WindowConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.max_ts: int | None = None
        """Largest event time seen (µs since the epoch); the watermark adds the lateness."""
        self.open: dict[int, list[pl.DataFrame]] = {}
        """Window start (µs) -> raw rows received for it, in arrival order."""
        self.with_unit = False
        self.flushed: dict[int, int] = {}
        """Window start (µs) -> rows it held when a stop last emitted it as partial."""

    # -- helpers -----------------------------------------------------------------------------

    @property
    def _every_us(self) -> int:
        return round(self.config.every * 1e6)

    def _project(self, df: pl.DataFrame) -> pl.DataFrame:
        """Only what the aggregates need, with the window start of each row."""
        cfg = self.config
        missing = [c for c in ("ts", *cfg.by, cfg.field) if c not in df.columns]
        if missing:
            raise TransformError(
                f"window: column(s) {', '.join(missing)} not in the batch "
                f"(it has {', '.join(df.columns)})"
            )
        every = self._every_us
        cols: list[pl.Expr] = [
            pl.col("ts").dt.epoch("us").alias(_TS),
            *[pl.col(c) for c in cfg.by],
            pl.col(cfg.field).cast(pl.Float64),
        ]
        if "unit" in df.columns:
            self.with_unit = True
            cols.append(pl.col("unit").cast(pl.String))
        return (
            df.lazy()
            .select(cols)
            .filter(pl.col(_TS).is_not_null())
            .with_columns(((pl.col(_TS) // every) * every).alias(_W))
            .collect(engine="in-memory")
        )

    def _aggregate(self, rows: pl.DataFrame, partial: bool) -> pl.DataFrame:
        if rows.is_empty():
            # Most batches close no window; the empty result's schema is all they need, and
            # working it out is a group-by, which costs as much as 100 readings' own work.
            # Kept outside the instance: its state is checkpointed, this is not state.
            cfg = self.config
            key = (tuple(cfg.aggs), tuple(cfg.by), self.with_unit, partial, *rows.schema.items())
            if key not in _NOTHING:
                _NOTHING[key] = self._aggregate_rows(rows, partial)
            return _NOTHING[key].clear()
        return self._aggregate_rows(rows, partial)

    def _aggregate_rows(self, rows: pl.DataFrame, partial: bool) -> pl.DataFrame:
        cfg = self.config
        if self.with_unit and "unit" not in rows.columns:
            rows = rows.with_columns(pl.lit(None, pl.String).alias("unit"))
        if not rows.get_column(_TS).is_sorted():
            # event-time order: first/last follow it, and sums do not depend on batching
            rows = rows.sort(_TS, maintain_order=True)
        aggs = [_agg_expr(a, cfg.field) for a in cfg.aggs]
        if self.with_unit:
            aggs.insert(0, pl.col("unit").first(ignore_nulls=True).alias("unit"))
        # group order does not matter (one sort below); rows keep their order within a group
        out = rows.group_by([_W, *cfg.by]).agg(aggs)
        out = out.select(
            pl.from_epoch(pl.col(_W), time_unit="us").dt.replace_time_zone("UTC").alias("ts"),
            *cfg.by,
            *(["unit"] if self.with_unit else []),
            *cfg.aggs,
            pl.lit(partial, pl.Boolean).alias("partial"),
        )
        return out.sort(["ts", *cfg.by], maintain_order=True)

    def _keep_open(self, rows: pl.DataFrame, in_order: bool) -> None:
        if rows.is_empty():
            return
        starts = rows.get_column(_W)
        if starts.first() == starts.last() and (in_order or starts.n_unique() == 1):
            # the common case: time-ordered input leaves one window open, no split needed
            parts = {(starts.first(),): rows}
        else:
            parts = rows.partition_by(_W, as_dict=True, maintain_order=True)
        for (start,), part in parts.items():
            pieces = self.open.setdefault(int(start), [])  # type: ignore[call-overload]
            pieces.append(part)
            if len(pieces) > _MAX_PIECES:
                self.open[int(start)] = [pl.concat(pieces, how="diagonal_relaxed")]  # type: ignore[call-overload]

    # -- the contract ------------------------------------------------------------------------

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        rows = self._project(df)
        if rows.is_empty():
            return self._aggregate(rows, partial=False)
        every, lateness = self._every_us, round(self.config.allowed_lateness * 1e6)
        in_order = rows.get_column(_TS).is_sorted()
        first_end = int(rows.get_column(_W)[0]) + every
        if not (in_order and (self.max_ts is None or first_end > self.max_ts - lateness)):
            rows = self._drop_late(rows, every, lateness)
        # else (the common case): time-ordered rows whose first window is still open cannot be
        # late, since each row's window ends after every earlier row's time
        if rows.is_empty():
            return self._aggregate(rows, partial=False)
        batch_max = rows.get_column(_TS).max()
        if batch_max is not None:
            self.max_ts = max(int(batch_max), self.max_ts if self.max_ts is not None else -(2**62))  # type: ignore[arg-type]
        assert self.max_ts is not None
        watermark = self.max_ts - lateness
        if in_order:  # closed windows are a prefix of time-ordered rows
            idx = int(rows.get_column(_W).search_sorted(watermark - every, side="right"))
            now_closed, still_open = rows.slice(0, idx), rows.slice(idx)
        else:
            is_closed = pl.col(_W) + every <= watermark
            now_closed, still_open = rows.filter(is_closed), rows.filter(~is_closed)
        # held rows first: they arrived earlier, so time-ordered input stays ordered (no sort)
        closed: list[pl.DataFrame] = []
        for start in sorted(s for s in self.open if s + every <= watermark):
            closed.extend(self.open.pop(start))
            self.flushed.pop(start, None)
        closed.append(now_closed)
        self._keep_open(still_open, in_order)
        return self._aggregate(pl.concat(closed, how="diagonal_relaxed"), partial=False)

    def _drop_late(self, rows: pl.DataFrame, every: int, lateness: int) -> pl.DataFrame:
        """Rows whose window had closed before they arrived are dropped and counted."""
        # Watermark each row is judged by: the max event time of everything before it.
        before = pl.col(_TS).cum_max().shift(1)
        if self.max_ts is not None:
            before = pl.max_horizontal(before, pl.lit(self.max_ts, pl.Int64))
        late = (pl.col(_W) + every <= before - lateness).fill_null(False)
        flagged = rows.with_columns(late.alias("__late"))
        n_late = int(flagged.get_column("__late").sum())
        if n_late:
            self.ctx.counters.inc("late_rows_total", n_late, component=self.ctx.component)
        return flagged.filter(~pl.col("__late")).drop("__late")

    def flush(self) -> pl.DataFrame | None:
        """Open windows that changed since the last stop, as partial rows; they stay open."""
        changed = []
        for start in sorted(self.open):
            rows = sum(p.height for p in self.open[start])
            if self.flushed.get(start) != rows:
                self.flushed[start] = rows
                changed.extend(self.open[start])
        if not changed:
            return None
        return self._aggregate(pl.concat(changed, how="diagonal_relaxed"), partial=True)
