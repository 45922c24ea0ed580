"""`type:` names a registered plugin, an entry point, or a `package.module:Class` that `check`
finds without importing: a plugin module's import-time code runs in `run` only, and standard
library targets like `os:system` are config errors, never imports or tracebacks."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from collector.config import load_text
from collector.errors import ConfigError
from tests.e2e.conftest import ROOT, read_lake, run_cli

SINK_MODULE = '''
from pathlib import Path

from pydantic import Field

from collector.plugin import Sink, SinkConfig

Path({marker!r}).write_text("imported")  # the import-time side effect


class MarkerConfig(SinkConfig):
    path: Path = Field(description="Folder.")


class MarkerSink(Sink):
    Config = MarkerConfig

    async def write(self, table, batch_id):
        self.config.path.mkdir(parents=True, exist_ok=True)
        table.write_parquet(self.config.path / f"{{batch_id}}.parquet")
'''


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"PYTHONPATH": f"{tmp_path / 'plugins'}{os.pathsep}{ROOT}"})


def plugin_package(tmp_path: Path) -> Path:
    """A package whose __init__ and module both leave a marker when imported."""
    pkg = tmp_path / "plugins" / "acme_sinks"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'init-ran')!r}).write_text('x')\n"
    )
    (pkg / "marker.py").write_text(SINK_MODULE.format(marker=str(tmp_path / "module-ran")))
    return pkg


def config(tmp_path: Path, sink: dict) -> Path:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "telemetry": {"enabled": False},
                "sources": [{"name": "s", "type": "simulated", "every": "1s"}],
                "sinks": [sink],
            }
        )
    )
    return cfg


def test_check_locates_a_plugin_without_running_its_import_code(tmp_path: Path) -> None:
    plugin_package(tmp_path)
    cfg = config(
        tmp_path,
        {"name": "m", "type": "acme_sinks.marker:MarkerSink", "path": str(tmp_path / "out"),
         "where": "value > -1000"},
    )
    res = cli(tmp_path, "check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "found, not imported" in res.stdout
    assert not (tmp_path / "module-ran").exists()
    assert not (tmp_path / "init-ran").exists()  # not even the parent package's __init__


def test_check_still_checks_the_shared_fields_of_an_unimported_plugin(tmp_path: Path) -> None:
    plugin_package(tmp_path)
    cfg = config(
        tmp_path,
        {"name": "m", "type": "acme_sinks.marker:MarkerSink", "where": "nosuch > 1",
         "batch": {"max_age": "soon"}},
    )
    res = cli(tmp_path, "check", str(cfg))
    assert res.returncode == 2
    assert "sinks[0].where: 'nosuch > 1' fails on columns" in res.stderr
    assert "sinks[0].batch.max_age: 'soon' is not a duration" in res.stderr
    assert not (tmp_path / "module-ran").exists()


def test_run_imports_the_plugin_and_validates_its_own_fields(tmp_path: Path) -> None:
    plugin_package(tmp_path)
    bad = config(tmp_path, {"name": "m", "type": "acme_sinks.marker:MarkerSink"})
    res = cli(tmp_path, "run", str(bad), "--once")
    assert res.returncode == 2
    assert "sinks[0].path: field required" in res.stderr and "Traceback" not in res.stderr
    good = config(
        tmp_path,
        {"name": "m", "type": "acme_sinks.marker:MarkerSink", "path": str(tmp_path / "out")},
    )
    res = cli(tmp_path, "run", str(good), "--once")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "module-ran").exists()
    assert read_lake(tmp_path / "out").height > 0


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("os:system", "'os' is a Python standard library module, not a plugin"),
        ("subprocess:Popen", "standard library"),
        ("builtins:eval", "standard library"),
        ("sys:exit", "standard library"),
        ("nosuchpkg.mod:Cls", "no module named 'nosuchpkg'"),
        ("collector.testing:Nope", "has no attribute 'Nope'"),
        ("collector.testing:run_once", "is not a Sink plugin class"),
        ("collector.sources.simulated:SimulatedSource", "is not a Sink plugin class"),
        ("not a target", "unknown sink type"),
        ("a.b:c-d", "not a plugin name or a `package.module:Class`"),
    ],
)
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_targets_are_one_clear_config_error(
    tmp_path: Path, target: str, fragment: str, command: str
) -> None:
    cfg = config(tmp_path, {"name": "x", "type": target})
    args = ["run", str(cfg), "--once"] if command == "run" else ["check", str(cfg)]
    res = cli(tmp_path, *args)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "sinks[0].type: cannot load plugin" in res.stderr or "unknown sink" in res.stderr
    assert fragment.lower() in res.stderr.lower()
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


def test_a_plugin_that_fails_on_import_is_a_config_error_in_run(tmp_path: Path) -> None:
    pkg = tmp_path / "plugins" / "broken_plugin.py"
    pkg.parent.mkdir(parents=True)
    pkg.write_text("raise RuntimeError('driver missing')\n")
    cfg = config(tmp_path, {"name": "x", "type": "broken_plugin:Sink"})
    assert cli(tmp_path, "check", str(cfg)).returncode == 0  # found; not run
    res = cli(tmp_path, "run", str(cfg), "--once")
    assert res.returncode == 2
    assert "cannot import 'broken_plugin': RuntimeError: driver missing" in res.stderr
    assert "Traceback" not in res.stderr


def test_documented_in_repo_targets_still_load() -> None:
    cfg = load_text(
        "sources: [{type: simulated}]\n"
        "sinks: [{type: 'collector.testing:ListSink', name: out}]\n",
        import_plugins=False,
    )
    assert cfg.sinks[0].imported and cfg.sinks[0].cls.__name__ == "ListSink"
    with pytest.raises(ConfigError):
        load_text("sources: [{type: simulated}]\nsinks: [{type: 'os:system'}]\n")
