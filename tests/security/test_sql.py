"""Untrusted SQL text cannot read files, reach URLs or leak data (issue 14 item 1).

Every entry point that takes user SQL is fed the same attacks against a planted secret file
(a unique marker in ``tmp_path``): sink ``where`` (through `collector check` and `collector
run`), ``filter``, ``derive``, the ``sql`` transform, `collector export --where` (the real CLI)
and the dashboard's row filter (its data functions). Each must be refused, name what it
refused, and print the marker nowhere. A control test shows raw Polars SQL would leak it, so
these tests fail if the gate goes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError

from collector import sqlexpr
from collector.commands.export import LakeQuery
from collector.plugin import Context
from collector.schema import empty_readings
from collector.transforms.derive import DeriveConfig, DeriveTransform
from collector.transforms.filter import FilterConfig, FilterTransform
from collector.transforms.sql import SqlConfig
from dashboards import data
from sample_data.make_lake import aggregate_table, write_lake

ROOT = Path(__file__).resolve().parents[2]
MARKER = "TOPSECRET-d41d8cd98f00b204"


@pytest.fixture
def secret(tmp_path: Path) -> dict[str, str]:
    """The same secret as CSV, Parquet, JSON and IPC files, plus where a COPY would write."""
    folder = tmp_path / "secret"
    folder.mkdir()
    frame = pl.DataFrame({"metric": [MARKER], "value": [1.0]})
    paths = {
        "csv": folder / "secret.csv",
        "parquet": folder / "secret.parquet",
        "json": folder / "secret.json",
        "ipc": folder / "secret.arrow",
    }
    paths["csv"].write_text(f"{MARKER},x\n")
    frame.write_parquet(paths["parquet"])
    frame.write_ndjson(paths["json"])
    frame.write_ipc(paths["ipc"])
    out = {k: str(v) for k, v in paths.items()}
    out["copy_to"] = str(folder / "copied.csv")
    return out


def expression_attacks(s: dict[str, str]) -> dict[str, str]:
    """Boolean expressions (where, filter, derive, export, dashboard) that try to read out."""
    return {
        "read_csv": f"metric IN (SELECT column_1 FROM read_csv('{s['csv']}', has_header => false))",
        "read_parquet": f"metric IN (SELECT metric FROM read_parquet('{s['parquet']}'))",
        "read_json": f"metric IN (SELECT metric FROM read_json('{s['json']}'))",
        "read_ipc": f"metric IN (SELECT metric FROM read_ipc('{s['ipc']}'))",
        "scan_csv": f"scan_csv('{s['csv']}') IS NOT NULL",
        "url": "metric IN (SELECT column_1 FROM read_csv('http://127.0.0.1:9/secret.csv'))",
        "url_literal": "metric = 'https://169.254.169.254/latest/meta-data/'",
        "subquery": "value > (SELECT max(value) FROM self)",
        "exists": "EXISTS (SELECT 1)",
        "copy": f"COPY (SELECT 1) TO '{s['copy_to']}'",
        "stacked": f"value > 1; SELECT * FROM read_csv('{s['csv']}')",
        "comment_smuggle": f"value > 1 /* ) OR metric IN (SELECT * FROM read_csv('{s['csv']}' */",
        # a parser that takes \' as an escape sees code after it: never read as plain data
        "escape_smuggle": f"unit = 'x\\' OR metric IN (SELECT * FROM read_csv('{s['csv']}')) --'",
    }


def query_attacks(s: dict[str, str]) -> dict[str, str]:
    """Whole queries for the sql transform."""
    return {
        "read_csv": f"SELECT * FROM read_csv('{s['csv']}')",
        "read_parquet": "SELECT * FROM self UNION ALL "
        f"SELECT * FROM read_parquet('{s['parquet']}')",
        "read_json": f"WITH t AS (SELECT * FROM read_json('{s['json']}')) SELECT * FROM t",
        "read_ipc": f"SELECT * FROM self JOIN read_ipc('{s['ipc']}') AS x ON true",
        "scan_csv": f"SELECT * FROM scan_csv('{s['csv']}')",
        "path_table": f"SELECT * FROM '{s['csv']}'",
        "url": "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')",
        "subquery": "SELECT * FROM self WHERE metric IN "
        f"(SELECT metric FROM read_csv('{s['csv']}'))",
        "other_table": "SELECT * FROM other",
        "copy": f"COPY self TO '{s['copy_to']}'",
        "stacked": f"SELECT * FROM self; SELECT * FROM read_csv('{s['csv']}')",
        "create": f"CREATE TABLE t AS SELECT * FROM read_csv('{s['csv']}')",
    }


def assert_clean(text: str, secret: dict[str, str]) -> None:
    assert MARKER not in text
    assert not Path(secret["copy_to"]).exists()


FORBIDDEN = re.compile(
    r"not allowed|refused|only|does not parse|no column", re.IGNORECASE
)


# ---------------------------------------------------------------------------------------------
# the control: without the gate, Polars SQL reads the file and prints it


def test_control_raw_polars_sql_leaks_the_file(secret: dict[str, str]) -> None:
    attack = f"metric IN (SELECT nosuch FROM read_csv('{secret['csv']}'))"  # issue 14's form
    with pytest.raises(Exception) as info:
        pl.DataFrame({"metric": ["t"]}).filter(pl.sql_expr(attack))
    assert MARKER in str(info.value)  # the very leak the gate exists for


# ---------------------------------------------------------------------------------------------
# the gate and the transforms, in process


def test_every_expression_attack_is_refused_in_process(secret: dict[str, str]) -> None:
    ctx = Context(device="edge-01", component="t", data_dir=Path(secret["csv"]).parent)
    for name, attack in expression_attacks(secret).items():
        messages = []
        for build in (
            lambda a: sqlexpr.compile_expr(a),
            lambda a: sqlexpr.compile_expr(a, ["ts", "metric", "value"]),
            lambda a: FilterTransform(FilterConfig(type="filter", where=a), ctx),
            lambda a: DeriveTransform(DeriveConfig(type="derive", columns={"x": a}), ctx),
            lambda a: LakeQuery("lake", where=a),
        ):
            with pytest.raises((ValueError, ValidationError)) as info:
                build(attack)
            messages.append(str(info.value))
        for text in messages:
            assert_clean(text, secret)
            assert FORBIDDEN.search(text), (name, text)


def test_every_query_attack_is_refused_in_process(secret: dict[str, str]) -> None:
    for name, attack in query_attacks(secret).items():
        with pytest.raises(ValidationError) as info:
            SqlConfig(type="sql", query=attack)
        assert_clean(str(info.value), secret)
        assert "invalid SQL query" in str(info.value), name
        with pytest.raises(ValueError) as run_info:
            sqlexpr.run_query(empty_readings(), attack)
        assert_clean(str(run_info.value), secret)


def test_the_message_names_the_construct(secret: dict[str, str]) -> None:
    attacks = expression_attacks(secret)
    cases = {
        "read_csv": "table function read_csv()",
        "scan_csv": "table function scan_csv()",
        "url_literal": "URL or file path",
        "subquery": "SELECT",
        "copy": "COPY",
        "stacked": "SELECT",
    }
    for name, words in cases.items():
        with pytest.raises(ValueError, match=re.escape(words)):
            sqlexpr.compile_expr(attacks[name])
    with pytest.raises(ValueError, match="stacked statements"):
        sqlexpr.compile_expr("value > 1; value < 2")
    with pytest.raises(ValueError, match="JOIN"):
        sqlexpr.gate_query("SELECT * FROM self JOIN self AS b ON true")
    with pytest.raises(ValueError, match="function system"):
        sqlexpr.compile_expr("system('id') = 0")


def test_an_accepted_expression_that_fails_names_only_frame_columns() -> None:
    """Errors at evaluation come from the frame: its columns, its dtypes."""
    frame = empty_readings()
    with pytest.raises(ValueError, match=r"no column 'maxx' \(columns: .*metric") as info:
        sqlexpr.check_on(pl.col("x"), "maxx > 1", frame)
    assert set(re.findall(r"columns: ([^)]*)", str(info.value))[0].split(", ")) == set(
        frame.columns
    )


# ---------------------------------------------------------------------------------------------
# through the real CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=180,
    )


def _config(tmp_path: Path, secret: dict[str, str]) -> Path:
    """One config holding every attack in a filter, a derive, an sql transform and a sink."""
    exprs = list(expression_attacks(secret).values())
    queries = list(query_attacks(secret).values())
    transforms: list[dict[str, object]] = []
    for e in exprs:
        transforms.append({"type": "filter", "where": e})
        transforms.append({"type": "derive", "columns": {"x": e}})
    transforms += [{"type": "sql", "query": q} for q in queries]
    sinks = [{"name": f"s{i}", "type": "console", "where": e} for i, e in enumerate(exprs)]
    cfg = {
        "device": "edge-01",
        "data_dir": str(tmp_path / "data"),
        "sources": [
            {"name": "room", "type": "simulated", "every": "1s",
             "metrics": {"temperature": {"min": 0, "max": 30}}}
        ],
        "transforms": transforms,
        "sinks": sinks,
    }
    path = tmp_path / "attack.yaml"
    path.write_text(yaml.safe_dump(cfg, width=10_000))
    return path


@pytest.mark.slow
def test_collector_check_and_run_refuse_every_attack(
    tmp_path: Path, secret: dict[str, str]
) -> None:
    config = _config(tmp_path, secret)
    n_exprs, n_queries = len(expression_attacks(secret)), len(query_attacks(secret))
    res = _cli("check", str(config), cwd=tmp_path)
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert_clean(out, secret)
    assert "Traceback" not in out
    for i in range(2 * n_exprs + n_queries):
        assert re.search(rf"transforms\[{i}\]\.[^\n]*: invalid SQL", out), i
    for i in range(n_exprs):
        assert re.search(rf"sinks\[{i}\]\.where: invalid SQL expression", out), i
    # `collector run` validates the same way and never starts
    res = _cli("run", str(config), "--once", cwd=tmp_path)
    assert res.returncode == 2
    assert_clean(res.stdout + res.stderr, secret)
    assert not (tmp_path / "data" / "log").exists()


@pytest.fixture(scope="module")
def small_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sqllake") / "lake"
    write_lake(aggregate_table(days=1, devices=("edge-01",), gap=None), root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["read_csv", "read_parquet", "read_json", "read_ipc", "scan_csv", "url", "subquery",
             "copy", "stacked"]
)
def test_export_where_refuses_every_attack(
    name: str, tmp_path: Path, secret: dict[str, str], small_lake: Path
) -> None:
    out = tmp_path / "out.csv"
    attack = expression_attacks(secret)[name]
    res = _cli("export", "--lake", str(small_lake), "--where", attack, "--out", str(out),
               "--no-progress", cwd=tmp_path)
    text = res.stdout + res.stderr
    assert res.returncode == 2, text
    assert_clean(text, secret)
    assert "Traceback" not in text and FORBIDDEN.search(text)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the dashboard's row filter (the page calls these; the browser test drives the page itself)


def test_dashboard_row_filter_refuses_every_attack(
    secret: dict[str, str], small_lake: Path, tmp_path: Path
) -> None:
    spool = tmp_path / "spool.arrow"
    table = pq.read_table(next(small_lake.rglob("*.parquet")))
    with pa.OSFile(str(spool), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    for name, attack in expression_attacks(secret).items():
        with pytest.raises(ValueError) as info:
            LakeQuery(str(small_lake), where=attack)
        assert_clean(str(info.value), secret)
        # a query object built around the check (as a page might) is still gated when read
        query = LakeQuery(str(small_lake))
        object.__setattr__(query, "where", attack)
        for read in (
            lambda q: data.lake_frame(q).collect(),
            lambda q: data.spool_frame(q, [spool]).collect(),
        ):
            with pytest.raises(ValueError) as info:
                read(query)
            assert_clean(str(info.value), secret)
            assert FORBIDDEN.search(str(info.value)), name


# ---------------------------------------------------------------------------------------------
# what users legitimately write still works


LEGIT_EXPRESSIONS = [
    "value BETWEEN -40 AND 85",
    "value IS NOT NULL",
    "metric = 'temperature' AND max > 70",
    "CASE WHEN unit = 'bar' THEN value * 100 ELSE value END",
    "CASE WHEN unit = 'bar' THEN 'kPa' ELSE unit END",
    "value * 9 / 5 + 32",
    "round(value, 1) > 20 OR abs(value) < 1",
    "coalesce(value, 0) >= 0 AND lower(unit) LIKE 'c%' AND unit ILIKE 'C'",
    "metric IN ('temperature', 'humidity') AND length(metric) > 3",
    "CAST(value AS INT) > 1 AND value::float < 100 AND sqrt(abs(value)) >= 0",
    "unit = 'm/s' OR substr(metric, 1, 4) = 'temp'",
    "extract(hour FROM ts) >= 0 AND date_part('minute', ts) >= 0",
    # words of SQL inside plain string literals are data (a tag value, a label)
    "unit <> 'kitchen table' AND metric <> 'select values with care'",
]


def test_legit_expressions_compile_and_run() -> None:
    frame = pl.DataFrame(
        {
            "ts": pl.Series([0, 60_000_000], dtype=pl.Datetime("us", "UTC")),
            "metric": ["temperature", "humidity"],
            "value": [21.5, 40.0],
            "unit": ["C", "%"],
            "max": [80.0, 41.0],
        }
    )
    for sql in LEGIT_EXPRESSIONS:
        expr = sqlexpr.compile_expr(sql, frame.columns)
        assert frame.select(expr).height == 2, sql


def test_readme_sql_passes_the_gate() -> None:
    """Every where/query/derive example in README still passes."""
    readme = (ROOT / "README.md").read_text()
    wheres = re.findall(r'where:\s*"([^"]+)"', readme) + re.findall(
        r'--where "([^"]+)"', readme
    )
    queries = re.findall(r'query:\s*"([^"]+)"', readme)
    assert "value BETWEEN -40 AND 85" in wheres and queries
    for sql in wheres:
        sqlexpr.compile_expr(sql)
    for query in queries:
        sqlexpr.gate_query(query)
    sqlexpr.compile_expr("value * 9 / 5 + 32")  # README's derive example


@pytest.mark.slow
def test_collector_check_passes_every_sample_config(tmp_path: Path) -> None:
    configs = [
        p for p in sorted((ROOT / "sample_data").glob("*.yaml"))
        if isinstance(yaml.safe_load(p.read_text()), dict)
        and "sources" in yaml.safe_load(p.read_text())
    ]
    assert len(configs) >= 5
    for path in configs:
        res = _cli("check", str(path), cwd=ROOT)
        assert res.returncode == 0, (path.name, res.stdout, res.stderr)
        assert "OK" in res.stdout
