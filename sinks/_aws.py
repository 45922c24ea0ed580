"""What every AWS sink shares: config fields, the aiobotocore session and the error mapping.

Credentials come only from botocore's default chain (env, shared profile, container provider,
instance role). On Greengrass v2 the token exchange service sets
``AWS_CONTAINER_CREDENTIALS_FULL_URI`` and ``AWS_CONTAINER_AUTHORIZATION_TOKEN``, which botocore's
container provider already reads and refreshes, so no custom credentials code lives here.

Retries: botocore's ``standard`` mode with a small ``max_attempts`` absorbs a throttled or dropped
call within one ``write``; anything still failing becomes a ``SinkError`` so the runtime's spool
(durable, with backoff) owns the long wait instead of a sink blocking in a loop.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pydantic import Field

from collector.errors import PermanentSinkError, SinkError, TransientSinkError
from collector.plugin import SinkConfig
from collector.units import Duration

if TYPE_CHECKING:
    from aiobotocore.session import AioSession

REQUIRES = {"aiobotocore": "aws"}

THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "InternalFailure",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)
"""Error codes that mean "later", whatever the HTTP status the service chose for them."""

FIXABLE_CODES = frozenset(
    {
        "NoSuchBucket",
        "ResourceNotFoundException",
        "AccessDenied",
        "AccessDeniedException",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "InvalidToken",
        "KMS.AccessDeniedException",
        "KMS.DisabledException",
        "KMS.NotFoundException",
        "KMS.InvalidStateException",
        "KMS.ThrottlingException",
        "KMS.OptInRequired",
        "ResourceInUseException",
    }
)
"""Errors an operator fixes without touching the data (a missing bucket or stream, IAM, expired
credentials being rotated): the batch stays in the spool instead of going to the dead-letter
file, and the message says what to fix. ``spool.max_retries`` bounds the wait if wanted."""


class AwsSinkConfig(SinkConfig):
    """Fields every AWS sink accepts."""

    region: str | None = Field(
        default=None,
        description="AWS region; default: botocore's chain (AWS_REGION, AWS_DEFAULT_REGION, "
        "profile).",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Endpoint override (moto, LocalStack, a VPC endpoint); default: AWS.",
    )
    profile: str | None = Field(
        default=None,
        description="Shared-config profile; default: the default credential chain (env, "
        "profile, Greengrass token exchange / container credentials, instance role).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=10,
        description="Attempts per API call in botocore's `standard` retry mode, before the "
        "runtime's spool backoff takes over.",
    )
    connect_timeout: Duration = Field(default=5.0, gt=0, description="TCP connect timeout.")
    read_timeout: Duration = Field(default=30.0, gt=0, description="Response read timeout.")


def deadline(config: AwsSinkConfig) -> float:
    """Seconds one ``write`` may take before the runtime gives up on it as "no answer".

    botocore's timeouts bound each attempt; a write makes a few calls (partitions, chunks), so
    twice the worst single call: all attempts each waiting their connect and read timeouts.
    """
    return 2.0 * config.max_attempts * (config.connect_timeout + config.read_timeout)


def session(config: AwsSinkConfig) -> AioSession:
    """An aiobotocore session on the default credential chain (optionally a named profile)."""
    from aiobotocore.session import AioSession

    return AioSession(profile=config.profile) if config.profile else AioSession()


def client_config(config: AwsSinkConfig, **extra: Any) -> Any:
    """botocore client config: standard retry mode, bounded attempts, timeouts."""
    from aiobotocore.config import AioConfig

    return AioConfig(
        retries={"mode": "standard", "total_max_attempts": config.max_attempts},
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        **extra,
    )


async def open_client(
    stack: contextlib.AsyncExitStack, service: str, config: AwsSinkConfig, **extra: Any
) -> Any:
    """An aiobotocore client for ``service`` whose lifetime is ``stack``'s."""
    from botocore.exceptions import BotoCoreError

    try:
        return await stack.enter_async_context(
            session(config).create_client(
                service,
                region_name=config.region,
                endpoint_url=config.endpoint_url,
                config=client_config(config, **extra),
            )
        )
    except BotoCoreError as exc:  # NoRegionError, ProfileNotFound, ...
        raise TransientSinkError(f"cannot create the {service} client: {exc}") from exc


def error_code(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ``ClientError``; ("", 0) for anything else."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def classify(exc: BaseException, what: str) -> SinkError:
    """The ``SinkError`` kind for a botocore/aiohttp failure of ``what`` (e.g. "s3 put").

    Connection problems, 5xx, throttling and fixable config errors (missing bucket/stream, IAM,
    credentials) are transient: the data waits in the spool. Other 4xx mean the service will
    never accept this request as is: permanent, the rows go to the dead-letter file.
    """
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, SinkError):
        return exc
    if isinstance(exc, ClientError):
        code, status = error_code(exc)
        headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}
        retry_after = _retry_after(headers.get("retry-after"))
        message = f"{what}: {code or status} {exc.response.get('Error', {}).get('Message', '')}"
        if code in FIXABLE_CODES:
            return TransientSinkError(f"{message.strip()} (fix the config/IAM; data is kept)")
        if code in THROTTLING_CODES or status >= 500 or status in (0, 408, 429):
            return TransientSinkError(message.strip(), retry_after=retry_after)
        return PermanentSinkError(message.strip())
    if isinstance(exc, NoCredentialsError):
        return TransientSinkError(
            f"{what}: no AWS credentials found in the default chain (env, profile, "
            "container/Greengrass token exchange, instance role)"
        )
    if isinstance(exc, BotoCoreError | OSError | TimeoutError):
        return TransientSinkError(f"{what}: {type(exc).__name__}: {exc}")
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return TransientSinkError(f"{what}: {type(exc).__name__}: {exc}")
    except ImportError:  # pragma: no cover - aiohttp comes with aiobotocore
        pass
    return TransientSinkError(f"{what}: unexpected {type(exc).__name__}: {exc}")


def _retry_after(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
