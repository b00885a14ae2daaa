"""Merchandiser reports: role checks, figures recomputed independently from the stored snapshots, task
order and impact, CSV exports, the log-in cookie, and the pages rendering (the browser test is separate)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloud_api import models as m
from cloud_api.main import create_app
from cloud_api.reports.data import UNITS_PER_FACING_PER_DAY
from cloud_api.reports.loader import DEMO_STORES, load_world
from cloud_api.security import create_user, issue_token
from shelfloop.settings import Settings

END = date(2026, 11, 20)
DAYS = 14
PASSWORD = "correct horse battery"
JSON_ROUTES = (
    "/reports/stores",
    "/reports/stores/store-north-01",
    "/reports/stores/store-north-01/bays/bay-01",
    "/reports/tasks",
    "/reports/tasks.csv",
    "/reports/slots.csv",
    "/reports/aggregates?by=brand",
    "/reports/trends",
)


@dataclass
class World:
    app: FastAPI
    client: TestClient
    tokens: dict[str, str]
    load: Any

    def get(self, path: str, role: str | None = "merchandiser", **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return self.client.get(path, headers=headers, **kw)

    def rows(self) -> list[m.ComplianceSnapshotRow]:
        with self.app.state.services.db.session() as s:
            return list(
                s.scalars(sa.select(m.ComplianceSnapshotRow).order_by(m.ComplianceSnapshotRow.id)).all()
            )


def report_settings(tmp: Path) -> Settings:
    return Settings(
        database={"url": f"sqlite:///{tmp / 'reports.db'}"},
        storage={"backend": "local", "local_dir": tmp / "objects"},
        cloud={"json_logs": False, "image_check": "structural"},
    )


def make_world(tmp: Path, world_dir: Path) -> World:
    app = create_app(report_settings(tmp))
    svc = app.state.services
    load = load_world(world_dir, svc.ingestor, end=END, days=DAYS)
    tokens = {}
    with svc.db.session() as s:
        for role in ("annotator", "reviewer", "merchandiser", "admin"):
            user = create_user(s, role, PASSWORD, role)
            tokens[role] = issue_token(s, user, 3600)[0]
    return World(app, TestClient(app), tokens, load)


@pytest.fixture(scope="module")
def world(small_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = make_world(tmp_path_factory.mktemp("reports"), small_world)
    yield w
    w.app.state.services.db.dispose()


def _bays(store_id: str, w: World) -> int:
    n = {s[0]: s[3] for s in DEMO_STORES}[store_id]
    all_bays = len({r.bay_id for r in w.rows()})
    return n or all_bays


def _correct(slot: dict[str, Any]) -> int:
    if slot["status"] == "correct":
        return slot["facings_planned"]
    if slot["status"] == "facing_count_mismatch":
        return min(slot["facings_found"], slot["facings_planned"])
    return 0


def _latest(rows: list[m.ComplianceSnapshotRow]) -> dict[tuple[str, str], m.ComplianceSnapshotRow]:
    out: dict[tuple[str, str], m.ComplianceSnapshotRow] = {}
    for r in rows:
        k = (r.store_id, r.bay_id)
        if k not in out or r.captured_at >= out[k].captured_at:
            out[k] = r
    return out


# --------------------------------------------------------------------------------------------------------


def test_loader_uses_the_ingest_path_and_is_idempotent(world: World, small_world: Path) -> None:
    rep = world.load
    assert rep.rejected == [] and rep.partial_photos == []
    expected = sum(_bays(s[0], world) for s in DEMO_STORES) * DAYS
    assert rep.snapshots == rep.stored == expected == len(world.rows())
    again = load_world(small_world, world.app.state.services.ingestor, end=END, days=DAYS)
    assert again.stored == 0 and again.snapshots == expected  # at-least-once delivery: duplicates ignored
    row = world.rows()[0]
    assert (
        row.image_key
        and row.body["planogram_version"] == rep.planogram_version
        and "image_jpeg" not in row.body
    )


def test_roles_no_token_401_wrong_role_403(world: World) -> None:
    for path in JSON_ROUTES:
        r = world.get(path, role=None)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        assert world.client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
        stale = TestClient(world.app)
        stale.cookies.set("shelfloop_session", "nope")
        assert stale.get(path).status_code == 401, path
        for role in ("annotator", "reviewer"):
            assert world.get(path, role).status_code == 403, (path, role)
        for role in ("merchandiser", "admin"):
            assert world.get(path, role).status_code == 200, (path, role)
    image = world.get("/reports/stores/store-north-01/bays/bay-01").json()["image"]["url"]
    assert world.get(image, role=None).status_code == 401
    assert world.get(image, "annotator").status_code == 403
    ok = world.get(image)
    assert (
        ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg" and ok.content[:2] == b"\xff\xd8"
    )
    assert world.get("/reports/stores/nowhere").status_code == 404
    assert world.get("/reports/stores/store-north-01/bays/bay-01?snapshot_id=nope").status_code == 404


def test_bay_kpis_equal_the_engine_figures_in_each_snapshot(world: World) -> None:
    for row in _latest(world.rows()).values():
        b = world.get(f"/reports/stores/{row.store_id}/bays/{row.bay_id}").json()
        assert b["snapshot_id"] == row.snapshot_id
        assert b["kpis"]["compliance_pct"] == pytest.approx(row.compliance_pct, abs=0.01)
        assert b["kpis"]["osa_pct"] == pytest.approx(row.availability_pct, abs=0.01)


def test_store_and_group_figures_match_the_snapshot_data(world: World) -> None:
    latest = _latest(world.rows())
    listing = world.get("/reports/stores").json()
    assert [s["store_id"] for s in listing["stores"]] == sorted(s[0] for s in DEMO_STORES)
    assert listing["end"] == END.isoformat()
    for st in listing["stores"]:
        slots = [sl for (sid, _), r in latest.items() if sid == st["store_id"] for sl in r.body["slots"]]
        planned = sum(sl["facings_planned"] for sl in slots)
        oos = sum(sl["status"] == "out_of_stock" for sl in slots)
        k = st["kpis"]
        assert k["bays"] == _bays(st["store_id"], world)
        assert k["planned_facings"] == planned and k["oos_slots"] == oos
        assert k["compliance_pct"] == pytest.approx(100 * sum(map(_correct, slots)) / planned, abs=0.01)
        assert k["osa_pct"] == pytest.approx(100 * (1 - oos / len(slots)), abs=0.01)
        assert st["region"] == {s[0]: s[2] for s in DEMO_STORES}[st["store_id"]]
    total = listing["kpis"]
    for by in ("store", "region", "category", "brand"):
        agg = world.get(f"/reports/aggregates?by={by}").json()
        groups = agg["groups"]
        assert sum(g["planned_facings"] for g in groups) == total["planned_facings"], by
        assert sum(g["correct_facings"] for g in groups) == total["correct_facings"], by
        assert sum(g["oos_slots"] for g in groups) == total["oos_slots"], by
    regions = {g["key"]: g for g in world.get("/reports/aggregates?by=region").json()["groups"]}
    assert set(regions) == {"North", "South"}
    north = [s for s in listing["stores"] if s["region"] == "North"]
    assert regions["North"]["planned_slots"] == sum(s["kpis"]["planned_slots"] for s in north)
    # Category figures, recomputed from the slots and the catalogue.
    with world.app.state.services.db.session() as s:
        category = {sku.sku_id: sku.category for sku in s.scalars(sa.select(m.Sku))}
    cats = {g["key"]: g for g in world.get("/reports/aggregates?by=category").json()["groups"]}
    for name, g in cats.items():
        slots = [sl for r in latest.values() for sl in r.body["slots"] if category[sl["planned_sku"]] == name]
        assert g["planned_slots"] == len(slots)
        assert g["correct_facings"] == sum(map(_correct, slots))


def test_daily_trend_is_each_bays_last_snapshot_of_the_day(world: World) -> None:
    points = world.get("/reports/trends?store_id=store-south-01").json()["points"]
    assert len(points) == DAYS and points[-1]["day"] == END.isoformat()
    rows = [r for r in world.rows() if r.store_id == "store-south-01"]
    for p in points:
        day_rows = [r for r in rows if r.captured_at.date().isoformat() == p["day"]]
        slots = [sl for r in _latest(day_rows).values() for sl in r.body["slots"]]
        planned = sum(sl["facings_planned"] for sl in slots)
        assert p["bays"] == _bays("store-south-01", world)
        assert p["compliance_pct"] == pytest.approx(100 * sum(map(_correct, slots)) / planned, abs=0.01)
    empty = world.get("/reports/trends?days=3&end=2026-01-02").json()["points"]
    assert [p["compliance_pct"] for p in empty] == [None, None, None]


def test_tasks_ordered_by_impact_with_lost_revenue(world: World) -> None:
    tasks = world.get("/reports/tasks").json()
    assert tasks, "the synthetic world has faults"
    lost = [t["lost_revenue_per_day"] for t in tasks]
    assert lost == sorted(lost, reverse=True)
    assert tasks[0]["status"] == "out_of_stock" and tasks[0]["severity"] == "critical"
    latest = _latest(world.rows())
    faults = sum(
        sum(sl["status"] != "correct" for sl in r.body["slots"]) + len(r.body["unplanned"])
        for r in latest.values()
    )
    assert len(tasks) == faults
    with world.app.state.services.db.session() as s:
        price = {sku.sku_id: sku.attributes["price"] for sku in s.scalars(sa.select(m.Sku))}
    for t in tasks:
        if t["status"] == "out_of_stock":
            expected = price[t["sku_id"]] * t["facings_planned"] * UNITS_PER_FACING_PER_DAY
            assert t["lost_revenue_per_day"] == pytest.approx(expected, abs=0.01)
            assert "restock" in t["action"] and f"shelf {t['shelf']}" in t["action"]
            assert t["sku_name"] in t["action"]
    store = world.get("/reports/tasks?store_id=store-south-01").json()
    assert store and {t["store_id"] for t in store} == {"store-south-01"}
    assert {t["region"] for t in world.get("/reports/tasks?region=South").json()} == {"South"}
    assert len(world.get("/reports/tasks?limit=3").json()) == 3


def test_task_and_slot_csv(world: World) -> None:
    tasks = world.get("/reports/tasks").json()
    r = world.get("/reports/tasks.csv")
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == len(tasks)
    assert [row["action"] for row in rows] == [t["action"] for t in tasks]
    assert [float(row["lost_revenue_per_day"]) for row in rows] == [t["lost_revenue_per_day"] for t in tasks]
    assert rows[0]["rank"] == "1" and rows[0]["store_name"] == tasks[0]["store_name"]
    all_slots = list(csv.DictReader(io.StringIO(world.get("/reports/slots.csv").text)))
    assert len(all_slots) == sum(len(r.body["slots"]) for r in world.rows())
    latest = list(csv.DictReader(io.StringIO(world.get("/reports/slots.csv?latest_only=true").text)))
    assert len(latest) == sum(len(r.body["slots"]) for r in _latest(world.rows()).values())
    assert {row["status"] for row in all_slots} <= {
        "correct",
        "misplaced_same_row",
        "wrong_shelf",
        "out_of_stock",
        "missing_unverified",
        "facing_count_mismatch",
    }


def test_bay_overlay_has_a_box_per_facing_and_places_empty_slots(world: World) -> None:
    for (store_id, bay_id), row in _latest(world.rows()).items():
        b = world.get(f"/reports/stores/{store_id}/bays/{bay_id}").json()
        counts: dict[str, int] = {}
        for sl in row.body["slots"]:
            n = len(sl["boxes"]) or (sl["status"] in ("out_of_stock", "missing_unverified"))
            counts[sl["status"]] = counts.get(sl["status"], 0) + int(n)
        for det in row.body["unplanned"]:
            counts[det["status"]] = counts.get(det["status"], 0) + 1
        w, h = b["image"]["size"]
        estimated = [o for o in b["overlay"] if o["estimated"]]
        assert all(o["x"] >= 0 and o["y"] >= 0 and o["x"] + o["w"] <= w + 0.1 for o in estimated)
        assert all(o["y"] + o["h"] <= h + 0.1 for o in estimated)
        drawn = {k: v for k, v in counts.items() if v}
        assert b["overlay_counts"] == drawn, (store_id, bay_id)
        assert b["planogram"]["to_scale"] and len(b["planogram"]["slots"]) == len(row.body["slots"])


def test_pages_log_in_with_a_cookie_and_render(world: World) -> None:
    c = TestClient(world.app)
    r = c.get("/app/stores", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/app/login?next=")
    bad = c.post("/app/login", data={"username": "merchandiser", "password": "nope"})
    assert bad.status_code == 401 and "Wrong username or password" in bad.text
    evil = c.post(
        "/app/login",
        data={"username": "merchandiser", "password": PASSWORD, "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert evil.status_code == 303 and evil.headers["location"] == "/app/stores"
    cookie = evil.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie
    for path in (
        "/app/stores",
        "/app/stores/store-north-01",
        "/app/stores/store-north-01/bays/bay-01",
        "/app/stores/store-north-01/visit",
        "/app/tasks?region=South",
        "/app/aggregates",
        "/reports/tasks.csv",
    ):
        page = c.get(path)
        assert page.status_code == 200, path
    bay = c.get("/app/stores/store-north-01/bays/bay-01").text
    assert 'class="box' in bay and "@media print" in c.get("/app/static/reports.css").text
    assert c.get("/app/stores/nowhere").status_code == 404
    c.post("/app/logout")
    assert c.get("/app/stores", follow_redirects=False).status_code == 303
    assert c.get("/reports/tasks.csv").status_code == 401  # the token was revoked, not only the cookie
    annot = TestClient(world.app)
    annot.cookies.set("shelfloop_session", world.tokens["annotator"])
    assert annot.get("/app/stores").status_code == 403
