"""The sidecar's status page at `/`, in a real headless browser (Debian's
chromium driven through chromedriver by selenium): the pools table shows the
live counts, refreshes itself, and the latency chart has the console's
histogram. The browser is kept to loopback: no host name resolves, no
background networking."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import APP_DB, APP_USER, admin_show, wait_until
from test_sidecar import ADMIN, ADMIN_PASSWORD, make_client, pooler, running_sidecar  # noqa: F401

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
POOL_KEY = f"{APP_DB}/{APP_USER}"


def run(target, sql: str, n: int) -> None:
    conn = target.connect()
    conn.autocommit = True
    with conn.cursor() as cur:
        for _ in range(n):
            cur.execute(sql)
    conn.close()


@pytest.fixture
def browser(monkeypatch):
    # bin/setup installs both (Debian's chromium and chromium-driver); not a skip.
    assert CHROMIUM and CHROMEDRIVER, "chromium and chromedriver are needed: run bin/setup"
    monkeypatch.setenv("SE_OFFLINE", "true")        # selenium must never download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-extensions", "--no-first-run",
                "--disable-default-apps",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def cell(driver, column: str) -> str | None:
    from selenium.webdriver.common.by import By
    found = driver.find_elements(By.CSS_SELECTOR, f'tr[data-pool="{POOL_KEY}"] td.{column}')
    return found[0].text if found else None


def test_status_page_shows_live_counts_and_the_histogram(pooler, browser, tmp_path: Path):
    from selenium.webdriver.common.by import By
    run(pooler, "SELECT pg_sleep(0.03)", 3)
    run(pooler, "SELECT 1", 10)
    held = [pooler.connect() for _ in range(2)]
    try:
        with running_sidecar(pooler, tmp_path) as base:
            browser.get(base + "/")
            assert browser.title == "pooler status"
            wait_until(lambda: cell(browser, "cl_active") == "2", timeout=15, interval=0.2,
                       message=f"page never showed 2 active clients: {cell(browser, 'cl_active')}")
            assert cell(browser, "cl_waiting") == "0"
            assert cell(browser, "mode") == "transaction"
            # The chart: one bar per bucket, the console's query histogram.
            console = [r for r in admin_show(pooler, "HISTOGRAMS", ADMIN, ADMIN_PASSWORD)
                       if (r["database"], r["user"], r["kind"]) == (APP_DB, APP_USER, "query")]
            bars = browser.find_elements(By.CSS_SELECTOR, "#chart rect")
            assert len(bars) == len(console) == 17
            assert sum(int(b.get_attribute("data-count")) for b in bars) == int(console[-1]["count"])
            assert cell(browser, "p95") not in (None, "-")
            shot = Path(os.environ.get("STATUS_SHOT", tmp_path / "status.png"))
            assert browser.save_screenshot(str(shot))
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
            # Live: a third client shows up without a reload.
            held.append(pooler.connect())
            wait_until(lambda: cell(browser, "cl_active") == "3", timeout=15, interval=0.2,
                       message="the page did not refresh to 3 active clients")
            assert not browser.find_element(By.ID, "error").is_displayed()
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert not errors, errors
    finally:
        for c in held:
            c.close()


def test_root_negotiates_and_status_is_json(pooler):
    client = make_client(pooler)
    page = client.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'<table id="pools">' in page.data
    index = client.get("/", headers={"Accept": "*/*"})
    assert index.status_code == 200 and "/status" in index.json["endpoints"]
    run(pooler, "SELECT 1", 3)
    status = client.get("/status")
    assert status.status_code == 200
    pool = next(p for p in status.json["pools"] if (p["database"], p["user"]) == (APP_DB, APP_USER))
    assert pool["histograms"]["query"]["count"] >= 3
    assert status.json["paused"] is False
    assert ADMIN_PASSWORD not in status.get_data(as_text=True)
