"""The python source: per-tick functions, coroutines, generators, and import errors."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from pydantic import ValidationError

from collector.errors import ConfigError
from collector.plugin import Context
from collector.schema import normalize
from collector.sources.python import PythonSource, PythonSourceConfig

from .conftest import collect

HERE = str(Path(__file__).parent)
NOW = datetime(2024, 1, 1, tzinfo=UTC)


def make(tmp_path: Path, function: str, **cfg: Any) -> PythonSource:
    config = PythonSourceConfig.model_validate(
        {"name": "py", "function": f"plugin_user_code:{function}", "path": HERE, **cfg}
    )
    return PythonSource(config, Context(device="d1", component="py", data_dir=tmp_path))


def canonical(data: Any) -> pl.DataFrame:
    return normalize(data, device="d1", source="py", now=NOW)


async def test_plain_function_with_args_per_tick(tmp_path: Path) -> None:
    src = make(tmp_path, "read_wide", args={"base": 10.0})
    await src.open()
    assert src.long_lived is False
    df = canonical(await src.read())
    assert dict(zip(df["metric"], df["value"], strict=True)) == {
        "temperature": 10.0, "humidity": 20.0}
    assert src.config.every == 5.0


async def test_coroutine_function_and_frame_results(tmp_path: Path) -> None:
    src = make(tmp_path, "read_async", args={"n": 3})
    await src.open()
    assert canonical(await src.read())["value"].to_list() == [0.0, 1.0, 2.0]
    src = make(tmp_path, "read_frame")
    await src.open()
    df = canonical(await src.read())
    assert df["metric"].to_list() == ["a", "b"] and set(df["device"]) == {"d1"}


@pytest.mark.parametrize("function,values", [("stream_async", [0.0, 1.0, 2.0, 3.0]),
                                             ("stream_sync", [0.0, 10.0, 20.0, 30.0])])
async def test_generators_become_long_lived(tmp_path: Path, function: str,
                                            values: list[float]) -> None:
    src = make(tmp_path, function, args={"n": 4}, finite=True)
    assert PythonSource.long_lived is False
    await src.open()
    assert src.long_lived is True and src.finite is True
    items = await collect(src.stream())
    assert [canonical(i)["value"][0] for i in items] == values


async def test_import_errors_are_config_errors(tmp_path: Path) -> None:
    src = PythonSource(
        PythonSourceConfig(type="python", function="no_such_module_xyz:f", path=str(tmp_path)),
        Context(device="d1", component="py", data_dir=tmp_path),
    )
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        await src.open()
    with pytest.raises(ConfigError, match="no callable 'missing'"):
        await make(tmp_path, "missing").open()
    broken = tmp_path / "broken_user_mod.py"
    broken.write_text("import not_installed_pkg_abc\n")
    src = PythonSource(
        PythonSourceConfig(type="python", function="broken_user_mod:f", path=str(tmp_path)),
        Context(device="d1", component="py", data_dir=tmp_path),
    )
    with pytest.raises(ConfigError, match="not_installed_pkg_abc"):
        await src.open()


def test_function_spec_is_validated() -> None:
    with pytest.raises(ValidationError, match="function"):
        PythonSourceConfig.model_validate({"function": "no colon"})


def test_cron_instead_of_the_default_every() -> None:
    cfg = PythonSourceConfig.model_validate({"function": "m:f", "cron": "*/5 * * * *"})
    assert cfg.every is None and cfg.cron == "*/5 * * * *"
