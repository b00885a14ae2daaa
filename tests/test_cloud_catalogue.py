"""Step 3 of the cloud: the catalogue (SKUs, variants, reference images, events, CSV/JSON round trips)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from cloud_api import catalogue as cat
from cloud_api import models as m
from cloud_api.db import Database
from cloud_api.devsim import random_jpeg
from cloud_api.storage import LocalObjectStore
from shelfloop.sim.catalogue import make_catalogue


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'cat.db'}")
    yield database
    database.dispose()


def world_catalogue(n: int = 25) -> dict:
    """Exactly what `shelfloop sim generate` writes as catalogue.json."""
    world = make_catalogue(np.random.default_rng(3), n, 2, 2, variant_rate=0.5)
    return {"catalogue_version": "1", "skus": [s.to_json() for s in world.skus]}


def events(db: Database) -> list[tuple[str, str | None]]:
    with db.session() as s:
        return [
            (e.action, e.sku_id) for e in s.scalars(sa.select(m.CatalogueEvent).order_by(m.CatalogueEvent.id))
        ]


def test_gtin_check_digits() -> None:
    assert cat.gtin_valid("4006381333931") and cat.gtin_valid("96385074") and cat.gtin_valid("036000291452")
    assert not cat.gtin_valid("4006381333932") and not cat.gtin_valid("abc") and not cat.gtin_valid("123")


def test_a_synthetic_world_catalogue_imports_and_exports_back(db: Database) -> None:
    doc = world_catalogue()
    with db.session() as s:
        report = cat.import_json(s, doc, actor="admin")
    assert len(report.created) == 25 and report.variants >= 25
    with db.session() as s:
        exported = cat.export_json(s)
    by_id = {x["sku_id"]: x for x in exported["skus"]}
    for original in doc["skus"]:
        got = by_id[original["sku_id"]]
        for key, value in original.items():
            if key != "variants":
                assert got[key] == value, key
        assert {v["variant_id"] for v in got["variants"]} == {v["variant_id"] for v in original["variants"]}
        assert got["status"] == "active"
    # Importing the same document again changes nothing and records no events.
    before = len(events(db))
    with db.session() as s:
        again = cat.import_json(s, json.loads(json.dumps(exported)), actor="admin")
    assert again.created == [] and again.updated == [] and len(events(db)) == before


def test_csv_round_trip_and_changes_become_events(db: Database) -> None:
    with db.session() as s:
        cat.import_json(s, world_catalogue(6), actor="admin")
        text = cat.export_csv(s)
    lines = text.splitlines()
    assert lines[0].split(",")[:3] == ["sku_id", "gtin", "name"] and len(lines) == 7
    first_id = lines[1].split(",")[0]
    edited = text.replace(",active,", ",discontinued,", 1)
    with db.session() as s:
        report = cat.import_csv(s, edited, actor="merch")
    assert report.updated == [first_id]
    assert ("status", first_id) in events(db)
    with db.session() as s:
        assert s.get(m.Sku, first_id).status == "discontinued"


def test_bad_rows_are_all_named_and_nothing_is_imported(db: Database) -> None:
    doc = {
        "skus": [
            {"sku_id": "ok-1", "name": "Fine"},
            {"sku_id": "bad/1", "name": ""},
            {"sku_id": "x", "name": "n", "gtin": "4006381333932"},
        ]
    }
    with pytest.raises(cat.CatalogueError) as err, db.session() as s:
        cat.import_json(s, doc, actor="admin")
    assert len(err.value.problems) == 3 and any("gtin" in p for p in err.value.problems)
    with db.session() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(m.Sku)) == 0


def test_gtins_are_unique_across_skus(db: Database) -> None:
    with db.session() as s:
        cat.upsert_sku(s, {"sku_id": "a", "name": "A", "gtin": "4006381333931"}, actor="t")
    with pytest.raises(cat.CatalogueError), db.session() as s:
        cat.upsert_sku(s, {"sku_id": "b", "name": "B", "gtin": "4006381333931"}, actor="t")


def test_variants_and_reference_images(db: Database, tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    jpeg = random_jpeg()
    with db.session() as s:
        cat.upsert_sku(s, {"sku_id": "cola-330", "name": "Cola 330 ml", "brand": "Fizz"}, actor="t")
        assert cat.add_variant(s, "cola-330", "cola-330~xmas", "seasonal", actor="t") is True
        assert cat.add_variant(s, "cola-330", "cola-330~xmas", "seasonal", actor="t") is False
        key = cat.add_reference_image(s, store, "cola-330", jpeg, actor="t")
        assert cat.add_reference_image(s, store, "cola-330", jpeg, actor="t") == key
    assert store.get(key) == jpeg
    assert events(db) == [("create", "cola-330"), ("variant_add", "cola-330"), ("image_add", "cola-330")]
    with db.session() as s:
        exported = cat.sku_to_json(s.get(m.Sku, "cola-330"))
    assert exported["reference_images"] == [key]
    assert exported["variants"] == [{"variant_id": "cola-330~xmas", "kind": "seasonal"}]
