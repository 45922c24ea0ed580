"""Config validation (no I/O), document building, the index template and the Kibana file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from collector import registry
from sinks import _es_docs as docs
from sinks.elasticsearch import ElasticsearchSink, ElasticsearchSinkConfig
from tests.sinks.es.kit import readings

REPO = Path(__file__).resolve().parents[3]


def _cfg(**kw: Any) -> ElasticsearchSinkConfig:
    return ElasticsearchSinkConfig.model_validate({"type": "elasticsearch", **kw})


def test_defaults_and_registry() -> None:
    cfg = _cfg()
    assert registry.load("sinks", "elasticsearch") is ElasticsearchSink
    assert cfg.hosts == ["http://localhost:9200"]
    assert cfg.index == "sensors-%Y.%m.%d" and cfg.flavor == "auto" and cfg.verify_certs
    assert cfg.max_bytes == 5 * 1024 * 1024 and cfg.request_timeout == 30.0
    assert _cfg(hosts="https://es:9200").hosts == ["https://es:9200"]
    assert _cfg(max_bytes="1MiB").max_bytes == 1024 * 1024
    for name, field in ElasticsearchSinkConfig.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"hosts": ["https://elastic:pw@es:9200"]}, "not in the URL"),
        ({"hosts": ["es:9200"]}, "is not an http"),
        ({"hosts": []}, "at least 1"),
        ({"index": "Sensors-%Y"}, "contains 'S'"),
        ({"index": "sensors-%B"}, "%B is not supported"),
        ({"index": "_sensors"}, "may not"),
        ({"data_stream": "logs sensors"}, "contains ' '"),
        ({"api_key": "k", "bearer_token": "t"}, "one way to authenticate"),
        ({"username": "u"}, "go together"),
        ({"client_key": "/k.pem"}, "needs client_cert"),
        ({"flavor": "elasticsearch", "aws_sigv4": {"region": "eu-west-1"}}, "flavor opensearch"),
        ({"aws_sigv4": {"region": "eu-west-1", "service": "lambda"}}, "'es' or 'aoss'"),
        ({"max_bytes": "200MiB"}, "less than or equal"),
        ({"bulk_size": 10}, "Extra inputs"),
    ],
)
def test_invalid_configs_are_refused_without_io(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _cfg(**config)


def test_secrets_are_secret_str() -> None:
    cfg = _cfg(api_key="s3cr3t-key")
    assert "s3cr3t-key" not in repr(cfg) and "s3cr3t-key" not in cfg.model_dump_json()
    assert cfg.api_key is not None and cfg.api_key.get_secret_value() == "s3cr3t-key"


def test_collector_check_reports_the_field(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "device: d1\nsources:\n  - {name: room, type: simulated}\nsinks:\n"
        "  - name: search\n    type: elasticsearch\n    hosts: [https://u:pw@es:9200]\n"
    )
    proc = subprocess.run([sys.executable, "-m", "collector", "check", str(config)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "sinks[0].hosts" in out and "not in the URL" in out
    assert "u:pw@" not in out


def test_example_is_a_valid_config() -> None:
    import yaml

    entry = yaml.safe_load(ElasticsearchSink.example)[0]
    entry["api_key"] = "from-env"
    assert _cfg(**{k: v for k, v in entry.items() if k != "name"}).index == "sensors-%Y.%m.%d"


def test_template_pattern_and_name() -> None:
    assert docs.template_pattern("sensors-%Y.%m.%d") == "sensors-*"
    assert docs.template_pattern("plant-a") == "plant-a"
    assert docs.default_template_name("sensors-%Y.%m") == "edge-collector-sensors"
    body = docs.index_template("sensors-*", data_stream=False)
    assert "data_stream" not in body and body["template"]["mappings"]["date_detection"] is False
    kinds = {d_name: d["mapping"]["type"] for t in body["template"]["mappings"]["dynamic_templates"]
             for d_name, d in t.items()}
    assert kinds == {"strings_as_keyword": "keyword", "integers_as_double": "double",
                     "floats_as_double": "double"}


def test_actions_carry_record_ids_and_per_row_index() -> None:
    built = docs.build_actions(readings(6), index="sensors-%Y.%m.%d", data_stream=None,
                               use_record_id=True)
    assert [a["_index"] for a in built.actions] == ["sensors-2024.01.01"] * 4 + \
        ["sensors-2024.01.02"] * 2
    assert [a["_id"] for a in built.actions] == [f"b1:{i}" for i in range(6)]
    assert all("record_id" not in a["_source"] for a in built.actions)
    no_ids = docs.build_actions(readings(2), index="fixed", data_stream=None,
                                use_record_id=False)
    assert [set(a) for a in no_ids.actions] == [{"_op_type", "_index", "_source"}] * 2


def test_kibana_saved_objects_file() -> None:
    lines = (REPO / "dashboards" / "kibana-saved-objects.ndjson").read_text().splitlines()
    objects = [json.loads(line) for line in lines]
    by_type = {o["type"]: o for o in objects}
    view = by_type["index-pattern"]
    assert view["attributes"]["title"] == docs.template_pattern(_cfg().index)
    assert view["attributes"]["timeFieldName"] == "ts"
    search = by_type["search"]
    assert search["references"][0]["id"] == view["id"]
    source = json.loads(search["attributes"]["kibanaSavedObjectMeta"]["searchSourceJSON"])
    assert source["indexRefName"] == search["references"][0]["name"]
