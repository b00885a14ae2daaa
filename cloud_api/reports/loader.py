"""Report data from a synthetic world, through the path a store device's snapshots take.

Each shelf photo is scored by the real engine (`planograms.compliance.check_bay`) on its ground-truth
boxes, as `planograms.evaluate` does; the result becomes a `contract.ComplianceSnapshot`, is encoded, and
goes to `Ingestor.handle` on the device's uplink topic, exactly as the ingest worker would hand it over.
Photos are spread over a few stores in two regions and over several days, so stores differ and trends move.

``python -m cloud_api.reports.loader --world DIR [--config FILE] [--days 14]`` fills a cloud database for
a local look at the reports.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import msgspec

from cloud_api import catalogue as cat
from cloud_api import models as m
from cloud_api.ingest import Ingestor
from cloud_api.reports.directory import put_planogram, write_directory
from planograms.catalogue import CatalogueView
from planograms.compliance import BayCompliance, check_bay
from planograms.evaluate import observation_from_coco
from planograms.schema import Planogram
from shelfloop import contract

__all__ = ["DEMO_STORES", "LoadReport", "load_world"]

# (store id, name, region, how many of the world's bays it has)
DEMO_STORES: tuple[tuple[str, str, str, int | None], ...] = (
    ("store-north-01", "Northgate", "North", None),
    ("store-north-02", "Riverside", "North", None),
    ("store-south-01", "Harbour Road", "South", 4),
)
DEVICE_ID = "shelfcam-01"


@dataclass
class LoadReport:
    photos: int = 0
    partial_photos: list[str] = field(default_factory=list)
    snapshots: int = 0
    stored: int = 0
    rejected: list[str] = field(default_factory=list)
    stores: list[str] = field(default_factory=list)
    planogram_version: str = ""


def _jpeg(path: Path) -> bytes:
    """The photo as sent: the frame itself, re-encoded only when over the contract's image limit."""
    data = path.read_bytes()
    if len(data) <= contract.MAX_JPEG_BYTES:
        return data
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=75)
        return buf.getvalue()


def _box(b: tuple[float, float, float, float], w: int, h: int) -> contract.BoundingBox | None:
    x1, y1 = min(max(b[0], 0.0), w), min(max(b[1], 0.0), h)
    x2, y2 = min(max(b[2], 0.0), w), min(max(b[3], 0.0), h)
    if x2 <= x1 or y2 <= y1:
        return None
    return contract.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2)


def to_snapshot(
    res: BayCompliance,
    *,
    store_id: str,
    camera_id: str,
    planogram_version: str,
    captured_at: datetime,
    image: bytes,
    size: tuple[int, int],
) -> contract.ComplianceSnapshot:
    """The message a device would publish for this result (the caller has dropped partial results)."""
    w, h = size
    slots = [
        contract.SlotResult(
            shelf_row=s.shelf_row,
            slot_index=s.slot_index,
            planned_sku=s.planned_sku,
            status=s.status,
            facings_planned=s.facings_planned,
            facings_found=s.facings_found,
            found_sku=s.found_sku,
            boxes=[bb for b in s.boxes if (bb := _box(b, w, h)) is not None],
        )
        for s in res.slots
    ]
    unplanned = [
        contract.UnplannedDetection(
            status=u.status, sku_id=u.sku_id, box=bb, score=min(1.0, max(0.0, u.score))
        )
        for u in res.unplanned
        if (bb := _box(u.box, w, h)) is not None
    ]
    met = res.metrics
    assert met.compliance is not None and met.on_shelf_availability is not None
    sid = hashlib.sha256(f"{store_id}|{res.bay_id}|{captured_at.isoformat()}".encode()).hexdigest()[:24]
    return contract.ComplianceSnapshot(
        snapshot_id=f"snap-{sid}",
        store_id=store_id,
        device_id=DEVICE_ID,
        camera_id=camera_id,
        bay_id=res.bay_id,
        planogram_version=planogram_version,
        captured_at=captured_at,
        model_version="ground-truth-boxes",
        gallery_version="ground-truth-boxes",
        slots=slots,
        unplanned=unplanned,
        compliance_pct=round(100.0 * met.compliance, 4),
        availability_pct=round(100.0 * met.on_shelf_availability, 4),
        image_jpeg=image,
    )


