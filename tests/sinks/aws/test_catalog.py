"""`collector catalog` DDL, and the lake the s3 sink writes read back by Polars and DuckDB."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from collector.commands.catalog import (
    RECORD_ID_FORMAT,
    columns_from_schema,
    ddl,
    ddl_firehose_json,
    ddl_for_config,
    ddl_for_sink,
    parse_s3_url,
)
from collector.plugin import Context
from sinks.s3 import S3Config, S3Sink

from .conftest import REGION, admin, readings


def props(text: str) -> dict[str, str]:
    return dict(re.findall(r"'([^']+)'='([^']*)'", text))


def sql(text: str) -> str:
    """The DDL without its ``--`` comment lines."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("--"))


def test_default_ddl_has_projection_for_metric_and_date():
    text = sql(ddl("s3://my-lake/readings/"))
    assert text.startswith("CREATE EXTERNAL TABLE IF NOT EXISTS `readings` (")
    assert "PARTITIONED BY (`metric` string, `date` string)" in text
    assert "STORED AS PARQUET" in text
    assert "LOCATION 's3://my-lake/readings/'" in text
    # partition columns are not data columns too (Athena refuses duplicates)
    data_cols = text.split("(", 1)[1].split(")", 1)[0]
    assert "`metric`" not in data_cols and "`ts` timestamp" in data_cols
    p = props(text)
    assert p["projection.enabled"] == "true"
    assert p["projection.metric.type"] == "injected"
    assert p["projection.date.type"] == "date"
    assert p["projection.date.format"] == "yyyy-MM-dd"
    assert p["projection.date.range"].endswith(",NOW")
    assert p["storage.location.template"] == "s3://my-lake/readings/metric=${metric}/date=${date}"


def test_custom_partitions_enums_database_and_columns():
    schema = pa.schema([("ts", pa.timestamp("us", tz="UTC")), ("device", pa.string()),
                        ("mean", pa.float64()), ("count", pa.int64()), ("partial", pa.bool_())])
    text = ddl("s3://b", ["device", "date", "hour"], columns_from_schema(schema),
               table="agg", database="iot", enums={"device": ["a", "b"]})
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `iot`.`agg`" in text
    assert "`count` bigint" in text and "`partial` boolean" in text and "`mean` double" in text
    assert "PARTITIONED BY (`device` string, `date` string, `hour` int)" in text
    p = props(text)
    assert p["projection.device.type"] == "enum" and p["projection.device.values"] == "a,b"
    assert p["projection.hour.type"] == "integer" and p["projection.hour.range"] == "0,23"
    assert p["projection.hour.digits"] == "2"
    assert p["storage.location.template"] == "s3://b/device=${device}/date=${date}/hour=${hour}"


def test_ddl_for_sink_and_config():
    sink = S3Config(type="s3", name="data-lake", bucket="my-lake", key_prefix="x/y",
                    partition_by=["device", "date"])
    text = ddl_for_sink(sink)
    assert "`data_lake`" in text and "LOCATION 's3://my-lake/x/y/'" in text
    assert "PARTITIONED BY (`device` string, `date` string)" in text
    raw = {"sinks": [{"type": "lake", "path": "x"}, {"type": "s3", "bucket": "b1"},
                     {"type": "s3", "bucket": "b2", "name": "two"}]}
    both = ddl_for_config(raw)
    assert both.count("CREATE EXTERNAL TABLE") == 2 and "s3://b2/" in both
    with pytest.raises(ValueError, match="no `s3` sink"):
        ddl_for_config({"sinks": [{"type": "lake"}]})
    with pytest.raises(ValueError, match="not 'firehose'"):
        ddl_for_sink({"type": "firehose", "stream": "s"})
    assert parse_s3_url("s3://b/p/q/") == ("b", "p/q")
    with pytest.raises(ValueError):
        parse_s3_url("https://b")


def test_firehose_json_table():
    text = ddl_firehose_json("s3://b/raw")
    assert "org.openx.data.jsonserde.JsonSerDe" in text and "`ts` string" in text
    assert props(text)["storage.location.template"] == "s3://b/raw/${dt}"


