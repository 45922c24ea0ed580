"""Secrets in a config or its environment never reach an output: check, logs, status, metrics.

Planted where they are most likely to leak: a URL's user-info, a `password` field, a `${VAR}`
secret put by mistake in a duration field (whose error message quotes the value).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from collector import redact
from collector.errors import PermanentSinkError
from collector.plugin import Sink
from collector.testing import run_once
from tests.e2e.conftest import Collector, read_lake, run_cli, wait_for, write_config

PASSWORD = "Pw-9f3c1d77e2"
TOKEN = "Tok-4b8a2e19c0"
LITERAL = "Lit-0c5e7a3b91"
SECRETS = (PASSWORD, TOKEN, LITERAL)
ENV = {"ES_PASSWORD": PASSWORD, "API_TOKEN": TOKEN}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=ENV)


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret} leaked in {where}:\n{text}"



def test_check_output_shows_names_and_stars_never_values(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "sources:\n"
        "  - {name: a, type: simulated, every: '${API_TOKEN}'}\n"
        "  - {name: b, type: simulated, every: '${ES_PASSWORD}s'}\n"
        "sinks:\n"
        "  - type: elasticsearch\n"
        "    hosts: ['htps://elastic:${ES_PASSWORD}@es.example:9200',\n"
        f"            'htps://elastic:{LITERAL}@es2.example:9200']\n"
        "    index: readings\n"
        f"    password: {LITERAL}\n"
        "    no_such_field: 1\n"
    )
    res = cli("check", str(cfg))
    assert res.returncode == 2
    out = res.stdout + res.stderr
    assert_no_secret(out, "check output")
    assert f"{cfg}:2 sources[0].every: '${{API_TOKEN}}' is not a duration" in out
    assert f"{cfg}:3 sources[1].every: '${{ES_PASSWORD}}s' is not a duration" in out
    assert "htps://elastic:***@es.example:9200" in out
    assert "sinks[0].no_such_field: unknown field" in out


def test_a_non_secret_variable_in_the_wrong_field_is_shown_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collector.config import load_text
    from collector.errors import ConfigError

    monkeypatch.setenv("SITE_NAME", "plant-north-7")
    with pytest.raises(ConfigError) as info:
        load_text(
            "sources: [{type: simulated, every: '${SITE_NAME}'}]\nsinks: [{type: console}]\n"
        )
    text = str(info.value)
    assert "plant-north-7" not in text and "'${SITE_NAME}' is not a duration" in text


def test_redact_api() -> None:
    redact.register("s3cr3t-value")
    assert redact.text("x s3cr3t-value y") == "x *** y"
    assert (
        redact.text("https://u:p%40ss@h:1/x and ftp://a:b@c")
        == "https://u:***@h:1/x and ftp://a:***@c"
    )
    assert redact.text("no userinfo https://host/a@b") == "no userinfo https://host/a@b"
    redact.register("ab")  # too short to be a secret worth masking everywhere
    assert redact.text("abc") == "abc"


def test_run_never_prints_a_secret_in_logs_status_or_metrics(
    tmp_path: Path, collectors: list[Collector]
) -> None:
    lake = tmp_path / "lake"
    cfg = write_config(
        tmp_path / "c.yaml",
        {
            "device": "dev-sec",
            "data_dir": str(tmp_path / "data"),
            "telemetry": {"enabled": True, "port": 0},
            "sources": [{"name": "room", "type": "simulated", "every": "100ms",
                         "metrics": {"t": {"kind": "uniform", "min": 0, "max": 30}}}],
            "sinks": [
                {"name": "lake", "type": "lake", "path": str(lake),
                 "batch": {"max_age": "200ms"}},
                # a closed port: every write fails, and its error is what could leak
                {
                    "name": "es",
                    "type": "elasticsearch",
                    "hosts": ["http://127.0.0.1:9"],
                    "index": "readings",
                    "username": "elastic",
                    "password": "${ES_PASSWORD}",
                    "flavor": "elasticsearch",
                    "batch": {"max_age": "200ms"},
                    "spool": {"retry_base": "100ms", "retry_cap": "200ms"},
                },
                {
                    "name": "es2",
                    "type": "elasticsearch",
                    "hosts": ["http://127.0.0.1:9"],
                    "index": "readings",
                    "api_key": LITERAL,
                    "flavor": "elasticsearch",
                    "batch": {"max_age": "200ms"},
                    "spool": {"retry_base": "100ms", "retry_cap": "200ms"},
                },
            ],
        },
    )
    c = Collector(cfg, env=ENV)
    collectors.append(c)
    port = wait_for(
        lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", c.output()),
        what="the metrics endpoint",
    ).group(1)
    status_file = tmp_path / "data" / "status.json"
    wait_for(
        lambda: status_file.exists()
        and (json.loads(status_file.read_text()).get("sinks", {}).get("es") or {}).get(
            "last_error"
        ),
        what="the es sink to fail",
    )
    wait_for(lambda: read_lake(lake).height > 0, what="rows in the lake")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    status = cli("status", "--data-dir", str(tmp_path / "data"), "--json")
    assert c.stop(signal.SIGTERM) == 0
    assert_no_secret(c.output(), "the collector's log")
    assert_no_secret(metrics.decode() + health.decode(), "/metrics and /health")
    assert_no_secret(status.stdout + status.stderr, "collector status --json")
    assert_no_secret(status_file.read_text(), "status.json")
    for f in (tmp_path / "data").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".ndjson", ".log", ""):
            assert_no_secret(f.read_bytes().decode("utf-8", "replace"), str(f))


def test_log_filter_masks_secrets_in_messages_args_and_tracebacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from collector.cli import _setup_logging

    redact.register(PASSWORD)
    _setup_logging("info")
    log = logging.getLogger("botocore.somewhere")  # a library's logger, not ours
    log.warning("connect to %s failed", f"https://admin:{TOKEN}@host/x")
    try:
        raise ValueError(f"bad password {PASSWORD}")
    except ValueError:
        logging.getLogger("collector").exception("while sending")
    err = capsys.readouterr().err
    assert_no_secret(err, "stderr")
    assert "https://admin:***@host/x" in err and "bad password ***" in err


class LeakySink(Sink):
    """A sink whose client library puts credentials in its error text."""

    async def write(self, table: Any, batch_id: str) -> None:
        raise PermanentSinkError(
            "403 from https://elastic:Pa55-LEAK-w0rd@es.local:9200/_bulk token=tok-LEAK-123"
        )


def test_errors_from_sinks_are_redacted_where_they_are_kept(tmp_path: Path) -> None:
    redact.register("tok-LEAK-123")  # as the config loader does for a secret-named field
    config = {
        "device": "d",
        "sources": [{"name": "s", "type": "simulated", "every": "1s"}],
        "sinks": [{"name": "leaky", "type": "tests.security.test_secrets:LeakySink"}],
    }
    run_once(config, tmp_path)
    dead = pl.read_parquet(tmp_path / "spool" / "leaky" / "dead-letter" / "*.parquet")
    reasons = "\n".join(dead.get_column("dead_letter_reason").to_list())
    assert "elastic:***@es.local" in reasons and "token=***" in reasons
    assert "Pa55-LEAK-w0rd" not in reasons and "tok-LEAK-123" not in reasons
