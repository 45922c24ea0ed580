"""AWS IoT Analytics BatchPutMessage (legacy: the service ended on 2025-12-15).

Current botocore no longer ships the ``iotanalytics`` service model, so this sink speaks the
REST API itself (``POST /messages/batch``, JSON body, base64 payloads) and signs requests with
botocore's SigV4 signer and the default credential chain. It is kept for deployments on the
talk's original design and for endpoints that still speak the API; new deployments should use
Firehose -> S3 lake -> Athena (``collector catalog``), see the README.
"""

from __future__ import annotations

import base64
import json
from typing import Any, ClassVar

import polars as pl
from pydantic import Field

from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError
from collector.plugin import Context, Sink, SinkLimits
from sinks import _aws
from sinks._partition import bound_id
from sinks.firehose import ndjson_lines

MAX_MESSAGES_PER_CALL = 100
MAX_PAYLOAD_BYTES = 128 * 1024
MAX_MESSAGE_ID = 128
"""BatchPutMessage refuses a longer ``messageId`` (the whole call, not just that message)."""
SIGNING_NAME = "iotanalytics"
END_OF_LIFE = (
    "AWS IoT Analytics reached end of life on 2025-12-15: the `iot_analytics` sink only works "
    "against endpoints that still speak its API. Migrate to `firehose` (delivery stream -> S3) "
    "or `s3` and query the lake with Athena (`collector catalog` prints the table DDL)."
)
_REJECT_CODES = ("InvalidRequestException",)


class IotAnalyticsConfig(_aws.AwsSinkConfig):
    """Channel and endpoint of the (legacy) IoT Analytics API."""

    channel: str = Field(
        description="Channel name.", pattern=r"^[a-zA-Z0-9_]{1,128}$"
    )
    max_messages_per_call: int = Field(
        default=MAX_MESSAGES_PER_CALL,
        gt=0,
        le=MAX_MESSAGES_PER_CALL,
        description="Messages per BatchPutMessage call (service limit 100).",
    )


