"""Config loading: YAML with line numbers, ``${VAR}`` interpolation, two-phase validation.

Phase 1 validates the top level (plugin entries stay plain dicts); phase 2 validates each entry
against its plugin's own model, so an error inside ``sinks[1]`` names that plugin's fields.
A third, still I/O-free pass runs the transform chain on empty frames to type-check every SQL
expression and sink ``where:`` against the columns it will really see. All problems are
collected, each located as ``FILE:LINE path: message``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from pydantic import Field, ValidationError

from collector import registry, sqlexpr
from collector.errors import ConfigError, ConfigIssue
from collector.plugin import (
    Context,
    Model,
    Plugin,
    SinkConfig,
    SourceConfig,
    Transform,
    TransformConfig,
)
from collector.schema import empty_readings
from collector.units import Duration, Size

Loc = tuple[str | int, ...]
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class LogSettings(Model):
    """The durable device log every reading is written to before anything else."""

    fsync: str = Field(
        default="every_tick",
        pattern="^(every_tick|interval|never)$",
        description="`every_tick`: fsync each append (nothing read is lost on power cut); "
        "`interval`: fsync at most every `fsync_interval` (less flash wear, up to that much "
        "lost on power cut, nothing lost on a crash); `never`: leave it to the OS.",
    )
    fsync_interval: Duration = Field(default="1s", gt=0, description="Period for `interval`.")
    segment_bytes: Size = Field(default="64MiB", gt=0, description="Roll to a new segment here.")
    checkpoint_every: Duration = Field(
        default="2s", gt=0, description="How often transform state and offsets are committed."
    )


class TelemetrySettings(Model):
    """Prometheus metrics and the health endpoint (127.0.0.1 only)."""

    enabled: bool = Field(default=True, description="Serve /metrics and /health.")
    host: str = Field(default="127.0.0.1", description="Listen address; keep it on loopback.")
    port: int = Field(default=9108, ge=0, le=65535, description="Port (0 = any free port).")
    unhealthy_after: Duration = Field(
        default="5m", gt=0, description="A sink failing longer than this makes /health 503."
    )


class CollectorConfig(Model):
    """Top level of a collector config file."""

    device: str = Field(default="edge-01", description="Device id written in every reading.")
    data_dir: Path = Field(
        default=Path("./data"), description="Device log, spools, dead letters, status."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Device log settings.")
    telemetry: TelemetrySettings = Field(
        default_factory=TelemetrySettings, description="Metrics and health endpoint."
    )
    shutdown_timeout: Duration = Field(
        default="5s", description="On SIGTERM, how long sinks may keep draining their spools."
    )
    sources: list[Any] = Field(min_length=1, description="Where readings come from.")
    transforms: list[Any] = Field(
        default_factory=list, description="Polars steps applied in order to every batch."
    )
    sinks: list[Any] = Field(min_length=1, description="Where results are delivered.")


@dataclass
class Component:
    """A validated plugin entry: its class, its config model and its name."""

    kind: str
    index: int
    cls: type[Plugin]
    config: Any

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class LoadedConfig:
    """A fully validated config, ready for the runtime."""

    settings: CollectorConfig
    sources: list[Component]
    transforms: list[Component]
    sinks: list[Component]
    file: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict)
    output: pl.DataFrame | None = None
    """Empty frame with the columns the sinks receive (None after user code: unknown)."""

    @property
    def transforms_fingerprint(self) -> str:
        """Changes when the transform chain changes, so stale checkpointed state is not reused."""
        text = repr([c.config.model_dump(mode="json") for c in self.transforms])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# YAML with positions


def _interpolate(text: str, loc: Loc, problems: list[tuple[Loc, str]]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                problems.append(
                    (
                        loc,
                        f"environment variable {name} is not set "
                        f"(write ${{{name}:-default}} to give a default)",
                    )
                )
                return ""
            return default
        return value

    return _VAR_RE.sub(sub, text)


def _construct(
    node: yaml.Node, loc: Loc, lines: dict[Loc, int], problems: list[tuple[Loc, str]]
) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            child = (*loc, key)
            lines[child] = key_node.start_mark.line + 1
            if key in out:
                problems.append((child, "duplicate key"))
            out[key] = _construct(value_node, child, lines, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, (*loc, i), lines, problems) for i, v in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    if node.tag == "tag:yaml.org,2002:str" and "${" in node.value:
        # stays a string: pydantic turns "1883" into an int where the field wants one
        return _interpolate(node.value, loc, problems)
    return _scalar(node)


def _scalar(node: yaml.ScalarNode) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _fmt_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Locator:
    """Turns pydantic locations into printable paths and the line they point at."""

    def __init__(self, file: str, data: Any, lines: dict[Loc, int]) -> None:
        self.file, self.data, self.lines = file, data, lines
        self.issues: list[ConfigIssue] = []

    def _real_loc(self, loc: Loc) -> Loc:
        """Drop the parts pydantic adds for unions (tags, type names) that are not in the file."""
        node: Any = self.data
        out: list[str | int] = []
        for i, part in enumerate(loc):
            if (isinstance(node, Mapping) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and part < len(node)
            ):
                node = node[part]
                out.append(part)
            elif i == len(loc) - 1 and isinstance(node, Mapping):
                out.append(part)  # a missing field: name it
        return tuple(out)

    def add(self, loc: Loc, message: str) -> None:
        loc = self._real_loc(loc)
        line = None
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                line = self.lines[loc[:n]]
                break
        self.issues.append(ConfigIssue(_fmt_path(loc), message, line, self.file))

    def add_validation(self, prefix: Loc, err: ValidationError) -> None:
        for e in err.errors(include_url=False):
            loc = tuple(
                p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling; `collector schema` lists the fields)"
            elif e["type"] == "missing":
                msg = "field required"
            self.add((*prefix, *loc), msg)


# ---------------------------------------------------------------------------------------------
# Validation


def load_text(text: str, file: str = "<config>") -> LoadedConfig:
    """Validate a config given as YAML text; ConfigError lists every problem found."""
    lines: dict[Loc, int] = {}
    problems: list[tuple[Loc, str]] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            [ConfigIssue("", f"invalid YAML: {getattr(exc, 'problem', exc)}", line, file)]
        ) from None
    data = {} if root is None else _construct(root, (), lines, problems)
    loc = _Locator(file, data, lines)
    for where, msg in problems:
        loc.add(where, msg)
    if not isinstance(data, dict):
        loc.add((), "the config must be a mapping with `sources` and `sinks`")
        raise ConfigError(loc.issues)
    try:
        settings = CollectorConfig.model_validate(data)
    except ValidationError as err:
        loc.add_validation((), err)
        raise ConfigError(loc.issues) from None

    comps: dict[str, list[Component]] = {}
    for kind, items in (
        ("sources", settings.sources),
        ("transforms", settings.transforms),
        ("sinks", settings.sinks),
    ):
        comps[kind] = [
            c for i, item in enumerate(items) if (c := _component(kind, i, item, loc)) is not None
        ]
    _name_components(comps, loc)
    output = _check_dataflow(settings, comps, loc) if not loc.issues else None
    if loc.issues:
        raise ConfigError(loc.issues)
    return LoadedConfig(
        settings, comps["sources"], comps["transforms"], comps["sinks"], file=file, raw=data,
        output=output,
    )


def load(path: str | Path) -> LoadedConfig:
    """Validate a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read config: {exc.strerror}", None, str(path))]
        ) from None
    return load_text(text, str(path))


