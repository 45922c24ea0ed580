"""A Polars SQL SELECT over the micro-batch, which is the table `self` (and the only one).

The query passes :mod:`collector.sqlexpr`'s gate first: one SELECT over `self` (CTEs and
FROM-subqueries over it allowed), no joins, no table functions, no other table, so a query
can neither read a file nor leak one into an error.
"""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, field_validator

from collector.plugin import Transform, TransformConfig
from collector.sqlexpr import SqlRejected, gate_query, run_query, safe_reason


def check_query(query: str) -> None:
    """ValueError when the query is refused by the gate, does not parse, or names a table other
    than `self`.

    Runs on a frame without columns, so unknown columns are left to the chain check, which
    knows the real schema. The gate runs first, so Polars only ever plans a query over an
    in-memory frame: no I/O, as `collector check` promises.
    """
    try:
        gate_query(query)
    except SqlRejected as exc:
        raise ValueError(f"invalid SQL query (the batch is the table `self`): {exc}") from None
    try:
        # Parse errors surface in sql(); unknown tables only when the plan is resolved.
        pl.LazyFrame().sql(query).collect_schema()
    except (pl.exceptions.SQLInterfaceError, pl.exceptions.SQLSyntaxError) as exc:
        reason = safe_reason(exc)
        raise ValueError(f"invalid SQL query (the batch is the table `self`): {reason}") from None
    except Exception:  # column errors: the schema is not known here
        pass


class SqlConfig(TransformConfig):
    """Config of the `sql` transform."""

    type: Literal["sql"] = Field(default="sql", description="Plugin name.")
    query: str = Field(
        description="Polars SQL over the batch, which is the table `self`, e.g. "
        "`SELECT *, value * 100 AS pct FROM self WHERE metric = 'humidity'`."
    )

    @field_validator("query")
    @classmethod
    def _parses(cls, value: str) -> str:
        check_query(value)
        return value


class SqlTransform(Transform):
    """Runs a Polars SQL query on each batch."""

    Config = SqlConfig
    description = "Polars SQL over each batch (the batch is the table `self`)."
    example = """\
- type: sql
  query: "SELECT ts, device, source, metric, value / 1000 AS value, 'kW' AS unit FROM self"
"""
    requires = {}

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        return run_query(df, self.config.query)
