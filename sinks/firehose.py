"""Amazon Data Firehose: NDJSON readings packed into few records, sent with PutRecordBatch.

Firehose bills every record rounded up to a 5 KB increment, so one 150-byte reading per record
is billed ~33 times its size. Packing many NDJSON lines into one record just under a multiple of
5 KB makes the billable bytes almost equal to the real bytes (see ``collector.commands.economics``).

Delivery is at least once: a failed record is re-sent (only that record's rows, never the whole
batch), and a call that timed out may have landed. Every line carries ``record_id`` so a reader
can drop the rare duplicate.
"""

from __future__ import annotations

import contextlib
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from collector.errors import PartialWriteError, PermanentSinkError, TransientSinkError
from collector.plugin import BatchConfig, Context, Sink, SinkLimits
from collector.units import Size
from sinks import _aws

MAX_RECORDS_PER_CALL = 500
MAX_REQUEST_BYTES = 4 * 1024**2
MAX_RECORD_BYTES = 1000 * 1024
BILLING_INCREMENT = 5 * 1024
"""Firehose rounds each record up to 5 KB; we take the larger reading (5 KiB) to be safe."""
DEFAULT_RECORD_TARGET = 49_900
"""Just under 50,000 (10 x 5 KB), so no reading of "5 KB" (5,000 or 5,120) adds an increment.

Why 10 increments and not one (4,900): billing waste is at most one line per record either way,
but bigger records mean 10x fewer records and fewer calls (a call holds 84 such records within
4 MiB vs 500 x 4,900 = 2.4 MB), and Firehose's per-stream records/s quota is hit 10x later. The
cost: a failed record re-sends ~300 readings instead of ~30, which at least-once allows."""

DEFAULT_BATCH_AGE = 300.0
"""Seconds; matches Firehose's default S3 buffering interval, so end-to-end latency at most
doubles while small fleets get records worth packing."""


class FirehoseConfig(_aws.AwsSinkConfig):
    """Delivery stream and packing."""

    stream: str = Field(
        description="Delivery stream name.", pattern=r"^[a-zA-Z0-9_.-]{1,64}$"
    )
    batch: BatchConfig = Field(
        default_factory=lambda: BatchConfig(max_age=DEFAULT_BATCH_AGE),
        description="Batch cutting. Default `max_age: 5m`, Firehose's own default buffering "
        "interval: packing only packs within a batch, so a 10s batch of a slow sensor would be "
        "billed almost like one record per reading (`collector check --estimate` shows it).",
    )
    record_target_bytes: Size = Field(
        default=DEFAULT_RECORD_TARGET,
        gt=0,
        description="Pack NDJSON lines into one Firehose record up to this size; keep it just "
        "under a multiple of 5 KB (billing increment). At most 1,000 KiB.",
    )
    max_records_per_call: int = Field(
        default=MAX_RECORDS_PER_CALL,
        gt=0,
        description="Records per PutRecordBatch call (service limit 500).",
    )
    max_request_bytes: Size = Field(
        default=MAX_REQUEST_BYTES,
        gt=0,
        description="Data bytes per PutRecordBatch call (service limit 4MiB).",
    )
    compression: Literal["none", "gzip"] = Field(
        default="none",
        description="`gzip`: each record is a gzip member of NDJSON lines, packed to "
        "`record_target_bytes` compressed (~5x fewer billable bytes). The delivered S3 objects "
        "are then valid multi-member .gz files: set the stream's S3 `FileExtension` to "
        "`.json.gz` so Athena/DuckDB read them; no Firehose Lambda/dynamic partitioning.",
    )

    @field_validator("max_records_per_call")
    @classmethod
    def _records_limit(cls, value: int) -> int:
        if value > MAX_RECORDS_PER_CALL:
            raise ValueError(
                f"PutRecordBatch takes at most {MAX_RECORDS_PER_CALL} records, got {value}"
            )
        return value

    @field_validator("max_request_bytes")
    @classmethod
    def _request_limit(cls, value: int) -> int:
        if value > MAX_REQUEST_BYTES:
            raise ValueError(
                f"PutRecordBatch takes at most 4MiB ({MAX_REQUEST_BYTES} bytes) per call, "
                f"got {value}"
            )
        return value

    @field_validator("record_target_bytes")
    @classmethod
    def _record_limit(cls, value: int) -> int:
        if value > MAX_RECORD_BYTES:
            raise ValueError(
                f"a Firehose record is at most 1,000 KiB ({MAX_RECORD_BYTES} bytes), got {value}"
            )
        return value

    @model_validator(mode="after")
    def _record_fits_request(self) -> FirehoseConfig:
        if self.record_target_bytes > self.max_request_bytes:
            raise ValueError("record_target_bytes cannot exceed max_request_bytes")
        return self


