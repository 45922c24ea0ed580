"""The legacy iot_analytics sink against a local HTTP server that checks what AWS would check."""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pytest
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from pydantic import ValidationError

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Context
from sinks.iot_analytics import END_OF_LIFE, IotAnalyticsConfig, IotAnalyticsSink

from .conftest import as_json_rows, deliver, readings

AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[A-Z0-9]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9]+)/aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), "
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)


@dataclass
class FakeIotAnalytics:
    """Accepts BatchPutMessage only if signed correctly, within limits, with unique ids."""

    url: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    script: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def verify(self, request: web.Request, body: bytes) -> str | None:
        auth = request.headers.get("Authorization", "")
        m = AUTH_RE.match(auth)
        if not m:
            return f"bad Authorization header: {auth!r}"
        if (m["akid"], m["region"], m["service"]) != ("AKIDTESTING", "us-east-1", "iotanalytics"):
            return f"wrong credential scope: {auth}"
        amz_date = request.headers.get("X-Amz-Date", "")
        if not amz_date.startswith(m["date"]):
            return "X-Amz-Date does not match the credential scope"
        signed = m["signed"].split(";")
        if "host" not in signed or "x-amz-date" not in signed:
            return f"host/x-amz-date not signed: {signed}"
        # recompute the signature with the known secret: proves it is a real SigV4 signature
        again = AWSRequest(
            method=request.method,
            url=f"{self.url}{request.path}",
            data=body,
            headers={h: request.headers[h] for h in signed if h in request.headers},
        )
        signer = SigV4Auth(Credentials("AKIDTESTING", "testing-secret"), "iotanalytics",
                           "us-east-1")
        again.context["timestamp"] = amz_date
        canonical = signer.canonical_request(again)
        expected = signer.signature(signer.string_to_sign(again, canonical), again)
        if expected != m["sig"]:
            return "signature mismatch"
        return None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls += 1
        if request.path != "/messages/batch" or request.method != "POST":
            self.problems.append(f"{request.method} {request.path}")
            return web.json_response({"message": "not found"}, status=404)
        problem = self.verify(request, body)
        if problem:
            self.problems.append(problem)
            return web.json_response({"message": problem}, status=403)
        doc = json.loads(body)
        msgs = doc["messages"]
        if doc.get("channelName") != "sensor_channel":
            self.problems.append(f"channel {doc.get('channelName')}")
        if not 1 <= len(msgs) <= 100:
            self.problems.append(f"{len(msgs)} messages in one call")
            return web.json_response(
                {"__type": "InvalidRequestException", "message": "1..100 messages"}, status=400
            )
        ids = [m["messageId"] for m in msgs]
        if len(set(ids)) != len(ids):
            self.problems.append("duplicate messageId in a call")
        if any(not 1 <= len(i) <= 128 for i in ids):  # the service's bound: the whole call fails
            self.problems.append("messageId longer than 128")
            return web.json_response(
                {"__type": "InvalidRequestException", "message": "messageId length"}, status=400
            )
        if any(b"poison" in base64.b64decode(m["payload"]) for m in msgs):
            return web.json_response(
                {"__type": "InvalidRequestException", "message": "unparsable"}, status=400
            )
        step = self.script.pop(0) if self.script else "ok"
        if step == "throttle":
            return web.json_response(
                {"__type": "ThrottlingException", "message": "slow"}, status=429
            )
        if step == "500":
            return web.json_response({"__type": "InternalFailureException"}, status=500)
        errors = []
        for i, m in enumerate(msgs):
            if step == "reject_first" and i == 0:
                errors.append({"messageId": m["messageId"],
                               "errorCode": "InvalidRequestException",
                               "errorMessage": "bad payload"})
                continue
            if step == "partial" and i % 3 == 0:
                errors.append({"messageId": m["messageId"],
                               "errorCode": "ServiceUnavailableException",
                               "errorMessage": "try again"})
                continue
            self.messages.append(json.loads(base64.b64decode(m["payload"])))
        return web.json_response({"batchPutMessageErrorEntries": errors})


@pytest.fixture
async def iota(aws_env: None) -> AsyncIterator[FakeIotAnalytics]:
    fake = FakeIotAnalytics()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


def sink_for(fake: FakeIotAnalytics, ctx: Context) -> IotAnalyticsSink:
    cfg = IotAnalyticsConfig(type="iot_analytics", channel="sensor_channel",
                             endpoint_url=fake.url, region="us-east-1")
    return IotAnalyticsSink(cfg, ctx)