async def test_lake_reads_back_with_polars_and_duckdb(
    moto_url: str, bucket: str, tmp_path: Path
):
    """What the README shows: Polars on s3:// directly, DuckDB on the same Hive layout."""
    table = readings(200, step=timedelta(minutes=1))  # 23:00 .. 02:19: two dates
    sink = S3Sink(S3Config(type="s3", bucket=bucket, key_prefix="lake", endpoint_url=moto_url,
                           region=REGION),
                  Context(device="d", component="lake", data_dir=tmp_path))
    await sink.open()
    await sink.write(table, "000000000000-000000000199")
    await sink.close()

    df = pl.scan_parquet(
        f"s3://{bucket}/lake/**/*.parquet",
        hive_partitioning=True,
        storage_options={"aws_endpoint_url": moto_url, "aws_access_key_id": "AKIDTESTING",
                         "aws_secret_access_key": "testing-secret", "aws_region": REGION,
                         "aws_allow_http": "true"},
    ).filter(pl.col("metric") == "temperature").collect()
    expected = [r for r in table.to_dicts() if r["metric"] == "temperature"]
    assert df.height == len(expected)
    assert sorted(df["record_id"].to_list()) == sorted(r["record_id"] for r in expected)
    assert set(df["date"].cast(pl.String).to_list()) == {"2024-01-01", "2024-01-02"}

    # DuckDB's httpfs is not installable offline: read a byte-identical copy of the bucket
    s3 = admin("s3", moto_url)
    for o in s3.list_objects_v2(Bucket=bucket)["Contents"]:
        dest = tmp_path / "copy" / o["Key"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
    rows = duckdb.sql(
        f"SELECT metric, date, count(*) AS n, avg(value) AS mean FROM read_parquet("
        f"'{tmp_path}/copy/lake/**/*.parquet', hive_partitioning=true) "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert sum(r[2] for r in rows) == 200
    assert {(r[0], str(r[1])) for r in rows} == {
        (m, d) for m in ("temperature", "humidity") for d in ("2024-01-01", "2024-01-02")
    }


# ---------------------------------------------------------------------------------------------
# column types checked against real Parquet files (issue 17 item 7)


def ddl_columns(text: str) -> dict[str, str]:
    """The data columns of the first CREATE EXTERNAL TABLE, as ``{name: hive type}``."""
    body = sql(text).split("CREATE EXTERNAL TABLE", 1)[1]
    body = body.split("(", 1)[1].split("\n)\n", 1)[0]
    out = {}
    for line in body.strip().splitlines():
        name, _, kind = line.strip().rstrip(",").partition(" ")
        out[name.strip("`")] = kind
    return out


def duckdb_as_hive(kind: str) -> str:
    """DuckDB's name of a Parquet column type, spelled as Athena/Hive DDL spells it."""
    kind = kind.strip()
    if kind.endswith("[]"):
        return f"array<{duckdb_as_hive(kind[:-2])}>"
    if kind.startswith("STRUCT("):
        inner = kind[len("STRUCT("):-1]
        fields, depth, cur = [], 0, ""
        for ch in inner:
            depth += ch == "("
            depth -= ch == ")"
            if ch == "," and depth == 0:
                fields.append(cur)
                cur = ""
            else:
                cur += ch
        fields.append(cur)
        parts = []
        for f in fields:
            name, _, t = f.strip().partition(" ")
            parts.append(f"{name.strip(chr(34))}:{duckdb_as_hive(t)}")
        return "struct<" + ",".join(parts) + ">"
    if kind.startswith("MAP("):
        k, v = kind[4:-1].split(", ", 1)
        return f"map<{duckdb_as_hive(k)},{duckdb_as_hive(v)}>"
    if kind.startswith("DECIMAL("):
        return kind.lower().replace(" ", "")
    return {
        "TIMESTAMP WITH TIME ZONE": "timestamp", "TIMESTAMP": "timestamp",
        "TIMESTAMP_NS": "timestamp", "TIMESTAMP_MS": "timestamp", "VARCHAR": "string",
        "DOUBLE": "double", "FLOAT": "float", "BIGINT": "bigint", "INTEGER": "int",
        "SMALLINT": "smallint", "TINYINT": "tinyint", "UBIGINT": "decimal(20,0)",
        "UINTEGER": "bigint", "USMALLINT": "int", "UTINYINT": "smallint", "BOOLEAN": "boolean",
        "DATE": "date", "BLOB": "binary",
    }[kind]


def parquet_columns(files: list[str]) -> dict[str, str]:
    rows = duckdb.sql(
        f"DESCRIBE SELECT * FROM read_parquet({files!r}, union_by_name=true)"
    ).fetchall()
    return {r[0]: duckdb_as_hive(r[1]) for r in rows}


def test_every_arrow_type_matches_what_duckdb_reads_from_the_file(tmp_path: Path):
    point = pa.struct([("x", pa.float64()), ("tags", pa.list_(pa.string()))])
    table = pa.table({
        "ts": pa.array([0, 1], pa.timestamp("us", tz="UTC")),
        "ts_naive_ns": pa.array([0, 1], pa.timestamp("ns")),
        "ts_ms_zone": pa.array([0, 1], pa.timestamp("ms", tz="Europe/Paris")),
        "window_values": pa.array([[1.0, 2.0], []], pa.list_(pa.float64())),
        "big_list": pa.array([[1], None], pa.large_list(pa.int64())),
        "fixed": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32(), 2)),
        "point": pa.array([{"x": 1.0, "tags": ["a"]}, None], point),
        "attrs": pa.array([[("k", 1.5)], []], pa.map_(pa.string(), pa.float64())),
        "i8": pa.array([1, 2], pa.int8()), "i16": pa.array([1, 2], pa.int16()),
        "i32": pa.array([1, 2], pa.int32()), "i64": pa.array([1, 2], pa.int64()),
        "u8": pa.array([1, 2], pa.uint8()), "u32": pa.array([1, 2], pa.uint32()),
        "flag": pa.array([True, None]),
        "site": pa.array(["a", "b"]).dictionary_encode(),
        "note": pa.array(["x", "y"], pa.large_string()),
        "f32": pa.array([1, 2], pa.float32()), "day": pa.array([0, 1], pa.date32()),
        "money": pa.array([1, 2], pa.decimal128(10, 3)), "raw": pa.array([b"a", b"b"]),
    })
    path = tmp_path / "all.parquet"
    pq.write_table(table, path)
    got = ddl_columns(ddl("s3://b/p", [], columns_from_schema(pq.read_schema(path))))
    assert got == parquet_columns([str(path)])
    assert got["window_values"] == "array<double>"
    assert got["point"] == "struct<x:double,tags:array<string>>"
    assert got["site"] == "string" and got["ts_ms_zone"] == "timestamp"
    with pytest.raises(ValueError, match="no Athena equivalent"):
        columns_from_schema(pa.schema([("t", pa.time64("us"))]))


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "DEVICE_ID")}
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, cwd=cwd,
        env=env, timeout=180,
    )


