"""A fleet: several collectors, one lake folder, one S3 prefix, one Elasticsearch index (issue 12).

Every device runs the same config file (device id, seed and replay folder from its environment)
with its own data dir, as real `collector run` processes against a real moto server (S3 over
HTTP) and the Elasticsearch wire double. Each device runs `--once` twice, then a longer run
killed with SIGKILL in the middle of a replay, then `--once` to finish. The tests read back
what landed, rows in lake files, Parquet objects in the bucket and documents in the index, and
check, per device and per reading, that it is there exactly once, and that every file name,
object key and `_id` carries its device and its data dir's instance id.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector.runtime.identity import device_slug
from collector.sources.simulated import SimulatedConfig, generate
from collector.testing import moto_server
from tests.e2e.conftest import Collector, read_lake, wait_for, write_config
from tests.sinks.es.double import ElasticsearchDouble

pytestmark = pytest.mark.slow

REGION = "us-east-1"
PREFIX = "fleet/readings"
INDEX = "fleet-readings"
SIM_START = datetime(2024, 5, 1, tzinfo=UTC)
A_START = datetime(2024, 5, 2, tzinfo=UTC)
B_START = datetime(2024, 5, 3, tzinfo=UTC)
A_ROWS, B_ROWS = 20, 1200
SPEED = 200  # B: 1,200 s of recording at 200x, about 6 s of replay
KEY = ("device", "source", "metric", "ts")
SIM = {
    "name": "sim",
    "type": "simulated",
    "every": "1h",  # one tick per start: --once ticks once, a long run ticks on start
    "seed": "${SIM_SEED}",
    "start": SIM_START.isoformat(),
    "metrics": {
        "temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"},
        "pressure": {"kind": "walk", "start": 1000, "step": 0.5, "unit": "hPa"},
    },
}


# -- the shared destinations ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id="AKIDTESTING",
        aws_secret_access_key="testing-secret",
    )


@pytest.fixture
def bucket(moto_url: str) -> str:
    name = f"fleet-{uuid.uuid4().hex[:12]}"
    s3_client(moto_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def es() -> Iterator[ElasticsearchDouble]:
    with ElasticsearchDouble("elasticsearch") as double:
        yield double


def aws_env(tmp_path: Path) -> dict[str, str]:
    env = {
        "AWS_ACCESS_KEY_ID": "AKIDTESTING",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return env


# -- the fleet -----------------------------------------------------------------------------------


class Device:
    """One device of the fleet: its id, seed, data dir and replay folder."""

    def __init__(self, root: Path, device: str, seed: int, index: int) -> None:
        self.device, self.seed, self.index = device, seed, index
        self.data_dir = root / f"data-{index}"
        self.replay_dir = root / f"replay-{index}"
        self.replay_dir.mkdir(parents=True)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {
            **base,
            "DEVICE_ID": self.device,
            "SIM_SEED": str(self.seed),
            "REPLAY_DIR": str(self.replay_dir),
        }

    @property
    def instance(self) -> str:
        return (self.data_dir / "state" / "instance-id").read_text().strip()

    @property
    def prefix(self) -> str:
        """What every id of this device starts with: device slug, then instance id."""
        return f"{device_slug(self.device)}-{self.instance}-"

    def csv_rows(self, start: datetime, n: int, first: int) -> list[tuple[str, datetime, float]]:
        """(metric, ts, value) of a replay file; values are distinct per device and row."""
        return [
            ("flow", start + timedelta(seconds=i), self.index * 1e6 + first + i) for i in range(n)
        ]

    def write_csv(self, name: str, rows: list[tuple[str, datetime, float]]) -> None:
        pl.DataFrame(
            {
                "ts": [ts.strftime("%Y-%m-%dT%H:%M:%SZ") for _, ts, _ in rows],
                "metric": [m for m, _, _ in rows],
                "value": [v for _, _, v in rows],
            }
        ).write_csv(self.replay_dir / name)


def fleet_config(path: Path, lake: Path, moto: str, bucket: str, es_url: str) -> Path:
    """The one config every device runs; only the environment differs."""
    batch = {"max_rows": 400, "max_age": "300ms"}
    return write_config(
        path,
        {
            "device": "${DEVICE_ID}",
            "log": {"checkpoint_every": "300ms"},
            "sources": [
                SIM,
                {
                    "name": "rec",
                    "type": "replay",
                    "path": "${REPLAY_DIR}/*.csv",
                    "speed": SPEED,
                    "chunk_rows": 20,
                },
            ],
            "sinks": [
                {"name": "lake", "type": "lake", "path": str(lake), "batch": batch},
                {
                    "name": "s3",
                    "type": "s3",
                    "bucket": bucket,
                    "key_prefix": PREFIX,
                    "partition_by": ["device", "date"],
                    "endpoint_url": moto,
                    "region": REGION,
                    "batch": batch,
                    "spool": {"retry_base": "0.1s", "retry_cap": "0.5s"},
                },
                {
                    "name": "search",
                    "type": "elasticsearch",
                    "hosts": [es_url],
                    "index": INDEX,
                    "batch": batch,
                    "spool": {"retry_base": "0.1s", "retry_cap": "0.5s"},
                },
            ],
        },
    )


def start(cfg: Path, dev: Device, base_env: dict[str, str], *args: str) -> Collector:
    return Collector(cfg, "--data-dir", str(dev.data_dir), *args, env=dev.env(base_env))


def finish(c: Collector, timeout: float = 120) -> None:
    code = c.proc.wait(timeout=timeout)
    c.fh.close()
    assert code == 0, c.output()


def run_once_all(
    cfg: Path, devices: list[Device], base_env: dict[str, str], started: list[Collector]
) -> None:
    """Every device runs `--once` at the same time, as a fleet would."""
    procs = [start(cfg, d, base_env, "--once") for d in devices]
    started.extend(procs)
    for c in procs:
        finish(c)


# -- reading back --------------------------------------------------------------------------------


def lake_rows(lake: Path) -> pl.DataFrame:
    """Every lake row with the name of the file it is in."""
    frames = [
        pl.read_parquet(f).with_columns(pl.lit(f.name).alias("__where"))
        for f in sorted(lake.glob("**/*.parquet"))
    ]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def s3_rows(moto: str, bucket: str) -> pl.DataFrame:
    """Every row of every object under the prefix, with the object's key."""
    s3 = s3_client(moto)
    frames = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            assert key.startswith(PREFIX + "/"), key
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            frames.append(
                pl.read_parquet(io.BytesIO(body)).with_columns(pl.lit(key).alias("__where"))
            )
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def es_rows(double: ElasticsearchDouble) -> pl.DataFrame:
    """Every document of the index, with its `_id` (as `record_id` and `__where`)."""
    docs = double.all_docs(INDEX)
    assert set(double.docs) <= {INDEX}, sorted(double.docs)
    rows = []
    for doc_id, src in docs.items():
        ts = datetime.fromisoformat(src["ts"].replace("Z", "+00:00"))
        rows.append(
            {
                "device": src["device"],
                "source": src["source"],
                "metric": src["metric"],
                "ts": ts,
                "value": src.get("value"),
                "record_id": doc_id,
                "__where": doc_id,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "device": pl.String,
            "source": pl.String,
            "metric": pl.String,
            "ts": pl.Datetime("us", "UTC"),
            "value": pl.Float64,
            "record_id": pl.String,
            "__where": pl.String,
        },
    )


