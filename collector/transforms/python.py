"""User Python code as a transform: a function from a Polars DataFrame to a Polars DataFrame."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import polars as pl
from pydantic import Field

from collector.errors import TransformError
from collector.plugin import Context, Transform, TransformConfig
from collector.sources.python import FUNCTION_PATTERN, load_function


class PythonTransformConfig(TransformConfig):
    """Config of the `python` transform."""

    type: Literal["python"] = Field(default="python", description="Plugin name.")
    function: str = Field(
        description="`module:function` taking and returning a Polars DataFrame.",
        pattern=FUNCTION_PATTERN,
    )
    path: str | None = Field(
        default=None, description="Folder added to `sys.path` before importing the module."
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments passed after the frame."
    )


class PythonTransform(Transform):
    """Calls ``function(df, **args)`` on each batch; its output schema is the user's business."""

    Config = PythonTransformConfig
    description = "User Python code: a function from a Polars DataFrame to a DataFrame."
    example = """\
- type: python
  function: my_rules:clean
  path: ./plugins
"""
    requires = {}
    schema_opaque = True

    def __init__(self, config: PythonTransformConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self._fn: Callable[..., Any] | None = None
        self._function()  # import now: a missing module is a ConfigError at start-up

    def _function(self) -> Callable[..., Any]:
        if self._fn is None:
            self._fn = load_function(self.config.function, self.config.path, self.ctx.component)
        return self._fn

    def apply(self, df: pl.DataFrame) -> pl.DataFrame:
        out = self._function()(df, **self.config.args)
        if inspect.isawaitable(out):
            # `async def` transforms work like async sources: the pipeline thread has no event
            # loop of its own, so each batch's coroutine runs to its end here
            out = asyncio.run(_awaited(out))
        if hasattr(out, "__arrow_c_stream__") and not isinstance(out, pl.DataFrame):
            out = pl.DataFrame(out)  # an Arrow table or batch
        if not isinstance(out, pl.DataFrame):
            raise TransformError(
                f"{self.config.function} returned {type(out).__name__}, not a Polars DataFrame"
            )
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Functions are re-imported after a restart rather than pickled by reference.
        state = super().__getstate__()
        state["_fn"] = None
        return state


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value
