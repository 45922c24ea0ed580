"""The S3 data lake: Hive-partitioned Parquet (zstd) that Athena, DuckDB, Polars and Spark read.

Object keys come from the deterministic batch id, so a retried or replayed batch overwrites its
own objects instead of adding duplicates: delivery is exactly once as seen by a reader.

Each partition is one object with its own fate (``sinks._isolate``): an object S3 refuses for
good (a 4xx that is not throttling or a fixable setup error, a key over 1,024 bytes, rows
Parquet cannot encode) sends only that partition's rows to the dead letter; when the endpoint
stops answering part-way, the objects already written stay and only the rest is retried.

**Blob uploads** (``blob_column``, e.g. ``path`` from the ``files`` source): before a batch's
rows are written, the file each row refers to is uploaded byte for byte from the blob store
(``collector.runtime.blobs``) under a key made from the row (``blob_key``, e.g.
``retraining/{prediction}/{date}/{sha256}.{ext}``), and that key is written into the row
(``blob_key_column``). Idempotent across kill -9: an object is first looked up (HEAD) and not
sent again when it exists with the same SHA-256 (stored as object metadata ``sha256``), so a
batch retried after a crash between upload and commit uploads nothing twice. A row whose blob
is gone, damaged or not in the store goes to the dead letter with the reason; its neighbours go
on. The blob store deletes a blob once no spooled row of a blob-needing sink names it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import string
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field, field_validator, model_validator

from collector.errors import PermanentSinkError, TransientSinkError
from collector.plugin import BatchConfig, Context, Sink, SinkLimits
from collector.units import Size
from sinks import _aws
from sinks._isolate import Outcome
from sinks._partition import (
    DEFAULT_PARTITIONS,
    TIME_PARTS,
    part_name,
    sanitize,
    split_indexed,
    validate_partitions,
)

DEFAULT_BATCH_AGE = 300.0
"""Seconds an s3 batch may gather rows by default (see ``S3Config.batch``)."""
MIN_PART_BYTES = 5 * 1024**2
"""S3's smallest multipart part (all but the last)."""
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024
"""S3's longest object key (UTF-8 bytes)."""
MAX_PREFIX_BYTES = 256
"""``key_prefix`` bound: leaves room for a few bounded partition folders and the file name."""


