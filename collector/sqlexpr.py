"""The one SQL gate: every piece of user SQL passes here before Polars sees it.

SQL text is untrusted (ARCHITECTURE, "Identity and trust"): a ``where:``, a ``derive`` column,
an ``sql`` transform's query, ``collector export --where`` and the dashboard's row-filter box
must never read a file, reach a URL or echo anything that did not come from the frame. Polars
SQL alone cannot promise that: ``metric IN (SELECT x FROM read_csv('/etc/passwd'))`` is valid
Polars SQL, and its error message prints the file's lines.

So the text is parsed with sqlglot (a real SQL parser, not regexes) and its syntax tree is
walked against an allow-list: column references, literals, arithmetic/comparison/boolean
operators, BETWEEN, IN with a literal list, LIKE/ILIKE, IS [NOT] NULL, CASE, CAST and a list of
scalar (and aggregate) functions Polars supports. Anything else (a subquery, a table function,
an unknown function, COPY, a second statement) is refused with a message naming the construct,
never quoting data. Two parsers can disagree at the edges (string escapes, comments), so three
cheap checks on the raw text back the tree walk up: the typed name before every ``(`` must be
an allowed function or SQL keyword, no ``;`` may appear, and words that open a query (SELECT,
TABLE, VALUES, WITH, COPY, ``read_*``/``scan_*``) may not appear anywhere in an expression, not
even inside a string or a comment, where a second parser might read them as code.

For the ``sql`` transform (a whole query), only SELECTs over ``self`` (the batch) or over CTEs
and FROM-subqueries that are themselves SELECTs over ``self`` pass; no join, no other table.

All of this is pure computation: `collector check` uses it and stays free of I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import polars as pl
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

__all__ = [
    "SqlRejected",
    "apply_where",
    "check_on",
    "compile_expr",
    "gate_expr",
    "gate_query",
    "run_query",
    "safe_reason",
]

DIALECT = "postgres"
"""Polars SQL follows PostgreSQL's grammar (``::`` casts, ``~`` regex, ILIKE, ``$$`` strings)."""

TABLE = "self"
"""The only table a query may read: the frame at hand."""


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


SCALAR_FUNCTIONS = _words(
    """
    abs ceil ceiling floor round trunc truncate sqrt cbrt ln log log10 log2 log1p exp pow power
    mod sign pi degrees radians sin cos tan cot asin acos atan atan2 sind cosd tand
    lower upper length char_length character_length octet_length bit_length substr substring
    concat concat_ws left right ltrim rtrim trim btrim replace reverse starts_with ends_with
    strpos initcap regexp_like lpad rpad split_part normalize
    coalesce nullif greatest least if ifnull nvl
    date_part extract date strftime strptime date_trunc now
    cast try_cast
    """
)
"""Scalar functions Polars SQL implements and that compute on the row only (no I/O)."""

AGGREGATE_FUNCTIONS = _words(
    """
    avg mean count sum min max median stddev stddev_samp stddev_pop stdev variance var_samp
    var_pop first last first_value last_value quantile_cont quantile_disc string_agg array_agg
    row_number rank dense_rank
    """
)
"""Aggregates (and ranking windows) over the frame's own rows: harmless, useful in queries."""

ALLOWED_FUNCTIONS = SCALAR_FUNCTIONS | AGGREGATE_FUNCTIONS

_STRUCTURAL_WORDS = _words(
    """
    in not and or xor then when else case between like ilike is as distinct select where by
    having over filter from on interval escape partition order group limit offset end null
    similar true false
    """
)
"""Keywords that may stand before ``(`` without being a function call (``IN (1, 2)``)."""

# Nodes of an expression that compute on the row's own values and nothing else.
_EXPRESSION_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.Neg,
    exp.Not,
    exp.And,
    exp.Or,
    exp.Xor,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.IntDiv,
    exp.Mod,
    exp.Pow,
    exp.DPipe,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.NullSafeEQ,
    exp.NullSafeNEQ,
    exp.Is,
    exp.Between,
    exp.In,
    exp.Like,
    exp.ILike,
    exp.Escape,
    exp.RegexpLike,
    exp.RegexpILike,
    exp.Case,
    exp.If,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Var,
    exp.Interval,
    exp.Extract,
    exp.Distinct,
    exp.Star,
    exp.BitwiseAnd,
    exp.BitwiseOr,
    exp.BitwiseXor,
    exp.BitwiseNot,
)

# Extra nodes the clauses of a SELECT over `self` may hold (FROM and WITH are checked apart).
_CLAUSE_NODES: tuple[type[exp.Expression], ...] = (
    exp.TableAlias,
    exp.Alias,
    exp.Where,
    exp.Group,
    exp.Having,
    exp.Order,
    exp.Ordered,
    exp.Limit,
    exp.Offset,
    exp.Window,
    exp.WindowSpec,
)

