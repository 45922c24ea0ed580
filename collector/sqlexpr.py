"""Polars SQL expressions from configs (`where:`, `derive:`), compiled once and checked early.

`collector check` compiles every expression and evaluates it on an empty frame of the schema the
expression will see, so a typo or unknown column is a config error, not a run-time crash.
"""

from __future__ import annotations

import polars as pl


def compile_expr(sql: str) -> pl.Expr:
    """A Polars expression from SQL text; ValueError with Polars' reason when it does not parse."""
    try:
        return pl.sql_expr(sql)
    except Exception as exc:  # polars raises several SQL error types
        raise ValueError(f"invalid SQL expression {sql!r}: {_reason(exc)}") from None


def check_on(expr: pl.Expr, sql: str, schema_frame: pl.DataFrame, boolean: bool = False) -> None:
    """Evaluate ``expr`` on an empty frame to catch unknown columns and type errors."""
    try:
        out = schema_frame.select(expr)
    except Exception as exc:
        cols = ", ".join(schema_frame.columns)
        raise ValueError(f"{sql!r} fails on columns [{cols}]: {_reason(exc)}") from None
    if boolean and out.dtypes[0] not in (pl.Boolean, pl.Null):
        raise ValueError(f"{sql!r} is not a boolean expression (it gives {out.dtypes[0]})")


def apply_where(df: pl.DataFrame, expr: pl.Expr) -> pl.DataFrame:
    """Rows where ``expr`` is true (SQL semantics: Polars' filter drops null like false)."""
    return df.filter(expr)


def _reason(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
