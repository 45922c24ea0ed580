"""Keep the rows matching a SQL condition, e.g. to drop physically impossible readings."""

from __future__ import annotations

from typing import Any, Literal

import polars as pl
from pydantic import Field, field_validator

from collector.plugin import Context, Transform, TransformConfig
from collector.sqlexpr import apply_where, compile_expr


class FilterConfig(TransformConfig):
    """Config of the `filter` transform."""

    type: Literal["filter"] = Field(default="filter", description="Plugin name.")
    where: str = Field(
        description="Polars SQL boolean expression; rows where it is true (not null) are kept, "
        "e.g. `value BETWEEN -40 AND 85`."
    )

    @field_validator("where")
    @classmethod
    def _compiles(cls, value: str) -> str:
        compile_expr(value)
        return value


class FilterTransform(Transform):
    """Keeps the rows where a SQL condition holds (null counts as false)."""

    Config = FilterConfig
    description = "Keep rows matching a SQL condition."
    example = """\
- type: filter
  where: "value BETWEEN -40 AND 85"
"""
    requires = {}

    def __init__(self, config: FilterConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._expr: pl.Expr | None = None

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        if self._expr is None:
            self._expr = compile_expr(self.config.where)
        return apply_where(df, self._expr)

    def __getstate__(self) -> dict[str, Any]:
        # Stateless: the compiled expression is rebuilt from the re-attached config.
        state = super().__getstate__()
        state["_expr"] = None
        return state