_NAMES: list[tuple[type[exp.Expression], str]] = [
    (exp.Exists, "EXISTS (a subquery)"),
    (exp.Any, "ANY (a subquery)"),
    (exp.All, "ALL (a subquery)"),
    (exp.Subquery, "a subquery"),
    (exp.Select, "a SELECT inside an expression (subquery)"),
    (exp.Join, "a JOIN (a query reads the batch `self` only)"),
    (exp.Lateral, "LATERAL"),
    (exp.Unnest, "UNNEST"),
    (exp.Values, "VALUES"),
    (exp.Union, "UNION"),
    (exp.Intersect, "INTERSECT"),
    (exp.Except, "EXCEPT"),
    (exp.Copy, "COPY"),
    (exp.Create, "CREATE"),
    (exp.Insert, "INSERT"),
    (exp.Update, "UPDATE"),
    (exp.Delete, "DELETE"),
    (exp.Drop, "DROP"),
    (exp.Command, "a SQL command"),
    (exp.Placeholder, "a parameter placeholder"),
    (exp.Parameter, "a parameter"),
    (exp.Table, "a table reference"),
    (exp.With, "WITH (a CTE)"),
    (exp.Dot, "a qualified name"),
    (exp.Bracket, "an index or array literal"),
    (exp.Array, "an array"),
    (exp.Struct, "a struct"),
    (exp.Tuple, "a tuple"),
]

_URL_RE = re.compile(r"^\s*(?:[a-z][a-z0-9+.-]*://|file:)", re.IGNORECASE)
_PATH_RE = re.compile(r"^\s*(?:/|~|\.\.?[/\\]|[a-z]:[/\\]|\\\\)", re.IGNORECASE)
_TABLE_FN_RE = re.compile(r"\b((?:read|scan)_\w+)\s*(?:\(|/\*|--)", re.IGNORECASE)
_TABLE_FN_NAME_RE = re.compile(r"(?:read|scan)_\w+", re.IGNORECASE)
_EXPR_WORDS_RE = re.compile(r"\b(select|table|values|with|copy)\b", re.IGNORECASE)
_WORD_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


class SqlRejected(ValueError):
    """SQL text refused by the gate; the message names the construct, never the data."""


# ---------------------------------------------------------------------------------------------
# the gate


def gate_expr(sql: str, columns: Iterable[str] | None = None) -> exp.Expression:
    """The parsed tree of a boolean/scalar expression that only computes on the row.

    ``columns``, when known, are the only columns it may name. Raises :class:`SqlRejected`
    (a ValueError) naming the forbidden construct.
    """
    if not isinstance(sql, str) or not sql.strip():
        raise SqlRejected("empty SQL expression")
    code = _code_without_table_functions(sql)
    m = _EXPR_WORDS_RE.search(code)
    if m:
        raise SqlRejected(
            f"{m.group(1).upper()} is not allowed in an expression (not even inside a comment "
            "or an escaped string): an expression computes on the row's own columns only"
        )
    _check_tokens(sql)
    tree = _parse_one(sql, "expression")
    allowed_cols = None if columns is None else set(columns)
    for node in tree.walk():
        _check_node(node, _EXPRESSION_NODES, allowed_cols, tables=frozenset())
    return tree


def gate_query(
    query: str, columns: Iterable[str] | None = None, table: str = TABLE
) -> exp.Expression:
    """The parsed tree of one SELECT over ``table`` (the batch), or :class:`SqlRejected`.

    CTEs and FROM-subqueries are allowed when they are themselves SELECTs over the batch (or an
    earlier CTE); joins, other tables, table functions, set operations and expression
    subqueries are not. Column names are left to Polars (aliases and CTE columns make them
    query-dependent); its error lists the frame's own columns only.
    """
    del columns  # accepted for symmetry with gate_expr; Polars resolves names in a query
    if not isinstance(query, str) or not query.strip():
        raise SqlRejected("empty SQL query")
    code = _code_without_table_functions(query)
    for word in ("table", "values", "copy"):
        if re.search(rf"\b{word}\b", code, re.IGNORECASE):
            raise SqlRejected(f"{word.upper()} is not allowed: a query reads the batch `self`")
    _check_tokens(query)
    tree = _parse_one(query, "query")
    if not isinstance(tree, exp.Select):
        raise SqlRejected(f"{_name(tree)} is not allowed: the query must be one SELECT")
    # The raw text may only say SELECT/WITH as often as the parser saw them: a SELECT hidden
    # from sqlglot in a string or comment could be code to Polars.
    for word, kind in (("select", exp.Select), ("with", exp.With)):
        said = len(re.findall(rf"\b{word}\b", code, re.IGNORECASE))
        seen = sum(1 for _ in tree.find_all(kind))
        if said != seen:
            raise SqlRejected(
                f"{word.upper()} appears where it is not a clause of the query (inside a string "
                "or a comment): refused"
            )
    _check_select(tree, frozenset({table.lower()}))
    return tree