def sim_expected(dev: Device, ticks: int) -> list[tuple[str, str, datetime, float]]:
    cfg = SimulatedConfig.model_validate({**SIM, "seed": dev.seed})
    return [
        ("sim", r["metric"], r["ts"], r["value"])
        for tick in range(ticks)
        for r in generate(cfg, dev.device, tick, SIM_START)
    ]


def check_destination(
    name: str,
    df: pl.DataFrame,
    devices: list[Device],
    replayed: dict[str, list[tuple[str, datetime, float]]],
    min_ticks: int,
) -> None:
    """Per device and per reading: present exactly once; ids carry device and instance."""
    assert not df.is_empty(), f"{name}: nothing landed"
    by_device = {d.device: d for d in devices}
    assert set(df["device"].unique()) == set(by_device), f"{name}: devices {df['device']}"
    assert df["record_id"].n_unique() == df.height, f"{name}: record_id repeated in the fleet"
    for dev in devices:
        mine = df.filter(pl.col("device") == dev.device)
        keys = Counter(zip(mine["source"], mine["metric"], mine["ts"], strict=True))
        twice = {k: n for k, n in keys.items() if n != 1}
        assert not twice, f"{name}: {dev.device}: readings not exactly once: {twice}"
        sim = mine.filter(pl.col("source") == "sim")
        ticks = sim.height // len(SIM["metrics"])  # type: ignore[arg-type]
        assert ticks >= min_ticks, f"{name}: {dev.device}: only {ticks} simulated ticks"
        expected = sim_expected(dev, ticks) + [("rec", *r) for r in replayed[dev.device]]
        got = list(zip(mine["source"], mine["metric"], mine["ts"], mine["value"], strict=True))
        assert sorted(got) == sorted(expected), f"{name}: {dev.device}: wrong readings"
        for where, rid in zip(mine["__where"], mine["record_id"], strict=True):
            assert dev.prefix in where, f"{name}: {where!r} lacks {dev.prefix!r}"
            assert rid.startswith(dev.prefix), f"{name}: record_id {rid!r}"


