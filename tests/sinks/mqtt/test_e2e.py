"""`collector run` publishing over mutual TLS to a real mosquitto that requires client
certificates; a kill -9 of the collector and a restart of the broker in the middle of the run.

The lake sink of the same config is the ground truth (it is exactly once); the subscriber must
see every lake reading, and may see one again only under the same ``record_id`` (at least once).
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.sources.peers import (
    collector_alive,
    read_lake,
    start_collector,
    stop_process,
    wait_for,
)

from .broker import Subscriber, make_certs, tls_broker

pytestmark = pytest.mark.slow


def key(metric: str, ts: datetime) -> tuple[str, datetime]:
    return metric, ts.replace(tzinfo=None)


def received(sub: Subscriber) -> dict[str, list[dict[str, Any]]]:
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in sub.rows():
        by_id[row["record_id"]].append(row)
    return by_id


def test_every_reading_arrives_through_kill_9_and_a_broker_restart(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    broker = tls_broker(tmp_path, certs, acl="user reader\ntopic read #\n"
                        "user edge-01\ntopic write dt/#\n")
    broker.start()
    sub = Subscriber(broker.port, certs)
    cert, key_file = certs.client("edge-01")
    data = tmp_path / "data"
    config = tmp_path / "collector.yaml"
    config.write_text(f"""\
device: edge-01
data_dir: {data}
telemetry: {{enabled: false}}
sources:
  - name: room
    type: simulated
    every: 50ms
    seed: 3
    start: "2024-01-01T00:00:00Z"
    metrics:
      temperature: {{min: 0, max: 30, unit: C}}
      humidity: {{min: 20, max: 80, unit: "%"}}
sinks:
  - name: lake
    type: lake
    path: {data / "lake"}
    batch: {{max_age: 200ms}}
  - name: iot
    type: mqtt
    host: 127.0.0.1
    port: {broker.port}
    topic: "dt/{{device}}/{{source}}/{{metric}}"
    tls: {{ca_certs: "{certs.ca}", certfile: "{cert}", keyfile: "{key_file}"}}
    payload_target_bytes: 1000
    connect_timeout: 2s
    ack_timeout: 3s
    batch: {{max_age: 200ms}}
    spool: {{retry_base: 200ms, retry_cap: 1s}}
""")
    log = tmp_path / "collector.log"
    proc = start_collector(config, log)
    try:
        wait_for(lambda: len(sub.rows()) >= 20, 30, "first readings over MQTT")
        collector_alive(proc, log)
        proc.send_signal(signal.SIGKILL)  # kill -9 mid-run
        proc.wait()
        proc = start_collector(config, log)
        seen = len(received(sub))
        wait_for(lambda: len(received(sub)) >= seen + 20, 30, "readings after the restart")

        broker.stop()  # the broker goes away: the spool holds the batches
        time.sleep(1.5)
        collector_alive(proc, log)
        broker.start()
        seen = len(received(sub))
        wait_for(lambda: len(received(sub)) >= seen + 40, 30, "readings after the broker restart")
        collector_alive(proc, log)
    finally:
        stop_process(proc)  # SIGTERM: flush and deliver what is left
    assert proc.returncode == 0, log.read_text()[-3000:]

    lake = read_lake(data / "lake")
    expected = {key(m, t) for m, t in zip(lake["metric"], lake["ts"], strict=True)}
    assert len(expected) == lake.height > 60  # the lake holds each reading once

    def keys() -> set[tuple[str, datetime]]:
        return {
            key(r["metric"], datetime.fromisoformat(r["ts"]))
            for rows in received(sub).values()
            for r in rows
        }

    wait_for(lambda: keys() >= expected, 20, "every lake reading over MQTT")
    sub.stop()
    broker.stop()
    by_id = received(sub)
    assert keys() == expected  # every reading, nothing else
    for rows in by_id.values():  # a repeat is the same reading under the same record_id
        assert all(r == rows[0] for r in rows)
    assert len(by_id) == len(expected)  # one record_id per reading
    log_text = log.read_text()
    assert "connection lost" in log_text or "cannot connect" in log_text  # the outage was seen
