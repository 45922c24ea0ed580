"""The CLI glue: catalog, check --estimate, export, status on an empty folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


DEMO = """\
sources:
  - {name: room, type: simulated, every: 5s}
transforms:
  - {type: window, every: 1m}
sinks:
  - {name: lake_s3, type: s3, bucket: my-lake, key_prefix: readings, region: eu-west-1}
  - {name: cloud, type: firehose, stream: s, region: eu-west-1, where: "max > 28"}
"""


def test_catalog_describes_the_columns_after_the_window(tmp_path: Path) -> None:
    res = cli("catalog", "--config", write(tmp_path, DEMO))
    assert res.returncode == 0, res.stderr
    ddl = res.stdout
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `lake_s3`" in ddl
    assert "`mean` double" in ddl and "`count` bigint" in ddl and "`value`" not in ddl
    assert "PARTITIONED BY (`metric` string, `date` string)" in ddl
    assert "LOCATION 's3://my-lake/readings/'" in ddl
    assert "'projection.enabled'='true'" in ddl


def test_catalog_for_a_firehose_destination_and_bad_usage(tmp_path: Path) -> None:
    res = cli("catalog", "--firehose", "s3://raw-bucket/stream")
    assert res.returncode == 0, res.stderr
    assert "JsonSerDe" in res.stdout and "s3://raw-bucket/stream/" in res.stdout
    assert cli("catalog").returncode == 2


def test_check_estimate_uses_the_rates_after_the_window(tmp_path: Path) -> None:
    res = cli("check", "--estimate", write(tmp_path, DEMO))
    assert res.returncode == 0, res.stderr
    # one series, 1-minute windows: 1,440 aggregate rows a day reach the sinks
    assert "1,440/day" in res.stdout
    assert "cloud: 1,440 readings/day" in res.stdout
    assert "packing bills" in res.stdout


def test_export_writes_what_the_filters_select(tmp_path: Path) -> None:
    lake = ROOT / "sample_data" / "lake"
    out = tmp_path / "t.parquet"
    res = cli("export", "--lake", str(lake), "--metric", "temperature", "--since", "2000-01-01",
              "--where", "max > 20", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    got = pl.read_parquet(out)
    expected = (pl.scan_parquet(f"{lake}/**/*.parquet", hive_partitioning=True)
                .filter((pl.col("metric") == "temperature") & (pl.col("max") > 20)).collect())
    assert got.height == expected.height > 0
    assert f"{expected.height} rows" in res.stdout
    bad = cli("export", "--lake", str(lake), "--since", "soon", "--out", str(out))
    assert bad.returncode == 2 and "is not a time" in bad.stderr


def test_status_of_an_empty_folder(tmp_path: Path) -> None:
    res = cli("status", "--data-dir", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "no collector has run" in res.stdout
