"""The merchandiser pages in a real browser: Playwright driving Debian's Chromium against uvicorn on
loopback. Logs in, reads the store list, checks the bay page's coloured boxes against the API, the task
order and the CSV download, and saves screenshots: into docs/img/reports/ (the pictures the README shows)
when SHELFLOOP_DOCS_SCREENSHOTS=1, otherwise into the test's temporary folder so a test run leaves the
work tree as it was."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_reports import PASSWORD, World, make_world

from shelfloop.broker import free_port

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SHOTS = Path(__file__).resolve().parents[1] / "docs" / "img" / "reports"
SHOTS = (
    DOCS_SHOTS
    if os.environ.get("SHELFLOOP_DOCS_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="shots-"))
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt install chromium)"
)


@pytest.fixture(scope="module")
def served(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, str]]:
    import uvicorn

    w = make_world(tmp_path_factory.mktemp("reports-browser"), small_world)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(w.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield w, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    w.app.state.services.db.dispose()


@pytest.fixture(scope="module")
def page(served: tuple[World, str]) -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the dev extra (playwright) is not installed"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(15_000)
        yield pg
        context.close()
        browser.close()


def _no_overflow(pg: Any) -> None:
    """Nothing sticks out sideways (the page would scroll horizontally, or a table hide a column)."""
    wide = pg.evaluate(
        "() => [...document.querySelectorAll('main *')].filter(e => e.getBoundingClientRect().right >"
        " document.documentElement.clientWidth + 1).slice(0, 5).map(e => e.tagName + '.' + e.className)"
    )
    assert wide == [], (pg.url, wide)


def _shot(pg: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(SHOTS / name), full_page=True)


def test_browser_login_stores_bay_tasks_csv(served: tuple[World, str], page: Any) -> None:
    w, base = served
    pg = page

    # Log in: the form puts the token in an HttpOnly cookie and returns to the page asked for.
    pg.goto(f"{base}/app/stores")
    assert "/app/login" in pg.url
    pg.fill("input[name=username]", "merchandiser")
    pg.fill("input[name=password]", PASSWORD)
    pg.click("button[type=submit]")
    pg.wait_for_url(f"{base}/app/stores")
    cookies = {c["name"]: c for c in pg.context.cookies()}
    assert cookies["shelfloop_session"]["httpOnly"]

    # Store list: a card per store, KPI tiles matching the API.
    listing = w.get("/reports/stores").json()
    assert pg.locator("a.store-card").count() == len(listing["stores"]) == 3
    tile = pg.locator('[data-kpi="Planogram compliance"] .tile-value').first.inner_text()
    assert tile == f"{listing['kpis']['compliance_pct']:.1f} %"
    _shot(pg, "stores.png")
    _no_overflow(pg)

    # Bay page: pick the bay with the most kinds of fault, count the coloured boxes per status.
    candidates = []
    for st in listing["stores"]:
        for b in w.get(f"/reports/stores/{st['store_id']}").json()["bays"]:
            kinds = sum(
                1 for s, n in {**b["slot_counts"], **b["detection_counts"]}.items() if n and s != "correct"
            )
            candidates.append((kinds, -b["compliance_pct"], st["store_id"], b["bay_id"]))
    _, _, store_id, bay_id = max(candidates)
    bay = w.get(f"/reports/stores/{store_id}/bays/{bay_id}").json()
    pg.click(f'a.store-card[data-store="{store_id}"]')
    pg.wait_for_url(f"{base}/app/stores/{store_id}")
    pg.screenshot(
        path=str(SHOTS / "store.png"), full_page=True, clip={"x": 0, "y": 0, "width": 1360, "height": 1000}
    )
    _no_overflow(pg)
    pg.click(f'[data-table="bays"] a[href$="/bays/{bay_id}"]')
    pg.wait_for_url(f"{base}/app/stores/{store_id}/bays/{bay_id}")
    pg.wait_for_function(
        "() => { const i = document.querySelector('svg.photo image'); return !!i && i.getBBox().width > 0; }"
    )
    assert len(bay["overlay_counts"]) >= 3
    for status, n in bay["overlay_counts"].items():
        assert pg.locator(f'svg.photo rect.box[data-status="{status}"]').count() == n, status
    assert pg.locator("svg.photo rect.box").count() == len(bay["overlay"])
    colours = pg.eval_on_selector_all(
        "svg.photo rect.box",
        "els => [...new Set(els.map(e => e.dataset.status + '=' + getComputedStyle(e).stroke))]",
    )
    assert "correct=rgb(31, 157, 85)" in colours
    if "out_of_stock" in bay["overlay_counts"]:
        assert "out_of_stock=rgb(224, 36, 36)" in colours
    assert pg.locator("svg.plan g.slot").count() == len(bay["slots"])
    assert pg.locator("ul.legend li").count() == 8
    img_ok = pg.evaluate(
        "async () => { const r = await fetch(document.querySelector('svg.photo image').getAttribute('href'));"
        " return r.status + ' ' + r.headers.get('content-type'); }"
    )
    assert img_ok == "200 image/jpeg"
    pg.screenshot(
        path=str(SHOTS / "bay.png"), full_page=True, clip={"x": 0, "y": 0, "width": 1360, "height": 1100}
    )
    _no_overflow(pg)

    # Task list: ordered by estimated lost revenue, out-of-stock first; the CSV download matches it.
    pg.click("nav a:text-is('Tasks')")
    pg.wait_for_url(f"{base}/app/tasks")
    rows = pg.locator('table[data-table="tasks"] tbody tr')
    tasks = w.get("/reports/tasks").json()
    assert rows.count() == len(tasks)
    lost = [float(x) for x in rows.evaluate_all("rs => rs.map(r => r.dataset.lost)")]
    assert lost == sorted(lost, reverse=True) and lost[0] > 0
    assert rows.first.get_attribute("data-status") == "out_of_stock"
    assert rows.first.locator("td.action").inner_text().strip() == tasks[0]["action"]
    _no_overflow(pg)
    pg.set_viewport_size({"width": 1360, "height": 900})
    pg.screenshot(path=str(SHOTS / "tasks.png"), full_page=False)
    with pg.expect_download() as dl:
        pg.click("#export-csv")
    text = Path(dl.value.path()).read_text()
    exported = list(csv.DictReader(io.StringIO(text)))
    assert [r["action"] for r in exported] == [t["action"] for t in tasks]

    # The printable visit report has print styles and every bay of the store.
    pg.goto(f"{base}/app/stores/{store_id}/visit")
    assert pg.locator("section.bay-sheet").count() == len(w.get(f"/reports/stores/{store_id}").json()["bays"])
    pg.emulate_media(media="print")
    assert pg.locator("header.topbar").is_hidden()
    pg.screenshot(path=str(SHOTS / "visit-print.png"), full_page=False)
    pg.emulate_media(media="screen")
    pg.goto(f"{base}/app/aggregates")
    assert pg.locator('table[data-table="by-brand"] tbody tr').count() == len(
        w.get("/reports/aggregates?by=brand").json()["groups"]
    )
    _no_overflow(pg)
    pg.screenshot(path=str(SHOTS / "aggregates.png"), full_page=False)
