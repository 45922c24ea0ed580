"""Transform state as JSON plus Arrow IPC blobs: a checkpoint that cannot run code when loaded.

Files in the data dir are untrusted (anyone who can write ``state/`` must not get code run as
the collector), so checkpoints are not pickles. State is a tree of plain values; what JSON
lacks is tagged:

    {"$t": [...]}            tuple               {"$q": [...], "n": maxlen}  deque
    {"$d": [[k, v], ...]}    dict with non-str keys or a "$" key
    {"$s": [...]}            set                 {"$dt": "iso"}              datetime
    {"$f": "nan"|"inf"|"-inf"}                   a float JSON cannot hold
    {"$df": i} / {"$sr": i}  Polars frame / series, blob ``i`` (Arrow IPC stream)
    {"$o": "module:Class", "d": {...}}           an object's ``__dict__``

Objects are rebuilt only for classes of modules already imported from this package
(``collector.`` / ``sinks.``), without calling ``__init__`` and without importing anything:
a checkpoint can name a class, never make the collector load code.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
from collections import deque
from datetime import datetime
from typing import Any

import polars as pl

_TRUSTED_MODULES = ("collector.", "sinks.")


class StateError(ValueError):
    """A checkpoint's state cannot be encoded or decoded."""


def encode(value: Any, blobs: list[bytes]) -> Any:
    """A JSON-able tree for ``value``; frames go to ``blobs``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"$f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, pl.DataFrame | pl.Series):
        buf = io.BytesIO()
        frame = value.to_frame() if isinstance(value, pl.Series) else value
        frame.write_ipc_stream(buf, compression="zstd")
        blobs.append(buf.getvalue())
        return {"$df" if isinstance(value, pl.DataFrame) else "$sr": len(blobs) - 1}
    if isinstance(value, list):
        return [encode(v, blobs) for v in value]
    if isinstance(value, tuple):
        return {"$t": [encode(v, blobs) for v in value]}
    if isinstance(value, deque):
        return {"$q": [encode(v, blobs) for v in value], "n": value.maxlen}
    if isinstance(value, set | frozenset):
        return {"$s": [encode(v, blobs) for v in value]}
    if isinstance(value, datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, blobs) for k, v in value.items()}
        return {"$d": [[encode(k, blobs), encode(v, blobs)] for k, v in value.items()]}
    cls = type(value)
    if cls.__module__.startswith(_TRUSTED_MODULES) and hasattr(value, "__dict__"):
        state = value.__getstate__() if hasattr(cls, "__getstate__") else vars(value)
        if not isinstance(state, dict):
            state = vars(value)
        return {"$o": f"{cls.__module__}:{cls.__qualname__}", "d": encode(state, blobs)}
    raise StateError(f"cannot checkpoint a {cls.__module__}.{cls.__qualname__}")


def decode(tree: Any, blobs: list[bytes]) -> Any:
    """The value ``encode`` made ``tree`` from."""
    if isinstance(tree, list):
        return [decode(v, blobs) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "$f" in tree:
        return float(tree["$f"])
    if "$df" in tree or "$sr" in tree:
        frame = pl.read_ipc_stream(io.BytesIO(blobs[int(tree.get("$df", tree.get("$sr")))]))
        return frame if "$df" in tree else frame.to_series(0)
    if "$t" in tree:
        return tuple(decode(v, blobs) for v in tree["$t"])
    if "$q" in tree:
        return deque((decode(v, blobs) for v in tree["$q"]), maxlen=tree.get("n"))
    if "$s" in tree:
        return {decode(v, blobs) for v in tree["$s"]}
    if "$dt" in tree:
        return datetime.fromisoformat(tree["$dt"])
    if "$d" in tree:
        return {_hashable(decode(k, blobs)): decode(v, blobs) for k, v in tree["$d"]}
    if "$o" in tree:
        obj = _new(str(tree["$o"]))
        state = decode(tree["d"], blobs)
        if hasattr(obj, "__setstate__") and not dataclasses.is_dataclass(obj):
            obj.__setstate__(state)
        else:
            obj.__dict__.update(state)
        return obj
    return {k: decode(v, blobs) for k, v in tree.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _new(ref: str) -> Any:
    module_name, _, qualname = ref.partition(":")
    if not module_name.startswith(_TRUSTED_MODULES) or module_name not in sys.modules:
        raise StateError(f"checkpoint names a class outside the collector: {ref!r}")
    target: Any = sys.modules[module_name]
    for part in qualname.split("."):
        target = getattr(target, part, None)
    if not isinstance(target, type):
        raise StateError(f"checkpoint names an unknown class: {ref!r}")
    return target.__new__(target)
