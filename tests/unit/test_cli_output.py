"""What the CLI prints when its output is piped (issue 17 item 15): nothing is cut at 80 columns.

Every command runs as a subprocess with stdout a pipe, as in `collector plugins > plugins.txt`
or `collector status | grep lake`.
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import yaml

from collector import registry
from tests.e2e.conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("sources", "transforms", "sinks")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env={"COLUMNS": "80", **(env or {})})


def printed_examples(out: str) -> dict[tuple[str, str], str]:
    """(kind, plugin) -> the example block printed under it, dedented."""
    found: dict[tuple[str, str], str] = {}
    kind = name = None
    block: list[str] = []

    def close() -> None:
        if kind and name and any(line.strip() for line in block):
            found[(kind, name)] = textwrap.dedent("\n".join(block)).strip("\n")

    for line in out.splitlines():
        header = re.fullmatch(r"=== (\w+) ===", line)
        if header or (line and not line.startswith(" ")):
            close()
            block = []
            if header:
                kind, name = header.group(1), None
            else:
                name = line.split()[0]
        else:
            block.append(line)
    close()
    return found


def test_plugins_piped_prints_every_example_whole_and_valid_yaml() -> None:
    res = cli("plugins")
    assert res.returncode == 0, res.stderr
    got = printed_examples(res.stdout)
    expected = {
        (kind, name): registry.load(kind, name).example  # type: ignore[arg-type]
        for kind in KINDS
        for name in registry.available(kind)  # type: ignore[arg-type]
        if registry.load(kind, name).example  # type: ignore[arg-type]
    }
    assert set(got) == set(expected)
    long_lines = 0
    for key, example in expected.items():
        assert got[key] == example.strip("\n"), key
        assert yaml.safe_load(got[key]) == yaml.safe_load(example), key
        long_lines += any(len(line) + 2 > 80 for line in example.splitlines())
    assert long_lines, "no example is wider than 80 columns: the test would prove nothing"
    # a description is on its plugin's line, whole
    desc = registry.load("sinks", "elasticsearch").description
    assert f"elasticsearch  {desc}" in res.stdout.splitlines()


def test_plugins_piped_for_one_kind() -> None:
    res = cli("plugins", "--kind", "sinks")
    assert res.returncode == 0, res.stderr
    got = printed_examples(res.stdout)
    assert {k for k, _ in got} == {"sinks"}
    assert got[("sinks", "s3")] == registry.load("sinks", "s3").example.strip("\n")


def test_status_piped_shows_full_sink_names_and_times(tmp_path: Path) -> None:
    sink = "lake_of_the_boiler_room_readings_for_the_long_term"
    config = tmp_path / "c.yaml"
    config.write_text(
        textwrap.dedent(f"""\
            sources:
              - {{name: room, type: simulated}}
            sinks:
              - {{name: {sink}, type: lake, path: "${{DATA_DIR}}/lake"}}
            telemetry: {{enabled: false}}
            """)
    )
    data = tmp_path / "data"
    ran = cli("run", str(config), "--once", "--data-dir", str(data))
    assert ran.returncode == 0, ran.stderr
    res = cli("status", "--data-dir", str(data))
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout
    row = next(line for line in res.stdout.splitlines() if sink in line)
    # one line per sink, with the full time of its last success
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", row), row
