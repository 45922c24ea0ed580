"""End to end through the real CLI: ``collector run --once`` with a simulated source and the
elasticsearch sink pointed at the double. Asserts on the documents the double holds and on the
dead-letter Parquet the runtime writes for the rows the server refused."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from collector.sources.simulated import SimulatedConfig, generate
from tests.sinks.es.double import ElasticsearchDouble

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
API_KEY = "ZTJlOmUyZS1zZWNyZXQta2V5"
SOURCE: dict[str, Any] = {
    "name": "room",
    "type": "simulated",
    "every": "30s",
    "seed": 7,
    "start": "2024-01-01T23:59:30Z",
    "devices": 4,
    "metrics": {
        "temperature": {"kind": "uniform", "min": 0, "max": 30, "unit": "C"},
        "pressure": {"kind": "walk", "start": 1000, "step": 0.5, "unit": "hPa"},
    },
}


def _config(data_dir: Path, url: str) -> str:
    """The collector config; the API key comes from the environment through `${ES_API_KEY}`."""
    return yaml.safe_dump({
        "device": "edge-01",
        "data_dir": str(data_dir),
        "telemetry": {"port": 0},
        "sources": [SOURCE],
        "sinks": [{
            "name": "search", "type": "elasticsearch", "hosts": [url],
            "index": "sensors-%Y.%m.%d", "api_key": "${ES_API_KEY}",
            "spool": {"retry_base": "0.1s", "retry_cap": "0.5s"},
        }],
    })


def _rules(double: ElasticsearchDouble) -> None:
    """edge-01-001's pressure does not fit the mapping (400); edge-01-002's temperature is
    throttled once (429)."""

    def rule(_index: str, _id: str, src: dict[str, Any], attempt: int) -> Any:
        if src.get("device") == "edge-01-001" and src.get("metric") == "pressure":
            return (400, "document_parsing_exception",
                    "[1:90] failed to parse field [value] of type [double]")
        if src.get("device") == "edge-01-002" and src.get("metric") == "temperature" \
                and attempt == 1:
            return 429, "es_rejected_execution_exception", "rejected execution"
        return None

    double.item_rules.append(rule)


def _run(config: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ES_API_KEY": API_KEY, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "collector", "run", str(config), "--once", "--log-level", "debug"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )


@pytest.mark.parametrize("flavor", ["elasticsearch", "opensearch"])
def test_collector_run_once_delivers_each_reading_once(flavor: str, tmp_path: Path) -> None:
    with ElasticsearchDouble(flavor, authorization=f"ApiKey {API_KEY}") as double:
        _rules(double)
        config = tmp_path / "collector.yaml"
        data_dir = tmp_path / "data"
        config.write_text(_config(data_dir, double.url))
        proc = _run(config, tmp_path)
        docs = double.all_docs("sensors-*")
        attempts = dict(double.attempts)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert API_KEY not in output

    expected = {
        (row["device"], row["metric"]): row["value"]
        for row in generate(SimulatedConfig.model_validate(SOURCE), "edge-01", 0,
                            datetime.now(UTC))
    }
    assert len(expected) == 8
    landed = {(d["device"], d["metric"]): d for d in docs.values()}
    assert len(landed) == len(docs)  # no reading twice
    assert set(landed) == set(expected) - {("edge-01-001", "pressure")}
    for key, doc in landed.items():
        assert doc["value"] == pytest.approx(expected[key])
        assert doc["ts"] == "2024-01-01T23:59:30.000000Z"
        assert doc["source"] == "room"
    throttled = next(i for i, d in docs.items()
                     if (d["device"], d["metric"]) == ("edge-01-002", "temperature"))
    assert attempts.pop(throttled) == 2  # retried, and only it
    assert set(attempts.values()) == {1}

    dead = sorted((data_dir / "spool" / "search" / "dead-letter").glob("*.parquet"))
    assert dead, "no dead-letter file"
    rows = [r for f in dead for r in pq.read_table(f).to_pylist()]
    assert [(r["device"], r["metric"]) for r in rows] == [("edge-01-001", "pressure")]
    assert rows[0]["value"] == pytest.approx(expected[("edge-01-001", "pressure")])
    assert rows[0]["dead_letter_reason"].startswith("400 document_parsing_exception: ")
    assert "failed to parse field [value]" in rows[0]["dead_letter_reason"]
