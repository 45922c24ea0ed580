"""A model file that lives in S3 (Greengrass's "ML resource"): a local copy kept in step with it.

``model.path: s3://bucket/key.onnx`` is downloaded to ``data_dir/models/<component>/`` with a
sidecar ``<file>.json`` naming the ETag and VersionId it came from. Every ``reload_every`` the
transform asks :meth:`RemoteModel.refresh`, which sends one HEAD; only a changed ETag/VersionId
downloads (that exact version) to a temp name, smoke-tests it with the caller's loader, fsyncs
and renames it over the local copy. The transform's own mtime/size hot swap then picks the new
file up, so there is one swap mechanism for local and remote models.

Failure rules, so the device never stops for the cloud:

- S3 unreachable / access denied: counted (``model_fetch_failures_total``), logged once per
  distinct reason, the last good local copy keeps serving; at start-up the last downloaded copy
  is used. Only a first start with no copy at all is an error.
- A new version that fails its smoke test is counted (``model_reload_failures_total``), never
  renamed into place, and not downloaded again until the object changes once more.

boto3 is imported lazily (the ``aws`` extra); credentials come from botocore's default chain
(env, profile, Greengrass token exchange, instance role), as the S3 sink's do.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

S3_PREFIX = "s3://"


def is_remote(path: str) -> bool:
    return path.startswith(S3_PREFIX)


def split_s3(url: str) -> tuple[str, str]:
    """("bucket", "key") of ``s3://bucket/key``; ValueError when either is missing."""
    bucket, _, key = url.removeprefix(S3_PREFIX).partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ValueError(f"{url!r} is not s3://bucket/key")
    return bucket, key


class FetchError(Exception):
    """S3 could not be asked or read (network, credentials, missing object)."""


@dataclass(frozen=True)
class Version:
    """What identifies one object version: its ETag and (in a versioned bucket) VersionId."""

    etag: str
    version_id: str | None

    def describe(self) -> str:
        return f"etag {self.etag}" + (f", version {self.version_id}" if self.version_id else "")


@dataclass(frozen=True)
class S3Settings:
    """Where and as whom to ask S3 (the AWS sinks' fields of the same names)."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    max_attempts: int = 2


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "model"


class RemoteModel:
    """The local copy of one S3 model object and the logic that keeps it current."""

    def __init__(self, url: str, data_dir: Path, component: str, settings: S3Settings) -> None:
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.settings = settings
        folder = Path(data_dir) / "models" / _safe(component)
        self.local = folder / _safe(self.key.rsplit("/", 1)[-1])
        self.meta_path = self.local.with_name(self.local.name + ".json")
        self.rejected: Version | None = None
        self._client: Any = None

    # -- state on disk -----------------------------------------------------------------------

    def current(self) -> Version | None:
        """The version the local copy came from (None: no copy, or one we cannot vouch for)."""
        if not self.local.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("url") != self.url or not isinstance(meta.get("etag"), str):
            return None
        return Version(meta["etag"], meta.get("version_id"))

    # -- S3 ----------------------------------------------------------------------------------

    def _s3(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise FetchError(
                    "an s3:// model needs boto3: pip install 'edge-collector[aws]'"
                ) from None
            s = self.settings
            session = (
                boto3.session.Session(profile_name=s.profile)
                if s.profile
                else boto3.session.Session()
            )
            self._client = session.client(
                "s3",
                region_name=s.region,
                endpoint_url=s.endpoint_url,
                config=Config(
                    retries={"mode": "standard", "total_max_attempts": s.max_attempts},
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                ),
            )
        return self._client

    def remote_version(self) -> Version:
        """HEAD the object: its current ETag and VersionId."""
        try:
            head = self._s3().head_object(Bucket=self.bucket, Key=self.key)
        except FetchError:
            raise
        except Exception as exc:
            raise FetchError(_why(exc)) from None
        return Version(str(head.get("ETag", "")).strip('"'), head.get("VersionId"))

    def refresh(self, check: Callable[[Path], None]) -> Version | None:
        """Download the object when it differs from the local copy; the new version or None.

        ``check(path)`` loads and smoke-tests a candidate file and raises when it is not a
        usable model: a failing version is remembered in ``rejected`` and raised as
        ``ValueError``; S3 trouble raises ``FetchError``. The local copy changes only by an
        atomic rename of a file that passed ``check``.
        """
        remote = self.remote_version()
        if remote == self.current() or remote == self.rejected:
            return None
        self.local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=".download-", suffix=self.local.suffix, dir=self.local.parent
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                extra = {"VersionId": remote.version_id} if remote.version_id else {}
                try:
                    body = self._s3().get_object(Bucket=self.bucket, Key=self.key, **extra)["Body"]
                    for chunk in iter(lambda: body.read(1 << 20), b""):
                        fh.write(chunk)
                except Exception as exc:
                    raise FetchError(_why(exc)) from None
                fh.flush()
                os.fsync(fh.fileno())
            try:
                check(tmp)
            except Exception as exc:
                self.rejected = remote
                raise ValueError(f"{self.url} ({remote.describe()}): {exc}") from None
            os.replace(tmp, self.local)
            self._write_meta(remote)
            _fsync_dir(self.local.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.rejected = None
        return remote

    def _write_meta(self, version: Version) -> None:
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        tmp.write_text(
            json.dumps({"url": self.url, "etag": version.etag, "version_id": version.version_id}),
            encoding="utf-8",
        )
        os.replace(tmp, self.meta_path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _why(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("Error"):
        err = response["Error"]
        return f"{err.get('Code', '')} {err.get('Message', '')}".strip() or type(exc).__name__
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