def ndjson_lines(frame: pl.DataFrame) -> list[bytes]:
    """One JSON line per row (``\\n`` included), timestamps as ISO 8601 UTC with ``Z``."""
    df = frame
    df = df.with_columns(
        pl.col(name)
        .dt.convert_time_zone("UTC")
        .dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ")
        .alias(name)
        for name, dtype in df.schema.items()
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is not None
    ).with_columns(
        pl.col(name).dt.strftime("%Y-%m-%dT%H:%M:%S%.f").alias(name)
        for name, dtype in df.schema.items()
        if isinstance(dtype, pl.Datetime) and dtype.time_zone is None
    )
    text = df.write_ndjson()
    lines = text.encode().splitlines(keepends=True)
    if len(lines) != frame.height:  # a JSON string never holds a raw newline; be sure
        raise AssertionError(f"{len(lines)} NDJSON lines for {frame.height} rows")
    return lines


@dataclass(frozen=True)
class Packed:
    """A Firehose record: its bytes and the batch rows it holds."""

    data: bytes
    rows: list[int]


def pack(lines: Sequence[bytes], target: int) -> list[Packed]:
    """Greedy in-order packing of lines into records of at most ``target`` bytes.

    A line longer than ``target`` gets a record of its own (callers reject lines above the
    1,000 KiB service limit before packing).
    """
    records: list[Packed] = []
    buf: list[bytes] = []
    rows: list[int] = []
    size = 0
    for i, line in enumerate(lines):
        if buf and size + len(line) > target:
            records.append(Packed(b"".join(buf), rows))
            buf, rows, size = [], [], 0
        buf.append(line)
        rows.append(i)
        size += len(line)
    if buf:
        records.append(Packed(b"".join(buf), rows))
    return records


def pack_gzip(lines: Sequence[bytes], target: int, level: int = 6) -> list[Packed]:
    """In-order packing of lines into gzip members of at most ``target`` compressed bytes.

    The raw budget of the next record follows the compression ratio just seen, and a member
    that came out too big is re-cut smaller, so records end up just under ``target``. A line
    that alone compresses above ``target`` still gets its own record.
    """
    records: list[Packed] = []
    ratio = 8.0  # NDJSON readings compress ~8x; a wrong guess only costs one re-cut
    start = 0
    while start < len(lines):
        budget = target * ratio * 0.97
        end, raw = start + 1, len(lines[start])
        while end < len(lines) and raw + len(lines[end]) <= budget:
            raw += len(lines[end])
            end += 1
        data = gzip.compress(b"".join(lines[start:end]), compresslevel=level, mtime=0)
        while len(data) > target and end - start > 1:
            end = start + max(1, int((end - start) * target / len(data) * 0.95))
            data = gzip.compress(b"".join(lines[start:end]), compresslevel=level, mtime=0)
        ratio = max(1.0, sum(len(x) for x in lines[start:end]) / len(data))
        records.append(Packed(data, list(range(start, end))))
        start = end
    return records