class IotAnalyticsSink(Sink):
    """One JSON message per row, 100 per signed BatchPutMessage call."""

    Config = IotAnalyticsConfig
    description = "Legacy AWS IoT Analytics channel (end of life 2025-12-15): BatchPutMessage."
    example = """\
- name: legacy
  type: iot_analytics
  channel: sensor_channel
  region: us-east-1
"""
    requires: ClassVar[dict[str, str]] = _aws.REQUIRES
    limits = SinkLimits(max_record_bytes=MAX_PAYLOAD_BYTES)

    def __init__(self, config: IotAnalyticsConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.config: IotAnalyticsConfig = config
        self._http: Any = None
        self._session: Any = None
        self.url = ""
        self.region = ""

    @property
    def deadline(self) -> float:
        """Seconds the runtime lets one ``write`` take (see ``_aws.deadline``)."""
        return _aws.deadline(self.config)

    async def open(self) -> None:
        import aiohttp

        self.ctx.logger.warning("%s: %s", self.ctx.component, END_OF_LIFE)
        self._session = _aws.session(self.config)
        region = self.config.region or self._session.get_config_variable("region")
        if not region:
            raise TransientSinkError("iot_analytics: no region (set `region` or AWS_REGION)")
        self.region = region
        base = self.config.endpoint_url or f"https://iotanalytics.{region}.amazonaws.com"
        self.url = base.rstrip("/") + "/messages/batch"
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                connect=self.config.connect_timeout, sock_read=self.config.read_timeout
            )
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _signed_headers(self, body: bytes) -> dict[str, str]:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        creds = await self._session.get_credentials()
        if creds is None:
            raise _aws.classify(_no_credentials(), "iot_analytics")
        frozen = await creds.get_frozen_credentials()
        request = AWSRequest(
            method="POST",
            url=self.url,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        SigV4Auth(frozen, SIGNING_NAME, self.region).add_auth(request)
        return dict(request.headers.items())

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        if frame.height == 0:
            return
        if self._http is None:
            await self.open()
        lines = ndjson_lines(frame)
        ids = [
            bound_id(str(raw), MAX_MESSAGE_ID)
            for raw in (
                frame.get_column("record_id").to_list()
                if "record_id" in frame.columns
                else [f"{batch_id}:{i}" for i in range(frame.height)]
            )
        ]
        too_big = [i for i, line in enumerate(lines) if len(line) > MAX_PAYLOAD_BYTES]
        keep = [i for i in range(len(lines)) if i not in set(too_big)]
        step = self.config.max_messages_per_call
        retry: list[int] = []
        rejected = list(too_big)
        reasons = [f"payload larger than {MAX_PAYLOAD_BYTES} bytes"] * len(too_big)
        sent_any = False
        chunks = [keep[i : i + step] for i in range(0, len(keep), step)]
        for n, chunk in enumerate(chunks):
            try:
                errors, refused = await self._put_isolating(chunk, ids, lines)
            except TransientSinkError:
                if not sent_any and not rejected:
                    raise
                retry += [r for c in chunks[n:] for r in c]
                break
            sent_any = True
            for row, reason in refused:
                rejected.append(row)
                reasons.append(reason)
            for row, code, message in errors:
                if code in _REJECT_CODES:
                    rejected.append(row)
                    reasons.append(f"{code}: {message}")
                else:
                    retry.append(row)
        if not retry and not rejected:
            return
        raise PartialWriteError(
            retry_rows=frame[sorted(retry)] if retry else None,
            rejected_rows=frame[rejected] if rejected else None,
            reasons=reasons,
            message=f"iot_analytics {self.config.channel}: {len(retry)} rows to retry, "
            f"{len(rejected)} rejected",
        )

    async def _put_isolating(
        self, chunk: list[int], ids: list[str], lines: list[bytes]
    ) -> tuple[list[tuple[int, str, str]], list[tuple[int, str]]]:
        """``_put``, and when the service refuses the whole call for good (HTTP 400), halve it
        until the message(s) that cause it stand alone: only those are rejected, the rest of
        the chunk is sent. Returns (per-message errors, (row, reason) refused for good)."""
        try:
            return await self._put(chunk, ids, lines), []
        except PermanentSinkError as exc:
            if len(chunk) == 1:
                return [], [(chunk[0], str(exc))]
        half = len(chunk) // 2
        errors_a, refused_a = await self._put_isolating(chunk[:half], ids, lines)
        errors_b, refused_b = await self._put_isolating(chunk[half:], ids, lines)
        return errors_a + errors_b, refused_a + refused_b

    async def _put(
        self, chunk: list[int], ids: list[str], lines: list[bytes]
    ) -> list[tuple[int, str, str]]:
        """One BatchPutMessage; (row, error code, message) per message the service refused."""
        import aiohttp

        by_id = {str(ids[i]): i for i in chunk}
        body = json.dumps(
            {
                "channelName": self.config.channel,
                "messages": [
                    {
                        "messageId": str(ids[i]),
                        "payload": base64.b64encode(lines[i].rstrip(b"\n")).decode(),
                    }
                    for i in chunk
                ],
            }
        ).encode()
        headers = await self._signed_headers(body)
        what = f"iot_analytics BatchPutMessage {self.config.channel}"
        try:
            async with self._http.post(self.url, data=body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _aws.classify(exc, what) from exc
        if status >= 500 or status in (408, 429) or "Throttling" in text:
            raise TransientSinkError(
                f"{what}: HTTP {status} {text[:200]}",
                retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None,
            )
        if status in (401, 403, 404):
            raise TransientSinkError(f"{what}: HTTP {status} {text[:200]} (check channel/IAM)")
        if status >= 400:
            raise PermanentSinkError(f"{what}: HTTP {status} {text[:200]}")
        try:
            answer = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise TransientSinkError(f"{what}: unreadable response {text[:200]!r}") from exc
        return [
            (by_id[e["messageId"]], str(e.get("errorCode", "")), str(e.get("errorMessage", "")))
            for e in answer.get("batchPutMessageErrorEntries", [])
            if e.get("messageId") in by_id
        ]


def _no_credentials() -> Exception:
    from botocore.exceptions import NoCredentialsError

    return NoCredentialsError()
