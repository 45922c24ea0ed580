"""Hostile configs: bombs, depth, size, absurd durations, random mutations, a bad SIGHUP.

Whatever the file holds, `check` and `run` answer with FILE:LINE lines and exit 2, never a
traceback, and a reload with such a file never stops a running collector from collecting or
from obeying SIGTERM.
"""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.config import MAX_CONFIG_BYTES, load_text
from collector.errors import ConfigError
from tests.e2e.conftest import Collector, read_lake, run_cli, wait_for, write_config

GOOD = textwrap.dedent(
    """\
    device: dev-1
    sources:
      - name: room
        type: simulated
        every: 5s
        tags: {site: a}
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
        where: "max > 1"
        spool: {max_bytes: 256MiB, ttl: 7d}
    log: {fsync: interval, fsync_interval: 1s}
    telemetry: {port: 9108}
    """
)

ALIAS_BOMB = textwrap.dedent(
    """\
    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
    b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
    c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
    d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
    e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
    f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
    g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
    h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
    i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    sources: [{type: simulated, tags: {x: *i}}]
    sinks: [{type: console}]
    """
)

HOSTILE = {
    "alias bomb": ALIAS_BOMB,
    "self-referencing alias": "a: &a [1, *a]\n"
    "sources: [{type: simulated}]\nsinks: [{type: console}]\n",
    "deep flow nesting": "sources: " + "[" * 20_000 + "]" * 20_000 + "\nsinks: [{type: console}]\n",
    "deep block nesting": "".join(f"{'  ' * i}k{i}:\n" for i in range(500)) + "  " * 500 + "v\n",
    "aliases nesting deeper than the text": "l0: &l0 [x]\n"
    + "".join(f"l{i}: &l{i} [*l{i - 1}]\n" for i in range(1, 200))
    + "sources: [{type: simulated}]\nsinks: [{type: console}]\n",
}


def first_issue(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_text(text, "bad.yaml", import_plugins=False)
    issues = info.value.issues
    assert issues and all(i.file == "bad.yaml" for i in issues)
    return str(issues[0])


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_yaml_is_one_located_error(name: str) -> None:
    line = first_issue(HOSTILE[name])
    assert line.startswith("bad.yaml:") and not line.startswith("bad.yaml:?"), line
    assert any(w in line for w in ("alias", "nested", "contains it")), line


def test_alias_bomb_names_the_entry_being_expanded() -> None:
    assert first_issue(ALIAS_BOMB).startswith("bad.yaml:6 f: more than 100,000 values")
    levels = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
        f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]"
        for p, k in zip("abcdefgh", "bcdefghi", strict=True)
    ]
    inline = "sources:\n  - type: simulated\n    tags: {" + ", ".join(levels) + "}\n"
    found = first_issue(inline + "sinks: [{type: console}]\n")
    assert found.startswith("bad.yaml:2 sources[0]: more than 100,000 values"), found


def test_oversized_config_states_the_limit(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(GOOD + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    res = run_cli("check", str(big))
    assert res.returncode == 2
    assert f"{big}:1 <root>: the config is" in res.stderr
    assert "the limit is 1,048,576 bytes (1 MiB)" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (".inf", "at most"),
        ("-.inf", "negative"),
        (".nan", "NaN"),
        ("99999999999d", "at most"),
        ("1e400", "not a duration"),
        ("0.000001", "too short"),
        ("5ms", "too short"),
        ("9" * 500 + "s", "at most"),
    ],
)
def test_absurd_source_interval_is_rejected_by_check(
    tmp_path: Path, value: str, fragment: str
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(GOOD.replace("every: 5s", f"every: {value}"))
    res = run_cli("check", str(cfg))
    assert res.returncode == 2, res.stdout
    assert f"{cfg}:5 sources[0].every: " in res.stderr and fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("max_bytes: 256MiB", "max_bytes: .inf", "sinks[0].spool.max_bytes"),
        ("max_bytes: 256MiB", "max_bytes: .nan", "sinks[0].spool.max_bytes"),
        ("ttl: 7d", "ttl: .inf", "sinks[0].spool.ttl"),
        ("fsync_interval: 1s", "fsync_interval: 1ms", "log.fsync_interval"),
        ("every: 1m", "every: .inf", "transforms[1].every"),
    ],
)
def test_absurd_values_elsewhere_are_config_errors(old: str, new: str, path: str) -> None:
    assert old in GOOD
    with pytest.raises(ConfigError) as info:
        load_text(GOOD.replace(old, new), "c.yaml")
    assert path in {i.path for i in info.value.issues}, info.value.issues


