"""Config loading: YAML with line numbers, ``${VAR}`` interpolation, two-phase validation.

Phase 1 validates the top level (plugin entries stay plain dicts); phase 2 validates each entry
against its plugin's own model, so an error inside ``sinks[1]`` names that plugin's fields.
A third, still I/O-free pass runs the transform chain on empty frames to type-check every SQL
expression and sink ``where:`` against the columns it will really see. All problems are
collected, each located as ``FILE:LINE path: message``.

The config file is trusted, but it is still bounded: a file above :data:`MAX_CONFIG_BYTES`,
nesting deeper than :data:`MAX_DEPTH` or more than :data:`MAX_NODES` values once YAML aliases are
expanded (a "billion laughs" bomb) is rejected before anything is built, so neither `check` nor
a SIGHUP reload can be made to eat the device's memory. Whatever the text, only
:class:`ConfigError` leaves :func:`load_text`. Secret values are registered with
:mod:`collector.redact` as they are read, and messages show ``${VAR}`` instead of an
interpolated value.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from collector import redact, registry
from collector.errors import ConfigError, ConfigIssue
from collector.plugin import (
    Context,
    Model,
    Plugin,
    Sink,
    SinkConfig,
    Source,
    SourceConfig,
    Transform,
    TransformConfig,
)
from collector.runtime.blobs import BlobsConfig
from collector.schema import empty_readings
from collector.units import MIN_INTERVAL, Duration, Size, format_duration

Loc = tuple[str | int, ...]
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

MAX_CONFIG_BYTES = 1024 * 1024
"""A config is a page of YAML; 1 MiB leaves room for big register maps and stops a 50 MB file."""
MAX_DEPTH = 64
"""Nesting limit (textual and after aliases); PyYAML's composer recurses once per level."""
MAX_NODES = 100_000
"""Values after alias expansion; a billion-laughs file reaches this within milliseconds."""
MAX_MESSAGE = 400
"""Longest message printed for one issue (a 1 MB scalar echoed back helps nobody)."""
_LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}
_OWN_PACKAGE_BASES: dict[str, type[Plugin]] = {
    "sources": Source,
    "transforms": Transform,
    "sinks": Sink,
}
_COLUMN_PRESERVING = {"filter", "deadband"}
"""Transforms that only drop rows: when one is invalid, `check` still knows the columns after it
and goes on checking the sinks' `where:` (README's four-problem example)."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses nobody else on the network reaches."""
    if host.strip().lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class LogSettings(Model):
    """The durable device log every reading is written to before anything else."""

    fsync: str = Field(
        default="every_tick",
        pattern="^(every_tick|interval|never)$",
        description="`every_tick`: fsync each append (nothing read is lost on power cut); "
        "`interval`: fsync at most every `fsync_interval` (less flash wear, up to that much "
        "lost on power cut, nothing lost on a crash); `never`: leave it to the OS.",
    )
    fsync_interval: Duration = Field(
        default="1s", ge=MIN_INTERVAL, description="Period for `interval` (at least 10ms)."
    )
    segment_bytes: Size = Field(default="64MiB", gt=0, description="Roll to a new segment here.")
    checkpoint_every: Duration = Field(
        default="2s",
        ge=MIN_INTERVAL,
        description="How often transform state and offsets are committed (at least 10ms).",
    )


class TelemetrySettings(Model):
    """Prometheus metrics and the health endpoint (127.0.0.1 only)."""

    enabled: bool = Field(default=True, description="Serve /metrics and /health.")
    expose: bool = Field(
        default=False,
        description="Allow a `host` that is not loopback (the endpoints have no authentication: "
        "anyone who reaches the port reads every metric).",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Listen address; loopback unless `expose: true`.",
    )
    port: int = Field(default=9108, ge=0, le=65535, description="Port (0 = any free port).")
    unhealthy_after: Duration = Field(
        default="5m", gt=0, description="A sink failing longer than this makes /health 503."
    )

    @field_validator("host")
    @classmethod
    def _loopback_unless_exposed(cls, host: str, info: ValidationInfo) -> str:
        # `expose` is declared before `host`, so it is validated first and visible here
        if not is_loopback(host) and not info.data.get("expose", False):
            raise ValueError(
                f"{host!r} is not a loopback address: /metrics and /health have no "
                "authentication; set `telemetry.expose: true` to serve them on the network"
            )
        return host


