"""The two client flavours behind the ``elasticsearch`` sink, and telling the servers apart.

The official ``elasticsearch`` client refuses any server that does not answer with
``X-Elastic-Product: Elasticsearch`` and sends ``compatible-with`` media types OpenSearch does
not accept, so OpenSearch (and Amazon OpenSearch Service, which needs SigV4) gets
``opensearch-py``. Both expose the same bulk helper (``async_streaming_bulk``), so the sink only
sees a :class:`Backend`.

Retries: the client's own retries are limited to moving to the next host on a dead connection;
statuses (429/5xx) are never retried here because the runtime's spool owns backoff.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from collector.errors import MissingDependencyError, PermanentSinkError

if TYPE_CHECKING:
    from sinks.elasticsearch import ElasticsearchSinkConfig

PLUGIN = "elasticsearch"


@dataclass(frozen=True)
class Failure:
    """A client exception reduced to what the error mapping needs."""

    status: int | None
    """HTTP status, None when no response arrived (connection refused, TLS, timeout)."""
    reason: str
    retry_after: float | None = None


def _retry_after(headers: Any) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta form; a date is ignored)."""
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _error_text(body: Any, fallback: str) -> str:
    """``type: reason`` from an Elasticsearch-style error body."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            root = (err.get("root_cause") or [err])[0]
            kind, why = root.get("type"), root.get("reason")
            if kind or why:
                return f"{kind}: {why}"
        if isinstance(err, str):
            return err
    return fallback


class Backend:
    """One connected client: probe, template, bulk, close."""

    flavor: str = ""
    client: Any

    async def info(self) -> dict[str, Any]:
        raise NotImplementedError

    async def put_template(self, name: str, body: dict[str, Any]) -> None:
        raise NotImplementedError

    def streaming_bulk(
        self, actions: Iterable[dict[str, Any]], *, max_docs: int, max_bytes: int
    ) -> AsyncIterator[tuple[bool, dict[str, Any]]]:
        raise NotImplementedError

    async def close(self) -> None:
        await self.client.close()


def _common_tls(cfg: ElasticsearchSinkConfig) -> dict[str, Any]:
    tls: dict[str, Any] = {"verify_certs": cfg.verify_certs}
    for key in ("ca_certs", "client_cert", "client_key"):
        if getattr(cfg, key):
            tls[key] = getattr(cfg, key)
    return tls


class ElasticsearchBackend(Backend):
    """``AsyncElasticsearch`` and ``elasticsearch.helpers.async_streaming_bulk``."""

    flavor = "elasticsearch"

    def __init__(self, cfg: ElasticsearchSinkConfig) -> None:
        _require("elasticsearch", "es")
        from elasticsearch import AsyncElasticsearch

        kwargs: dict[str, Any] = {
            "hosts": list(cfg.hosts),
            "request_timeout": cfg.request_timeout,
            "max_retries": len(cfg.hosts) - 1,
            "retry_on_status": (),
            "retry_on_timeout": False,
            **_common_tls(cfg),
        }
        if cfg.api_key is not None:
            kwargs["api_key"] = cfg.api_key.get_secret_value()
        elif cfg.bearer_token is not None:
            kwargs["bearer_auth"] = cfg.bearer_token.get_secret_value()
        elif cfg.username is not None and cfg.password is not None:
            kwargs["basic_auth"] = (cfg.username, cfg.password.get_secret_value())
        self.client = AsyncElasticsearch(**kwargs)

    async def info(self) -> dict[str, Any]:
        return dict((await self.client.info()).body)

    async def put_template(self, name: str, body: dict[str, Any]) -> None:
        await self.client.indices.put_index_template(name=name, body=body)

    def streaming_bulk(
        self, actions: Iterable[dict[str, Any]], *, max_docs: int, max_bytes: int
    ) -> AsyncIterator[tuple[bool, dict[str, Any]]]:
        from elasticsearch.helpers import async_streaming_bulk

        return async_streaming_bulk(
            self.client, actions, chunk_size=max_docs, max_chunk_bytes=max_bytes,
            raise_on_error=False, raise_on_exception=False, max_retries=0, yield_ok=True,
        )


class OpenSearchBackend(Backend):
    """``AsyncOpenSearch`` (opensearch-py) and its ``async_streaming_bulk``; SigV4 for AWS."""

    flavor = "opensearch"

    def __init__(self, cfg: ElasticsearchSinkConfig) -> None:
        _require("opensearchpy", "opensearch")
        from opensearchpy import AsyncHttpConnection, AsyncOpenSearch

        kwargs: dict[str, Any] = {
            "hosts": list(cfg.hosts),
            # the default AIOHttpConnection cannot call a request signer; this one can
            "connection_class": AsyncHttpConnection,
            "timeout": cfg.request_timeout,
            "max_retries": len(cfg.hosts) - 1,
            "retry_on_status": (),
            "retry_on_timeout": False,
            **_common_tls(cfg),
        }
        if cfg.aws_sigv4 is not None:
            kwargs["http_auth"] = _sigv4_auth(cfg.aws_sigv4.region, cfg.aws_sigv4.service)
        elif cfg.api_key is not None:
            kwargs["headers"] = {"authorization": f"ApiKey {cfg.api_key.get_secret_value()}"}
        elif cfg.bearer_token is not None:
            token = cfg.bearer_token.get_secret_value()
            kwargs["headers"] = {"authorization": f"Bearer {token}"}
        elif cfg.username is not None and cfg.password is not None:
            kwargs["http_auth"] = (cfg.username, cfg.password.get_secret_value())
        self.client = AsyncOpenSearch(**kwargs)

    async def info(self) -> dict[str, Any]:
        return dict(await self.client.info())

    async def put_template(self, name: str, body: dict[str, Any]) -> None:
        await self.client.indices.put_index_template(name=name, body=body)

    def streaming_bulk(
        self, actions: Iterable[dict[str, Any]], *, max_docs: int, max_bytes: int
    ) -> AsyncIterator[tuple[bool, dict[str, Any]]]:
        from opensearchpy.helpers import async_streaming_bulk

        return async_streaming_bulk(
            self.client, actions, chunk_size=max_docs, max_chunk_bytes=max_bytes,
            raise_on_error=False, raise_on_exception=False, max_retries=0, yield_ok=True,
        )


def describe(exc: BaseException) -> Failure | None:
    """A :class:`Failure` for either client's exceptions, None for anything else.

    Looks only at libraries already imported, so a bare install never imports a client here.
    """
    if "elastic_transport" in sys.modules:
        from elastic_transport import TransportError
        from elasticsearch import ApiError

        if isinstance(exc, ApiError):
            return Failure(
                status=exc.meta.status,
                reason=_error_text(exc.body, exc.message),
                retry_after=_retry_after(exc.meta.headers),
            )
        if isinstance(exc, TransportError):
            return Failure(status=None, reason=f"{type(exc).__name__}: {exc.message}")
    if "opensearchpy" in sys.modules:
        from opensearchpy import TransportError as OsTransportError

        if isinstance(exc, OsTransportError):
            status = exc.status_code if isinstance(exc.status_code, int) else None
            fallback = str(exc.error) if status is not None else f"{type(exc).__name__}: {exc}"
            return Failure(status=status, reason=_error_text(exc.info, fallback))
    return None


def _sigv4_auth(region: str, service: str) -> Any:
    """SigV4 request signer from botocore's default credential chain (env, profile, role)."""
    _require("botocore", "aws")
    import botocore.session
    from opensearchpy import AWSV4SignerAsyncAuth

    credentials = botocore.session.get_session().get_credentials()
    if credentials is None:
        raise PermanentSinkError(
            "aws_sigv4: no AWS credentials found (env, shared profile, container or instance role)"
        )
    return AWSV4SignerAsyncAuth(credentials, region, service)


