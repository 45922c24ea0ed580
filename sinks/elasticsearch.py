"""Elasticsearch / OpenSearch sink: bulk-indexes readings so Kibana or OpenSearch Dashboards can
show them.

Replays are harmless because every document's ``_id`` is the row's ``record_id``. Per-item bulk
results decide what happens to each row: 429/5xx rows go back to the spool (only those), other
4xx rows (mapping errors) go to the dead-letter file with the server's reason.

Auth failures (401/403) are *transient* here, not permanent: the readings are fine, the
credentials are not, and once an operator fixes the key the spooled batches flow again. A user who
would rather give up sets ``spool.max_retries``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import polars as pl
from pydantic import Field, SecretStr, field_validator, model_validator

from collector.errors import PartialWriteError, TransientSinkError
from collector.plugin import Model, Sink, SinkConfig, SinkLimits
from collector.units import Duration, Size
from sinks import _es_docs as docs
from sinks._es_clients import Backend, Failure, connect, describe

HARD_MAX_REQUEST_BYTES = 100 * 1024 * 1024
"""``http.max_content_length`` default of both servers (Amazon OpenSearch: 10-100 MiB by size)."""


class AwsSigV4(Model):
    """Sign requests for Amazon OpenSearch Service with the default AWS credential chain."""

    region: str = Field(description="AWS region of the domain or collection, e.g. `eu-west-1`.")
    service: Literal["es", "aoss"] = Field(
        default="es",
        description="`es` for an OpenSearch Service domain, `aoss` for OpenSearch Serverless.",
    )


class ElasticsearchSinkConfig(SinkConfig):
    """Where and how readings are bulk-indexed."""

    hosts: list[str] = Field(
        default_factory=lambda: ["http://localhost:9200"],
        min_length=1,
        description="Cluster URLs, e.g. `https://es.example.com:9200`; credentials go in "
        "`api_key`/`username`/`password`/`bearer_token`, never in the URL.",
    )
    index: str = Field(
        default="sensors-%Y.%m.%d",
        description="Index name; strftime codes (%Y %m %d %H %j %G %V %U %y) take the row's "
        "event time (UTC), so a reading lands in the index of the day it was measured.",
    )
    data_stream: str | None = Field(
        default=None,
        description="Write to this data stream (op_type create, `@timestamp` added) instead of "
        "`index`.",
    )
    flavor: Literal["auto", "elasticsearch", "opensearch"] = Field(
        default="auto",
        description="Server kind; `auto` asks `GET /` (`version.distribution`). OpenSearch needs "
        "the `opensearch` extra.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="Elasticsearch API key (the base64 `encoded` form), e.g. "
        "`${ES_API_KEY}`."
    )
    username: str | None = Field(default=None, description="Basic auth user.")
    password: SecretStr | None = Field(
        default=None, description="Basic auth password, e.g. `${ES_PASSWORD}`."
    )
    bearer_token: SecretStr | None = Field(
        default=None, description="OAuth2/JWT bearer token, e.g. `${ES_TOKEN}`."
    )
    ca_certs: str | None = Field(
        default=None, description="PEM file of the CA that signed the server certificate."
    )
    client_cert: str | None = Field(
        default=None, description="PEM client certificate for mutual TLS."
    )
    client_key: str | None = Field(
        default=None, description="PEM private key of `client_cert`."
    )
    verify_certs: bool = Field(
        default=True, description="Verify the server certificate; turn off only for a lab."
    )
    aws_sigv4: AwsSigV4 | None = Field(
        default=None,
        description="Amazon OpenSearch Service: sign requests with SigV4 (implies OpenSearch).",
    )
    max_docs: int = Field(
        default=5000, gt=0, description="Most documents in one `_bulk` request."
    )
    max_bytes: Size = Field(
        default="5MiB", gt=0, le=HARD_MAX_REQUEST_BYTES, validate_default=True,
        description="Largest `_bulk` request body; a batch above it is sent in several requests.",
    )
    template_name: str | None = Field(
        default=None,
        description="Index template created/updated on start; default "
        "`edge-collector-<index prefix>`.",
    )
    manage_template: bool = Field(
        default=True,
        description="Create/update the index template on start (needs `manage_index_templates`).",
    )
    use_record_id: bool = Field(
        default=True,
        description="Use `record_id` as `_id` so replays overwrite; turn off only for OpenSearch "
        "Serverless time-series collections, which refuse custom ids.",
    )
    request_timeout: Duration = Field(
        default="30s", gt=0, validate_default=True, description="Per-request timeout."
    )

    @field_validator("hosts", mode="before")
    @classmethod
    def _one_host(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("hosts")
    @classmethod
    def _urls(cls, hosts: list[str]) -> list[str]:
        from urllib.parse import urlsplit

        for host in hosts:
            parts = urlsplit(host)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{host!r} is not an http:// or https:// URL")
            if parts.username or parts.password:
                raise ValueError(
                    "put credentials in username/password or api_key, not in the URL "
                    "(URLs appear in logs, secrets must not)"
                )
        return hosts

    @field_validator("index")
    @classmethod
    def _index(cls, value: str) -> str:
        docs.check_index_pattern(value)
        return value

    @field_validator("data_stream")
    @classmethod
    def _data_stream(cls, value: str | None) -> str | None:
        if value is not None:
            docs.check_index_name(value, "data_stream")
        return value

    @model_validator(mode="after")
    def _auth(self) -> ElasticsearchSinkConfig:
        kinds = [
            name
            for name, given in (
                ("api_key", self.api_key is not None),
                ("bearer_token", self.bearer_token is not None),
                ("username/password", self.username is not None or self.password is not None),
                ("aws_sigv4", self.aws_sigv4 is not None),
            )
            if given
        ]
        if len(kinds) > 1:
            raise ValueError(f"give one way to authenticate, not {' and '.join(kinds)}")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert")
        if self.aws_sigv4 is not None and self.flavor == "elasticsearch":
            raise ValueError("aws_sigv4 is for Amazon OpenSearch Service: use flavor opensearch")
        return self

    @property
    def target(self) -> str:
        return self.data_stream or self.index


class ElasticsearchSink(Sink):
    """Bulk-indexes rows into Elasticsearch or OpenSearch with deterministic ``_id``s."""

    Config: ClassVar[type[ElasticsearchSinkConfig]] = ElasticsearchSinkConfig
    description = "Elasticsearch / OpenSearch bulk indexing with per-item retry and dead-letter."
    example = """\