def _component(kind: str, index: int, item: Any, loc: _Locator) -> Component | None:
    where: Loc = (kind, index)
    if not isinstance(item, dict):
        loc.add(where, "each entry must be a mapping with a `type`")
        return None
    type_name = item.get("type")
    known = registry.available(kind)  # type: ignore[arg-type]
    if not type_name:
        loc.add((*where, "type"), f"field required (one of: {', '.join(sorted(known))})")
        return None
    try:
        if ":" in str(type_name):
            import importlib

            module_name, _, attr = str(type_name).partition(":")
            cls = getattr(importlib.import_module(module_name), attr)
        else:
            cls = registry.load(kind, type_name)  # type: ignore[arg-type]
    except KeyError:
        loc.add(
            (*where, "type"),
            f"unknown {kind[:-1]} type {type_name!r}; known: {', '.join(sorted(known))}",
        )
        return None
    except (ImportError, AttributeError) as exc:
        loc.add((*where, "type"), f"cannot load plugin {type_name!r}: {exc}")
        return None
    try:
        config = cls.Config.model_validate(item)
    except ValidationError as err:
        loc.add_validation(where, err)
        return None
    for module, extra in registry.missing_requirements(cls):
        loc.add(
            (*where, "type"),
            f"{type_name!r} needs the Python package {module!r}: "
            f"pip install 'edge-collector[{extra}]'",
        )
    return Component(kind, index, cls, config)


