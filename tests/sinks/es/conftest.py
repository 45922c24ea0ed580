"""Fixtures: started ElasticsearchDouble servers and a factory for sinks pointed at them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.plugin import Context
from sinks.elasticsearch import ElasticsearchSink, ElasticsearchSinkConfig
from tests.sinks.es.double import ElasticsearchDouble

SinkFactory = Callable[..., ElasticsearchSink]


@pytest.fixture
def es_double() -> Iterator[ElasticsearchDouble]:
    with ElasticsearchDouble("elasticsearch") as double:
        yield double


@pytest.fixture
def os_double() -> Iterator[ElasticsearchDouble]:
    with ElasticsearchDouble("opensearch") as double:
        yield double


@pytest.fixture(params=["elasticsearch", "opensearch"])
def double(request: pytest.FixtureRequest) -> Iterator[ElasticsearchDouble]:
    """The same test against both flavours of the double."""
    with ElasticsearchDouble(request.param) as d:
        yield d


@pytest.fixture
async def make_sink(tmp_path: Path) -> AsyncIterator[SinkFactory]:
    """``make_sink(url_or_double, **config)`` -> an unopened sink; all are closed at teardown."""
    made: list[ElasticsearchSink] = []

    def factory(target: Any, **config: Any) -> ElasticsearchSink:
        hosts = [target.url] if isinstance(target, ElasticsearchDouble) else [target]
        cfg = ElasticsearchSinkConfig.model_validate(
            {"type": "elasticsearch", "name": "search", "hosts": hosts, **config}
        )
        sink = ElasticsearchSink(cfg, Context(device="edge-01", component="search",
                                              data_dir=tmp_path))
        made.append(sink)
        return sink

    yield factory
    for sink in made:
        await sink.close()
