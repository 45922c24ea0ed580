"""The mqtt source against a real mosquitto on 127.0.0.1 (started and restarted by the test)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.publish as publish
import polars as pl
import pytest
from pydantic import ValidationError

from collector.parsers import ParseError
from collector.plugin import Context
from collector.sources.mqtt import MqttConfig, MqttSource, TopicConfig, message_rows, topic_matches
from tests.sources.peers import (
    Mosquitto,
    async_wait_for,
    collector_alive,
    read_lake,
    start_collector,
    stop_process,
    wait_for,
    write_config,
)


def pub(broker: Mosquitto, msgs: list[tuple[str, Any]], qos: int = 1) -> None:
    publish.multiple(
        [
            {"topic": t, "payload": p if isinstance(p, str | bytes) else json.dumps(p), "qos": qos}
            for t, p in msgs
        ],
        hostname="127.0.0.1",
        port=broker.port,
    )


@pytest.mark.parametrize(
    ("filter_", "topic", "ok"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/#", "a/b/c", True),
        ("a/#", "a", True),
        ("a/+", "a/b/c", False),
        ("+/b", "$SYS/b", False),
        ("a/b", "a/b", True),
    ],
)
def test_topic_matching(filter_: str, topic: str, ok: bool) -> None:
    import paho.mqtt.client as mqtt

    assert topic_matches(filter_, topic) is ok
    assert mqtt.topic_matches_sub(filter_, topic) is ok  # same rules as paho


def test_message_rows_topic_levels_and_forms() -> None:
    t = TopicConfig(filter="site/+/+/data", device_segment=2, tags={1: "site"}, json_path="d")
    assert message_rows(t, "site/hall/pump-1/data", b'{"d": {"rpm": 1200}}') == [
        {"rpm": 1200.0, "site": "hall", "device": "pump-1"}
    ]
    bare = TopicConfig(filter="s/+/temperature")
    assert message_rows(bare, "s/x/temperature", b"21.5") == [
        {"metric": "temperature", "value": 21.5}
    ]
    for payload in (b"\xff", b"{", b'{"x": 1}', b'{"d": null}', b'{"d": {"a": "b"}}'):
        with pytest.raises(ParseError):
            message_rows(t, "site/hall/pump-1/data", payload)


def test_config_rules() -> None:
    base = {"type": "mqtt", "topics": [{"filter": "a/#", "tags": {0: "area"}}]}
    cfg = MqttConfig.model_validate(base)
    assert cfg.broker_port == 1883 and cfg.tags == {"area": ""}  # topic tags become columns
    assert MqttConfig.model_validate({**base, "tls": {}}).broker_port == 8883
    for bad, msg in [
        ({"clean_session": False}, "client_id"),
        ({"every": "5s"}, "streaming"),
        ({"topics": [{"filter": "a/#/b"}]}, "topic filter"),
        ({"password": "x"}, "username"),
    ]:
        with pytest.raises(ValidationError, match=msg):
            MqttConfig.model_validate({**base, **bad})
    secret = MqttConfig.model_validate({**base, "username": "u", "password": "hunter2"})
    assert "hunter2" not in repr(secret)


def test_bare_topic_filters_are_topics_with_defaults() -> None:
    cfg = MqttConfig.model_validate(
        {"type": "mqtt", "topics": ["sensors/#", {"filter": "plc/+", "qos": 0}]}
    )
    assert [(t.filter, t.qos, t.json_path) for t in cfg.topics] == [
        ("sensors/#", 1, None),
        ("plc/+", 0, None),
    ]
    with pytest.raises(ValidationError, match="topic filter"):
        MqttConfig.model_validate({"type": "mqtt", "topics": ["a/#/b"]})


async def test_a_clean_stop_is_not_a_lost_connection(
    tmp_path: Path, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = MqttConfig.model_validate(
        {"type": "mqtt", "host": "127.0.0.1", "port": mosquitto.port, "topics": ["s/+/t"]}
    )
    src = MqttSource(cfg, Context(device="gw", component="m", data_dir=tmp_path))
    await src.open()
    gen = src.stream()
    try:
        await async_wait_for(lambda: src.subscribed, 30, "subscription")
        await asyncio.to_thread(pub, mosquitto, [("s/d1/t", 21.5)])
        rows = await asyncio.wait_for(anext(gen), 30)
    finally:
        await src.close()
        await gen.aclose()
    assert [(r["metric"], r["value"]) for r in rows] == [("t", 21.5)]
    assert "connection lost" not in caplog.text
    assert src.ctx.counters.get("mqtt_disconnects_total", component="m") == 0


async def test_unacked_messages_are_redelivered_to_a_persistent_session(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A batch the runtime never logged (crash) is not acked: the broker sends it again."""
    cfg = MqttConfig.model_validate(
        {
            "type": "mqtt",
            "host": "127.0.0.1",
            "port": mosquitto.port,
            "client_id": "gw-test",
            "clean_session": False,
            "topics": [{"filter": "s/+/t", "qos": 1, "device_segment": 1}],
        }
    )

    def make() -> MqttSource:
        return MqttSource(cfg, Context(device="gw", component="m", data_dir=tmp_path))

    first = make()
    await first.open()
    await async_wait_for(lambda: first.subscribed, 30, "subscription")
    gen = first.stream()
    await asyncio.to_thread(pub, mosquitto, [("s/d1/t", {"v": 1})])
    rows = await asyncio.wait_for(anext(gen), 30)
    assert [(r["device"], r["v"]) for r in rows] == [("d1", 1.0)]
    await first.close()  # "crash" before the generator resumed: no PUBACK was sent
    await gen.aclose()

    second = make()
    await second.open()
    gen2 = second.stream()
    try:
        rows = await asyncio.wait_for(anext(gen2), 30)
    finally:
        await second.close()
        await gen2.aclose()
    assert [(r["device"], r["v"]) for r in rows] == [("d1", 1.0)]