class S3Config(_aws.AwsSinkConfig):
    """Where and how the lake objects are written."""

    batch: BatchConfig = Field(
        default_factory=lambda: BatchConfig(
            max_rows=100_000, max_bytes=32 * 1024**2, max_age=DEFAULT_BATCH_AGE
        ),
        description="Batch cutting. Default `max_age: 5m`, `max_rows: 100000`, "
        "`max_bytes: 32MiB`: a lake wants few, large objects (every PUT is billed, every small "
        "file slows Athena, and a backlog drains per object); 5 minutes is also how long "
        "Firehose buffers before it writes to S3.",
    )

    bucket: str = Field(
        description="Bucket name.", pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$"
    )
    key_prefix: str = Field(
        default="",
        description="Folder inside the bucket, e.g. `lake/readings` (no leading/trailing `/`).",
    )
    partition_by: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PARTITIONS),
        description="Hive partition keys: time parts (date, year, month, day, hour, from the "
        "event time) or columns (metric, device, source, tags), e.g. [device, date, hour].",
    )
    storage_class: str | None = Field(
        default=None,
        description="S3 storage class, e.g. STANDARD_IA or INTELLIGENT_TIERING; default STANDARD.",
        pattern=r"^[A-Z_]+$",
    )
    sse: Literal["AES256", "aws:kms"] | None = Field(
        default=None, description="Server-side encryption: `AES256` or `aws:kms`."
    )
    sse_kms_key_id: str | None = Field(
        default=None, description="KMS key id/ARN for `sse: aws:kms` (default: the AWS key)."
    )
    multipart_threshold: Size = Field(
        default=16 * 1024**2,
        gt=0,
        description="Files at least this large are sent as a multipart upload.",
    )
    multipart_part_size: Size = Field(
        default=8 * 1024**2,
        ge=MIN_PART_BYTES,
        description="Part size of multipart uploads (S3 minimum 5MiB).",
    )
    compression_level: int | None = Field(
        default=None, ge=1, le=22, description="zstd level; default: the library's (3)."
    )
    blob_column: str | None = Field(
        default=None,
        description="Column naming a blob-store file (the `files` source's `path`): each "
        "row's file is uploaded as its own object before the rows are written.",
    )
    blob_key: str = Field(
        default="blobs/{date}/{sha256}.{ext}",
        description="Object key of an uploaded blob, under `key_prefix`: `{column}` fields of "
        "the row (percent-encoded, bounded) and `{date}`, `{year}`, `{month}`, `{day}`, "
        "`{hour}` (event time), `{ext}` (the file's extension), e.g. "
        "`retraining/{prediction}/{date}/{sha256}.{ext}`.",
    )
    blob_key_column: str = Field(
        default="blob_key",
        description="Column the uploaded object's key is written to (null: no blob).",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
    )

    @field_validator("blob_key")
    @classmethod
    def _check_template(cls, value: str) -> str:
        try:
            fields = list(string.Formatter().parse(value))
        except ValueError as exc:
            raise ValueError(f"not a key template: {exc}") from None
        for _text, name, spec, conversion in fields:
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise ValueError(
                    f"{{{name}}}: fields are plain column names or date parts "
                    "(no format specs, indexes or conversions)"
                )
        if value.startswith("/") or any(p in (".", "..") for p in value.split("/")):
            raise ValueError("blob_key may not start with `/` or hold `.`/`..` segments")
        return value

    @field_validator("key_prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if any(part in ("", ".", "..") for part in value.split("/")) and value:
            raise ValueError("key_prefix may not contain empty, `.` or `..` segments")
        if len(value.encode()) > MAX_PREFIX_BYTES:
            raise ValueError(
                f"key_prefix is longer than {MAX_PREFIX_BYTES} bytes: with partitions and the "
                f"file name, keys would pass S3's {MAX_KEY_BYTES}"
            )
        return value

    @field_validator("partition_by")
    @classmethod
    def _check_parts(cls, value: list[str]) -> list[str]:
        validate_partitions(value)
        if len(set(value)) != len(value):
            raise ValueError("partition keys must be unique")
        return value

    @model_validator(mode="after")
    def _kms_key_needs_kms(self) -> S3Config:
        if self.sse_kms_key_id and self.sse != "aws:kms":
            raise ValueError("sse_kms_key_id needs `sse: aws:kms`")
        return self


def object_key(config: S3Config, folder: str, batch_id: str) -> str:
    """``<key_prefix>/<partition folder>/part-<batch id>.parquet``: the same on every retry.

    Partition values and the batch id are bounded (``sinks._partition``), so with a
    ``key_prefix`` of at most 256 bytes a key passes 1,024 bytes only with very many partition
    keys; :meth:`S3Sink.write` dead-letters such a partition instead of sending it.
    """
    name = part_name(batch_id)
    return "/".join(p for p in (config.key_prefix, folder, name) if p)


def to_parquet(frame: pl.DataFrame, compression_level: int | None = None) -> bytes:
    """One Parquet file (zstd) in memory; batches are bounded by ``batch.max_bytes``."""
    buf = io.BytesIO()
    frame.write_parquet(buf, compression="zstd", compression_level=compression_level)
    return buf.getvalue()


def blob_key(config: S3Config, row: dict[str, Any], blob_name: str) -> str:
    """The object key of a row's blob: the template filled from the row, under ``key_prefix``.

    Row values are data: each is percent-encoded and bounded like a partition value
    (``sinks._partition.sanitize``), so no value can add ``/`` or ``..`` segments to the key.
    KeyError names a field that is neither a column nor a date part.
    """
    ts = row.get("ts")
    if isinstance(ts, datetime):
        ts = ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)
    values: dict[str, str] = {}
    for _text, name, _spec, _conv in string.Formatter().parse(config.blob_key):
        if name is None or name in values:
            continue
        if name == "ext":
            values[name] = sanitize(Path(blob_name).suffix.lstrip(".") or "bin")
        elif name in row:
            values[name] = sanitize(row[name])
        elif name in TIME_PARTS and isinstance(ts, datetime):
            values[name] = ts.strftime(TIME_PARTS[name])
        else:
            raise KeyError(name)
    key = config.blob_key.format(**values)
    return "/".join(p for p in (config.key_prefix, key) if p)