def canon(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


async def test_batch_put_signed_limited_and_decoded(
    iota: FakeIotAnalytics, ctx: Context, caplog: pytest.LogCaptureFixture
):
    table = readings(250)
    sink = sink_for(iota, ctx)
    with caplog.at_level(logging.WARNING, logger="collector"):
        await sink.open()
    assert "end of life on 2025-12-15" in caplog.text and END_OF_LIFE in caplog.text
    await sink.write(table, "b")
    await sink.close()
    assert iota.problems == []
    assert iota.calls == 3  # 100 + 100 + 50
    assert canon(iota.messages) == canon(as_json_rows(table))


async def test_partial_and_throttled_calls_retry_only_failed_messages(
    iota: FakeIotAnalytics, ctx: Context
):
    table = readings(230)
    iota.script = ["partial", "ok", "throttle", "500", "partial"]
    sink = sink_for(iota, ctx)
    await sink.open()
    seen = await deliver(sink, table, "b")
    await sink.close()
    assert any(s.startswith("partial") for s in seen)
    assert any(s.startswith("transient") for s in seen)
    assert iota.problems == []
    ids = [m["record_id"] for m in iota.messages]
    assert len(ids) == len(set(ids)) == 230  # every row once, failed ones re-sent alone
    assert canon(iota.messages) == canon(as_json_rows(table))


async def test_first_call_throttled_is_transient(iota: FakeIotAnalytics, ctx: Context):
    iota.script = ["throttle"]
    sink = sink_for(iota, ctx)
    await sink.open()
    with pytest.raises(TransientSinkError, match="429"):
        await sink.write(readings(5), "b")
    await sink.close()
    assert iota.messages == []


async def test_unsigned_or_wrong_credentials_never_pass(
    iota: FakeIotAnalytics, ctx: Context, monkeypatch: pytest.MonkeyPatch
):
    """The fake really checks the signature: a wrong secret is refused."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    sink = sink_for(iota, ctx)
    await sink.open()
    with pytest.raises(TransientSinkError, match="403"):
        await sink.write(readings(2), "b")
    await sink.close()
    assert iota.problems == ["signature mismatch"]


def test_limits_in_config():
    with pytest.raises(ValidationError):
        IotAnalyticsConfig(type="iot_analytics", channel="c", max_messages_per_call=101)
    with pytest.raises(ValidationError):
        IotAnalyticsConfig(type="iot_analytics", channel="bad-name!")


async def test_rejected_messages_go_to_dead_letter(iota: FakeIotAnalytics, ctx: Context):
    iota.script = ["reject_first"]
    sink = sink_for(iota, ctx)
    await sink.open()
    table = readings(4)
    with pytest.raises(PartialWriteError) as info:
        await sink.write(table, "b")
    await sink.close()
    assert info.value.retry_rows is None
    assert info.value.rejected_rows is not None
    assert info.value.rejected_rows.to_dicts() == table.slice(0, 1).to_dicts()
    assert info.value.reasons == ["InvalidRequestException: bad payload"]
    assert canon(iota.messages) == canon(as_json_rows(table.slice(1)))


async def test_endpoint_down_is_transient(aws_env: None, ctx: Context):
    from .conftest import free_port

    cfg = IotAnalyticsConfig(type="iot_analytics", channel="sensor_channel",
                             endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1",
                             connect_timeout=1)
    sink = IotAnalyticsSink(cfg, ctx)
    await sink.open()
    with pytest.raises(TransientSinkError, match="BatchPutMessage"):
        await sink.write(readings(3), "b")
    await sink.close()


FLEET_BATCH = "edge-" + "x" * 29 + "_0123456789-1a2b3c4d-000000000017-000000000058-0003"


@pytest.mark.parametrize("batch_id", [FLEET_BATCH, "q" * 300])
async def test_message_ids_fit_the_service(iota: FakeIotAnalytics, ctx: Context, batch_id: str):
    """Fleet-shaped record ids pass as they are; any longer one is bounded (prefix + hash), so
    the call is not refused and ids stay distinct."""
    table = readings(120, batch_id)
    sink = sink_for(iota, ctx)
    await sink.open()
    await sink.write(table, batch_id)
    await sink.close()
    assert iota.problems == []
    assert canon(iota.messages) == canon(as_json_rows(table))


async def test_call_refused_for_one_message_costs_only_that_message(
    iota: FakeIotAnalytics, ctx: Context
):
    """A 400 for the whole call: halved until the message that causes it stands alone."""
    table = readings(150)
    units = table.get_column("unit").to_list()
    units[77] = "poison"
    table = table.with_columns(pl.Series("unit", units, pl.String))
    sink = sink_for(iota, ctx)
    await sink.open()
    with pytest.raises(PartialWriteError) as info:
        await sink.write(table, "b")
    await sink.close()
    err = info.value
    assert err.retry_rows is None and err.rejected_rows is not None
    assert err.rejected_rows.to_dicts() == table.slice(77, 1).to_dicts()
    assert "InvalidRequestException" in err.reasons[0]
    assert canon(iota.messages) == canon(
        as_json_rows(table.slice(0, 77)) + as_json_rows(table.slice(78)))
