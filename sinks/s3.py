"""The S3 data lake: Hive-partitioned Parquet (zstd) that Athena, DuckDB, Polars and Spark read.

Object keys come from the deterministic batch id, so a retried or replayed batch overwrites its
own objects instead of adding duplicates: delivery is exactly once as seen by a reader.

Each partition is one object with its own fate (``sinks._isolate``): an object S3 refuses for
good (a 4xx that is not throttling or a fixable setup error, a key over 1,024 bytes, rows
Parquet cannot encode) sends only that partition's rows to the dead letter; when the endpoint
stops answering part-way, the objects already written stay and only the rest is retried.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from collector.errors import PermanentSinkError, TransientSinkError
from collector.plugin import Context, Sink, SinkLimits
from collector.units import Size
from sinks import _aws
from sinks._isolate import Outcome
from sinks._partition import DEFAULT_PARTITIONS, part_name, split_indexed, validate_partitions

MIN_PART_BYTES = 5 * 1024**2
"""S3's smallest multipart part (all but the last)."""
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024
"""S3's longest object key (UTF-8 bytes)."""
MAX_PREFIX_BYTES = 256
"""``key_prefix`` bound: leaves room for a few bounded partition folders and the file name."""


class S3Config(_aws.AwsSinkConfig):
    """Where and how the lake objects are written."""

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
        default=None, ge=1, le=22, description="zstd level; default: pyarrow's."
    )

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


def to_parquet(table: pa.Table, compression_level: int | None = None) -> bytes:
    """One Parquet file (zstd) in memory; batches are bounded by ``batch.max_bytes``."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", compression_level=compression_level)
    return buf.getvalue()


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
        """Seconds the runtime lets one ``write`` take (see ``_aws.deadline``)."""
        return _aws.deadline(self.config)

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

    async def write(self, table: pa.Table, batch_id: str) -> None:
        if table.num_rows == 0:
            return
        if self.client is None:
            await self.open()
        from botocore.exceptions import BotoCoreError, ClientError

        outcome = Outcome(f"s3 {self.config.bucket}")
        parts = list(split_indexed(table, self.config.partition_by))
        for n, (folder, _rows, index) in enumerate(parts):
            key = object_key(self.config, folder, batch_id)
            if len(key.encode()) > MAX_KEY_BYTES:
                outcome.reject(index, f"s3: key longer than {MAX_KEY_BYTES} bytes: {key[:200]}…")
                continue
            try:
                # polars made strings large_string: keep the batch's own schema in the file
                body = to_parquet(table.take(index), self.config.compression_level)
            except (pa.ArrowException, ValueError, TypeError) as exc:
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
        outcome.settle(table, batch_id)

    async def _put_multipart(self, key: str, body: bytes) -> None:
        """Multipart upload; aborted on failure so no orphan parts keep costing storage."""
        part_size = max(self.config.multipart_part_size, -(-len(body) // MAX_PARTS))
        bucket = self.config.bucket
        created = await self.client.create_multipart_upload(
            Bucket=bucket, Key=key, **self._extra_args()
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