def _name_components(comps: dict[str, list[Component]], loc: _Locator) -> None:
    for kind, items in comps.items():
        seen: dict[str, int] = {}
        for c in items:
            if c.config.name is None:
                base = str(c.config.type).rsplit(":", 1)[-1].lower()
                same = [o for o in items if o.config.type == c.config.type]
                c.config.name = base if len(same) == 1 else f"{base}-{same.index(c)}"
            if c.config.name in seen:
                loc.add(
                    (kind, c.index, "name"),
                    f"duplicate name {c.config.name!r} (also {kind}[{seen[c.config.name]}])",
                )
            seen[c.config.name] = c.index
        if kind == "sources":
            for c in items:
                if (
                    not getattr(c.cls, "long_lived", False)
                    and not _maybe_long_lived(c)
                    and c.config.every is None
                    and c.config.cron is None
                ):
                    c.config.every = 5.0


def _maybe_long_lived(c: Component) -> bool:
    """Sources that decide at open() whether they stream (python generators, serial)."""
    return bool(getattr(c.cls, "maybe_long_lived", False))


def _check_dataflow(
    settings: CollectorConfig, comps: dict[str, list[Component]], loc: _Locator
) -> None:
    """Run the chain on empty frames: unknown columns and bad SQL become config errors."""
    tags: set[str] = set()
    for c in comps["sources"]:
        tags.update(getattr(c.config, "tags", {}) or {})
        tags.update(getattr(c.cls, "extra_columns", lambda cfg: ())(c.config))
    frame: pl.DataFrame | None = empty_readings(sorted(tags))
    ctx = Context(device=settings.device, component="check", data_dir=settings.data_dir)
    for c in comps["transforms"]:
        try:
            t: Transform = c.cls(c.config, ctx)  # type: ignore[assignment]
        except Exception as exc:  # plugin constructors validate more than pydantic can
            loc.add(("transforms", c.index), str(exc))
            frame = None
            continue
        if frame is None:
            continue
        if getattr(t, "schema_opaque", False):
            frame = None  # user code decides the columns; later checks are syntax-only
            continue
        try:
            frame = t.apply(frame.clear())
        except Exception as exc:
            loc.add(
                ("transforms", c.index),
                f"fails on columns [{', '.join(frame.columns)}]: "
                f"{str(exc).strip().splitlines()[0]}",
            )
            frame = None
    for c in comps["sinks"]:
        cfg: SinkConfig = c.config
        parts = getattr(cfg, "partition_by", None)
        if parts and frame is not None:
            from sinks._partition import validate_partitions

            try:
                validate_partitions(parts, frame.columns)
            except ValueError as exc:
                loc.add(("sinks", c.index, "partition_by"), str(exc))
        if cfg.where is None:
            continue
        try:
            expr = sqlexpr.compile_expr(cfg.where)
            if frame is not None:
                sqlexpr.check_on(expr, cfg.where, frame, boolean=True)
        except ValueError as exc:
            loc.add(("sinks", c.index, "where"), str(exc))
    return frame


def json_schema() -> dict[str, Any]:
    """The JSON schema of a config: the top level plus every plugin's model under $defs."""
    schema = CollectorConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    for kind, base in (
        ("sources", SourceConfig),
        ("transforms", TransformConfig),
        ("sinks", SinkConfig),
    ):
        variants = []
        for name in sorted(registry.available(kind)):  # type: ignore[arg-type]
            try:
                cls = registry.load(kind, name)  # type: ignore[arg-type]
            except Exception:
                continue
            sub = cls.Config.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            title = f"{kind[:-1]}.{name}"
            sub["title"] = title
            defs[title] = sub
            variants.append({"$ref": f"#/$defs/{title}"})
        schema["properties"][kind]["items"] = (
            {"anyOf": variants} if variants else base.model_json_schema()
        )
    return schema
