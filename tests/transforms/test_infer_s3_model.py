"""`model.path: s3://…`: download, swap on a new object version, keep running when S3 is gone.

A real moto server over HTTP with a versioned bucket; the device reaches it through a TCP
forwarder the test can take down (connection refused, open connections cut), which is what an
edge device sees when its uplink drops.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from collector.errors import ConfigError
from collector.plugin import Context
from collector.testing import FakeClock, free_port
from collector.transforms.infer import InferConfig, InferTransform, validate_model_file
from sample_data import make_camera
from tests.sinks.aws.conftest import admin

from .test_infer_image import SAMPLE_MODEL, image_rows, sample_infer


def s3_admin(url: str) -> Any:
    return admin("s3", url)


class Forwarder:
    """A threaded TCP forwarder to the moto server that can be switched off and on."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: socketserver.ThreadingTCPServer | None = None
        self._socks: set[socket.socket] = set()

    def up(self) -> None:
        forwarder = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    upstream = socket.create_connection(forwarder.target)
                except OSError:
                    return
                forwarder._socks |= {self.request, upstream}

                def pump(src: socket.socket, dst: socket.socket) -> None:
                    with contextlib.suppress(OSError):
                        while data := src.recv(65536):
                            dst.sendall(data)
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)

                back = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
                back.start()
                pump(self.request, upstream)
                back.join()
                upstream.close()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        for s in list(self._socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._socks.clear()


@pytest.fixture
def link(moto_endpoint: str) -> Iterator[Forwarder]:
    fwd = Forwarder(moto_endpoint)
    fwd.up()
    yield fwd
    fwd.down()


@pytest.fixture
def versioned_bucket(moto_endpoint: str, aws_env: None) -> str:
    name = f"models-{uuid.uuid4().hex[:10]}"
    admin = s3_admin(moto_endpoint)
    admin.create_bucket(Bucket=name)
    admin.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def shifted_model(path: Path) -> bytes:
    """A "retrained" model that is visibly different: it answers (digit + 1) % 10."""
    x_train, y_train, _, _ = make_camera.split()
    make_camera.export(make_camera.train(x_train, (y_train + 1) % 10), path)
    return path.read_bytes()


def digit_pngs(folder: Path, n: int = 12) -> tuple[list[Path], list[str]]:
    _, _, x_test, y_test = make_camera.split()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        make_camera.to_png(x_test[i], folder / f"{i}.png")
        paths.append(folder / f"{i}.png")
    return paths, [str(int(y)) for y in y_test[:n]]


def accuracy(out: pl.DataFrame, truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(out["prediction"], truth, strict=True)]))