- name: search
  type: elasticsearch
  hosts: [https://es.example.com:9200]
  index: sensors-%Y.%m.%d
  api_key: ${ES_API_KEY}
  ca_certs: /etc/collector/es-ca.pem
"""
    requires: ClassVar[dict[str, str]] = {"elasticsearch": "es"}
    limits = SinkLimits(max_request_bytes=HARD_MAX_REQUEST_BYTES)

    config: ElasticsearchSinkConfig
    backend: Backend | None = None

    @property
    def deadline(self) -> float:
        """Seconds the runtime lets one ``write`` take before it counts as "no answer".

        Each bulk request is bounded by ``request_timeout`` (per host tried); a batch above
        ``max_bytes`` takes several requests, so a few of them plus the re-sends of rows a
        refused request held.
        """
        return 4.0 * self.config.request_timeout * len(self.config.hosts)

    async def open(self) -> None:
        cfg = self.config
        try:
            self.backend, info = await connect(cfg)
            version = (info.get("version") or {}).get("number", "?")
            self.ctx.logger.info(
                "%s: connected to %s %s at %s",
                self.ctx.component, self.backend.flavor, version, ", ".join(cfg.hosts),
            )
            if not cfg.verify_certs:
                self.ctx.logger.warning(
                    "%s: TLS certificate verification is off (verify_certs: false)",
                    self.ctx.component,
                )
            if cfg.manage_template:
                name = cfg.template_name or docs.default_template_name(cfg.target)
                pattern = (
                    cfg.data_stream if cfg.data_stream else docs.template_pattern(cfg.index)
                )
                body = docs.index_template(pattern, data_stream=cfg.data_stream is not None)
                await self.backend.put_template(name, body)
        except Exception as exc:
            failure = describe(exc)
            if failure is None:
                raise
            await self.close()
            raise TransientSinkError(
                f"{self.ctx.component}: cannot prepare the cluster: {_say(failure)}",
                retry_after=failure.retry_after,
            ) from None

    async def close(self) -> None:
        if self.backend is not None:
            backend, self.backend = self.backend, None
            await backend.close()

    async def write(self, frame: pl.DataFrame, batch_id: str) -> None:
        if frame.height == 0:
            return
        if self.backend is None:
            await self.open()
        assert self.backend is not None
        cfg = self.config
        built = docs.build_actions(
            frame, index=cfg.index, data_stream=cfg.data_stream, use_record_id=cfg.use_record_id
        )
        results = await self._bulk(built.actions, batch_id)
        refused = [i for i, result in enumerate(results) if self._refused_whole(*result)]
        if len(refused) > 1:
            # A request the server refused as a whole (413 too large, 400 unparsable) says
            # nothing about which document caused it: send those documents one per request,
            # so only a document that cannot be indexed even alone is dead-lettered.
            for i in refused:
                (results[i],) = await self._bulk([built.actions[i]], batch_id, max_docs=1)
        self._settle(frame, batch_id, built, results)

    async def _bulk(
        self, actions: list[dict[str, Any]], batch_id: str, max_docs: int | None = None
    ) -> list[tuple[bool, dict[str, Any]]]:
        """One result per action, in order; TransientSinkError if the exchange itself broke."""
        assert self.backend is not None
        cfg = self.config
        results: list[tuple[bool, dict[str, Any]]] = []
        try:
            async for result in self.backend.streaming_bulk(
                actions, max_docs=max_docs or cfg.max_docs, max_bytes=cfg.max_bytes
            ):
                results.append(result)
        except Exception as exc:
            failure = describe(exc)
            if failure is None:
                raise
            raise TransientSinkError(
                f"{self.ctx.component}: bulk of batch {batch_id} failed: {_say(failure)}",
                retry_after=failure.retry_after,
            ) from None
        if len(results) != len(actions):
            raise TransientSinkError(
                f"{self.ctx.component}: {len(results)} bulk results for {len(actions)} "
                "documents; sending the batch again"
            )
        return results

    @staticmethod
    def _refused_whole(ok: bool, item: dict[str, Any]) -> bool:
        """The item failed because its whole request was refused for good (400/413)."""
        if ok:
            return False
        _, info = next(iter(item.items()))
        exc = info.get("exception")
        if exc is None:
            return False
        failure = describe(exc) or Failure(None, str(exc))
        return failure.status in (400, 413)

    def _settle(
        self,
        frame: pl.DataFrame,
        batch_id: str,
        built: docs.Actions,
        results: list[tuple[bool, dict[str, Any]]],
    ) -> None:
        """Sort rows into done / retry / rejected and raise what the runtime must do next."""
        retry: list[int] = []
        rejected: dict[int, str] = dict(built.rejected)
        retry_after: float | None = None
        first_retry_reason = ""
        done = 0
        for row, (ok, item) in zip(built.rows, results, strict=True):
            verdict, reason, hint = self._verdict(ok, item)
            if verdict == "done":
                done += 1
            elif verdict == "retry":
                retry.append(row)
                first_retry_reason = first_retry_reason or reason
                if hint is not None:
                    retry_after = max(retry_after or 0.0, hint)
            else:
                rejected[row] = reason
        self._count(done, len(retry), len(rejected))
        if not retry and not rejected:
            return
        if not done and not rejected:
            raise TransientSinkError(
                f"{self.ctx.component}: no document of batch {batch_id} was accepted "
                f"(first failure: {first_retry_reason})",
                retry_after=retry_after,
            )
        order = sorted(rejected)
        raise PartialWriteError(
            retry_rows=frame[retry] if retry else None,
            rejected_rows=frame[order] if order else None,
            reasons=[rejected[r] for r in order],
            message=f"{self.ctx.component}: batch {batch_id}: {done} indexed, {len(retry)} to "
            f"retry, {len(order)} rejected",
        )

    def _verdict(self, ok: bool, item: dict[str, Any]) -> tuple[str, str, float | None]:
        """``done``/``retry``/``reject`` for one bulk result, the reason, a Retry-After hint."""
        if ok:
            return "done", "", None
        op, info = next(iter(item.items()))
        exc = info.get("exception")
        if exc is not None:
            # The whole request failed (the helper spreads it over the chunk's items).
            failure = describe(exc) or Failure(None, str(exc))
            if failure.status in (400, 413):
                extra = "; lower max_bytes" if failure.status == 413 else ""
                return "reject", f"bulk request refused: {_say(failure)}{extra}", None
            return "retry", _say(failure), failure.retry_after
        status = info.get("status")
        if op == "create" and status == 409:
            return "done", "", None  # a replay: this _id is already in the data stream
        if isinstance(status, int) and 400 <= status < 500 and status != 429:
            return "reject", _item_reason(status, info.get("error")), None
        return "retry", _item_reason(status, info.get("error")), None

    def _count(self, done: int, retry: int, rejected: int) -> None:
        for result, n in (("indexed", done), ("retry", retry), ("rejected", rejected)):
            if n:
                self.ctx.counters.inc(
                    "es_documents_total", n, component=self.ctx.component, result=result
                )


def _say(failure: Failure) -> str:
    status = failure.status if failure.status is not None else "no response"
    text = f"{status} {failure.reason}"
    if failure.status in (401, 403):
        text += " (check the credentials; the batch stays in the spool)"
    return text


def _item_reason(status: Any, error: Any) -> str:
    """``400 document_parsing_exception: failed to parse field [value] ...`` from a bulk item."""
    if isinstance(error, dict):
        text = f"{error.get('type')}: {error.get('reason')}"
        cause = error.get("caused_by")
        if isinstance(cause, dict) and cause.get("reason"):
            text += f" (caused by {cause.get('type')}: {cause.get('reason')})"
    else:
        text = str(error)
    return f"{status} {text}"

