"""Delivery semantics of the elasticsearch sink against the wire-level double, both flavours:
each reading lands exactly once, only throttled items are re-sent, mapping errors are
dead-lettered with the server's reason."""

from __future__ import annotations

import polars as pl
import pytest

from collector.errors import PartialWriteError, TransientSinkError
from tests.sinks.es.conftest import SinkFactory
from tests.sinks.es.double import ElasticsearchDouble
from tests.sinks.es.kit import START, deliver, ids, readings


async def test_each_reading_lands_once_in_its_daily_index(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    table = readings(10)
    sink = make_sink(double)
    await sink.open()
    await sink.write(table, "b1")

    assert set(double.docs) == {"sensors-2024.01.01", "sensors-2024.01.02"}
    day1, day2 = double.docs["sensors-2024.01.01"], double.docs["sensors-2024.01.02"]
    assert sorted(day1) == ["b1:0", "b1:1", "b1:2", "b1:3"]  # 23:58:00 .. 23:59:30
    assert len(day2) == 6
    assert double.all_docs()["b1:5"] == {
        "ts": "2024-01-02T00:00:30.000000Z", "device": "edge-01", "source": "room",
        "metric": "temperature", "value": 21.25, "unit": "C",
    }
    assert set(double.attempts.values()) == {1}
    props = double.templates["edge-collector-sensors"]["template"]["mappings"]["properties"]
    assert double.templates["edge-collector-sensors"]["index_patterns"] == ["sensors-*"]
    assert props["ts"]["type"] == "date"
    assert props["value"]["type"] == props["mean"]["type"] == "double"
    assert props["device"]["type"] == props["metric"]["type"] == "keyword"
    assert double.mappings["sensors-2024.01.01"]["value"] == "double"


async def test_replaying_a_batch_overwrites_instead_of_duplicating(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(double)
    await sink.write(readings(6), "b1")
    await sink.write(readings(6, value_base=99.0), "b1")  # same record ids, replayed

    docs = double.all_docs()
    assert len(docs) == 6
    assert docs["b1:0"]["value"] == 99.0
    assert set(double.attempts.values()) == {2}


async def test_only_throttled_items_are_retried(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    double.throttle("b1:2", times=1)
    double.throttle("b1:7", times=2)
    sink = make_sink(double)
    await sink.open()

    with pytest.raises(PartialWriteError) as err:
        await sink.write(readings(10), "b1")
    assert ids(err.value.retry_rows) == ["b1:2", "b1:7"]
    assert err.value.rejected_rows is None

    result = await deliver(sink, err.value.retry_rows, "b1")
    assert result.retried == [["b1:7"]]
    assert result.dead_letter == {}
    docs = double.all_docs()
    assert sorted(docs) == sorted(f"b1:{i}" for i in range(10))
    assert double.attempts == {**{f"b1:{i}": 1 for i in range(10)}, "b1:2": 2, "b1:7": 3}


async def test_mapping_errors_go_to_dead_letter_with_the_server_reason(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(double)
    result = await deliver(sink, readings(8, bad_mean=(1, 6)), "b1")

    assert sorted(result.dead_letter) == ["b1:1", "b1:6"]
    kind = ("document_parsing_exception" if double.flavor == "elasticsearch"
            else "mapper_parsing_exception")
    for rid, reason in result.dead_letter.items():
        assert reason.startswith(f"400 {kind}: ")
        assert "failed to parse field [mean] of type [double]" in reason
        assert f"id '{rid}'" in reason
    assert result.retried == [[]]  # nothing to retry: 4xx items are never re-sent
    assert sorted(double.all_docs()) == [f"b1:{i}" for i in (0, 2, 3, 4, 5, 7)]
    assert double.attempts["b1:1"] == double.attempts["b1:6"] == 1


async def test_throttled_and_rejected_items_in_one_batch(
    es_double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    es_double.throttle("b1:0")
    es_double.fail_item("b1:4", 403, "security_exception", "action [indices:data/write] denied")
    sink = make_sink(es_double)
    with pytest.raises(PartialWriteError) as err:
        await sink.write(readings(6, bad_mean=(3,)), "b1")
    assert ids(err.value.retry_rows) == ["b1:0"]
    assert ids(err.value.rejected_rows) == ["b1:3", "b1:4"]
    assert err.value.reasons[1] == "403 security_exception: action [indices:data/write] denied"

    await deliver(sink, err.value.retry_rows, "b1")
    assert sorted(es_double.all_docs()) == ["b1:0", "b1:1", "b1:2", "b1:5"]


async def test_whole_request_429_backs_off_with_retry_after(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(double)
    await sink.open()
    double.reject_bulk(status=429, retry_after="7")

    with pytest.raises(TransientSinkError) as err:
        await sink.write(readings(5), "b1")
    assert double.all_docs() == {}
    if double.flavor == "elasticsearch":  # opensearch-py does not expose response headers
        assert err.value.retry_after == 7.0
    assert "429" in str(err.value)

    await sink.write(readings(5), "b1")
    assert sorted(double.all_docs()) == [f"b1:{i}" for i in range(5)]


async def test_whole_request_503_on_one_chunk_retries_only_that_chunk(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(double, max_docs=4)
    await sink.open()
    double.reject_bulk(status=503)

    with pytest.raises(PartialWriteError) as err:
        await sink.write(readings(10), "b1")
    assert ids(err.value.retry_rows) == ["b1:0", "b1:1", "b1:2", "b1:3"]
    assert err.value.rejected_rows is None
    assert double.bulk_sizes == [4, 2]

    await deliver(sink, err.value.retry_rows, "b1")
    assert sorted(double.all_docs()) == sorted(f"b1:{i}" for i in range(10))
    assert set(double.attempts.values()) == {1}  # the refused chunk never reached the items


async def test_request_limits_split_the_batch(
    es_double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(es_double, max_bytes="2KiB")
    await sink.write(readings(40), "b1")
    bulk_bodies = [len(body) for _m, path, _h, body in es_double.requests if path == "/_bulk"]
    assert len(bulk_bodies) > 1
    assert max(bulk_bodies) <= 2048
    assert sum(es_double.bulk_sizes) == 40
    assert len(es_double.all_docs()) == 40


async def test_data_stream_replay_counts_conflicts_as_done(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(double, data_stream="sensors-edge")
    await sink.write(readings(4), "b1")
    await sink.write(readings(4), "b1")  # replay: 409 per item, nothing raised

    assert double.data_streams == {"sensors-edge"}
    tpl = double.templates["edge-collector-sensors-edge"]
    assert tpl["data_stream"] == {} and tpl["index_patterns"] == ["sensors-edge"]
    docs = double.docs["sensors-edge"]
    assert sorted(docs) == ["b1:0", "b1:1", "b1:2", "b1:3"]
    assert docs["b1:0"]["@timestamp"] == docs["b1:0"]["ts"] == "2024-01-01T23:58:00.000000Z"


async def test_non_finite_values_are_rejected_before_sending(
    es_double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    table = readings(3)
    values = table.get_column("value").to_list()
    values[1] = float("inf")
    values[2] = float("nan")  # NaN is a missing reading: sent as null
    table = table.with_columns(pl.Series("value", values, pl.Float64))
    sink = make_sink(es_double)
    with pytest.raises(PartialWriteError) as err:
        await sink.write(table, "b1")
    assert ids(err.value.rejected_rows) == ["b1:1"]
    assert "non-finite value in field [value]" in err.value.reasons[0]
    assert err.value.retry_rows is None
    docs = es_double.all_docs()
    assert sorted(docs) == ["b1:0", "b1:2"]
    assert "value" not in docs["b1:2"]


async def test_window_aggregates_are_typed_by_the_template(
    es_double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    table = pl.DataFrame({
        "ts": pl.Series([START, START], dtype=pl.Datetime("us", "UTC")),
        "device": ["edge-01", "edge-01"], "source": ["room", "room"],
        "metric": ["temperature", "humidity"],
        "mean": [21.5, 40.25], "min": [20.0, 39.0], "max": [23.0, 41.5],
        "count": pl.Series([12, 11], dtype=pl.Int64), "partial": [False, True],
        "site": ["plant-a", "plant-a"],  # a tag column the template does not name
        "record_id": ["w1:0", "w1:1"],
    })
    sink = make_sink(es_double)
    await sink.write(table, "w1")
    doc = es_double.all_docs()["w1:1"]
    assert doc == {"ts": "2024-01-01T23:58:00.000000Z", "device": "edge-01", "source": "room",
                   "metric": "humidity", "mean": 40.25, "min": 39.0, "max": 41.5, "count": 11,
                   "partial": True, "site": "plant-a"}
    mapping = es_double.mappings["sensors-2024.01.01"]
    assert mapping["count"] == mapping["mean"] == "double"
    assert mapping["partial"] == "boolean" and mapping["site"] == "keyword"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(429, "transient"), (503, "transient"), (401, "transient"), (413, "dead-letter"),
     (413, "isolated")],
)
async def test_whole_request_failures(
    double: ElasticsearchDouble, make_sink: SinkFactory, status: int, outcome: str
) -> None:
    """Throttling, outages and revoked credentials keep the batch for later; a request the
    server will never take at this size is dead-lettered with advice."""
    sink = make_sink(double)
    await sink.open()
    # "dead-letter": refused even one document per request; "isolated": only the batch's
    # request is refused, each document alone is taken
    double.reject_bulk(status=status, times=4 if outcome == "dead-letter" else 1)
    if outcome == "isolated":
        await sink.write(readings(3), "b1")
        assert sorted(double.all_docs()) == ["b1:0", "b1:1", "b1:2"]
        return
    if outcome == "transient":
        with pytest.raises(TransientSinkError, match=str(status)) as err:
            await sink.write(readings(3), "b1")
        if status == 401:
            assert "check the credentials" in str(err.value)
    else:
        with pytest.raises(PartialWriteError) as perr:
            await sink.write(readings(3), "b1")
        assert perr.value.retry_rows is None
        assert ids(perr.value.rejected_rows) == ["b1:0", "b1:1", "b1:2"]
        assert all("413" in r and "lower max_bytes" in r for r in perr.value.reasons)
    assert double.all_docs() == {}


async def test_server_gone_after_open_is_transient(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    sink = make_sink(double)
    await sink.open()
    double.stop()
    with pytest.raises(TransientSinkError, match="no response"):
        await sink.write(readings(3), "b1")


async def test_counters_split_results(es_double: ElasticsearchDouble,
                                      make_sink: SinkFactory) -> None:
    es_double.throttle("b1:1")
    sink = make_sink(es_double)
    with pytest.raises(PartialWriteError):
        await sink.write(readings(5, bad_mean=(4,)), "b1")
    counters = sink.ctx.counters
    got = {r: counters.get("es_documents_total", component="search", result=r)
           for r in ("indexed", "retry", "rejected")}
    assert got == {"indexed": 3, "retry": 1, "rejected": 1}


FLEET_BATCH = "edge-" + "x" * 29 + "_0123456789-1a2b3c4d-000000000017-000000000058-0003"


async def test_ids_fit_and_a_huge_metric_costs_only_its_row(
    double: ElasticsearchDouble, make_sink: SinkFactory
) -> None:
    """Fleet-shaped ``_id``s pass as they are, a longer record id is bounded to 512 bytes (and
    stays distinct), and a 1 MB metric name refused in a request of its own costs one row."""
    table = readings(6, FLEET_BATCH)
    long_ids = [f"{'z' * 600}:{i}" for i in range(6)]
    table = table.with_columns(
        pl.Series("record_id", ids(table)[:3] + long_ids[3:], pl.String)
    )
    metrics = table.get_column("metric").to_list()
    metrics[1] = "m" * 1_000_000
    table = table.with_columns(pl.Series("metric", metrics, pl.String))
    sink = make_sink(double)
    await sink.open()
    double.max_content_length = 512 * 1024  # the batch's request and the huge doc alone: 413
    with pytest.raises(PartialWriteError) as caught:
        await sink.write(table, FLEET_BATCH)
    err = caught.value
    assert err.retry_rows is None
    assert ids(err.rejected_rows) == [f"{FLEET_BATCH}:1"]
    docs = double.all_docs()
    assert len(docs) == 5
    assert {f"{FLEET_BATCH}:0", f"{FLEET_BATCH}:2"} <= set(docs)
    assert all(len(i.encode()) <= 512 for i in docs)