def _check_select(select: exp.Expression, tables: frozenset[str]) -> None:
    """One SELECT: CTEs first (each may read the tables before it), then its own FROM."""
    if not isinstance(select, exp.Select):
        raise SqlRejected(f"{_name(select)} is not allowed: only SELECT over `self`")
    with_ = select.args.get("with") or select.args.get("with_")
    if with_ is not None:
        for cte in with_.expressions:
            _check_select(cte.this, tables)
            tables = tables | {cte.alias_or_name.lower()}
    if select.args.get("joins"):
        raise SqlRejected("a JOIN is not allowed (a query reads the batch `self` only)")
    if select.args.get("laterals"):
        raise SqlRejected("LATERAL is not allowed")
    from_ = select.args.get("from") or select.args.get("from_")
    if from_ is not None:
        source = from_.this
        if isinstance(source, exp.Subquery):
            _check_select(source.this, tables)
        elif isinstance(source, exp.Table):
            if (
                not isinstance(source.this, exp.Identifier)
                or source.args.get("db")
                or source.args.get("catalog")
                or source.name.lower() not in tables
            ):
                raise SqlRejected(
                    "a query may read the batch `self` only, not another table or function"
                )
        else:
            raise SqlRejected(f"{_name(source)} is not allowed in FROM: read `self`")
    for key, value in select.args.items():
        if key in ("with", "with_", "from", "from_"):
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, exp.Expression):
                for node in child.walk():
                    _check_node(node, _EXPRESSION_NODES + _CLAUSE_NODES, None, tables)


def _check_node(
    node: exp.Expression,
    allowed: tuple[type[exp.Expression], ...],
    columns: set[str] | None,
    tables: frozenset[str],
) -> None:
    if isinstance(node, exp.Literal) and node.is_string:
        text = node.this
        if _URL_RE.match(text) or _PATH_RE.match(text):
            raise SqlRejected("a URL or file path is not allowed in SQL text")
    if isinstance(node, exp.Column):
        if node.table and node.table.lower() not in tables:
            raise SqlRejected("a qualified column (table.column) is not allowed")
        if columns is not None and node.name not in columns and not isinstance(node.this, exp.Star):
            listing = ", ".join(sorted(columns))
            raise SqlRejected(f"no column {node.name!r} (columns: {listing})")
        return
    if isinstance(node, exp.In) and any(
        node.args.get(k) is not None for k in ("query", "unnest", "field")
    ):
        raise SqlRejected("IN takes a list of literals only, not a subquery")
    if isinstance(node, exp.Select | exp.Subquery | exp.Table | exp.Join | exp.With):
        raise SqlRejected(f"{_name(node)} is not allowed")
    if isinstance(node, allowed):
        return
    if isinstance(node, exp.Func):
        name = _func_name(node)
        if name is None:
            raise SqlRejected(f"{_name(node)} is not allowed")
        return
    raise SqlRejected(f"{_name(node)} is not allowed")


def _func_name(node: exp.Func) -> str | None:
    """The allowed name a function node is known by, or None."""
    if isinstance(node, exp.Anonymous):
        name = str(node.name).lower()
        return name if name in ALLOWED_FUNCTIONS else None
    for name in type(node).sql_names():
        if name.lower() in ALLOWED_FUNCTIONS:
            return name.lower()
    return None


def _name(node: exp.Expression) -> str:
    if isinstance(node, exp.Func) and not isinstance(node, exp.Connector):
        fname = node.name if isinstance(node, exp.Anonymous) else type(node).sql_names()[0]
        if _TABLE_FN_NAME_RE.fullmatch(str(fname)):
            return f"table function {str(fname).lower()}()"
        return f"function {str(fname).lower()}()"
    for kind, label in _NAMES:
        if isinstance(node, kind):
            return label
    return type(node).__name__


def _code_without_table_functions(sql: str) -> str:
    """The code of ``sql`` (see ``_code_only``); SqlRejected if it calls a table function."""
    code = _code_only(sql)
    m = _TABLE_FN_RE.search(code)
    if m:
        raise SqlRejected(f"table function {m.group(1).lower()}() is not allowed")
    return code