def _require(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(PLUGIN, module, extra)


def _distribution(body: Any) -> str:
    """``version.distribution`` of a ``GET /`` answer; Elasticsearch leaves it out."""
    if isinstance(body, dict) and isinstance(body.get("version"), dict):
        return str(body["version"].get("distribution") or "elasticsearch")
    return "unknown"


async def connect(cfg: ElasticsearchSinkConfig) -> tuple[Backend, dict[str, Any]]:
    """The backend for ``cfg.flavor`` and the server's ``GET /`` answer.

    ``auto`` asks with the Elasticsearch client when it is installed: an OpenSearch server fails
    its product check, and the refused answer still carries ``version.distribution``.
    """
    flavor = "opensearch" if cfg.aws_sigv4 is not None else cfg.flavor
    if flavor == "auto" and importlib.util.find_spec("elasticsearch") is None:
        flavor = "opensearch"
    if flavor == "opensearch":
        backend: Backend = OpenSearchBackend(cfg)
        if cfg.aws_sigv4 is not None and cfg.aws_sigv4.service == "aoss":
            # OpenSearch Serverless has no `GET /`; the first bulk proves the connection.
            return backend, {"version": {"distribution": "opensearch", "number": "serverless"}}
        info = await _probe(backend)
        if cfg.flavor == "auto" and cfg.aws_sigv4 is None and _distribution(info) != "opensearch":
            await backend.close()
            raise MissingDependencyError(PLUGIN, "elasticsearch", "es")
        return backend, info
    backend = ElasticsearchBackend(cfg)
    from elasticsearch import UnsupportedProductError

    try:
        return backend, await _probe(backend)
    except UnsupportedProductError as exc:  # _probe has closed the client
        dist = _distribution(exc.body)
        if flavor == "auto" and dist == "opensearch":
            backend = OpenSearchBackend(cfg)
            return backend, await _probe(backend)
        hint = " (set `flavor: opensearch` or `auto`)" if dist == "opensearch" else ""
        raise PermanentSinkError(
            f"the server is {dist}, not Elasticsearch{hint}"
        ) from None


async def _probe(backend: Backend) -> dict[str, Any]:
    try:
        return await backend.info()
    except BaseException:
        await backend.close()
        raise
