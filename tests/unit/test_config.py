"""Config validation: every bad config names its file, line and field, and exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from collector.config import load_text
from collector.errors import ConfigError

GOOD = """\
device: dev-1
sources:
  - name: room
    type: simulated
    every: 5s
    metrics:
      temperature: {kind: uniform, min: 0, max: 30, unit: C}
transforms:
  - type: filter
    where: "value BETWEEN -40 AND 85"
  - type: window
    every: 1m
    aggs: [mean, min, max, count]
sinks:
  - name: lake
    type: lake
    path: ./data/lake
"""


def issues_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as info:
        load_text(textwrap.dedent(text), "cfg.yaml")
    return [(i.line, i.path, i.message) for i in info.value.issues]


def test_good_config_loads_with_defaults() -> None:
    cfg = load_text(GOOD, "cfg.yaml")
    assert cfg.settings.device == "dev-1"
    assert [c.name for c in cfg.sources] == ["room"]
    assert cfg.sources[0].config.every == 5.0
    assert cfg.transforms[1].config.every == 60.0
    assert [c.name for c in cfg.transforms] == ["filter", "window"]
    assert cfg.sinks[0].config.spool.max_bytes == 256 * 1024**2
    assert cfg.sinks[0].config.batch.max_age == 10.0


def test_env_interpolation_with_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEV_ID", "gw-7")
    monkeypatch.delenv("NOPE", raising=False)
    text = GOOD.replace("device: dev-1", "device: ${DEV_ID}").replace(
        "path: ./data/lake", "path: ${NOPE:-/tmp/x}/lake"
    )
    cfg = load_text(text)
    assert cfg.settings.device == "gw-7"
    assert str(cfg.sinks[0].config.path) == "/tmp/x/lake"


BAD = [
    # (name, replace old -> new in GOOD, expected line, expected path, message fragment)
    (
        "unknown source type",
        ("type: simulated", "type: simulatd"),
        4,
        "sources[0].type",
        "unknown source type 'simulatd'; known: ",
    ),
    (
        "unknown sink type",
        ("type: lake", "type: lak"),
        16,
        "sinks[0].type",
        "unknown sink type 'lak'",
    ),
    (
        "unknown transform type",
        ("type: window", "type: windw"),
        11,
        "transforms[1].type",
        "unknown transform type 'windw'",
    ),
    (
        "unknown top-level field",
        ("device: dev-1", "device: dev-1\ndevcie: x"),
        2,
        "devcie",
        "unknown field",
    ),
    (
        "unknown plugin field",
        ("    every: 5s\n", "    every: 5s\n    evry: 5s\n"),
        6,
        "sources[0].evry",
        "unknown field",
    ),
    ("bad duration", ("every: 5s", "every: 5 parsecs"), 5, "sources[0].every", "is not a duration"),
    ("negative duration", ("every: 1m", "every: -1m"), 12, "transforms[1].every", "duration"),
    (
        "bad SQL in filter",
        ("value BETWEEN -40 AND 85", "value BETWEN -40 AND 85"),
        10,
        "transforms[0].where",
        "invalid SQL expression",
    ),
    (
        "unknown column in filter",
        ("value BETWEEN -40 AND 85", "valu > 3"),
        9,
        "transforms[0]",
        "valu",
    ),
    (
        "sink where on a column the window removed",
        ("    path: ./data/lake\n", '    path: ./data/lake\n    where: "value > 3"\n'),
        18,
        "sinks[0].where",
        "value",
    ),
    (
        "sink where not boolean",
        ("    path: ./data/lake\n", '    path: ./data/lake\n    where: "mean + 1"\n'),
        18,
        "sinks[0].where",
        "not a boolean",
    ),
    (
        "unknown aggregation",
        ("aggs: [mean, min, max, count]", "aggs: [mean, median9]"),
        13,
        "transforms[1].aggs[1]",
        "Input should be 'mean'",
    ),
    (
        "no sinks",
        ("sinks:\n  - name: lake\n    type: lake\n    path: ./data/lake\n", "sinks: []\n"),
        14,
        "sinks",
        "at least 1",
    ),
    ("missing sources", ("sources:", "sorces:"), 2, "sorces", "unknown field"),
    (
        "duplicate sink names",
        ("    path: ./data/lake\n", "    path: ./data/lake\n  - name: lake\n    type: console\n"),
        18,
        "sinks[1].name",
        "duplicate name 'lake'",
    ),
    (
        "bad size",
        ("    path: ./data/lake\n", "    path: ./data/lake\n    spool: {max_bytes: lots}\n"),
        18,
        "sinks[0].spool.max_bytes",
        "is not a size",
    ),
    (
        "bad when_full",
        ("    path: ./data/lake\n", "    path: ./data/lake\n    spool: {when_full: panic}\n"),
        18,
        "sinks[0].spool.when_full",
        "pattern",
    ),
    (
        "missing env var",
        ("device: dev-1", "device: ${EDGE_TEST_UNSET_VAR}"),
        1,
        "device",
        "environment variable EDGE_TEST_UNSET_VAR is not set",
    ),
    (
        "every and cron both",
        ("    every: 5s\n", "    every: 5s\n    cron: '* * * * *'\n"),
        3,
        "sources[0]",
        "either `every` or `cron`",
    ),
    ("bad cron", ("    every: 5s\n", "    cron: 'every tuesday'\n"), 3, "sources[0]", "cron"),
    (
        "entry not a mapping",
        ('  - type: filter\n    where: "value BETWEEN -40 AND 85"\n', "  - filter\n"),
        9,
        "transforms[0]",
        "mapping",
    ),
    ("type missing", ("    type: simulated\n", ""), 3, "sources[0].type", "field required"),
    (
        "bad partition key",
        ("    path: ./data/lake\n", "    path: ./data/lake\n    partition_by: [metric, week]\n"),
        18,
        "sinks[0].partition_by",
        "week",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_config_is_located(case: tuple) -> None:
    _, (old, new), line, path, fragment = case
    assert old in GOOD, old
    found = issues_of(GOOD.replace(old, new, 1))
    assert any(p == path and fragment in m for _, p, m in found), found
    assert any(ln == line and p == path for ln, p, _ in found), found


def test_invalid_yaml_reports_line() -> None:
    found = issues_of("sources:\n  - type: simulated\n    every: [5s\n")
    assert found[0][0] is not None and "invalid YAML" in found[0][2]


def test_all_problems_reported_not_just_first() -> None:
    text = GOOD.replace("type: simulated", "type: nope").replace("type: lake", "type: nada")
    paths = {p for _, p, _ in issues_of(text)}
    assert {"sources[0].type", "sinks[0].type"} <= paths


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_check_cli_exit_2_with_file_line_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(GOOD.replace("every: 5s", "every: soon"))
    res = run_cli("check", str(cfg))
    assert res.returncode == 2
    assert f"{cfg}:5 sources[0].every: 'soon' is not a duration" in res.stderr
    assert "Traceback" not in res.stderr


def test_check_cli_ok(tmp_path: Path) -> None:
    cfg = tmp_path / "good.yaml"
    cfg.write_text(GOOD)
    res = run_cli("check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_schema_lists_plugin_fields() -> None:
    res = run_cli("schema")
    assert res.returncode == 0, res.stderr
    schema = json.loads(res.stdout)
    assert "source.simulated" in schema["$defs"]
    assert "every" in schema["$defs"]["source.simulated"]["properties"]
    assert schema["properties"]["sinks"]["items"]["anyOf"]


def test_plugins_lists_descriptions() -> None:
    res = run_cli("plugins")
    assert res.returncode == 0, res.stderr
    for name in ("simulated", "replay", "window", "deadband", "lake", "console"):
        assert name in res.stdout


def test_tag_named_like_a_column_is_rejected() -> None:
    text = GOOD.replace("    every: 5s\n", "    every: 5s\n    tags: {value: x}\n", 1)
    found = issues_of(text)
    assert any(p == "sources[0].tags" and "clash" in m for _, p, m in found), found


@pytest.mark.parametrize(
    ("host", "expose", "ok"),
    [
        ("127.0.0.1", False, True),
        ("127.0.0.53", False, True),
        ("::1", False, True),
        ("localhost", False, True),
        ("0.0.0.0", False, False),
        ("192.168.1.10", False, False),
        ("gateway.local", False, False),
        ("0.0.0.0", True, True),
    ],
)
def test_telemetry_off_loopback_needs_expose(host: str, expose: bool, ok: bool) -> None:
    text = GOOD + f"telemetry: {{host: '{host}', expose: {str(expose).lower()}}}\n"
    if ok:
        assert load_text(text).settings.telemetry.host == host
        return
    found = issues_of(text)
    assert [(p, "telemetry.expose: true" in m) for _, p, m in found] == [("telemetry.host", True)]
    assert found[0][0] == GOOD.count("\n") + 1


def test_every_problem_is_reported_even_when_the_top_level_is_invalid() -> None:
    text = (
        GOOD.replace("every: 5s", "every: soon")
        .replace("type: lake", "type: lak")
        .replace("    path: ./data/lake\n", "    path: ./data/lake\n    where: 'value > 3'\n")
        + "telemetry: {port: many}\n"
    )
    found = issues_of(text)
    paths = [p for _, p, _ in found]
    assert paths == ["sources[0].every", "sinks[0].type", "sinks[0].where", "telemetry.port"]
    where = next(m for _, p, m in found if p == "sinks[0].where")
    assert "fails on columns" in where and "mean" in where  # checked after the window


def test_readme_four_problem_example() -> None:
    text = (
        GOOD.replace("every: 5s", "every: soon")
        .replace("value BETWEEN -40 AND 85", "value BETWEN 1 AND 2")
        .replace("type: lake", "type: lak")
        .replace("    path: ./data/lake\n", "    path: ./data/lake\n    where: 'value > 3'\n")
    )
    paths = [p for _, p, _ in issues_of(text)]
    assert paths == ["sources[0].every", "transforms[0].where", "sinks[0].type", "sinks[0].where"]


def test_units_refuse_what_cannot_be_a_schedule_or_a_size() -> None:
    from collector.units import parse_duration, parse_size

    for bad in (float("inf"), float("nan"), "99999999999d", 10**400, "1" * 400):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in (float("inf"), float("nan"), "1e3", "9" * 30 + "TiB"):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_duration("250ms") == 0.25 and parse_size("256MiB") == 256 * 1024**2


def test_intervals_below_10ms_are_rejected() -> None:
    found = issues_of(GOOD.replace("every: 5s", "every: 9ms"))
    assert ("sources[0].every" in {p for _, p, _ in found}), found
    assert load_text(GOOD.replace("every: 5s", "every: 10ms")).sources[0].config.every == 0.01
