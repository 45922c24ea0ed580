"""User Python code as a source: the edge analog of a Greengrass Lambda.

A plain or coroutine function is called on every tick; an async (or plain) generator function
becomes a long-lived stream. Whatever it returns goes through the same normalisation as any
built-in source (dicts, lists of narrow or wide dicts, Polars or Arrow frames).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from collector.errors import ConfigError, ConfigIssue
from collector.plugin import Context, Source, SourceConfig
from collector.units import Duration

FUNCTION_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
_DONE = object()


def load_function(spec: str, path: str | None, component: str) -> Callable[..., Any]:
    """The callable named ``module:function``; ConfigError that says what went wrong.

    ``path`` is prepended to ``sys.path`` so user code can live next to the config file.
    """
    if path is not None:
        folder = str(Path(path).expanduser().resolve())
        if folder not in sys.path:
            sys.path.insert(0, folder)
    module_name, _, attr = spec.partition(":")
    where = f" (searched sys.path, including {path!r})" if path else ""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        msg = f"{component}: cannot import module {module_name!r}{where}: {exc!r}"
        raise ConfigError([ConfigIssue(path="function", message=msg)]) from exc
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        msg = f"{component}: module {module_name!r} has no callable {attr!r}"
        raise ConfigError([ConfigIssue(path="function", message=msg)])
    return fn


class PythonSourceConfig(SourceConfig):
    """Config of the `python` source."""

    type: Literal["python"] = Field(default="python", description="Plugin name.")
    every: Duration | None = Field(
        default=5.0, gt=0, description="Call interval for a plain or coroutine function."
    )
    function: str = Field(
        description="`module:function` of the user code.", pattern=FUNCTION_PATTERN
    )
    path: str | None = Field(
        default=None, description="Folder added to `sys.path` before importing the module."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the function."
    )
    finite: bool = Field(
        default=False,
        description="For a generator function that ends on its own: `--once` waits for its end.",
    )


class PythonSource(Source):
    """Calls user code per tick, or streams what a user (async) generator yields."""

    Config = PythonSourceConfig
    description = "User Python code: a function per tick, or an (async) generator as a stream."
    example = """\
- name: custom
  type: python
  function: my_sensors:read_all
  path: ./plugins
  every: 10s
  args: {bus: 1}
"""
    requires = {}
    maybe_long_lived = True
    """Whether it streams is known only at open(), from the kind of function imported."""

    def __init__(self, config: PythonSourceConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._fn: Callable[..., Any] | None = None

    async def open(self) -> None:
        fn = load_function(self.config.function, self.config.path, self.ctx.component)
        self._fn = fn
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            # The runtime reads these from the instance after open().
            self.long_lived = True
            self.finite = self.config.finite

    def _function(self) -> Callable[..., Any]:
        if self._fn is None:
            raise RuntimeError("python source used before open()")
        return self._fn

    async def read(self) -> Any:
        fn = self._function()
        if inspect.iscoroutinefunction(fn):
            return await fn(**self.config.args)
        result = await asyncio.to_thread(fn, **self.config.args)
        if inspect.isawaitable(result):  # a callable object with an async __call__
            result = await result
        return result

    async def stream(self) -> AsyncIterator[Any]:
        fn = self._function()
        gen = fn(**self.config.args)
        if inspect.isasyncgen(gen):
            try:
                async for item in gen:
                    yield item
            finally:
                await gen.aclose()
            return
        try:
            while True:
                # A plain generator may block (device I/O): advance it in a thread.
                item = await asyncio.to_thread(next, gen, _DONE)
                if item is _DONE:
                    return
                yield item
        finally:
            gen.close()
