"""The "doubtful images" view: query functions, and the real page in headless Chromium.

The lake is built here as the `lake` sink writes an image model's rows (canonical columns,
metric `image`, value null, `path` to the blob, `prediction`, `confidence`, `top_k`); the
pictures sit in the data dir like the files source's blob store.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dashboards import data
from tests.dashboard.conftest import streamlit
from tests.dashboard.test_browser import CHROMIUM, _free_port

START = datetime(2024, 6, 3, 12, 0, tzinfo=UTC)
VERDICTS = [  # (prediction, confidence, blob present on this machine)
    ("3", 0.42, True),
    ("7", 0.97, True),
    ("8", 0.31, True),
    ("1", 0.55, True),
    ("0", 0.99, True),
    ("5", 0.58, False),
    (None, 0.0, True),
    ("2", 0.93, True),
]


def _png(path: Path, shade: int) -> None:
    from PIL import Image

    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[16:48, 24:40] = shade
    Image.fromarray(pixels, mode="L").save(path)


def image_lake(root: Path, blobs: Path) -> pa.Table:
    blobs.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[object]] = {
        k: []
        for k in (
            "ts",
            "device",
            "source",
            "metric",
            "value",
            "unit",
            "path",
            "file",
            "sha256",
            "prediction",
            "confidence",
            "top_k",
        )
    }
    for i, (label, conf, present) in enumerate(VERDICTS):
        blob = blobs / f"{i:02d}" / f"blob{i}.png"
        if present:
            blob.parent.mkdir(exist_ok=True)
            if label is None:
                blob.write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the corrupt one
            else:
                _png(blob, 60 + 20 * i)
        rows["ts"].append(START + timedelta(minutes=5 * i))
        rows["device"].append("edge-01")
        rows["source"].append("camera")
        rows["metric"].append("image")
        rows["value"].append(None)
        rows["unit"].append(None)
        rows["path"].append(str(blob))
        rows["file"].append(f"cam-{i}.png")
        rows["sha256"].append(f"{i:064x}")
        rows["prediction"].append(label)
        rows["confidence"].append(conf)
        rows["top_k"].append(None if label is None else [{"label": label, "confidence": conf}])
    table = pa.table(
        rows,
        schema=pa.schema(
            [
                ("ts", pa.timestamp("us", tz="UTC")),
                ("device", pa.string()),
                ("source", pa.string()),
                ("metric", pa.string()),
                ("value", pa.float64()),
                ("unit", pa.string()),
                ("path", pa.string()),
                ("file", pa.string()),
                ("sha256", pa.string()),
                ("prediction", pa.string()),
                ("confidence", pa.float64()),
                (
                    "top_k",
                    pa.list_(pa.struct([("label", pa.string()), ("confidence", pa.float64())])),
                ),
            ]
        ),
    )
    folder = root / "metric=image" / f"date={START:%Y-%m-%d}"  # the lake sink's layout
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "part-000000000000-000000000007.parquet", compression="zstd")
    return table


def test_doubtful_images_query_and_thumbnails(tmp_path: Path) -> None:
    lake, blobs = tmp_path / "data" / "lake", tmp_path / "data" / "blobs"
    image_lake(lake, blobs)
    lf = pl.scan_parquet(lake / "**" / "*.parquet", hive_partitioning=False)
    assert data.has_images(lf)
    rows = data.doubtful_images(lf, threshold=0.6)
    assert rows["confidence"].to_list() == [0.0, 0.31, 0.42, 0.55, 0.58]  # least sure first
    assert rows["prediction"].to_list() == [None, "8", "3", "1", "5"]
    assert data.doubtful_images(lf, threshold=0.6, limit=2).height == 2
    assert data.doubtful_images(lf, threshold=1.0).height == len(VERDICTS)
    assert not data.has_images(pl.LazyFrame({"ts": [START], "value": [1.0]}))
    assert data.doubtful_images(pl.LazyFrame({"value": [1.0]})).is_empty()

    from PIL import Image

    roots = (tmp_path / "data",)
    thumb = data.image_thumbnail(rows["path"][1], roots)
    assert thumb is not None
    with Image.open(io.BytesIO(thumb)) as img:
        assert img.format == "PNG" and img.size == (data.THUMBNAIL, data.THUMBNAIL)
    assert data.image_thumbnail(rows["path"][0], roots) is None  # corrupt file
    assert data.image_thumbnail(rows["path"][4], roots) is None  # blob gone (uploaded)
    assert data.image_thumbnail(None, roots) is None
    outside = tmp_path / "elsewhere.png"
    _png(outside, 200)
    assert data.image_thumbnail(str(outside), roots) is None  # not under the roots


@pytest.fixture
def image_dashboard(tmp_path: Path) -> Iterator[str]:
    lake, blobs = tmp_path / "data" / "lake", tmp_path / "data" / "blobs"
    image_lake(lake, blobs)
    port = _free_port()
    env = {
        **os.environ,
        data.LAKE_ENV: str(lake),
        data.DATA_DIR_ENV: str(tmp_path / "data"),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    flags = ("--server.headless", "true", "--server.address", "127.0.0.1")
    with streamlit(port, env, tmp_path / "streamlit.log", *flags):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing")
def test_doubtful_images_render_in_chromium(image_dashboard: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "doubtful.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(image_dashboard, timeout=120_000)
            page.get_by_role("heading", name="Doubtful images").wait_for(timeout=120_000)
            page.wait_for_function(
                "!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000
            )
            images = page.locator('[data-testid="stImage"] img')
            page.wait_for_function(
                """() => [...document.querySelectorAll('[data-testid="stImage"] img')]
                       .filter(i => i.complete && i.naturalWidth > 0).length >= 3""",
                timeout=120_000,
            )
            # 5 rows under 0.6: 3 pictures on this machine, 1 unreadable, 1 already uploaded
            assert images.count() == 3
            widths = images.evaluate_all("els => els.map(e => e.naturalWidth)")
            assert widths == [data.THUMBNAIL] * 3
            text = page.locator('[data-testid="stMain"]').inner_text()
            for caption in ("8 · 0.31", "3 · 0.42", "1 · 0.55", "5 · 0.58", "unreadable · 0.00"):
                assert caption in text, caption
            assert "cam-5.png: image not on this machine" in text  # uploaded, blob deleted
            assert "cam-6.png: image cannot be shown" in text  # the corrupt file
            for confident in ("7 · 0.97", "0 · 0.99", "2 · 0.93"):
                assert confident not in text
            page.locator('[data-testid="stImage"]').first.scroll_into_view_if_needed()
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("DASHBOARD_SCREENSHOT"):  # keep a copy to look at
        Path(os.environ["DASHBOARD_SCREENSHOT"]).write_bytes(shot.read_bytes())


@pytest.fixture
def retraining_bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """What the s3 sink leaves for retraining: pictures under their label and the rows (with
    ``blob_key``) as Parquet, in a real moto server; the blobs are gone from this machine."""
    import boto3

    from collector.testing import moto_server

    with moto_server(tmp_path / "moto.log") as url:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(var, raising=False)
        for var, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", url),
            ("AWS_CONFIG_FILE", str(tmp_path / "none")),
            ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none")),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ):
            monkeypatch.setenv(var, value)
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="retraining-data")
        s3.create_bucket(Bucket="other-bucket")
        local = tmp_path / "device"
        table = image_lake(local / "lake", local / "blobs")
        keys = []
        for i, (label, conf, present) in enumerate(VERDICTS):
            key = f"retraining/{label}/2024-06-03/{i:064x}.png"
            blob = local / "blobs" / f"{i:02d}" / f"blob{i}.png"
            if present and conf < 0.6:
                s3.put_object(Bucket="retraining-data", Key=key, Body=blob.read_bytes())
            keys.append(key if conf < 0.6 else None)
        s3.put_object(
            Bucket="other-bucket",
            Key="secret.png",
            Body=(local / "blobs" / "00" / "blob0.png").read_bytes(),
        )
        rows = pl.from_arrow(table).with_columns(pl.Series("blob_key", keys, dtype=pl.String))
        buf = io.BytesIO()
        rows.filter(pl.col("confidence") < 0.6).write_parquet(buf)
        s3.put_object(
            Bucket="retraining-data",
            Key="retraining/metric=image/date=2024-06-03/part-1.parquet",
            Body=buf.getvalue(),
        )
        import shutil

        shutil.rmtree(local)  # uploaded and deleted on the device: only S3 has them
        yield "s3://retraining-data/retraining"


def test_doubtful_images_from_an_s3_lake_come_from_their_uploaded_objects(
    retraining_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamlit.testing.v1 import AppTest

    from collector.lakequery import LakeQuery

    lf = data.lake_frame(LakeQuery(retraining_bucket))
    rows = data.doubtful_images(lf)
    assert rows["confidence"].to_list() == [0.0, 0.31, 0.42, 0.55, 0.58]
    assert all(k.startswith("retraining/") for k in rows["blob_key"].to_list())
    thumbs = [data.s3_image_thumbnail(retraining_bucket, k) for k in rows["blob_key"]]
    # the corrupt picture cannot be shown; the one never uploaded is missing; 3 are there
    assert [t is not None for t in thumbs] == [False, True, True, True, False]
    # a key from the data reaches only the lake's own bucket
    assert data.s3_image_thumbnail(retraining_bucket, "../other-bucket/secret.png") is None
    assert data.s3_image_thumbnail("s3://retraining-data/x", "secret.png") is None

    monkeypatch.setenv(data.LAKE_ENV, retraining_bucket)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "data"))
    app = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
    at = AppTest.from_file(str(app), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Doubtful images" in [h.value for h in at.subheader]
    assert len(at.get("image")) == 3  # the three pictures that are in the bucket
    captions = " ".join(c.value for c in at.caption) + " ".join(m.value for m in at.markdown)
    assert "image cannot be shown" in captions