def test_run_refuses_an_alias_bomb_at_start(tmp_path: Path) -> None:
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(ALIAS_BOMB)
    res = run_cli("run", str(cfg), "--once", "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2
    assert f"{cfg}:6 f: more than" in res.stderr
    assert "Traceback" not in res.stderr


# --- fuzz -------------------------------------------------------------------------------------

NASTY = [
    ".inf", "-.inf", ".nan", "-1", "1e400", "9" * 5000, "0x1F", "~", "[]", "{}", "''", "&x",
    "*x", "*nope", "!!python/object:os.system", "!!binary AAAA", "2024-13-45", "2024-01-01",
    "? [a]\n: b", "[", "{", "]", "'", '"', "|", ">", "${X}", "${", "${DEFINITELY_UNSET}",
    "${X:-}", "\t", "\x00", "\ufeff", "é", "os:system", "collector.nope:X", ":", "- -", "yes",
    "null", "true", "<<: *x", "&x [1, *x]", "5 parsecs", "value >", "SELECT 1", "ms",
]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    lines = GOOD.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["value", "insert", "delete", "dup", "chars", "indent"]))
        if op == "value" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: {draw(st.sampled_from(NASTY))}"
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(NASTY)))
        elif op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = " " * draw(st.integers(0, 6)) + lines[i].lstrip()
        else:
            s = lines[i]
            j = draw(st.integers(0, len(s)))
            lines[i] = s[:j] + draw(st.text(max_size=5)) + s[j + draw(st.integers(0, 3)) :]
    return "\n".join(lines) + "\n"


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(mutated())
def test_fuzzed_configs_raise_only_config_errors(text: str) -> None:
    try:
        load_text(text, "fuzz.yaml", import_plugins=False)
    except ConfigError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert "Traceback" not in str(issue)
            assert len(issue.message) <= 400


# --- SIGHUP with a hostile file -----------------------------------------------------------------



def _running_collector(tmp_path: Path, collectors: list[Collector]) -> tuple[Collector, Path]:
    lake = tmp_path / "lake"
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "dev-hup",
            "data_dir": str(tmp_path / "data"),
            "sources": [
                {"name": "room", "type": "simulated", "every": "100ms",
                 "metrics": {"t": {"kind": "uniform", "min": 0, "max": 30}}}
            ],
            "sinks": [{"name": "lake", "type": "lake", "path": str(lake),
                       "batch": {"max_age": "200ms"}}],
        },
    )
    c = Collector(cfg)
    collectors.append(c)
    wait_for(lambda: read_lake(lake).height > 0, what="first rows in the lake")
    return c, cfg


@pytest.mark.parametrize("hostile", ["alias bomb", "50 MB"])
def test_sighup_with_a_hostile_config_keeps_collecting_and_obeys_sigterm(
    tmp_path: Path, collectors: list[Collector], hostile: str
) -> None:
    c, cfg = _running_collector(tmp_path, collectors)
    if hostile == "alias bomb":
        cfg.write_text(ALIAS_BOMB)
    else:
        with cfg.open("w") as fh:
            for _ in range(50):
                fh.write("# " + "x" * (1024 * 1024 - 3) + "\n")
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload rejected" in c.output(), what="the reload to be rejected")
    assert "Traceback" not in c.output()
    seen = read_lake(tmp_path / "lake").height
    wait_for(lambda: read_lake(tmp_path / "lake").height > seen, what="rows after the reload")
    assert c.stop(signal.SIGTERM, timeout=60) == 0
    assert "Traceback" not in c.output()


def test_sighup_with_unchanged_transforms_carries_windows_on(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    c, cfg = _running_collector(tmp_path, collectors)
    cfg.write_text(cfg.read_text().replace("dev-hup", "dev-hup2"))
    c.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "transforms unchanged" in c.output(), what="the reload")
    wait_for(
        lambda: "dev-hup2" in set(read_lake(tmp_path / "lake")["device"].to_list()),
        what="rows of the reloaded config",
    )
    assert c.stop(signal.SIGTERM, timeout=60) == 0