def load_world(
    world: str | Path,
    ingestor: Ingestor,
    *,
    end: date | None = None,
    days: int = 14,
    stores: tuple[tuple[str, str, str, int | None], ...] = DEMO_STORES,
) -> LoadReport:
    """Catalogue, store directory, planogram and `days` days of snapshots (one per bay per store per day,
    ending on `end`, default today) from `world` into the cloud that `ingestor` writes to."""
    root = Path(world)
    if end is None:  # the last day whose captures (07:30-08:30 UTC) are already in the past
        now = datetime.now(UTC)
        end = now.date() if now.hour >= 9 else now.date() - timedelta(days=1)
    report = LoadReport(stores=[s[0] for s in stores])
    plan = msgspec.json.decode((root / "planograms.json").read_bytes(), type=Planogram)
    catalogue_doc = json.loads((root / "catalogue.json").read_text())
    view = CatalogueView.from_json(catalogue_doc, str(root / "catalogue.json"))
    known, info, variants = view.known_skus, view.info, view.variants

    with ingestor.db.session() as s:
        cat.import_json(s, catalogue_doc, actor="reports-loader")
        for store_id, name, _region, _n in stores:
            row = s.get(m.Store, store_id)
            if row is None:
                s.add(m.Store(store_id=store_id, name=name))
            elif not row.name:
                row.name = name
    write_directory(ingestor.store, {sid: {"name": n, "region": r} for sid, n, r, _ in stores})
    version = f"{plan.planogram_id}:{plan.version}"
    report.planogram_version = version
    put_planogram(ingestor.store, plan, version)

    # Score every photo once; a photo stands for its bay on the days it is assigned to.
    scored: dict[str, list[tuple[BayCompliance, bytes, tuple[int, int], str]]] = {}
    for split in ("train", "val", "test"):
        path = root / "shelf" / "annotations" / f"{split}.json"
        if not path.exists():
            continue
        coco = json.loads(path.read_text())
        anns: dict[int, list[dict[str, Any]]] = {}
        for a in coco["annotations"]:
            anns.setdefault(a["image_id"], []).append(a)
        for im in coco["images"]:
            obs = observation_from_coco(anns.get(im["id"], []), im["width"], im["height"])
            res = check_bay(
                obs,
                plan.bay(im["bay_id"]),
                known_skus=known,
                variants=variants,
                catalogue=info,
                other_bays=plan.bays,
            )
            report.photos += 1
            if res.partial:  # a device does not publish a figure it cannot stand behind
                report.partial_photos.append(im["image_id"])
                continue
            image = _jpeg(root / im["file_name"])
            scored.setdefault(im["bay_id"], []).append(
                (res, image, (im["width"], im["height"]), im["image_id"])
            )
    for photos in scored.values():
        photos.sort(key=lambda p: p[3])

    bays = sorted(scored)
    for si, (store_id, _name, _region, n_bays) in enumerate(stores):
        for bi, bay_id in enumerate(bays[:n_bays] if n_bays else bays):
            photos = scored[bay_id]
            for d in range(days):
                day = end - timedelta(days=days - 1 - d)
                res, image, size, _ = photos[(d * 2 + si + bi) % len(photos)]
                at = datetime.combine(day, time(7, 30), UTC) + timedelta(minutes=11 * bi + 3 * si)
                msg = to_snapshot(
                    res,
                    store_id=store_id,
                    camera_id=f"cam-{bay_id}",
                    planogram_version=version,
                    captured_at=at,
                    image=image,
                    size=size,
                )
                topic = contract.uplink_topic_for(msg)
                result = ingestor.handle(topic, contract.encode(msg))
                report.snapshots += 1
                if result.status == "stored":
                    report.stored += 1
                elif result.status == "rejected":
                    report.rejected.append(f"{msg.snapshot_id}: {result.reason}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Fill the configured cloud database and object store with a synthetic world's snapshots."""
    import argparse

    from cloud_api.db import Database
    from cloud_api.storage import make_object_store
    from shelfloop.settings import load_settings

    parser = argparse.ArgumentParser(prog="cloud_api.reports.loader", description=main.__doc__)
    parser.add_argument("--world", required=True, type=Path)
    parser.add_argument("--config", default=None)
    parser.add_argument("--days", type=int, default=14)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    db = Database(settings.database.url)
    ingestor = Ingestor(db, make_object_store(settings.storage), image_check=settings.cloud.image_check)
    rep = load_world(args.world, ingestor, days=args.days)
    db.dispose()
    print(
        f"{rep.stored} snapshots stored ({rep.snapshots} sent, {len(rep.rejected)} rejected) for "
        f"{', '.join(rep.stores)} from {rep.photos} photos ({len(rep.partial_photos)} partial, skipped)"
    )
    return 0 if not rep.rejected else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
