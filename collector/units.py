"""Human units in configs: durations (``5s``, ``1m``, ``7d``) and sizes (``256MiB``).

Pydantic ``Annotated`` types so every model parses them the same way and the JSON schema shows
the accepted forms.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
MAX_DURATION = 10 * 366 * 86400.0
"""Ten years: longer than any schedule, TTL or timeout makes sense, and far below the values
that overflow the event loop's and the scheduler's clocks (``every: 99999999999d``)."""
MIN_INTERVAL = 0.01
"""Shortest schedule or loop period (``every``, fsync and checkpoint intervals, retry backoff):
below 10 ms a timer starves the event loop instead of pacing it."""
MAX_SIZE = 2**50
"""One PiB: far above any spool or batch, and exact as a float and as a C int64."""
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def _as_float(value: int | float) -> float:
    """A YAML int of 400 digits does not fit a float: treat it as infinitely large."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def parse_duration(value: Any) -> float:
    """Seconds from ``5s``/``1m``/``7d``/``250ms`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '5s', '1m', '7d'")
    if isinstance(value, int | float):
        seconds = _as_float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(
                f"{value!r} is not a duration: use a number with ms, s, m, h, d or w, e.g. '5s'"
            )
        seconds = float(m.group(1)) * _DURATION_FACTORS[m.group(2)]
    if math.isnan(seconds):
        raise ValueError("a duration must be a number of seconds, not NaN")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(
            f"a duration must be at most {format_duration(MAX_DURATION)} (ten years)"
        )
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``256MiB``/``5MB``/``1024`` (decimal and binary prefixes both accepted)."""
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '256MiB'")
    if isinstance(value, int | float):
        number = _as_float(value)
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a size: use e.g. '512KiB', '256MiB', '5MB'")
        number = float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "b").lower()]
    if math.isnan(number):
        raise ValueError("a size must be a number of bytes, not NaN")
    if number < 0:
        raise ValueError("a size cannot be negative")
    if number > MAX_SIZE:  # also .inf, which int() cannot take
        raise ValueError("a size must be at most 1PiB")
    return int(value) if isinstance(value, int) else int(number)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling, for messages and partition names."""
    for unit in ("w", "d", "h", "m", "s"):
        factor = _DURATION_FACTORS[unit]
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{int(seconds * 1000)}ms"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"type": ["string", "number"], "examples": ["5s", "1m", "7d"]}),
]
"""Seconds; configs write ``5s``, ``1m``, ``7d`` or a number of seconds."""

PositiveDuration = Annotated[Duration, Field(gt=0)]

Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema({"type": ["string", "integer"], "examples": ["256MiB", "5MB", 1048576]}),
]
"""Bytes; configs write ``256MiB``, ``5MB`` or a number of bytes."""


def check_time_zone(value: str) -> str:
    """``value`` if it names an IANA time zone (``Europe/Rome``), else a ValueError saying so."""
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from None
    return value


TimeZone = Annotated[str, AfterValidator(check_time_zone)]
"""An IANA time zone name, checked when the config is read."""
