"""`collector check` on mqtt sinks: IoT Core limits with FILE:LINE, Basic Ingest, the estimate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from collector import registry
from collector.config import load_text
from collector.errors import ConfigError
from sinks.mqtt import MqttSinkConfig, check_topic, is_iot_core

ROOT = Path(__file__).resolve().parents[3]
IOT = "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com"


def config(sink: str) -> str:
    return f"""\
device: edge-01
data_dir: ./data
sources:
  - name: room
    type: simulated
    every: 5s
sinks:
  - name: iot
    type: mqtt
{sink}"""


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_text(text, "collector.yaml")
    return [str(i) for i in err.value.issues]


def test_iot_core_limits_are_config_errors_at_their_line() -> None:
    long_topic = "dt/" + "x" * 260 + "/{metric}"
    text = config(
        f"    host: {IOT}\n"
        "    qos: 2\n"
        f"    topic: \"{long_topic}\"\n"
    )
    got = issues(text)
    assert any(i.startswith("collector.yaml:11 sinks[0].qos: AWS IoT Core does not support QoS 2")
               for i in got), got
    assert any(i.startswith("collector.yaml:12 sinks[0].topic:") and "256" in i for i in got), got
    slashes = issues(config(f"    host: {IOT}\n    topic: dt/a/b/c/d/e/f/g/{{metric}}\n"))
    assert len(slashes) == 1 and slashes[0].startswith("collector.yaml:11 sinks[0].topic:")
    assert "8 slashes" in slashes[0] and "at most 7" in slashes[0]


def test_basic_ingest_prefix_does_not_count_and_other_brokers_take_more() -> None:
    ingest = "$aws/rules/to_firehose/dt/a/b/c/d/e/{device}/{metric}"  # 7 slashes after prefix
    cfg = load_text(config(f"    host: {IOT}\n    topic: \"{ingest}\"\n"), "c.yaml")
    assert cfg.sinks[0].config.iot_core
    for bad in ("$aws/rules/{metric}/x", "$SYS/x", "$aws/things/t/shadow/update", "a/+/b", "a/#"):
        with pytest.raises(ValueError):
            check_topic(bad, iot_core=True)
    # a plain broker takes QoS 2, deep topics; `aws_iot: true` applies IoT limits to a custom host
    plain = MqttSinkConfig.model_validate(
        {"type": "mqtt", "host": "gg-core.local", "qos": 2, "topic": "a/b/c/d/e/f/g/h/i/{metric}"}
    )
    assert not plain.iot_core and plain.qos == 2
    with pytest.raises(ValueError, match="QoS 2"):
        MqttSinkConfig.model_validate({"type": "mqtt", "host": "mqtt.example.com",
                                       "aws_iot": True, "qos": 2})
    with pytest.raises(ValueError, match="128 KiB"):
        MqttSinkConfig.model_validate({"type": "mqtt", "host": IOT, "max_payload_bytes": "1MiB"})
    with pytest.raises(ValueError, match="cannot exceed"):
        MqttSinkConfig.model_validate({"type": "mqtt", "payload_target_bytes": 200_000,
                                       "max_payload_bytes": 100_000})
    assert is_iot_core("abc-ats.iot.cn-north-1.amazonaws.com.cn")
    assert not is_iot_core("iot.example.com")


def test_example_and_registry() -> None:
    cls = registry.load("sinks", "mqtt")
    (entry,) = yaml.safe_load(cls.example)
    assert cls.Config.model_validate(entry).iot_core
    assert cls.requires == {"paho": "devices"}
    for name, field in cls.Config.model_fields.items():
        assert field.description, name


def test_check_estimate_prints_messages_and_metered_units(tmp_path: Path) -> None:
    path = tmp_path / "collector.yaml"
    path.write_text(config(
        f"    host: {IOT}\n    topic: \"$aws/rules/to_firehose/dt/{{device}}\"\n"
        "    batch: {max_age: 5m}\n"
    ))
    out = subprocess.run([sys.executable, "-m", "collector", "check", str(path), "--estimate"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "17,280 readings/day" in out and "60 per message" in out
    assert "288 messages" in out and "17,280 messages" in out
    assert "metered 5 KB units/day" in out and "Basic Ingest" in out