def calls(records: Sequence[Packed], max_records: int, max_bytes: int) -> list[list[Packed]]:
    """Consecutive records grouped into PutRecordBatch calls within both per-call limits."""
    out: list[list[Packed]] = []
    cur: list[Packed] = []
    size = 0
    for rec in records:
        if cur and (len(cur) >= max_records or size + len(rec.data) > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(rec)
        size += len(rec.data)
    if cur:
        out.append(cur)
    return out


class FirehoseSink(Sink):
    """PutRecordBatch with packing; only failed records are retried."""

    Config = FirehoseConfig
    description = "Amazon Data Firehose: NDJSON readings packed into ~50 KB records."
    example = """\
- name: cloud
  type: firehose
  stream: sensor-stream
  region: eu-west-1
  where: "max > 28"
"""
    requires: ClassVar[dict[str, str]] = _aws.REQUIRES
    limits = SinkLimits(max_record_bytes=MAX_RECORD_BYTES)

    def __init__(self, config: FirehoseConfig, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.config: FirehoseConfig = config
        self._stack: contextlib.AsyncExitStack | None = None
        self.client: Any = None

    @property
    def deadline(self) -> float:
        """Seconds the runtime lets one ``write`` take (see ``_aws.deadline``)."""
        return _aws.deadline(self.config)

    async def open(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.client = await _aws.open_client(self._stack, "firehose", self.config)

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self.client = None

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        if frame.height == 0:
            return
        if self.client is None:
            await self.open()
        lines = ndjson_lines(frame)
        too_big = [i for i, line in enumerate(lines) if len(line) > MAX_RECORD_BYTES]
        rejected = list(too_big)
        why = [f"NDJSON line larger than {MAX_RECORD_BYTES} bytes"] * len(too_big)
        big = set(too_big)
        keep = [i for i in range(len(lines)) if i not in big]
        packer = pack_gzip if self.config.compression == "gzip" else pack
        records = [
            Packed(p.data, [keep[r] for r in p.rows])
            for p in packer([lines[i] for i in keep], self.config.record_target_bytes)
        ]
        retry: list[int] = []
        reasons: list[str] = []
        sent_any = False
        groups = calls(records, self.config.max_records_per_call, self.config.max_request_bytes)
        for n, group in enumerate(groups):
            try:
                failed, errors, refused = await self._put_isolating(group)
            except TransientSinkError as exc:
                if not sent_any and not too_big:
                    raise  # nothing landed: the runtime retries the whole batch
                # something landed or must be dead-lettered: re-send only this call's rows and
                # those of the calls not made yet
                retry += [r for g in groups[n:] for rec in g for r in rec.rows]
                reasons.append(str(exc))
                break
            for rec, reason in refused:  # only the records refused even alone
                rejected += rec.rows
                why += [reason] * len(rec.rows)
            sent_any = True
            for rec in failed:
                retry += rec.rows
            reasons += errors
        self.ctx.counters.inc(
            "firehose_rows_sent_total", len(lines) - len(retry) - len(rejected),
            component=self.ctx.component,
        )
        if not retry and not rejected:
            return
        raise PartialWriteError(
            retry_rows=frame[sorted(retry)] if retry else None,
            rejected_rows=frame[rejected] if rejected else None,
            reasons=why,
            message=f"firehose {self.config.stream}: {len(retry)} rows to retry, "
            f"{len(rejected)} rejected" + (f" ({'; '.join(sorted(set(reasons))[:3])})"
                                          if reasons else ""),
        )

    async def _put_isolating(
        self, group: list[Packed]
    ) -> tuple[list[Packed], list[str], list[tuple[Packed, str]]]:
        """``_put``; a call refused for good is halved until the refused record stands alone,
        so one bad record costs its own rows, not the call's other records.

        Returns (records that failed for now, their errors, (record, reason) refused for good).
        """
        try:
            failed, errors = await self._put(group)
            return failed, errors, []
        except PermanentSinkError as exc:
            if len(group) == 1:
                return [], [], [(group[0], str(exc))]
        half = len(group) // 2
        failed_a, errors_a, refused_a = await self._put_isolating(group[:half])
        failed_b, errors_b, refused_b = await self._put_isolating(group[half:])
        return failed_a + failed_b, errors_a + errors_b, refused_a + refused_b

    async def _put(self, group: list[Packed]) -> tuple[list[Packed], list[str]]:
        """One PutRecordBatch; (records that failed, their error strings)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = await self.client.put_record_batch(
                DeliveryStreamName=self.config.stream,
                Records=[{"Data": rec.data} for rec in group],
            )
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise _aws.classify(exc, f"firehose put_record_batch {self.config.stream}") from exc
        self.ctx.counters.inc("firehose_calls_total", component=self.ctx.component)
        if not resp.get("FailedPutCount"):
            return [], []
        failed: list[Packed] = []
        errors: list[str] = []
        for rec, answer in zip(group, resp["RequestResponses"], strict=True):
            if answer.get("ErrorCode"):
                failed.append(rec)
                errors.append(f"{answer['ErrorCode']}: {answer.get('ErrorMessage', '')}")
        self.ctx.counters.inc(
            "firehose_failed_records_total", len(failed), component=self.ctx.component
        )
        return failed, errors
