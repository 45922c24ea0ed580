"""The same delivery assertions against a real cluster when one is given, else only the double.

Set ``ES_URL`` (and/or ``OPENSEARCH_URL``) to run against a real server; credentials come from
``ES_API_KEY`` or ``ES_USERNAME``/``ES_PASSWORD`` (``OPENSEARCH_…`` likewise), a CA from
``ES_CA_CERTS``, and ``ES_VERIFY_CERTS=false`` turns verification off for a lab cluster. The
test writes to ``edge-it-<random>-*`` indices and deletes them and its template afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from sinks.elasticsearch import ElasticsearchSink
from tests.sinks.es.conftest import SinkFactory
from tests.sinks.es.double import ElasticsearchDouble
from tests.sinks.es.kit import deliver, readings

TARGETS = [
    pytest.param(("double", "elasticsearch"), id="double-elasticsearch"),
    pytest.param(("double", "opensearch"), id="double-opensearch"),
    pytest.param(("ES", "elasticsearch"), id="real-elasticsearch", marks=pytest.mark.skipif(
        not os.environ.get("ES_URL"), reason="ES_URL is not set: no Elasticsearch to test")),
    pytest.param(("OPENSEARCH", "opensearch"), id="real-opensearch", marks=pytest.mark.skipif(
        not os.environ.get("OPENSEARCH_URL"), reason="OPENSEARCH_URL is not set: no OpenSearch "
        "to test")),
]


def _server_config(prefix: str) -> dict[str, Any]:
    env = os.environ
    cfg: dict[str, Any] = {"flavor": "auto"}
    for key in ("API_KEY", "USERNAME", "PASSWORD", "CA_CERTS"):
        if env.get(f"{prefix}_{key}"):
            cfg[key.lower()] = env[f"{prefix}_{key}"]
    if env.get(f"{prefix}_VERIFY_CERTS", "").lower() in ("0", "false", "no"):
        cfg["verify_certs"] = False
    return cfg


@pytest.fixture(params=TARGETS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(url, expected flavor, extra sink config)."""
    kind, flavor = request.param
    if kind == "double":
        with ElasticsearchDouble(flavor) as double:
            yield double.url, flavor, {}
    else:
        yield os.environ[f"{kind}_URL"], flavor, _server_config(kind)


async def _search(sink: ElasticsearchSink, pattern: str) -> dict[str, dict[str, Any]]:
    assert sink.backend is not None
    client = sink.backend.client
    await client.indices.refresh(index=pattern)
    resp = await client.search(index=pattern, body={"size": 1000, "query": {"match_all": {}}})
    body = getattr(resp, "body", resp)
    return {hit["_id"]: hit["_source"] for hit in body["hits"]["hits"]}


async def _cleanup(sink: ElasticsearchSink, prefix: str, template: str) -> None:
    assert sink.backend is not None
    client = sink.backend.client
    for day in ("2024.01.01", "2024.01.02"):
        with contextlib.suppress(Exception):  # best effort: the index may not exist
            await client.indices.delete(index=f"{prefix}-{day}")
    with contextlib.suppress(Exception):
        await client.indices.delete_index_template(name=template)


async def test_each_reading_once_and_mapping_errors_dead_lettered(
    server: tuple[str, str, dict[str, Any]], make_sink: SinkFactory
) -> None:
    url, flavor, extra = server
    prefix = f"edge-it-{uuid.uuid4().hex[:8]}"
    template = f"{prefix}-template"
    sink = make_sink(url, index=f"{prefix}-%Y.%m.%d", template_name=template, **extra)
    await sink.open()
    try:
        assert sink.backend is not None and sink.backend.flavor == flavor
        table = readings(10, bad_mean=(3, 7))
        first = await deliver(sink, table, "b1")
        replay = await deliver(sink, table, "b1")  # a replay after a crash

        for result in (first, replay):
            assert sorted(result.dead_letter) == ["b1:3", "b1:7"]
            for reason in result.dead_letter.values():
                assert reason.startswith("400 ")
                assert "failed to parse field [mean]" in reason
        docs = await _search(sink, f"{prefix}-*")
        assert sorted(docs) == sorted(f"b1:{i}" for i in range(10) if i not in (3, 7))
        assert docs["b1:0"]["ts"] == "2024-01-01T23:58:00.000000Z"
        assert docs["b1:5"]["value"] == 21.25
    finally:
        await _cleanup(sink, prefix, template)
