"""ElasticsearchDouble: a TEST DOUBLE, not a search engine.

No Elasticsearch or OpenSearch server can run on the build machines, so the sink tests talk to
this real HTTP server (a thread, an OS-assigned port, optional TLS) that answers like
Elasticsearch 9 — or, with ``flavor="opensearch"``, like OpenSearch 2 — wherever a client can
tell the difference:

* ``GET /`` with the ``X-Elastic-Product: Elasticsearch`` header and a 9.x version (OpenSearch:
  ``version.distribution: opensearch`` and no product header, so the official client's product
  check fails exactly as it does against a real OpenSearch);
* OpenSearch answers 406 to the ``application/vnd.elasticsearch+json; compatible-with=9`` media
  type the official client sends with bodies;
* ``PUT /_index_template/<name>``; new indices take their mappings from the matching template
  (highest priority), so a document that does not fit (a string in a ``double`` field) gets the
  server's 400 ``document_parsing_exception`` (OpenSearch: ``mapper_parsing_exception``);
* ``POST /_bulk`` and ``/<index>/_bulk``: NDJSON, per-item statuses (201 created, 200 updated,
  400, 409 for ``create`` of an existing id, injected 429s), data streams (``create`` only,
  ``@timestamp`` required), injected whole-request 429/503 with ``Retry-After``;
* ``GET /<index>/_doc/<id>``, ``_count``, ``_search`` (match_all), ``_refresh``, ``DELETE``;
* optional auth: an exact ``Authorization`` value, or a SigV4 signature verified with botocore.

The state the tests assert on: :attr:`docs` (index -> id -> source) and :attr:`attempts` (how
many times each ``_id`` arrived in a bulk request).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import itertools
import json
import re
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

ItemRule = Callable[[str, str, dict[str, Any], int], tuple[int, str, str] | None]
"""(index, _id, source, attempt number from 1) -> (status, error type, reason) to fail an item."""

_COMPAT_RE = re.compile(r"compatible-with=(\d+)")


@dataclass
class SigV4Expectation:
    """Credentials the double checks SigV4 signatures against (as Amazon OpenSearch would)."""

    access_key: str
    secret_key: str
    region: str
    service: str = "es"


class _Reply(Exception):
    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


def _error(status: int, kind: str, reason: str, **extra: Any) -> dict[str, Any]:
    err = {"type": kind, "reason": reason, **extra}
    return {"error": {"root_cause": [{"type": kind, "reason": reason}], **err}, "status": status}


class ElasticsearchDouble:
    """Test double of an Elasticsearch 9 / OpenSearch 2 node (see the module docstring)."""

    def __init__(
        self,
        flavor: str = "elasticsearch",
        *,
        authorization: str | None = None,
        sigv4: SigV4Expectation | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        assert flavor in ("elasticsearch", "opensearch")
        self.flavor = flavor
        self.authorization = authorization
        self.sigv4 = sigv4
        self.tls = tls
        self.lock = threading.Lock()
        self.templates: dict[str, dict[str, Any]] = {}
        self.mappings: dict[str, dict[str, str]] = {}
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self.data_streams: set[str] = set()
        self.attempts: Counter[str] = Counter()
        self.bulk_sizes: list[int] = []
        """Documents per ``_bulk`` request that reached item processing."""
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        """(method, path, lower-cased headers, body) of every request, in arrival order."""
        self.item_rules: list[ItemRule] = []
        self._rejections: list[tuple[int, str | None]] = []
        self.max_content_length: int | None = None
        """Refuse a `_bulk` body above this many bytes with 413, like `http.max_content_length`."""
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    # ---- fault injection -------------------------------------------------------------------

    def throttle(self, doc_id: str, times: int = 1) -> None:
        """The first ``times`` attempts of ``doc_id`` get a per-item 429."""

        def rule(_index: str, did: str, _src: dict[str, Any], attempt: int) -> Any:
            if did == doc_id and attempt <= times:
                return 429, "es_rejected_execution_exception", "rejected execution of bulk item"
            return None

        self.item_rules.append(rule)

    def fail_item(self, doc_id: str, status: int, kind: str, reason: str) -> None:
        """Every attempt of ``doc_id`` fails with this item error."""
        self.item_rules.append(
            lambda _i, did, _s, _a: (status, kind, reason) if did == doc_id else None
        )

    def reject_bulk(
        self, times: int = 1, status: int = 429, retry_after: str | None = None
    ) -> None:
        """The next ``times`` bulk requests are refused as a whole (nothing is indexed)."""
        with self.lock:
            self._rejections.extend([(status, retry_after)] * times)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> ElasticsearchDouble:
        double = self

        class Handler(_Handler):
            owner = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections, like a node going away."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            conns, self._connections = set(self._connections), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def __enter__(self) -> ElasticsearchDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    # ---- views for assertions --------------------------------------------------------------

    def all_docs(self, pattern: str = "*") -> dict[str, dict[str, Any]]:
        """``_id`` -> source over every index matching ``pattern``."""
        with self.lock:
            out: dict[str, dict[str, Any]] = {}
            for index, docs in self.docs.items():
                if fnmatch.fnmatchcase(index, pattern):
                    out.update(docs)
            return out

    # ---- request handling (called from the handler thread) ---------------------------------

    def handle(self, method: str, target: str, headers: dict[str, str], body: bytes) -> _Reply:
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.lock:
            self.requests.append((method, path, headers, body))
        try:
            self._check_auth(method, target, headers, body)
            self._check_media_type(headers, body)
            return self._route(method, path, query, headers, body)
        except _Reply as reply:
            return reply

    def _check_auth(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        if self.sigv4 is not None:
            problem = _verify_sigv4(self.sigv4, method, target, headers, body)
            if problem:
                raise _Reply(403, {"message": problem})
        elif self.authorization is not None and headers.get("authorization") != self.authorization:
            raise _Reply(
                401,
                _error(401, "security_exception", "unable to authenticate user for REST request"),
                {"WWW-Authenticate": 'ApiKey, Basic realm="security", Bearer realm="security"'},
            )

    def _check_media_type(self, headers: dict[str, str], body: bytes) -> None:
        ctype = headers.get("content-type", "")
        if self.flavor == "opensearch" and body and "vnd.elasticsearch" in ctype:
            raise _Reply(
                406, {"error": f"Content-Type header [{ctype}] is not supported", "status": 406}
            )

    def _route(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> _Reply:
        segs = [s for s in path.split("/") if s]
        if not segs and method in ("GET", "HEAD"):
            return _Reply(200, self._info())
        if segs[:1] == ["_index_template"] and len(segs) == 2:
            return self._template(method, segs[1], body)
        if segs and segs[-1] == "_bulk" and method in ("POST", "PUT") and len(segs) <= 2:
            return self._bulk(segs[0] if len(segs) == 2 else None, body)
        if len(segs) == 3 and segs[1] == "_doc" and method == "GET":
            return self._get_doc(segs[0], segs[2])
        if len(segs) == 2 and segs[1] in ("_count", "_search", "_refresh"):
            return self._read(segs[0], segs[1], query, body)
        if len(segs) == 1 and method == "DELETE":
            with self.lock:
                gone = [i for i in self.docs if fnmatch.fnmatchcase(i, segs[0])]
                for index in gone:
                    del self.docs[index]
                    self.mappings.pop(index, None)
            return _Reply(200, {"acknowledged": True})
        return _Reply(
            400, _error(400, "illegal_argument_exception", f"no handler for [{method} {path}]")
        )

    def _info(self) -> dict[str, Any]:
        if self.flavor == "opensearch":
            return {
                "name": "os-double", "cluster_name": "double",
                "version": {"distribution": "opensearch", "number": "2.19.0",
                            "minimum_wire_compatibility_version": "7.10.0"},
                "tagline": "The OpenSearch Project: https://opensearch.org/",
            }
        return {
            "name": "es-double", "cluster_name": "double",
            "version": {"number": "9.1.0", "build_flavor": "default", "lucene_version": "10.2.2",
                        "minimum_wire_compatibility_version": "8.19.0"},
            "tagline": "You Know, for Search",
        }

    def _template(self, method: str, name: str, body: bytes) -> _Reply:
        with self.lock:
            if method == "PUT":
                tpl = json.loads(body)
                if not isinstance(tpl.get("index_patterns"), list | str):
                    raise _Reply(400, _error(400, "action_request_validation_exception",
                                             "Validation Failed: 1: index patterns are missing;"))
                self.templates[name] = tpl
                return _Reply(200, {"acknowledged": True})
            if method == "DELETE":
                self.templates.pop(name, None)
                return _Reply(200, {"acknowledged": True})
            if name not in self.templates:
                raise _Reply(404, _error(404, "resource_not_found_exception",
                                         f"index template matching [{name}] not found"))
            return _Reply(200, {"index_templates": [
                {"name": name, "index_template": self.templates[name]}]})

    def _matching_template(self, index: str) -> dict[str, Any] | None:
        best: dict[str, Any] | None = None
        for tpl in self.templates.values():
            pats = tpl["index_patterns"]
            pats = [pats] if isinstance(pats, str) else pats
            if any(fnmatch.fnmatchcase(index, p) for p in pats) and (
                best is None or tpl.get("priority", 0) > best.get("priority", 0)
            ):
                best = tpl
        return best

    def _ensure_index(self, index: str) -> None:
        if index in self.mappings:
            return
        tpl = self._matching_template(index) or {}
        props = (tpl.get("template") or {}).get("mappings", {}).get("properties", {})
        self.mappings[index] = {k: v.get("type", "object") for k, v in props.items()}
        self.docs[index] = {}
        if "data_stream" in tpl:
            self.data_streams.add(index)

    def _bulk(self, path_index: str | None, body: bytes) -> _Reply:
        limit = self.max_content_length
        if limit is not None and len(body) > limit:  # the server's http.max_content_length
            raise _Reply(413, _error(413, "content_too_long_exception",
                                     f"request of {len(body)} bytes above {limit}"))
        with self.lock:
            if self._rejections:
                status, retry_after = self._rejections.pop(0)
                kind = ("es_rejected_execution_exception" if status == 429
                        else "cluster_block_exception")
                headers = {"Retry-After": retry_after} if retry_after else {}
                raise _Reply(status, _error(status, kind, "injected whole-request failure"),
                             headers)
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        items: list[dict[str, Any]] = []
        i = 0
        with self.lock:
            while i < len(lines):
                action = json.loads(lines[i])
                (op, meta), = action.items()
                source = json.loads(lines[i + 1]) if op != "delete" else {}
                i += 1 if op == "delete" else 2
                items.append({op: self._item(op, meta, source, path_index)})
            self.bulk_sizes.append(len(items))
        errors = any(next(iter(it.values()))["status"] >= 300 for it in items)
        return _Reply(200, {"took": 1, "errors": errors, "items": items})

    def _item(
        self, op: str, meta: dict[str, Any], source: dict[str, Any], path_index: str | None
    ) -> dict[str, Any]:
        index = meta.get("_index") or path_index or ""
        doc_id = str(meta.get("_id") or f"auto-{next(self._ids)}")
        self.attempts[doc_id] += 1
        head = {"_index": index, "_id": doc_id}

        def fail(status: int, kind: str, reason: str, **extra: Any) -> dict[str, Any]:
            return {**head, "status": status, "error": {"type": kind, "reason": reason, **extra}}

        for rule in self.item_rules:
            hit = rule(index, doc_id, source, self.attempts[doc_id])
            if hit:
                return fail(*hit)
        if op not in ("index", "create"):
            return fail(400, "illegal_argument_exception", f"unsupported op [{op}]")
        self._ensure_index(index)
        existing = self.docs[index].get(doc_id)
        if index in self.data_streams:
            if op != "create":
                return fail(400, "illegal_argument_exception",
                            "only write ops with an op_type of create are allowed in data streams")
            if "@timestamp" not in source:
                return fail(400, self._parse_error_type(),
                            "data stream timestamp field [@timestamp] is missing")
        if op == "create" and existing is not None:
            return fail(409, "version_conflict_engine_exception",
                        f"[{doc_id}]: version conflict, document already exists "
                        "(current version [1])")
        problem = self._mapping_problem(index, doc_id, source)
        if problem:
            return fail(400, self._parse_error_type(), problem[0], caused_by=problem[1])
        self.docs[index][doc_id] = source
        version = 1 if existing is None else 2
        return {**head, "_version": version, "result": "created" if existing is None else
                "updated", "status": 201 if existing is None else 200,
                "_shards": {"total": 1, "successful": 1, "failed": 0},
                "_seq_no": 0, "_primary_term": 1}

    def _parse_error_type(self) -> str:
        return ("mapper_parsing_exception" if self.flavor == "opensearch"
                else "document_parsing_exception")

    def _mapping_problem(
        self, index: str, doc_id: str, source: dict[str, Any]
    ) -> tuple[str, dict[str, str]] | None:
        mapping = self.mappings[index]
        learned: dict[str, str] = {}
        for field, value in source.items():
            if value is None:
                continue
            kind = mapping.get(field) or learned.get(field) or _dynamic_type(value)
            cause = _type_problem(kind, value)
            if cause:
                where = "[1:2] " if self.flavor == "elasticsearch" else ""
                reason = (f"{where}failed to parse field [{field}] of type [{kind}] in document "
                          f"with id '{doc_id}'. Preview of field's value: '{value}'")
                return reason, cause
            learned[field] = kind
        for field, kind in learned.items():
            mapping.setdefault(field, kind)
        return None

    def _get_doc(self, index: str, doc_id: str) -> _Reply:
        with self.lock:
            doc = self.docs.get(index, {}).get(doc_id)
        if doc is None:
            raise _Reply(404, {"_index": index, "_id": doc_id, "found": False})
        return _Reply(200, {"_index": index, "_id": doc_id, "found": True, "_source": doc})

    def _read(self, pattern: str, what: str, query: dict[str, str], body: bytes) -> _Reply:
        with self.lock:
            hits = [
                {"_index": index, "_id": did, "_source": src}
                for index, docs in sorted(self.docs.items())
                if any(fnmatch.fnmatchcase(index, p) for p in pattern.split(","))
                for did, src in docs.items()
            ]
        if what == "_refresh":
            return _Reply(200, {"_shards": {"total": 1, "successful": 1, "failed": 0}})
        if what == "_count":
            return _Reply(200, {"count": len(hits)})
        size = int(query.get("size") or (json.loads(body) if body else {}).get("size", 10))
        return _Reply(200, {"hits": {"total": {"value": len(hits), "relation": "eq"},
                                     "hits": hits[:size]}})


def _dynamic_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "double"
    return "keyword"


def _type_problem(kind: str, value: Any) -> dict[str, str] | None:
    """Why ``value`` does not fit a field of ``kind`` (None: it fits), as the server says it."""
    if kind in ("double", "float", "long", "integer"):
        if isinstance(value, bool | dict | list):
            return {"type": "illegal_argument_exception", "reason": "not a number"}
        try:
            float(value)
        except (TypeError, ValueError):
            return {"type": "number_format_exception", "reason": f'For input string: "{value}"'}
    elif kind == "date":
        if isinstance(value, int):
            return None
        try:
            datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return {"type": "illegal_argument_exception",
                    "reason": f"failed to parse date field [{value}]"}
    elif kind == "boolean":
        if value not in (True, False, "true", "false"):
            return {"type": "illegal_argument_exception",
                    "reason": f"Failed to parse value [{value}] as only [true] or [false] "
                    "are allowed."}
    elif kind == "keyword" and isinstance(value, dict):
        return {"type": "illegal_argument_exception", "reason": "object for a keyword field"}
    return None


def _verify_sigv4(
    expect: SigV4Expectation, method: str, target: str, headers: dict[str, str], body: bytes
) -> str | None:
    """Recompute the request's SigV4 signature with botocore; a message when it does not match."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    auth = headers.get("authorization", "")
    m = re.match(
        r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
        r"SignedHeaders=([^,]+), Signature=([0-9a-f]+)$", auth)
    if not m:
        return "missing or malformed SigV4 Authorization header"
    akid, _day, region, service, signed, signature = m.groups()
    if (akid, region, service) != (expect.access_key, expect.region, expect.service):
        return f"credential scope {akid}/{region}/{service} is not the expected one"
    if headers.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
        return "x-amz-content-sha256 does not match the body"
    names = signed.split(";")
    request = AWSRequest(method=method, url=f"http://{headers.get('host', '')}{target}",
                         data=body, headers={n: headers.get(n, "") for n in names})
    request.context["timestamp"] = headers.get("x-amz-date", "")
    signer = SigV4Auth(Credentials(expect.access_key, expect.secret_key), service, region)
    with contextlib.suppress(Exception):
        canonical = signer.canonical_request(request)
        if signer.signature(signer.string_to_sign(request, canonical), request) == signature:
            return None
    return "The request signature we calculated does not match the signature you provided."


class _Handler(BaseHTTPRequestHandler):
    owner: ElasticsearchDouble
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.owner.lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.owner.lock:
            self.owner._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.owner.handle(self.command, self.path, headers, body)
        accept = headers.get("accept", "")
        compat = _COMPAT_RE.search(accept)
        ctype = (f"application/vnd.elasticsearch+json;compatible-with={compat.group(1)}"
                 if compat and self.owner.flavor == "elasticsearch" else "application/json")
        data = b"" if self.command == "HEAD" else json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if self.owner.flavor == "elasticsearch":
            self.send_header("X-Elastic-Product", "Elasticsearch")
        for key, value in reply.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve
