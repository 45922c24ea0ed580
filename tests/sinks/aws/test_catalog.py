"""`collector catalog` DDL, and the lake the s3 sink writes read back by Polars and DuckDB."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import duckdb
import polars as pl
import pyarrow as pa
import pytest

from collector.commands.catalog import (
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


def test_default_ddl_has_projection_for_metric_and_date():
    text = ddl("s3://my-lake/readings/")
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
    expected = [r for r in table.to_pylist() if r["metric"] == "temperature"]
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
