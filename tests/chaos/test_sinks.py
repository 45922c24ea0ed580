"""Poison rows and a silent endpoint through the real CLI (issue 13 rows 1 and 8).

- 41 good readings plus a 30-CJK-character metric, a 1 MB metric name, NaN and inf values and
  an empty metric, through `collector run --once` into the local lake and into S3 (a real moto
  server): every good row lands exactly once, every odd one either lands (under a bounded
  partition name, full value in the file) or is in the sink's dead letter with a reason, and
  `collector status --json` reconciles: delivered + dead-lettered + dropped = spooled.
- An S3 endpoint that accepts the TCP connection and never answers: `/health` turns 503 and says
  "no answer" while the backlog waits in the spool; once the endpoint answers (forwarded to
  moto), everything is delivered exactly once.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
import pytest

from collector.testing import free_port, moto_server
from tests.e2e.conftest import Collector, read_lake, run_cli, wait_for, write_config

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REGION = "us-east-1"
BASE = datetime(2024, 5, 1, tzinfo=UTC)
CJK = "温度传感器" * 6
HUGE = "x" * 1_000_000
ODD = [(CJK, 1.0), (HUGE, 2.0), ("nan_value", float("nan")), ("inf_value", float("inf")),
       ("", 3.0)]


def poisoned_tick() -> list[dict[str, Any]]:
    """The `python` source of the poison test: 41 good readings, then the odd ones."""
    good = [{"ts": BASE + timedelta(seconds=i), "metric": "temperature", "value": float(i)}
            for i in range(41)]
    odd = [{"ts": BASE + timedelta(seconds=100 + i), "metric": m, "value": v}
           for i, (m, v) in enumerate(ODD)]
    return good + odd


AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDTESTING",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as url:
        yield url


def _s3(url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name=REGION,
                        aws_access_key_id="AKIDTESTING", aws_secret_access_key="testing-secret")


def _bucket(url: str) -> str:
    name = f"chaos-{uuid.uuid4().hex[:10]}"
    _s3(url).create_bucket(Bucket=name)
    return name


def _objects(url: str, bucket: str) -> dict[str, pl.DataFrame]:
    s3 = _s3(url)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: pl.from_arrow(pq.read_table(io.BytesIO(  # type: ignore[misc]
        s3.get_object(Bucket=bucket, Key=k)["Body"].read()))) for k in keys}


def _status(data_dir: Path) -> dict[str, Any]:
    done = run_cli("status", "--data-dir", str(data_dir), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _dead_letter(data_dir: Path, sink: str) -> pl.DataFrame:
    files = sorted((data_dir / "spool" / sink / "dead-letter").glob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")


def _reconciles(status: dict[str, Any], sink: str) -> tuple[int, int, int]:
    s = status["sinks"][sink]
    dropped = sum((s.get("dropped_rows") or {}).values())
    assert s["delivered_rows"] + s["dead_lettered_rows"] + dropped == s["spooled_rows"], s
    return int(s["spooled_rows"]), int(s["delivered_rows"]), int(s["dead_lettered_rows"])


def test_poison_rows_cost_only_themselves(tmp_path: Path, moto: str) -> None:
    bucket = _bucket(moto)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "poison.yaml", {
        "device": "edge-" + "x" * 60,  # a long device id: slugged, ids stay in bounds
        "data_dir": str(data_dir),
        "sources": [{"name": "feed", "type": "python", "function": "test_sinks:poisoned_tick",
                     "path": str(HERE), "every": "1h"}],
        "sinks": [
            {"name": "lake", "type": "lake"},  # default path: <data_dir>/lake
            {"name": "cloud", "type": "s3", "bucket": bucket, "key_prefix": "readings",
             "endpoint_url": moto, "region": REGION, "max_attempts": 1,
             "spool": {"retry_base": "100ms", "retry_cap": "500ms"}},
        ],
    })
    env = {**os.environ, **AWS_ENV}
    done = Collector(config, "--once", env=env)
    code = done.proc.wait(timeout=240)
    done.fh.close()
    assert code == 0, done.output()[-3000:]

    expected_good = {float(i) for i in range(41)}
    status = _status(data_dir)
    for sink in ("lake", "cloud"):
        spooled, delivered, dead = _reconciles(status, sink)
        assert spooled >= 41
        assert dead + delivered == spooled

    lake = read_lake(data_dir / "lake")
    assert all(len(p.name.encode()) <= 255 for p in (data_dir / "lake").rglob("*"))
    objects = _objects(moto, bucket)
    assert all(len(k.encode()) <= 1024 for k in objects)
    s3_rows = pl.concat(list(objects.values()), how="diagonal_relaxed")
    for sink, landed in (("lake", lake), ("cloud", s3_rows)):
        good = landed.filter(pl.col("metric") == "temperature")
        assert sorted(good["value"].to_list()) == sorted(expected_good), sink  # once each
        assert landed["record_id"].n_unique() == landed.height, sink
        dead = _dead_letter(data_dir, sink)
        if dead.height:
            assert dead["dead_letter_reason"].str.len_chars().min() > 0
            assert not set(dead["record_id"]) & set(landed["record_id"])
        # each odd reading the source took is either delivered (full value) or dead-lettered
        odd_landed = set(landed["metric"]) - {"temperature"}
        odd_dead = set(dead["metric"]) if dead.height else set()
        spooled = _status(data_dir)["sinks"][sink]["spooled_rows"]
        assert landed.height + dead.height == spooled, sink
        assert odd_landed | odd_dead <= {m for m, _ in ODD}
    assert CJK in set(lake["metric"])  # the CJK row landed under a bounded folder
    assert any("~" in p.name for p in (data_dir / "lake").iterdir())


class _SilentThenForward:
    """A TCP endpoint that accepts and never answers until ``forward()``; then it relays every
    new connection to ``target`` and drops the silent ones (as a restarted endpoint would)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.forwarding = threading.Event()
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if not self.forwarding.is_set():
                self.held.append(conn)
                continue
            try:
                up = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def forward(self) -> None:
        self.forwarding.set()
        for conn in self.held:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
    except OSError:
        return 0, {}