def test_catalog_of_infer_config_matches_the_files_a_real_run_writes(tmp_path: Path):
    """`collector catalog --config sample_data/infer.yaml` declares the columns the run's
    Parquet files hold (window_values is list<double>: array<double>, not string)."""
    sample = Path(__file__).resolve().parents[3] / "sample_data" / "infer.yaml"
    text = sample.read_text()
    # the same sources and transforms; every row to a local lake, nothing to the network
    local = text.split("\nsinks:", 1)[0] + (
        "\nsinks:\n  - name: lake\n    type: lake\n    path: " + str(tmp_path / "lake") + "\n"
    )
    (tmp_path / "run.yaml").write_text(local)
    run = _cli("run", str(tmp_path / "run.yaml"), "--for", "3s", "--data-dir",
               str(tmp_path / "data"), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    files = sorted(str(p) for p in (tmp_path / "lake").rglob("*.parquet"))
    assert files
    cat = _cli("catalog", "--config", str(sample), cwd=tmp_path)
    assert cat.returncode == 0, cat.stderr
    declared = ddl_columns(cat.stdout)
    partitions = re.search(r"PARTITIONED BY \((.*)\)", cat.stdout).group(1)  # type: ignore[union-attr]
    part_names = re.findall(r"`([^`]+)`", partitions)
    stored = {n: t for n, t in parquet_columns(files).items() if n not in part_names}
    assert declared == stored
    assert declared["window_values"] == "array<double>"


# ---------------------------------------------------------------------------------------------
# record_id documented in the DDL, and the dedupe it describes (issue 12 item 1)


def test_ddl_documents_record_id_and_firehose_dedupe_view_keeps_each_row_once():
    lake = ddl("s3://b/lake")
    stream = ddl_firehose_json("s3://b/raw")
    for text in (lake, stream):
        comment = [line for line in text.splitlines() if line.startswith("--")]
        assert f"-- record_id = {RECORD_ID_FORMAT}" in comment
        assert any('row_number() OVER (PARTITION BY "record_id")' in c for c in comment)
    assert RECORD_ID_FORMAT == (
        "<device slug>-<instance id>-<first log offset:012d>-<last log offset:012d>"
        "[-<part:04d>]:<row>"
    )
    assert "at least once" in stream
    # the view, run by DuckDB over NDJSON rows delivered twice, shows each record_id once
    view = stream[stream.index("CREATE OR REPLACE VIEW"):]
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE readings_stream (ts VARCHAR, device VARCHAR, source VARCHAR, "
        "metric VARCHAR, value DOUBLE, unit VARCHAR, record_id VARCHAR, dt VARCHAR)"
    )
    rows = [
        ("2024-01-01T00:00:00Z", "edge-01", "s", "t", float(i), "C",
         f"edge-01-3f9a2c1b-000000000001-000000000002:{i}", "2024/01/01/00")
        for i in range(5)
    ]
    con.executemany("INSERT INTO readings_stream VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows + rows[1:3])
    con.execute(view)
    got = con.execute(
        "SELECT record_id, value FROM readings_stream_dedup ORDER BY value"
    ).fetchall()
    assert got == [(r[6], r[4]) for r in rows]
    # the one-query form in the comment works too
    query = next(line for line in stream.splitlines() if "SELECT * FROM (SELECT" in line)
    assert len(con.execute(query.removeprefix("--").strip()).fetchall()) == 5