class RuntimeSettings(Model):
    """How much of the machine the collector may use."""

    threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Size of the Polars thread pool (default: one per core). `1` on a "
        "single-core device or one shared with a busier process; applied at start (a reload "
        "keeps the running pool).",
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
    runtime: RuntimeSettings = Field(
        default_factory=RuntimeSettings, description="Threads the collector may use."
    )
    blobs: BlobsConfig = Field(
        default_factory=BlobsConfig,
        description="Blob store for files sources take (images): bound and clean-up.",
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
    imported: bool = True
    """False for a `module:Class` plugin that `check` located but did not import: ``cls`` is a
    stand-in and ``config`` holds only the fields every plugin of its kind shares."""

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


class _LooseSourceConfig(SourceConfig):
    model_config = ConfigDict(extra="allow")


class _LooseTransformConfig(TransformConfig):
    model_config = ConfigDict(extra="allow")


class _LooseSinkConfig(SinkConfig):
    model_config = ConfigDict(extra="allow")


class _UnimportedSource(Source):
    """Stand-in for a located, not imported source: it may stream or poll."""

    Config = _LooseSourceConfig
    maybe_long_lived = True


class _UnimportedTransform(Transform):
    """Stand-in for a located, not imported transform: its output columns are unknown."""

    Config = _LooseTransformConfig
    schema_opaque = True


class _UnimportedSink(Sink):
    """Stand-in for a located, not imported sink."""

    Config = _LooseSinkConfig


_STAND_INS: dict[str, type[Plugin]] = {
    "sources": _UnimportedSource,
    "transforms": _UnimportedTransform,
    "sinks": _UnimportedSink,
}


# ---------------------------------------------------------------------------------------------
# YAML with positions


class _TooBig(Exception):
    """The YAML would expand past a limit; carries the line to report."""

    def __init__(self, line: int | None, message: str, loc: Loc = ()) -> None:
        super().__init__(message)
        self.line, self.message, self.loc = line, message, loc


def _scan_limits(text: str) -> None:
    """Reject deep nesting before PyYAML's (recursive) composer sees it.

    The event parser is iterative, so this costs one pass and no recursion whatever the text.
    """
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else None
                raise _TooBig(line, f"nested more than {MAX_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


class _Reader:
    """Builds plain Python values from YAML nodes, with positions, limits and secrets noted."""

    def __init__(self) -> None:
        self.lines: dict[Loc, int] = {}
        self.problems: list[tuple[Loc, str]] = []
        self.interpolated: dict[Loc, list[tuple[str, str]]] = {}
        """loc -> [(`${NAME}`, value)] for every substitution, to show the name, not the value."""
        self.nodes = 0
        self._open: set[int] = set()

    def construct(self, node: yaml.Node, loc: Loc = ()) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(loc, line)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self._too_big(
                loc,
                f"more than {MAX_NODES:,} values once YAML aliases are expanded "
                "(an alias bomb?)",
            )
        if len(loc) > MAX_DEPTH:
            raise self._too_big(loc, f"nested more than {MAX_DEPTH} levels deep (through aliases)")
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if id(node) in self._open:
                raise self._too_big(loc, "an alias refers to the collection that contains it")
            self._open.add(id(node))
            try:
                return self._collection(node, loc)
            finally:
                self._open.discard(id(node))
        assert isinstance(node, yaml.ScalarNode)
        if node.tag == "tag:yaml.org,2002:str" and "${" in node.value:
            # stays a string: pydantic turns "1883" into an int where the field wants one
            value: Any = self._interpolate(node.value, loc)
        else:
            value = self._scalar(node, loc)
        if isinstance(value, str):
            field_name = next((p for p in reversed(loc) if isinstance(p, str)), "")
            if redact.looks_secret(field_name):
                redact.register(value)
            for pw in redact.url_passwords(value):
                redact.register(pw)
        return value

    def _too_big(self, loc: Loc, message: str) -> _TooBig:
        """Located at the entry being expanded (``sources[0]``, or a top-level key): where the
        user looks, rather than deep inside the expansion."""
        where = loc[:2] if loc and loc[0] in ("sources", "transforms", "sinks") else loc[:1]
        return _TooBig(self.lines.get(where), message, where)

    def _collection(self, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return [self.construct(v, (*loc, i)) for i, v in enumerate(node.value)]
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                self.lines.setdefault((*loc, "?"), line)
                self.problems.append(((*loc, "?"), "a key must be a plain name"))
                continue
            key = str(key_node.value)
            child = (*loc, key)
            self.lines[child] = key_node.start_mark.line + 1
            if key in out:
                self.problems.append((child, "duplicate key"))
            out[key] = self.construct(value_node, child)
        return out

    def _scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_object(node, deep=True)
        except Exception as exc:  # e.g. a timestamp like 2024-13-45, an int of 5000 digits
            self.problems.append((loc, f"invalid value: {str(exc).splitlines()[0][:200]}"))
            return None
        finally:
            loader.dispose()

    def _interpolate(self, text: str, loc: Loc) -> str:
        field_name = next((p for p in reversed(loc) if isinstance(p, str)), "")

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            value = os.environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.problems.append(
                        (
                            loc,
                            f"environment variable {name} is not set "
                            f"(write ${{{name}:-default}} to give a default)",
                        )
                    )
                    return ""
                return default
            if redact.looks_secret(name) or redact.looks_secret(field_name):
                redact.register(value)
            self.interpolated.setdefault(loc, []).append((f"${{{name}}}", value))
            return value

        return _VAR_RE.sub(sub, text)


def _fmt_path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Locator:
    """Turns pydantic locations into printable paths and the line they point at."""

    def __init__(
        self,
        file: str,
        data: Any,
        lines: dict[Loc, int],
        interpolated: dict[Loc, list[tuple[str, str]]] | None = None,
    ) -> None:
        self.file, self.data, self.lines = file, data, lines
        self.interpolated = interpolated or {}
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
        self.issues.append(ConfigIssue(_fmt_path(loc), self._shown(loc, message), line, self.file))

    def _shown(self, loc: Loc, message: str) -> str:
        """The message with interpolated values written as their ``${VAR}``, secrets masked.

        A value substituted under ``loc`` (or inside it) is what the user did not write: show
        the name they wrote instead (``'${TOKEN}' is not a duration``), so an environment
        value put in the wrong field is never printed, secret-looking or not.
        """
        for where, subs in self.interpolated.items():
            if where[: len(loc)] != loc and loc[: len(where)] != where:
                continue
            for name, value in sorted(subs, key=lambda s: len(s[1]), reverse=True):
                if not value:
                    continue
                message = message.replace(repr(value), repr(name))
                if len(value) >= redact.MIN_LENGTH:
                    message = message.replace(value, name)
        message = redact.text(message)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 1] + "…"
        return message

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


def load_text(
    text: str,
    file: str = "<config>",
    *,
    import_plugins: bool = True,
    require_extras: bool = True,
) -> LoadedConfig:
    """Validate a config given as YAML text; ConfigError lists every problem found.

    ``import_plugins=False`` is `collector check`'s mode: a ``module:Class`` plugin outside
    edge-collector's own packages is located on disk but not imported (its import could run
    anything), and only the fields shared by its kind are checked; `run` imports it.
    ``require_extras=False`` is the mode of commands that only read the config (`status`,
    `catalog`): a plugin whose optional Python package (``requires``) is not installed is no
    error there, since none of its code runs.
    Whatever ``text`` holds, only ConfigError escapes.
    """
    try:
        return _load_text(text, file, import_plugins, require_extras)
    except ConfigError:
        raise
    except RecursionError:
        issue = ConfigIssue("", "the config is nested too deeply", None, file)
        raise ConfigError([issue]) from None
    except Exception as exc:  # a bug of ours or a plugin's validator: still one clear line
        msg = f"cannot validate the config: {type(exc).__name__}: {str(exc)[:200]}"
        raise ConfigError([ConfigIssue("", redact.text(msg), None, file)]) from None


def _load_text(
    text: str, file: str, import_plugins: bool, require_extras: bool = True
) -> LoadedConfig:
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ConfigError([_too_big(file, size)])
    try:
        _scan_limits(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        reader = _Reader()
        data = {} if root is None else reader.construct(root)
    except _TooBig as exc:
        raise ConfigError([ConfigIssue(_fmt_path(exc.loc), exc.message, exc.line, file)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            [ConfigIssue("", redact.text(f"invalid YAML: {problem}"), line, file)]
        ) from None
    loc = _Locator(file, data, reader.lines, reader.interpolated)
    for where, msg in reader.problems:
        loc.add(where, msg)
    if not isinstance(data, dict):
        loc.add((), "the config must be a mapping with `sources` and `sinks`")
        raise ConfigError(loc.issues)
    settings: CollectorConfig | None
    try:
        settings = CollectorConfig.model_validate(data)
    except ValidationError as err:
        loc.add_validation((), err)
        settings = None  # go on: every component's problems are reported too

    comps: dict[str, list[Component]] = {}
    failed: dict[str, set[int]] = {}
    for kind in ("sources", "transforms", "sinks"):
        items = getattr(settings, kind) if settings is not None else data.get(kind)
        comps[kind], failed[kind] = [], set()
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            c = _component(kind, i, item, loc, import_plugins, require_extras)
            if c is None:
                failed[kind].add(i)
            else:
                comps[kind].append(c)
    _name_components(comps, loc)
    _check_intervals(comps, loc)
    device = settings.device if settings is not None else str(data.get("device", "edge-01"))
    data_dir = settings.data_dir if settings is not None else Path("./data")
    output = _check_dataflow(device, data_dir, comps, failed, data, loc)
    if loc.issues or settings is None:
        # in file order (stable: problems on one line keep their order)
        raise ConfigError(sorted(loc.issues, key=lambda i: i.line or 0))
    return LoadedConfig(
        settings, comps["sources"], comps["transforms"], comps["sinks"], file=file, raw=data,
        output=output,
    )


def _too_big(file: str, size: int) -> ConfigIssue:
    return ConfigIssue(
        "",
        f"the config is {size:,} bytes; the limit is {MAX_CONFIG_BYTES:,} bytes (1 MiB)",
        1,
        file,
    )


def load(
    path: str | Path, *, import_plugins: bool = True, require_extras: bool = True
) -> LoadedConfig:
    """Validate a config file (at most :data:`MAX_CONFIG_BYTES`, read no further)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
            if len(raw) > MAX_CONFIG_BYTES:
                fh.seek(0, os.SEEK_END)
                raise ConfigError([_too_big(str(path), fh.tell())])
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read config: {exc.strerror or exc}", None, str(path))]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [ConfigIssue("", f"the config is not UTF-8 text (byte {exc.start})", None, str(path))]
        ) from None
    return load_text(
        text, str(path), import_plugins=import_plugins, require_extras=require_extras
    )


def _component(
    kind: str,
    index: int,
    item: Any,
    loc: _Locator,
    import_plugins: bool = True,
    require_extras: bool = True,
) -> Component | None:
    where: Loc = (kind, index)
    if not isinstance(item, dict):
        loc.add(where, "each entry must be a mapping with a `type`")
        return None
    type_name = item.get("type")
    if not type_name:
        known = registry.available(kind)  # type: ignore[arg-type]
        loc.add((*where, "type"), f"field required (one of: {', '.join(sorted(known))})")
        return None
    if not isinstance(type_name, str):
        loc.add((*where, "type"), "must be a plugin name (a string)")
        return None
    imported = True
    try:
        if registry.target(kind, type_name) is not None:  # type: ignore[arg-type]
            cls = registry.load(kind, type_name)  # type: ignore[arg-type]
        elif ":" not in type_name:
            raise KeyError(type_name)
        elif import_plugins or registry.is_own(type_name):
            cls = registry.load_target(type_name, _OWN_PACKAGE_BASES[kind])
        else:
            registry.locate(type_name)  # found on disk; its code runs only in `collector run`
            cls, imported = _STAND_INS[kind], False
    except KeyError:
        known = registry.available(kind)  # type: ignore[arg-type]
        loc.add(
            (*where, "type"),
            f"unknown {kind[:-1]} type {type_name!r}; known: {', '.join(sorted(known))} "
            "(or `package.module:Class`)",
        )
        return None
    except registry.PluginLoadError as exc:
        loc.add((*where, "type"), f"cannot load plugin {type_name!r}: {exc}")
        return None
    except Exception as exc:  # an entry point's module failing to import
        loc.add(
            (*where, "type"), f"cannot load plugin {type_name!r}: {type(exc).__name__}: {exc}"
        )
        return None
    try:
        config = cls.Config.model_validate(item)
    except ValidationError as err:
        loc.add_validation(where, err)
        return None
    except Exception as exc:  # a plugin validator raising something pydantic does not wrap
        loc.add(where, f"invalid: {type(exc).__name__}: {exc}")
        return None
    for module, extra in registry.missing_requirements(cls) if require_extras else ():
        loc.add(
            (*where, "type"),
            f"{type_name!r} needs the Python package {module!r}: "
            f"pip install 'edge-collector[{extra}]'",
        )
    return Component(kind, index, cls, config, imported)


def _check_intervals(comps: dict[str, list[Component]], loc: _Locator) -> None:
    """A schedule below 10 ms starves the event loop instead of pacing it."""
    for c in comps["sources"]:
        every = getattr(c.config, "every", None)
        if every is not None and every < MIN_INTERVAL:
            loc.add(
                ("sources", c.index, "every"),
                f"{format_duration(every) if every >= 0.001 else f'{every}s'} is too short: "
                f"the shortest interval is {format_duration(MIN_INTERVAL)}",
            )
    for c in comps["sinks"]:
        spool = getattr(c.config, "spool", None)
        base = getattr(spool, "retry_base", None)
        if base is not None and base < MIN_INTERVAL:
            loc.add(
                ("sinks", c.index, "spool", "retry_base"),
                f"the shortest retry backoff is {format_duration(MIN_INTERVAL)}",
            )


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
    device: str,
    data_dir: Path,
    comps: dict[str, list[Component]],
    failed: dict[str, set[int]],
    data: dict[str, Any],
    loc: _Locator,
) -> pl.DataFrame | None:
    """Run the chain on empty frames: unknown columns and bad SQL become config errors.

    Runs even when other parts are invalid, so every problem is printed at once: an invalid
    transform makes the columns after it unknown (unless it only drops rows), and a sink whose
    own fields are invalid still has its `where:` checked.
    """
    tags: set[str] = set()
    for c in comps["sources"]:
        tags.update(getattr(c.config, "tags", {}) or {})
        tags.update(getattr(c.cls, "extra_columns", lambda cfg: ())(c.config))
    known_columns = True
    raw_sources = data.get("sources") if isinstance(data.get("sources"), list) else []
    for i in failed["sources"]:
        # an invalid source still declares its tags; only a plugin adding columns of its own
        # (or an unreadable entry) makes the columns unknown
        raw = raw_sources[i] if i < len(raw_sources or []) else None
        raw_tags = raw.get("tags", {}) if isinstance(raw, dict) else None
        cls = _known_class("sources", raw.get("type") if isinstance(raw, dict) else None)
        if not isinstance(raw_tags, dict) or cls is None or hasattr(cls, "extra_columns"):
            known_columns = False
        else:
            tags.update(str(k) for k in raw_tags)
    frame: pl.DataFrame | None = empty_readings(sorted(tags)) if known_columns else None
    typed = {k: t for c in comps["sources"] for k, t in getattr(c.cls, "extra_schema", {}).items()}
    if frame is not None and typed:  # a source's own columns with their types (files: bytes)
        frame = frame.with_columns(pl.lit(None, t).alias(k) for k, t in typed.items())
    ctx = Context(device=device, component="check", data_dir=data_dir)
    by_index = {c.index: c for c in comps["transforms"]}
    raw_transforms = data.get("transforms") if isinstance(data.get("transforms"), list) else []
    for i in range(len(raw_transforms or [])):
        c = by_index.get(i)
        if c is None:
            raw = raw_transforms[i]
            if not (isinstance(raw, dict) and raw.get("type") in _COLUMN_PRESERVING):
                frame = None
            continue
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
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
            )
            frame = None
    sinks = {c.index: c for c in comps["sinks"]}
    raw_sinks = data.get("sinks") if isinstance(data.get("sinks"), list) else []
    for i, raw in enumerate(raw_sinks or []):
        c = sinks.get(i)
        if c is not None:
            cfg: SinkConfig = c.config
            where = cfg.where
            parts = getattr(cfg, "partition_by", None) if c.imported else None
        else:
            where = raw.get("where") if isinstance(raw, dict) else None
            parts = None
            if not isinstance(where, str):
                continue  # missing, or its type error is reported already
        if parts and frame is not None:
            from sinks._partition import validate_partitions

            try:
                validate_partitions(parts, frame.columns)
            except ValueError as exc:
                loc.add(("sinks", i, "partition_by"), str(exc))
        if where is None:
            continue
        from collector import sqlexpr  # sqlglot: only for a config that has SQL

        try:
            expr = sqlexpr.compile_expr(where)
            if frame is not None:
                sqlexpr.check_on(expr, where, frame, boolean=True)
        except ValueError as exc:
            loc.add(("sinks", i, "where"), str(exc))
    return frame


def _known_class(kind: str, type_name: Any) -> type[Plugin] | None:
    """The registered plugin class of ``type_name``, or None (unknown, or fails to load)."""
    if not isinstance(type_name, str) or registry.target(kind, type_name) is None:  # type: ignore[arg-type]
        return None
    try:
        return registry.load(kind, type_name)  # type: ignore[arg-type]
    except Exception:
        return None


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