class S3Sink(Sink):
    """Writes each batch as one Parquet object per partition."""

    Config = S3Config
    description = "Hive-partitioned Parquet (zstd) in S3: a data lake for Athena/DuckDB/Polars."
    example = """\
- name: datalake
  type: s3
  bucket: my-sensor-lake
  key_prefix: readings
  region: eu-west-1
  partition_by: [metric, date]
  sse: aws:kms
  sse_kms_key_id: alias/sensor-lake
"""
    requires: ClassVar[dict[str, str]] = _aws.REQUIRES
    limits = SinkLimits()

    def __init__(self, config: S3Config, ctx: Context) -> None:
        super().__init__(config, ctx)
        self.config: S3Config = config
        self._stack: contextlib.AsyncExitStack | None = None
        self.client: Any = None

    @property
    def deadline(self) -> float:
        """Seconds the runtime lets one ``write`` take (see ``_aws.deadline``); with blob
        uploads a batch makes a HEAD and a PUT per row, so up to 100 rows' worth more."""
        base = _aws.deadline(self.config)
        if self.config.blob_column:
            return base * (1 + min(self.config.batch.max_rows, 100))
        return base

    @property
    def blob_column(self) -> str | None:
        """The column of blob paths this sink uploads; the blob store keeps those blobs until
        this sink has delivered their rows (``collector.runtime.blobs``)."""
        return self.config.blob_column

    async def open(self) -> None:
        self._stack = contextlib.AsyncExitStack()
        self.client = await _aws.open_client(self._stack, "s3", self.config)

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self.client = None

    def _extra_args(self) -> dict[str, str]:
        extra: dict[str, str] = {"ContentType": "application/vnd.apache.parquet"}
        if self.config.storage_class:
            extra["StorageClass"] = self.config.storage_class
        if self.config.sse:
            extra["ServerSideEncryption"] = self.config.sse
        if self.config.sse_kms_key_id:
            extra["SSEKMSKeyId"] = self.config.sse_kms_key_id
        return extra

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        if frame.height == 0:
            return
        if self.client is None:
            await self.open()
        from botocore.exceptions import BotoCoreError, ClientError

        outcome = Outcome(f"s3 {self.config.bucket}")
        keep: pl.Series | None = None  # row numbers in `frame` of the rows to write
        if self.config.blob_column:
            frame, bad = await self._upload_blobs(frame)
            for reason, index in bad.items():
                outcome.reject(pl.Series(index, dtype=pl.Int64), reason)
            if bad:
                rejected = [i for index in bad.values() for i in index]
                keep = pl.int_range(frame.height, eager=True, dtype=pl.Int64)
                keep = keep.filter(~keep.is_in(rejected))
        good = frame if keep is None else frame[keep]
        parts = [
            (folder, rows, index if keep is None else keep[index])
            for folder, rows, index in (
                split_indexed(good, self.config.partition_by) if good.height else ()
            )
        ]
        for n, (folder, rows, index) in enumerate(parts):
            key = object_key(self.config, folder, batch_id)
            if len(key.encode()) > MAX_KEY_BYTES:
                outcome.reject(index, f"s3: key longer than {MAX_KEY_BYTES} bytes: {key[:200]}…")
                continue
            try:
                body = to_parquet(rows, self.config.compression_level)
            except (pl.exceptions.PolarsError, ValueError, TypeError) as exc:
                outcome.reject(index, f"s3: cannot encode {folder}: {type(exc).__name__}: {exc}")
                continue
            try:
                if len(body) >= self.config.multipart_threshold:
                    await self._put_multipart(key, body)
                else:
                    await self.client.put_object(
                        Bucket=self.config.bucket, Key=key, Body=body, **self._extra_args()
                    )
            except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
                error = _aws.classify(exc, f"s3 put s3://{self.config.bucket}/{key}")
                if isinstance(error, PermanentSinkError):
                    outcome.reject(index, str(error))  # this object only; go on with the rest
                    continue
                if isinstance(error, TransientSinkError) and not (
                    outcome.written_rows or outcome.rejected
                ):
                    raise error from exc  # nothing landed yet: retry the whole batch
                # the endpoint went away part-way: keep what landed, retry this and the rest
                for _, _, later in parts[n:]:
                    outcome.to_retry(later, str(error))
                break
            outcome.written(index)
            self.ctx.counters.inc("s3_objects_total", component=self.ctx.component)
            self.ctx.counters.inc("s3_bytes_total", len(body), component=self.ctx.component)
        outcome.settle(frame, batch_id)

    async def _upload_blobs(
        self, frame: pl.DataFrame
    ) -> tuple[pl.DataFrame, dict[str, list[int]]]:
        """Upload each row's blob (HEAD first: an object with the same SHA-256 is not sent
        again); the frame with the key column, and the rows to dead-letter by reason.

        A transient failure raises at once for the whole batch: nothing of it is committed
        yet, and the retry skips the objects that landed.
        """
        from collector.runtime import blobs

        column = self.config.blob_column
        assert column is not None
        if column not in frame.columns:
            raise PermanentSinkError(f"s3: blob_column {column!r} is not a column of the batch")
        store = blobs.store_for(self.ctx.data_dir, self.ctx.counters)
        keys: list[str | None] = []
        bad: dict[str, list[int]] = {}
        for i, row in enumerate(frame.iter_rows(named=True)):
            value = row.get(column)
            if value is None:
                keys.append(None)  # a row without a file: delivered as a row
                continue
            try:
                keys.append(await self._upload_one(store, row, value))
            except PermanentSinkError as exc:
                bad.setdefault(str(exc), []).append(i)
                keys.append(None)
        out = pl.Series(self.config.blob_key_column, keys, dtype=pl.String)
        return frame.with_columns(out), bad

    async def _upload_one(self, store: Any, row: dict[str, Any], value: Any) -> str:
        """Upload one blob unless S3 has it already; its key. Raises ``SinkError`` kinds."""
        from botocore.exceptions import BotoCoreError, ClientError

        path = store.resolve(value)
        if path is None:
            raise PermanentSinkError(
                f"s3: {str(value)[:200]!r} is not a file of this collector's blob store"
            )
        try:
            key = blob_key(self.config, row, path.name)
        except KeyError as exc:
            raise PermanentSinkError(
                f"s3: blob_key field {{{exc.args[0]}}} is neither a column nor a date part"
            ) from None
        if len(key.encode()) > MAX_KEY_BYTES:
            raise PermanentSinkError(f"s3: blob key longer than {MAX_KEY_BYTES} bytes: {key[:200]}")
        try:
            body = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise PermanentSinkError(
                f"s3: blob {path.name} is gone (dropped by blobs.when_full: drop_oldest?)"
            ) from None
        except OSError as exc:
            raise TransientSinkError(f"s3: cannot read blob {path.name}: {exc}") from exc
        sha = hashlib.sha256(body).hexdigest()
        if not path.name.startswith(sha):
            raise PermanentSinkError(f"s3: blob {path.name} is damaged (its SHA-256 is {sha})")
        bucket = self.config.bucket
        try:
            try:
                head = await self.client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                code, status = _aws.error_code(exc)
                if status != 404 and code not in ("404", "NoSuchKey", "NotFound"):
                    raise
                head = None
            if head is not None and head.get("Metadata", {}).get("sha256") == sha:
                self.ctx.counters.inc("s3_blobs_skipped_total", component=self.ctx.component)
                return key  # uploaded before a crash or a lost answer: not twice
            extra = self._extra_args()
            extra["ContentType"] = str(row.get("content_type") or "application/octet-stream")
            if len(body) >= self.config.multipart_threshold:
                await self._put_multipart(key, body, extra, {"sha256": sha})
            else:
                md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
                await self.client.put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=body,
                    ContentMD5=md5,
                    Metadata={"sha256": sha},
                    **extra,
                )
        except (ClientError, BotoCoreError, OSError, TimeoutError) as exc:
            raise _aws.classify(exc, f"s3 put s3://{bucket}/{key}") from exc
        self.ctx.counters.inc("s3_blobs_total", component=self.ctx.component)
        self.ctx.counters.inc("s3_blob_bytes_total", len(body), component=self.ctx.component)
        return key

    async def _put_multipart(
        self,
        key: str,
        body: bytes,
        extra: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Multipart upload; aborted on failure so no orphan parts keep costing storage."""
        part_size = max(self.config.multipart_part_size, -(-len(body) // MAX_PARTS))
        bucket = self.config.bucket
        more: dict[str, Any] = {"Metadata": metadata} if metadata else {}
        created = await self.client.create_multipart_upload(
            Bucket=bucket, Key=key, **(extra or self._extra_args()), **more
        )
        upload_id = created["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, len(body), part_size), start=1):
                resp = await self.client.upload_part(
                    Bucket=bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body[start : start + part_size],
                )
                parts.append({"ETag": resp["ETag"], "PartNumber": number})
            await self.client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id
                )
            raise