def test_fleet_one_lake_one_bucket_one_index_every_reading_exactly_once(
    tmp_path: Path, moto_url: str, bucket: str, es: ElasticsearchDouble, collectors: list[Collector]
) -> None:
    lake = tmp_path / "shared-lake"
    cfg = fleet_config(tmp_path / "fleet.yaml", lake, moto_url, bucket, es.url)
    base = aws_env(tmp_path)
    devices = [Device(tmp_path, f"edge-0{i}", seed=100 + i, index=i) for i in (1, 2, 3)]
    replayed: dict[str, list[tuple[str, datetime, float]]] = {}
    for d in devices:
        a = d.csv_rows(A_START, A_ROWS, 0)
        d.write_csv("a.csv", a)
        replayed[d.device] = a

    run_once_all(cfg, devices, base, collectors)  # tick 0 and all of a.csv
    run_once_all(cfg, devices, base, collectors)  # tick 1; a.csv is not replayed again

    # b.csv arrives; a long run replays it at 200x and is killed in the middle
    for d in devices:
        b = d.csv_rows(B_START, B_ROWS, A_ROWS)
        d.write_csv("b.csv", b)
        replayed[d.device] += b
    long_runs = [start(cfg, d, base) for d in devices]
    collectors.extend(long_runs)

    def b_rows_in_lake(dev: Device) -> int:
        try:
            df = read_lake(lake)
        except (OSError, pl.exceptions.PolarsError):
            return 0
        if df.is_empty():
            return 0
        return df.filter((pl.col("device") == dev.device) & (pl.col("ts") >= B_START)).height

    for d, c in zip(devices, long_runs, strict=True):
        wait_for(lambda d=d: b_rows_in_lake(d) > 0, timeout=60, what=f"{d.device} replaying b")
        time.sleep(0.2 * d.index)  # each device dies at another point of the file
        c.proc.kill()
        c.proc.wait()
        c.fh.close()
        assert b_rows_in_lake(d) < B_ROWS, f"{d.device} finished b.csv before the kill"
    run_once_all(cfg, devices, base, collectors)  # recover: the rest of b.csv, tick 2 or 3

    check_destination("lake", lake_rows(lake), devices, replayed, 3)
    check_destination("s3", s3_rows(moto_url, bucket), devices, replayed, 3)
    check_destination("elasticsearch", es_rows(es), devices, replayed, 3)
    instances = {d.instance for d in devices}
    assert len(instances) == 3, instances


def test_a_long_odd_device_id_gives_short_keys_and_lands_once(
    tmp_path: Path, moto_url: str, bucket: str, es: ElasticsearchDouble, collectors: list[Collector]
) -> None:
    device = ("plant/東京/ライン-7/../センサー群/" * 20)[:200]
    assert len(device) == 200 and "/" in device
    lake = tmp_path / "shared-lake"
    cfg = fleet_config(tmp_path / "fleet.yaml", lake, moto_url, bucket, es.url)
    dev = Device(tmp_path, device, seed=7, index=9)
    rows = dev.csv_rows(A_START, 5, 0)
    dev.write_csv("a.csv", rows)
    base = aws_env(tmp_path)
    run_once_all(cfg, [dev], base, collectors)
    run_once_all(cfg, [dev], base, collectors)

    files = sorted(lake.glob("**/*.parquet"))
    assert files
    for f in files:
        rel = f.relative_to(lake)
        assert all(len(part.encode()) < 255 for part in rel.parts), rel
        assert f.resolve().is_relative_to(lake.resolve()), f
    keys = s3_rows(moto_url, bucket)["__where"].unique().to_list()
    assert keys
    for key in keys:
        assert len(key.encode()) < 1024, key
        assert all(len(part.encode()) < 255 for part in key.split("/")), key
    for doc_id in es.all_docs(INDEX):
        assert len(doc_id.encode()) <= 512, doc_id

    replayed = {device: rows}
    check_destination("lake", lake_rows(lake), [dev], replayed, 2)
    check_destination("s3", s3_rows(moto_url, bucket), [dev], replayed, 2)
    check_destination("elasticsearch", es_rows(es), [dev], replayed, 2)
    assert os.sep not in device_slug(device)
