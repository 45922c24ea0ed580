"""The dashboard is private by default and reads only what it was started on (issue 14 item 2).

Started exactly as README says (`streamlit run dashboards/app.py` from the repo root, no
address flag: the project's `.streamlit/config.toml` must do it), the server listens on
127.0.0.1 only. In a real browser, a lake path outside the folders it was started with is
refused, and the row-filter box refuses `read_csv` without a byte of the file in the page.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from dashboards import data
from sample_data.make_lake import aggregate_table, write_lake
from tests.dashboard.conftest import streamlit

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
MARKER = "TOPSECRET-0cc175b9c0f1b6a8"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """`streamlit run dashboards/app.py` on a lake in a folder of its own, a secret beside it."""
    base = tmp_path_factory.mktemp("dash")
    lake = base / "allowed" / "lake"
    write_lake(aggregate_table(days=1, devices=("edge-01",), gap=None), lake)
    outside = base / "outside"
    (outside / "lake").mkdir(parents=True)
    write_lake(aggregate_table(days=1, devices=("intruder",), gap=None), outside / "lake")
    secret = outside / "secret.csv"
    secret.write_text(f"{MARKER},x\n")
    port = _free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STREAMLIT_SERVER_")  # nothing but the project's config decides
    }
    env.update({data.LAKE_ENV: str(lake), data.DATA_DIR_ENV: str(base / "allowed" / "data")})
    log_path = base / "streamlit.log"
    with streamlit(port, env, log_path) as proc:  # no address flag: the project's config
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "pid": proc.pid,
               "outside": outside, "secret": secret, "log": log_path}


def test_it_listens_on_loopback_only(started: dict[str, object]) -> None:
    procs = [psutil.Process(int(started["pid"]))]  # type: ignore[call-overload]
    procs += procs[0].children(recursive=True)
    listening = [
        c.laddr
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert any(addr.port == started["port"] for addr in listening), listening
    assert {addr.ip for addr in listening} == {"127.0.0.1"}, listening
    log = Path(str(started["log"])).read_text()
    assert "Network URL" not in log and "External URL" not in log


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing")
def test_outside_paths_and_file_reading_sql_are_refused_in_the_browser(
    started: dict[str, object],
) -> None:
    from playwright.sync_api import Page, sync_playwright

    url = str(started["url"])
    outside = str(Path(str(started["outside"])) / "lake")
    secret = str(started["secret"])

    def settle(page: Page) -> None:
        page.wait_for_timeout(300)  # let a rerun start before waiting for it to end
        page.wait_for_function(
            "!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=120_000
        )

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--no-first-run"],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, timeout=120_000)
            page.wait_for_selector('[data-testid="stVegaLiteChart"]', timeout=120_000)
            settle(page)

            # the SQL box: read_csv of the secret is refused, nothing of it reaches the page
            box = page.get_by_role("textbox", name="Row filter (SQL)")
            box.fill(f"metric IN (SELECT nosuch FROM read_csv('{secret}'))")
            box.press("Enter")
            page.get_by_text("table function read_csv() is not allowed").first.wait_for(
                timeout=120_000
            )
            settle(page)
            assert MARKER not in page.content()

            # a lake path typed outside the started-with folders
            lake_box = page.get_by_role("textbox", name="Lake path")
            lake_box.fill(outside)
            lake_box.press("Enter")
            page.get_by_text("outside the folders this dashboard was started with").first.wait_for(
                timeout=120_000
            )
            settle(page)
            assert "intruder" not in page.content()

            # the same through the URL
            page.goto(f"{url}/?lake={urllib.parse.quote(outside)}", timeout=120_000)
            page.get_by_text("outside the folders this dashboard was started with").first.wait_for(
                timeout=120_000
            )
            settle(page)
            assert "intruder" not in page.content() and MARKER not in page.content()
        finally:
            browser.close()


def test_confine_resolves_before_it_judges(tmp_path: Path) -> None:
    """`..` and symlinks cannot lead out of a root; s3:// URLs pass, other schemes do not."""
    root = tmp_path / "root"
    (root / "lake").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    roots = (root.resolve(),)
    assert data.confine(str(root / "lake"), roots) == str(root / "lake")
    assert data.confine("s3://bucket/lake", roots) == "s3://bucket/lake"
    for bad in (str(root / "lake" / ".." / ".." / "elsewhere"), str(root / "link"), "/etc",
                "file:///etc/passwd", "http://169.254.169.254/"):
        with pytest.raises(data.PathRefused):
            data.confine(bad, roots)
