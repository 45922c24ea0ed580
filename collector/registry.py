"""Plugin names -> import strings, so a library loads only when a config uses it.

Third parties add plugins through entry points in the groups ``edge_collector.sources``,
``edge_collector.transforms`` and ``edge_collector.sinks`` (value: ``module:Class``).

A config may also name a class directly, ``type: my_pkg.module:Class`` (README, "Writing a
plugin"). The config file is trusted, but ``collector check`` promises no I/O, so such a target
is only *located* there (:func:`locate`: the module's file is found without importing it or its
parent packages) and imported by ``collector run``. Modules of the standard library and built-in
modules are never plugins (``type: "os:system"`` is a config error, not an import).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
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
        "files": "collector.sources.files:FilesSource",
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
        "mqtt": "sinks.mqtt:MqttSink",
    },
}


@cache
def available(kind: Kind) -> dict[str, str]:
    """Built-ins plus installed entry points (an entry point may not shadow a built-in)."""
    found = dict(BUILTIN[kind])
    for ep in entry_points(group=f"edge_collector.{kind}"):
        found.setdefault(ep.name, ep.value)
    return found


def target(kind: Kind, name: str) -> str | None:
    """Import string of the plugin called ``name``, or None.

    A built-in is found without the entry-point scan, which reads the metadata of every
    installed package (25 ms of each start on a small device); the scan runs for other names.
    """
    return BUILTIN[kind].get(name) or available(kind).get(name)


def load(kind: Kind, name: str) -> type[Plugin]:
    """The plugin class; KeyError for an unknown name (config validation reports it)."""
    where = target(kind, name)
    if where is None:
        raise KeyError(name)
    module_name, _, attr = where.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def missing_requirements(cls: type[Plugin]) -> list[tuple[str, str]]:
    """(import name, extra) pairs of ``cls.requires`` that are not installed."""
    return [
        (mod, extra) for mod, extra in cls.requires.items() if importlib.util.find_spec(mod) is None
    ]


OWN_PACKAGES = ("collector", "sinks")
"""Packages of edge-collector itself: importing them has no side effects, by contract, so
``check`` imports ``collector.testing:ListSink`` and validates its fields."""


class PluginLoadError(Exception):
    """A plugin target cannot be used; the message says why, for a config error."""


def _split(target: str) -> tuple[str, str]:
    module_name, sep, attr = target.partition(":")
    parts = module_name.split(".")
    if (
        not sep
        or not attr.isidentifier()
        or not all(p.isidentifier() for p in parts)
    ):
        raise PluginLoadError(
            f"{target!r} is not a plugin name or a `package.module:Class` import string"
        )
    top = parts[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        raise PluginLoadError(
            f"{module_name!r} is a Python standard library module, not a plugin"
        )
    return module_name, attr


def is_own(target: str) -> bool:
    """True for a ``module:Class`` inside edge-collector's own packages."""
    top = target.partition(":")[0].split(".")[0]
    return top in OWN_PACKAGES


def locate(target: str) -> str:
    """Find the file of ``module:Class`` without importing anything; returns that path.

    ``importlib.util.find_spec("a.b")`` would import package ``a`` (running its
    ``__init__``), so the path finder is walked one level at a time instead.
    """
    module_name, _ = _split(target)
    parts = module_name.split(".")
    search: list[str] | None = None
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__spec__", None) is not None:
            spec = loaded.__spec__
        else:
            try:
                spec = importlib.machinery.PathFinder.find_spec(name, search)
            except (ImportError, ValueError, OSError) as exc:
                raise PluginLoadError(f"cannot locate module {name!r}: {exc}") from None
        if spec is None:
            raise PluginLoadError(
                f"no module named {name!r} (on sys.path: the working directory, installed "
                "packages, PYTHONPATH)"
            )
        if i < len(parts) - 1:
            search = list(spec.submodule_search_locations or [])
            if not search:
                raise PluginLoadError(f"{name!r} is a module, not a package")
    assert spec is not None
    if spec.origin in (None, "built-in", "frozen"):
        raise PluginLoadError(f"{module_name!r} is not a plugin module file")
    return spec.origin


def load_target(target: str, base: type[Plugin] | None = None) -> type[Plugin]:
    """Import ``module:Class``; every failure (even one raised by the module's own import-time
    code) becomes a :class:`PluginLoadError` with one line of reason, never a traceback."""
    module_name, attr = _split(target)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the module's import-time code is the user's: any error at all
        raise PluginLoadError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise PluginLoadError(f"module {module_name!r} has no attribute {attr!r}")
    if not isinstance(cls, type) or not issubclass(cls, base or Plugin):
        what = (base or Plugin).__name__
        raise PluginLoadError(f"{target!r} is not a {what} plugin class")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and hasattr(config, "model_validate")):
        raise PluginLoadError(f"{target!r} has no pydantic `Config` model")
    return cls
