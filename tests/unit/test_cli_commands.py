"""The CLI glue: catalog, check --estimate, export, status on an empty folder, commands that
need no optional package, the samples' headers, the last line of a stopped collector."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from collector import config

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env={**os.environ, **(env or {})})


HIDE_PACKAGES = """\
import os, sys

HIDDEN = set(os.environ["HIDE_PACKAGES"].split(","))


class Hide:
    \"\"\"Wraps a finder: the hidden packages are not installed, as far as Python can tell.\"\"\"

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self._finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, attr):
        return getattr(self._finder, attr)


sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def without(tmp_path: Path, *packages: str) -> dict[str, str]:
    """The environment of a Python on which ``packages`` are not installed (a sitecustomize)."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(HIDE_PACKAGES)
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "HIDE_PACKAGES": ",".join(packages)}


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


def test_status_of_a_missing_data_dir_says_so_and_fails(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    for args in ((), ("--json",)):
        res = cli("status", "--data-dir", str(missing), *args)
        assert res.returncode == 1
        assert f"data dir {missing} does not exist" in res.stderr
        assert res.stdout == ""
    assert not missing.exists()


AWS = ("aiobotocore", "botocore", "boto3")


def test_commands_without_io_work_without_the_extras(tmp_path: Path) -> None:
    env = without(tmp_path, *AWS, "psutil")
    probe = subprocess.run([sys.executable, "-c", "import psutil"], env={**os.environ, **env},
                           capture_output=True, text=True)
    assert "No module named 'psutil'" in probe.stderr  # the shim works
    # catalog reads the config and prints DDL: no AWS library involved
    res = cli("catalog", "--config", write(tmp_path, DEMO), env=env)
    assert res.returncode == 0, res.stderr
    assert "CREATE EXTERNAL TABLE IF NOT EXISTS `lake_s3`" in res.stdout
    # status only takes data_dir from the config
    data = tmp_path / "data"
    data.mkdir()
    multi = str(ROOT / "sample_data" / "multi.yaml")
    res = cli("status", "--config", multi, env={**env, "DATA_DIR": str(data)})
    assert res.returncode == 0, res.stderr
    assert f"no collector has run with data dir {data}" in res.stdout
    # check and run do need them, and say how to get them
    for args in (("check", multi), ("run", multi, "--once", "--data-dir", str(data))):
        res = cli(*args, env=env)
        assert res.returncode == 2
        assert (
            "sources[2].type: 'system' needs the Python package 'psutil': "
            "pip install 'edge-collector[devices]'"
        ) in res.stderr
    res = cli("check", write(tmp_path, DEMO), env=env)
    assert res.returncode == 2 and "pip install 'edge-collector[aws]'" in res.stderr


def header(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(
        i for i, line in enumerate(lines) if not line.startswith("#")
    )])


SAMPLES = sorted(
    p for p in (ROOT / "sample_data").glob("*.yaml") if "sources" in yaml.safe_load(p.read_text())
)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_each_sample_says_which_extra_it_needs(path: Path) -> None:
    cfg = config.load(path, import_plugins=False, require_extras=False)
    comps = (*cfg.sources, *cfg.transforms, *cfg.sinks)
    needed = {extra for c in comps for extra in c.cls.requires.values()}
    text = header(path)
    commands = re.findall(r"\.venv/bin/pip install -e '\.\[([\w,]+)\]'", text)
    if needed:
        assert commands, f"{path.name}: no install line in the header"
        assert {e for c in commands for e in c.split(",")} == needed
    else:
        assert not commands and "Needs no extra" in text


def test_a_stop_signal_ends_with_a_stopped_line(tmp_path: Path) -> None:
    cfg = write(tmp_path, """\
sources:
  - {name: room, type: simulated, every: 100ms}
sinks:
  - {name: lake, type: lake, path: "${DATA_DIR}/lake", batch: {max_age: 100ms}}
telemetry: {enabled: false}
""")
    data = tmp_path / "data"
    log = tmp_path / "run.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "run", cfg, "--data-dir", str(data)],
            cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while not list((data / "lake").glob("**/*.parquet")):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    last = log.read_text().splitlines()[-1]
    m = re.search(r"INFO collector: collector stopped: ([\d,]+) rows in, delivered lake=([\d,]+) "
                  r"\(exit 0\)$", last)
    assert m, last
    rows_in, delivered = (int(g.replace(",", "")) for g in m.groups())
    lake = pl.read_parquet(list((data / "lake").glob("**/*.parquet")))
    assert rows_in == delivered == lake.height > 0
