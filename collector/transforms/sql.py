"""Any Polars SQL query over the micro-batch, which is the table `self`."""

from __future__ import annotations

from typing import Literal

import polars as pl
from pydantic import Field, field_validator

from collector.plugin import Transform, TransformConfig


def check_query(query: str) -> None:
    """ValueError when the query does not parse or names a table other than `self`.

    Runs on a frame without columns, so unknown columns are left to the chain check, which
    knows the real schema.
    """
    try:
        # Parse errors surface in sql(); unknown tables only when the plan is resolved.
        pl.LazyFrame().sql(query).collect_schema()
    except (pl.exceptions.SQLInterfaceError, pl.exceptions.SQLSyntaxError) as exc:
        reason = str(exc).strip().splitlines()[0]
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
        return df.sql(self.config.query, table_name="self")