def test_model_from_s3_swaps_on_a_new_version_and_survives_an_outage(
    tmp_path: Path,
    moto_endpoint: str,
    versioned_bucket: str,
    link: Forwarder,
    clock: FakeClock,
    make_ctx: Callable[[str], Context],
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = s3_admin(moto_endpoint)
    v1 = admin.put_object(
        Bucket=versioned_bucket, Key="vision/digits.onnx", Body=SAMPLE_MODEL.read_bytes()
    )["VersionId"]
    paths, truth = digit_pngs(tmp_path / "imgs")
    rows = image_rows(paths)
    url = f"s3://{versioned_bucket}/vision/digits.onnx"
    block = sample_infer(model={"path": url, "endpoint_url": link.url}, reload_every="30s")
    ctx = make_ctx("digits")
    t = InferTransform(InferConfig.model_validate(block), ctx)
    t.open()

    local = tmp_path / "models" / "digits" / "digits.onnx"
    assert local.read_bytes() == SAMPLE_MODEL.read_bytes()
    meta = json.loads(local.with_name("digits.onnx.json").read_text())
    assert meta["version_id"] == v1 and meta["url"] == url
    assert accuracy(t.apply(rows), truth) >= 0.9

    # A retrained model lands as a new object version: used within reload_every.
    v2 = admin.put_object(
        Bucket=versioned_bucket, Key="vision/digits.onnx", Body=shifted_model(tmp_path / "v2.onnx")
    )["VersionId"]
    assert v2 != v1
    clock.advance(10)
    assert accuracy(t.apply(rows), truth) >= 0.9  # not checked yet: still v1
    clock.advance(21)
    shifted = [str((int(y) + 1) % 10) for y in truth]
    assert accuracy(t.apply(rows), shifted) >= 0.9
    assert json.loads(local.with_name("digits.onnx.json").read_text())["version_id"] == v2
    assert ctx.counters.get("model_downloads_total", component="digits") == 2
    assert ctx.counters.get("model_reloads_total", component="digits") == 1

    # A broken upload is smoke-tested in a temp file and never replaces the good copy.
    admin.put_object(Bucket=versioned_bucket, Key="vision/digits.onnx", Body=b"half a model")
    good = local.read_bytes()
    clock.advance(31)
    assert accuracy(t.apply(rows), shifted) >= 0.9
    assert local.read_bytes() == good
    assert ctx.counters.get("model_reload_failures_total", component="digits") == 1
    assert sorted(p.name for p in local.parent.iterdir()) == [
        "digits.onnx",
        "digits.onnx.json",
    ]  # no temp
    clock.advance(31)
    t.apply(rows)  # the same bad version is not downloaded again
    assert ctx.counters.get("model_reload_failures_total", component="digits") == 1

    # The uplink drops: every check fails, is counted, logged once; scoring goes on.
    link.down()
    caplog.clear()
    for _ in range(3):
        clock.advance(31)
        assert accuracy(t.apply(rows), shifted) >= 0.9
    assert ctx.counters.get("model_fetch_failures_total", component="digits") == 3
    warnings = [r for r in caplog.records if "cannot check" in r.getMessage()]
    assert len(warnings) == 1

    # A restart while S3 is unreachable starts from the last downloaded model.
    ctx2 = make_ctx("digits")
    t2 = InferTransform(InferConfig.model_validate(block), ctx2)
    t2.open()
    assert accuracy(t2.apply(rows), shifted) >= 0.9
    assert ctx2.counters.get("model_fetch_failures_total", component="digits") == 1

    # The link comes back with a fixed model: swapped in at the next check.
    link.up()
    admin.put_object(
        Bucket=versioned_bucket, Key="vision/digits.onnx", Body=SAMPLE_MODEL.read_bytes()
    )
    clock.advance(31)
    assert accuracy(t.apply(rows), truth) >= 0.9
    assert ctx.counters.get("model_reloads_total", component="digits") == 2


def test_first_start_without_s3_and_without_a_copy_is_an_error(
    tmp_path: Path, aws_env: None, make_ctx: Callable[[str], Context]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    block = sample_infer(model={"path": "s3://models/digits.onnx", "endpoint_url": dead})
    with pytest.raises(ConfigError, match="no earlier copy"):
        InferTransform(InferConfig.model_validate(block), make_ctx("digits")).open()
    reason = validate_model_file(InferConfig.model_validate(block))  # check --deep says why
    assert reason is not None and "connect" in reason.lower()


def test_check_deep_downloads_and_smoke_tests_an_s3_model(
    moto_endpoint: str, versioned_bucket: str, tmp_path: Path
) -> None:
    admin = s3_admin(moto_endpoint)
    admin.put_object(Bucket=versioned_bucket, Key="ok.onnx", Body=SAMPLE_MODEL.read_bytes())
    admin.put_object(Bucket=versioned_bucket, Key="bad.onnx", Body=b"nope")
    ok = sample_infer(
        model={"path": f"s3://{versioned_bucket}/ok.onnx", "endpoint_url": moto_endpoint}
    )
    bad = sample_infer(
        model={"path": f"s3://{versioned_bucket}/bad.onnx", "endpoint_url": moto_endpoint}
    )
    missing = sample_infer(
        model={"path": f"s3://{versioned_bucket}/missing.onnx", "endpoint_url": moto_endpoint}
    )
    assert validate_model_file(InferConfig.model_validate(ok)) is None
    assert "not a loadable ONNX model" in (
        validate_model_file(InferConfig.model_validate(bad)) or ""
    )
    assert "404" in (validate_model_file(InferConfig.model_validate(missing)) or "")
