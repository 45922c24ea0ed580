"""Report by exception: forward a reading only when it moved enough, or was silent too long.

A slowly changing sensor polled every second then costs a few rows a minute instead of sixty,
and the `max_silence` heartbeat still proves the device is alive.
"""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field, model_validator

from collector.errors import TransformError
from collector.plugin import Context, Transform, TransformConfig
from collector.schema import KEY_COLUMNS
from collector.units import Duration

_IDX = "__deadband_row"


class DeadbandConfig(TransformConfig):
    """Config of the `deadband` transform."""

    type: Literal["deadband"] = Field(default="deadband", description="Plugin name.")
    delta: float | None = Field(
        default=None,
        ge=0,
        description="Emit when |value - last emitted| > delta (default 0: any change).",
    )
    percent: float | None = Field(
        default=None,
        ge=0,
        description="Instead of `delta`: emit when the change exceeds this % of the last "
        "emitted value.",
    )
    max_silence: Duration | None = Field(
        default=None, gt=0, description="Emit anyway once this long passed since the last one."
    )
    by: list[str] = Field(
        default_factory=lambda: list(KEY_COLUMNS),
        description="Columns identifying one series.",
    )
    field: str = Field(default="value", description="Numeric column compared.")

    @model_validator(mode="after")
    def _one_threshold(self) -> DeadbandConfig:
        if self.delta is not None and self.percent is not None:
            raise ValueError("give `delta` or `percent`, not both")
        return self


class DeadbandTransform(Transform):
    """Drops readings within the dead band of the last emitted reading of their series."""

    Config = DeadbandConfig
    description = "Report by exception: only readings that changed by more than a dead band."
    example = """\
- type: deadband
  delta: 0.5
  max_silence: 5m
"""
    requires = {}

    def __init__(self, config: DeadbandConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.last: dict[tuple[Any, ...], tuple[float | None, int]] = {}
        """Series key -> (last emitted value, its ts in µs)."""

    def _changed(self, value: float | None, last: float | None) -> bool:
        if value is None or last is None:
            return (value is None) != (last is None)
        diff = abs(value - last)
        if self.config.percent is not None:
            return diff > abs(last) * self.config.percent / 100.0
        return diff > (self.config.delta or 0.0)

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        by, field = self.config.by, self.config.field
        missing = [c for c in (*by, "ts", field) if c not in df.columns]
        if missing:
            raise TransformError(
                f"deadband: column(s) {', '.join(missing)} not in the batch "
                f"(it has {', '.join(df.columns)})"
            )
        if df.is_empty():
            return df
        silence = (
            None if self.config.max_silence is None else round(self.config.max_silence * 1e6)
        )
        # Each series is walked in event-time order (ties: arrival order); the decision of a
        # row depends on the previous decisions, so this part is inherently sequential.
        ordered = (
            df.select(*by, "ts", field)
            .with_row_index(_IDX)
            .with_columns(pl.col("ts").dt.epoch("us").alias("ts"), pl.col(field).cast(pl.Float64))
            .sort([*by, "ts"], maintain_order=True)
        )
        keep: list[int] = []
        for key, group in ordered.group_by(by, maintain_order=True):
            last = self.last.get(key)
            for idx, ts, value in zip(
                group.get_column(_IDX).to_list(),
                group.get_column("ts").to_list(),
                group.get_column(field).to_list(),
                strict=True,
            ):
                if (
                    last is None
                    or self._changed(value, last[0])
                    or (silence is not None and ts - last[1] >= silence)
                ):
                    keep.append(idx)
                    last = (value, ts)
            if last is not None:
                self.last[key] = last
        mask = [False] * df.height
        for idx in keep:
            mask[idx] = True
        return df.filter(pl.Series(mask, dtype=pl.Boolean))
