"""Add or replace columns computed with SQL expressions (unit conversion, dew point, flags)."""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator

from collector.plugin import Context, Transform, TransformConfig
from collector.sqlexpr import compile_expr


class DeriveConfig(TransformConfig):
    """Config of the `derive` transform."""

    type: Literal["derive"] = Field(default="derive", description="Plugin name.")
    columns: dict[str, str] = Field(
        description="New (or replaced) column -> Polars SQL expression, evaluated in order so a "
        "later column may use an earlier one, e.g. `{value: \"value * 9 / 5 + 32\"}`.",
        min_length=1,
    )

    @field_validator("columns")
    @classmethod
    def _compile(cls, value: dict[str, str]) -> dict[str, str]:
        for name, sql in value.items():
            if not name:
                raise ValueError("a derived column needs a name")
            try:
                compile_expr(sql)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        return value


class DeriveTransform(Transform):
    """Adds or replaces columns from SQL expressions."""

    Config = DeriveConfig
    description = "Add or replace columns computed with SQL expressions."
    example = """\
- type: derive
  columns:
    value: "CASE WHEN unit = 'F' THEN (value - 32) * 5 / 9 ELSE value END"
    unit: "CASE WHEN unit = 'F' THEN 'C' ELSE unit END"
"""
    requires = {}

    def __init__(self, config: DeriveConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._exprs: list[pl.Expr] | None = None

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        if self._exprs is None:
            self._exprs = [compile_expr(sql).alias(n) for n, sql in self.config.columns.items()]
        # One with_columns per entry: a later expression sees the earlier results.
        for expr in self._exprs:
            df = df.with_columns(expr)
        return df

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_exprs"] = None
        return state
