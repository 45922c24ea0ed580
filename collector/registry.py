"""Plugin names -> import strings, so a library loads only when a config uses it.

Third parties add plugins through entry points in the groups ``edge_collector.sources``,
``edge_collector.transforms`` and ``edge_collector.sinks`` (value: ``module:Class``).
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from importlib.metadata import entry_points
from typing import Literal

from collector.plugin import Plugin

Kind = Literal["sources", "transforms", "sinks"]

BUILTIN: dict[str, dict[str, str]] = {
    "sources": {
        "simulated": "collector.sources.simulated:SimulatedSource",
        "replay": "collector.sources.replay:ReplaySource",
        "python": "collector.sources.python:PythonSource",
        "serial": "collector.sources.serial:SerialSource",
        "modbus": "collector.sources.modbus:ModbusSource",
        "system": "collector.sources.system:SystemSource",
        "mqtt": "collector.sources.mqtt:MqttSource",
    },
    "transforms": {
        "filter": "collector.transforms.filter:FilterTransform",
        "derive": "collector.transforms.derive:DeriveTransform",
        "window": "collector.transforms.window:WindowTransform",
        "deadband": "collector.transforms.deadband:DeadbandTransform",
        "sql": "collector.transforms.sql:SqlTransform",
        "python": "collector.transforms.python:PythonTransform",
        "infer": "collector.transforms.infer:InferTransform",
    },
    "sinks": {
        "lake": "sinks.lake:LakeSink",
        "console": "sinks.console:ConsoleSink",
        "s3": "sinks.s3:S3Sink",
        "firehose": "sinks.firehose:FirehoseSink",
        "iot_analytics": "sinks.iot_analytics:IotAnalyticsSink",
        "elasticsearch": "sinks.elasticsearch:ElasticsearchSink",
    },
}


@cache
def available(kind: Kind) -> dict[str, str]:
    """Built-ins plus installed entry points (an entry point may not shadow a built-in)."""
    found = dict(BUILTIN[kind])
    for ep in entry_points(group=f"edge_collector.{kind}"):
        found.setdefault(ep.name, ep.value)
    return found


def load(kind: Kind, name: str) -> type[Plugin]:
    """The plugin class; KeyError for an unknown name (config validation reports it)."""
    target = available(kind)[name]
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def missing_requirements(cls: type[Plugin]) -> list[tuple[str, str]]:
    """(import name, extra) pairs of ``cls.requires`` that are not installed."""
    return [
        (mod, extra) for mod, extra in cls.requires.items() if importlib.util.find_spec(mod) is None
    ]