def _code_only(sql: str) -> str:
    """``sql`` with its plain string literals emptied, for the raw-text checks.

    A literal in single quotes with no backslash reads the same to every SQL parser ('' is the
    only escape), so a word inside it (`site = 'kitchen table'`) is data, not code. Anything
    else (comments, E'…', $$…$$, a backslash, text that does not tokenize) stays in and is
    checked word by word.
    """
    try:
        tokens = sqlglot.tokenize(sql, read=DIALECT)
    except SqlglotError:
        return sql
    out, pos = [], 0
    for tok in tokens:
        if tok.token_type != TokenType.STRING:
            continue
        raw = sql[tok.start : tok.end + 1]
        if len(raw) >= 2 and raw[0] == raw[-1] == "'" and "\\" not in raw:
            out.append(sql[pos : tok.start] + "''")
            pos = tok.end + 1
    out.append(sql[pos:])
    return "".join(out)


def _check_tokens(sql: str) -> None:
    """What the raw text says, whatever a parser makes of it: no `;`, only allowed calls."""
    try:
        tokens = sqlglot.tokenize(sql, read=DIALECT)
    except SqlglotError:
        raise SqlRejected("invalid SQL: it does not tokenize (an unclosed quote?)") from None
    for tok, nxt in zip(tokens, [*tokens[1:], None], strict=True):
        if tok.token_type == TokenType.SEMICOLON:
            raise SqlRejected("stacked statements (;) are not allowed")
        if nxt is None or nxt.token_type != TokenType.L_PAREN:
            continue
        word = tok.text.lower()
        called = tok.token_type == TokenType.IDENTIFIER or (
            bool(_WORD_RE.match(tok.text)) and word not in _STRUCTURAL_WORDS
        )
        if called and word not in ALLOWED_FUNCTIONS:
            kind = "table function" if _TABLE_FN_NAME_RE.fullmatch(word) else "function"
            raise SqlRejected(f"{kind} {word}() is not allowed")


def _parse_one(sql: str, what: str) -> exp.Expression:
    try:
        trees = sqlglot.parse(sql, read=DIALECT)
    except SqlglotError as exc:
        raise SqlRejected(f"it does not parse as a SQL {what}: {_parse_reason(exc)}") from None
    trees = [t for t in trees if t is not None]
    if len(trees) != 1:
        raise SqlRejected("stacked statements (;) are not allowed")
    return trees[0]


def _parse_reason(exc: SqlglotError) -> str:
    """sqlglot's reason without its excerpt of the text (the text is the user's own anyway)."""
    errors = getattr(exc, "errors", None) or []
    if errors and isinstance(errors[0], dict) and errors[0].get("description"):
        first = errors[0]
        return f"{first['description']} (line {first.get('line')}, col {first.get('col')})"
    return safe_reason(exc)


# ---------------------------------------------------------------------------------------------
# what the rest of the code calls


def compile_expr(sql: str, columns: Iterable[str] | None = None) -> pl.Expr:
    """A Polars expression from SQL text that passed the gate.

    ValueError (``invalid SQL expression …``) when the gate refuses it or Polars cannot parse
    it. ``columns``: the frame's columns when known, so an unknown name fails here.
    """
    try:
        gate_expr(sql, columns)
    except SqlRejected as exc:
        raise SqlRejected(f"invalid SQL expression {sql!r}: {exc}") from None
    try:
        return pl.sql_expr(sql)
    except Exception as exc:  # polars raises several SQL error types
        raise ValueError(f"invalid SQL expression {sql!r}: {safe_reason(exc)}") from None


def check_on(expr: pl.Expr, sql: str, schema_frame: pl.DataFrame, boolean: bool = False) -> None:
    """Evaluate ``expr`` on an empty frame to catch unknown columns and type errors."""
    cols = ", ".join(schema_frame.columns)
    try:
        gate_expr(sql, schema_frame.columns)
    except SqlRejected as exc:
        raise ValueError(f"{sql!r} fails on columns [{cols}]: {exc}") from None
    try:
        out = schema_frame.clear().select(expr)
    except Exception as exc:
        raise ValueError(f"{sql!r} fails on columns [{cols}]: {safe_reason(exc)}") from None
    if boolean and out.dtypes[0] not in (pl.Boolean, pl.Null):
        raise ValueError(f"{sql!r} is not a boolean expression (it gives {out.dtypes[0]})")


def apply_where(df: pl.DataFrame, expr: pl.Expr) -> pl.DataFrame:
    """Rows where ``expr`` is true (SQL semantics: Polars' filter drops null like false)."""
    return df.filter(expr)


def run_query(df: pl.DataFrame, query: str) -> pl.DataFrame:
    """A gated SELECT over ``df`` registered as the only table, `self`."""
    _gate_query_once(query)
    return df.sql(query, table_name=TABLE)


@functools.lru_cache(maxsize=256)
def _gate_query_once(query: str) -> None:
    """The gate of a query, parsed once per text rather than once per batch."""
    gate_query(query)


def safe_reason(exc: BaseException) -> str:
    """The first line of an error: Polars' own reasons name the frame's columns and dtypes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
