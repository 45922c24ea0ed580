"""Device sources under poison input: one bad value costs itself, never its tick or stream."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from collector.plugin import Context
from collector.sources.modbus import ModbusConfig, ModbusSource, plan_reads
from collector.sources.mqtt import MqttConfig, MqttSource
from collector.sources.system import SystemConfig, SystemSource


def dead(tmp_path: Path, name: str) -> list[dict[str, Any]]:
    path = tmp_path / "dead-letter" / f"{name}.ndjson"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_mqtt_payload_no_parser_check_foresaw_is_dead_lettered_not_raised(tmp_path: Path) -> None:
    cfg = MqttConfig.model_validate({"type": "mqtt", "name": "bus", "topics": [{"filter": "s/#"}]})
    src = MqttSource(cfg, Context(device="gw", component="bus", data_dir=tmp_path))
    huge = b'{"t": 1' + b"0" * 400 + b"}"  # an integer far beyond float range
    batch = [
        SimpleNamespace(topic="s/a", payload=b'{"t": 21.5}', qos=1, mid=1),
        SimpleNamespace(topic="s/a", payload=huge, qos=1, mid=2),
        SimpleNamespace(topic="s/a", payload=b'{"t": 22.5}', qos=1, mid=3),
    ]
    rows = src._handle_batch(batch)  # raising here would loop: unacked, redelivered, again
    assert [r["t"] for r in rows] == [21.5, 22.5]
    rejected = dead(tmp_path, "bus")
    assert len(rejected) == 1 and rejected[0]["raw"] == huge.decode()


def test_system_probe_failing_costs_only_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Any:
        raise RuntimeError("swap accounting unavailable")

    monkeypatch.setattr(psutil, "swap_memory", broken)
    cfg = SystemConfig.model_validate({"type": "system", "include": ["cpu", "memory", "network"]})
    src = SystemSource(cfg, Context(device="gw", component="h", data_dir=tmp_path))
    metrics = {r["metric"] for r in src.read()}
    assert "cpu_percent" in metrics and "net_bytes_sent_total" in metrics
    assert src.ctx.counters.get("system_errors_total", component="h", kind="memory") == 1


def test_modbus_register_that_cannot_be_decoded_costs_only_itself(tmp_path: Path) -> None:
    cfg = ModbusConfig.model_validate(
        {
            "type": "modbus",
            "name": "plc",
            "host": "h",
            "slaves": [{"id": 1}],
            "registers": [
                {"name": "a", "address": 0, "function": "holding", "type": "uint16"},
                {"name": "b", "address": 1, "function": "holding", "type": "float32"},
            ],
        }
    )
    src = ModbusSource(cfg, Context(device="gw", component="plc", data_dir=tmp_path))
    (group,) = plan_reads(cfg.slaves[0], max_registers=125, max_bits=2000, max_gap=0)
    short = SimpleNamespace(registers=[7, 0x4048])  # the float32 lost its second word
    rows = src._rows(group, short, now=None)
    assert [(r["metric"], r["value"]) for r in rows] == [("a", 7.0)]
    rejected = dead(tmp_path, "plc")
    assert len(rejected) == 1 and "float32" in rejected[0]["reason"]
    assert (
        src.ctx.counters.get(
            "modbus_errors_total", component="plc", slave="1", register="b", kind="decode"
        )
        == 1
    )
