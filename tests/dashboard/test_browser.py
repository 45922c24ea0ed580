"""The real page in a real browser: `streamlit run` + headless Debian chromium via Playwright."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from dashboards import data
from tests.dashboard.conftest import streamlit

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
LAST = datetime(2024, 6, 3, 23, 59, tzinfo=UTC)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} missing (`make test` installs the chromium package)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dashboard(sample_lake: Path, tmp_path: Path) -> Iterator[str]:
    """``streamlit run dashboards/app.py`` on a free port, reading the generated sample lake."""
    port = _free_port()
    env = {
        **os.environ,
        data.LAKE_ENV: str(sample_lake),
        data.DATA_DIR_ENV: str(tmp_path / "data"),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    }
    flags = ("--server.headless", "true", "--server.address", "127.0.0.1")
    with streamlit(port, env, tmp_path / "streamlit.log", *flags):
        yield f"http://127.0.0.1:{port}"


def test_chart_tiles_and_table_render_in_chromium(
    dashboard: str, tmp_path: Path, sample_lake: Path
) -> None:
    from playwright.sync_api import sync_playwright

    lake_rows = pl.read_parquet(sample_lake / "**" / "*.parquet", hive_partitioning=False)
    error = (
        "ClientError: An error occurred (AccessDenied) when calling the PutObject operation: "
        "User arn:aws:iam::123456789012:user/collector is not authorized to perform "
        "s3:PutObject on resource arn:aws:s3:::my-sensor-lake/readings/part.parquet"
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "status.json").write_text(json.dumps({
        "pid": 0, "updated_at": 1719792000.0,
        "sinks": {name: {"delivered_rows": 123456, "dropped_rows": {"spool_full": 3, "ttl": 2},
                         "dead_lettered_rows": 1, "spool_backlog_rows": 1000,
                         "backlog_files": 4, "backlog_bytes": 123456789,
                         "oldest_file_age_s": 12.5, "last_success": 1719792000.0,
                         "last_error": error}
                  for name in ("cloud", "datalake", "search-index-with-a-long-name")},
    }))

    shot = tmp_path / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(dashboard, timeout=120_000)
            # a vega chart has rendered once its canvas (or svg) has a size
            page.wait_for_selector(
                '[data-testid="stVegaLiteChart"] canvas, [data-testid="stVegaLiteChart"] svg',
                timeout=120_000,
            )
            page.wait_for_function(
                "document.querySelectorAll('[data-testid=\"stMetric\"]').length >= 9",
                timeout=120_000,
            )
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=120_000)
            page.wait_for_function(
                "!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000
            )
            charts = page.locator('[data-testid="stVegaLiteChart"]')
            assert charts.count() == 6  # a time series and a histogram per metric
            box = charts.first.bounding_box()
            assert box is not None and box["width"] > 300 and box["height"] > 150
            tiles = page.locator('[data-testid="stMetric"]')
            assert tiles.count() == 9
            assert "edge-01" in tiles.first.inner_text()
            assert page.locator('[data-testid="stDataFrame"]').count() >= 1
            headings = page.locator("h3").all_inner_texts()
            assert {"temperature", "humidity", "pressure"} <= {h.strip() for h in headings}
            page.screenshot(path=str(shot), full_page=True)

            # the health table shows every column of every sink, the error in full: no part
            # of it is scrolled or clipped away
            table = page.locator('[data-testid="stTable"]').last
            table.scroll_into_view_if_needed()
            text = table.inner_text()
            for needle in ("last error", "dead letters", "search-index-with-a-long-name",
                           "123,456", "5 (spool_full: 3, ttl: 2)"):
                assert needle in text, needle
            assert text.count(error) == 3 or " ".join(text.split()).count(error) == 3
            clipped = table.evaluate(
                """el => [el, ...el.querySelectorAll('*')].some(
                       e => e.scrollWidth > e.clientWidth + 1
                            && getComputedStyle(e).overflowX !== 'visible')"""
            )
            assert not clipped
            main = page.locator('[data-testid="stMain"], section.main').first.bounding_box()
            box = table.bounding_box()
            assert main is not None and box is not None
            assert box["x"] + box["width"] <= main["x"] + main["width"] + 1

            # the Parquet download runs the export code on click and holds the shown rows
            button = page.get_by_role("button", name="Download PARQUET")
            button.scroll_into_view_if_needed()
            with page.expect_download(timeout=120_000) as info:
                button.click()
            info.value.save_as(tmp_path / "export.parquet")
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    exported = pl.read_parquet(tmp_path / "export.parquet")
    want = lake_rows.filter(pl.col("ts") > LAST - timedelta(days=1))
    assert exported.height == want.height == 3 * 3 * 1440  # the default "Last 24 hours"
    assert sorted(exported["record_id"]) == sorted(want["record_id"])
    if os.environ.get("DASHBOARD_SCREENSHOT"):  # keep a copy to look at
        Path(os.environ["DASHBOARD_SCREENSHOT"]).write_bytes(shot.read_bytes())