def test_silent_endpoint_is_visible_and_its_backlog_delivered_once(
    tmp_path: Path, moto: str, collectors: list[Collector]
) -> None:
    bucket = _bucket(moto)
    endpoint = _SilentThenForward(moto)
    port = free_port()
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "silent.yaml", {
        "device": "edge-silent",
        "data_dir": str(data_dir),
        "telemetry": {"enabled": True, "port": port, "unhealthy_after": "2s"},
        "sources": [{"name": "room", "type": "simulated", "every": "1s", "seed": 3,
                     "metrics": {"temperature": {"kind": "uniform", "min": 0, "max": 30}}}],
        "sinks": [{
            "name": "cloud", "type": "s3", "bucket": bucket, "endpoint_url": endpoint.url,
            "region": REGION, "max_attempts": 1, "read_timeout": "5m",
            "batch": {"max_rows": 3, "max_age": "1s"},
            "spool": {"retry_base": "200ms", "retry_cap": "1s"},
        }],
    })
    proc = Collector(config, env={**os.environ, **AWS_ENV})
    collectors.append(proc)
    try:
        def silent() -> dict[str, Any] | None:
            code, body = _health(port)
            failing = body.get("failing", {}).get("cloud", {})
            return body if code == 503 and "no answer" in str(failing.get("last_error")) else None

        body = wait_for(silent, timeout=60, interval=0.2, what="/health 503 'no answer'")
        assert "no answer for" in body["failing"]["cloud"]["last_error"]
        status = wait_for(
            lambda: (s := _status(data_dir)).get("sinks", {}).get("cloud", {}).get(
                "backlog_files") and s, timeout=30, what="a backlog in the spool")
        assert status["sinks"]["cloud"]["backlog_files"] > 0
        assert _objects(moto, bucket) == {}

        endpoint.forward()
        wait_for(lambda: _health(port)[0] == 200 and _objects(moto, bucket), timeout=60,
                 interval=0.3, what="delivery after the endpoint answers")
        assert proc.stop() == 0, proc.output()[-3000:]
    finally:
        endpoint.close()

    status = _status(data_dir)
    spooled, delivered, dead = _reconciles(status, "cloud")
    assert dead == 0 and delivered == spooled > 0
    assert status["sinks"]["cloud"]["backlog_files"] == 0
    rows = pl.concat(list(_objects(moto, bucket).values()), how="diagonal_relaxed")
    assert rows.height == spooled  # everything, once
    assert rows["record_id"].n_unique() == rows.height