@pytest.mark.slow
def test_cli_readings_land_and_survive_a_broker_restart(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    data = tmp_path / "data"
    cfg = write_config(
        tmp_path / "c.yaml",
        f"""\
  - name: lan
    type: mqtt
    host: 127.0.0.1
    port: {mosquitto.port}
    reconnect: {{initial: 1s, max: 2s}}
    topics:
      - {{filter: "sensors/+/telemetry", qos: 1, device_segment: 1}}
      - {{filter: "site/+/plc/#", qos: 1, json_path: data, tags: {{1: site}}}}
""",
        data,
    )
    log = tmp_path / "collector.log"
    proc = start_collector(cfg, log)
    lake = data / "lake"
    try:
        wait_for(lambda: "lan: subscribed to" in log.read_text(), 60, "the subscription")
        pub(
            mosquitto,
            [
                ("sensors/th-01/telemetry", {"temperature": 21.5, "humidity": 40}),
                (
                    "sensors/th-02/telemetry",
                    [
                        {
                            "metric": "temperature",
                            "value": 19,
                            "unit": "C",
                            "ts": "2024-05-01T10:00:00Z",
                        }
                    ],
                ),
                ("site/hall/plc/line1", {"data": {"speed": 3.2}}),
                ("sensors/th-01/telemetry", "not json"),
                ("sensors/th-01/telemetry", {"status": "ok"}),
            ],
        )
        wait_for(lambda: read_lake(lake).height >= 4, 60, "4 readings in the lake")
        collector_alive(proc, log)

        mosquitto.stop()
        mosquitto.start()
        restarted = datetime.now(UTC)

        def resumed() -> bool:  # publish until the collector has resubscribed and logs it
            pub(mosquitto, [("sensors/th-03/telemetry", {"after_restart": 1})])
            df = read_lake(lake)
            return df.height > 0 and df.filter(pl.col("device") == "th-03").height > 0

        wait_for(resumed, 60, "a reading published after the broker restart")
        collector_alive(proc, log)
    finally:
        stop_process(proc, signal.SIGTERM)
    assert proc.returncode == 0, log.read_text()[-4000:]

    df = read_lake(lake).sort("device", "metric")
    first = df.filter(pl.col("device") != "th-03").select(
        "device", "metric", "value", "unit", "site"
    )
    assert first.rows() == [
        ("test-gw", "speed", 3.2, None, "hall"),
        ("th-01", "humidity", 40.0, None, ""),
        ("th-01", "temperature", 21.5, None, ""),
        ("th-02", "temperature", 19.0, "C", ""),
    ]
    th02 = df.filter(pl.col("device") == "th-02")["ts"].to_list()
    assert th02 == [datetime(2024, 5, 1, 10, tzinfo=UTC)]
    after = df.filter(pl.col("device") == "th-03")
    assert after.height >= 1 and (after["ts"] > restarted).all()
    dead = [json.loads(x) for x in (data / "dead-letter" / "lan.ndjson").read_text().splitlines()]
    assert [d["raw"] for d in dead] == ["not json", '{"status": "ok"}']
    assert "broker connection lost" in log.read_text()


def _tls_files(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl, as an admin would)."""
    f = {n: folder / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt", "san")}
    f["san"].write_text("subjectAltName=IP:127.0.0.1\n")
    for cmd in (
        f"req -x509 -newkey rsa:2048 -nodes -keyout {f['ca.key']} -out {f['ca.crt']} -days 2 "
        "-subj /CN=test-ca",
        f"req -newkey rsa:2048 -nodes -keyout {f['srv.key']} -out {f['srv.csr']} "
        "-subj /CN=127.0.0.1",
        f"x509 -req -in {f['srv.csr']} -CA {f['ca.crt']} -CAkey {f['ca.key']} -CAcreateserial "
        f"-out {f['srv.crt']} -days 2 -extfile {f['san']}",
    ):
        subprocess.run(["openssl", *cmd.split()], check=True, capture_output=True)
    return f


@pytest.mark.skipif(
    not shutil.which("openssl") or not shutil.which("mosquitto_passwd"),
    reason="needs openssl and mosquitto_passwd",
)
async def test_tls_and_password_auth(tmp_path: Path) -> None:
    f = _tls_files(tmp_path)
    pwfile = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pwfile), "gw", "s3cret"],
        check=True,
        capture_output=True,
    )
    broker = Mosquitto(
        tmp_path,
        f"cafile {f['ca.crt']}\ncertfile {f['srv.crt']}\n"
        f"keyfile {f['srv.key']}\nallow_anonymous false\n"
        f"password_file {pwfile}\n",
    )
    broker.start()

    def source(password: str) -> MqttSource:
        cfg = MqttConfig.model_validate(
            {
                "type": "mqtt",
                "host": "127.0.0.1",
                "port": broker.port,
                "username": "gw",
                "password": password,
                "tls": {"ca_certs": str(f["ca.crt"])},
                "topics": [{"filter": "secure/+", "device_segment": 1}],
            }
        )
        return MqttSource(cfg, Context(device="gw", component="m", data_dir=tmp_path))

    good, bad = source("s3cret"), source("wrong")
    try:
        await good.open()
        await bad.open()
        await async_wait_for(lambda: good.subscribed, 30, "TLS + password subscription")
        stream = good.stream()
        await asyncio.to_thread(
            publish.single,
            "secure/pump",
            json.dumps({"rpm": 900}),
            qos=1,
            hostname="127.0.0.1",
            port=broker.port,
            auth={"username": "gw", "password": "s3cret"},
            tls={"ca_certs": str(f["ca.crt"])},
        )
        rows = await asyncio.wait_for(anext(stream), 30)
        await stream.aclose()
        assert [(r["device"], r["rpm"]) for r in rows] == [("pump", 900.0)]
        assert not bad.subscribed  # refused by the broker, logged, retried: never crashes
    finally:
        await good.close()
        await bad.close()
        broker.stop()
