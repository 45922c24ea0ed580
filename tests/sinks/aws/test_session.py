"""The shared session: default chain incl. Greengrass token exchange, retry mode, error mapping."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from collector.errors import PermanentSinkError, TransientSinkError
from collector.testing import fake_token_exchange
from sinks import _aws
from sinks.s3 import S3Config


@pytest.fixture
def token_exchange(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[list[dict]]:
    """A loopback credential endpoint and exactly the env Greengrass v2 gives a component."""
    with fake_token_exchange(token="gg-token-123") as tes:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                    "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for var, value in tes.env.items():
            monkeypatch.setenv(var, value)
        yield tes.requests


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
