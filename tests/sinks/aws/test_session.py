"""The shared session: default chain incl. Greengrass token exchange, retry mode, error mapping."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from collector.errors import PermanentSinkError, TransientSinkError
from sinks import _aws
from sinks.s3 import S3Config


class _Credentials(BaseHTTPRequestHandler):
    """Serves credential JSON like Greengrass's token exchange service, if the token matches."""

    requests: list[dict[str, str]] = []

    def do_GET(self) -> None:
        self.requests.append({"path": self.path, "auth": self.headers.get("Authorization", "")})
        if self.headers.get("Authorization") != "gg-token-123":
            self.send_response(403)
            self.end_headers()
            return
        body = json.dumps(
            {
                "AccessKeyId": "ASIAGREENGRASS",
                "SecretAccessKey": "gg-secret",
                "Token": "gg-session-token",
                "Expiration": (datetime.now(UTC) + timedelta(hours=1)).strftime(
                    "%Y-%m-%dT%H:%M:%SZ"
                ),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def token_exchange(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[dict]]:
    """A loopback credential endpoint and exactly the env Greengrass v2 gives a component."""
    handler = type("H", (_Credentials,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv(
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        f"http://127.0.0.1:{server.server_address[1]}/2016-11-01/credentialprovider/",
    )
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN", "gg-token-123")
    try:
        yield handler.requests
    finally:
        server.shutdown()
        server.server_close()


async def test_session_uses_greengrass_container_credentials(token_exchange: list[dict]):
    cfg = S3Config(type="s3", bucket="abc", region="eu-west-1")
    creds = await _aws.session(cfg).get_credentials()
    assert creds is not None
    frozen = await creds.get_frozen_credentials()
    assert frozen.access_key == "ASIAGREENGRASS"
    assert frozen.secret_key == "gg-secret"
    assert frozen.token == "gg-session-token"
    assert token_exchange == [
        {"path": "/2016-11-01/credentialprovider/", "auth": "gg-token-123"}
    ]


async def test_client_signs_with_container_credentials(token_exchange: list[dict]):
    """A client built by _aws signs real requests with the token-exchange key."""
    seen: list[str] = []
    import contextlib

    cfg = S3Config(type="s3", bucket="abc", region="eu-west-1",
                   endpoint_url="http://127.0.0.1:9")
    async with contextlib.AsyncExitStack() as stack:
        client = await _aws.open_client(stack, "s3", cfg)

        def capture(request: Any, **_: Any) -> Any:
            seen.append(request.headers["Authorization"].decode()
                        if isinstance(request.headers["Authorization"], bytes)
                        else request.headers["Authorization"])
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9")

        client.meta.events.register("before-send.s3.ListBuckets", capture)
        with pytest.raises(EndpointConnectionError):
            await client.list_buckets()
    assert seen and "Credential=ASIAGREENGRASS/" in seen[0]


def test_client_config_standard_retries():
    cfg = S3Config(type="s3", bucket="abc", max_attempts=4, connect_timeout="2s")
    conf = _aws.client_config(cfg)
    assert conf.retries == {"mode": "standard", "total_max_attempts": 4}
    assert conf.connect_timeout == 2.0


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"},
         "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {"retry-after": "3"}}},
        "PutObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("SlowDown", 503, TransientSinkError),
        ("ServiceUnavailableException", 400, TransientSinkError),
        ("InternalError", 500, TransientSinkError),
        ("NoSuchBucket", 404, TransientSinkError),
        ("AccessDenied", 403, TransientSinkError),
        ("ExpiredToken", 400, TransientSinkError),
        ("InvalidArgument", 400, PermanentSinkError),
        ("EntityTooLarge", 400, PermanentSinkError),
    ],
)
def test_error_mapping(code: str, status: int, kind: type):
    err = _aws.classify(_client_error(code, status), "s3 put")
    assert type(err) is kind
    assert code in str(err)


def test_connection_errors_are_transient():
    err = _aws.classify(EndpointConnectionError(endpoint_url="http://x"), "firehose")
    assert isinstance(err, TransientSinkError)
    assert _aws.classify(_client_error("SlowDown", 503), "s3").retry_after == 3.0
