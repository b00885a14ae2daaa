"""One function per report, returning plain JSON-able dicts: the JSON API returns them as they are and
the HTML pages render them, so a page can never show a number the API would not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from cloud_api import models as m
from cloud_api.reports import data as d
from cloud_api.reports import directory as dirs
from cloud_api.reports import views as v
from cloud_api.storage import ObjectStore

__all__ = ["ReportError", "Scope", "aggregates", "bay_report", "scope", "store_list", "store_report", "tasks"]


class ReportError(LookupError):
    """Nothing to report for what was asked (unknown store, bay or snapshot): a 404."""


@dataclass
class Scope:
    """The snapshots of a window and the lookups every report needs."""

    end: date
    days: int
    snaps: list[d.Snap]
    catalogue: dict[str, d.SkuMeta]
    directory: dict[str, dirs.StoreInfo]

    @property
    def latest(self) -> list[d.Snap]:
        return d.latest_per_bay(self.snaps)


def newest_day(s: Session) -> date:
    """The day of the newest snapshot (so a quiet week still shows its last data), else today."""
    newest = s.scalar(sa.select(sa.func.max(m.ComplianceSnapshotRow.captured_at)))
    if newest is None:
        return datetime.now(UTC).date()
    if newest.tzinfo is None:  # SQLite hands back a naive value for an aggregate
        newest = newest.replace(tzinfo=UTC)
    return newest.astimezone(UTC).date()


def scope(
    s: Session,
    store: ObjectStore,
    *,
    days: int = 14,
    end: date | None = None,
    store_id: str | None = None,
    region: str | None = None,
    bay_id: str | None = None,
) -> Scope:
    end = end or newest_day(s)
    since, until = d.day_window(end, days)
    snaps = d.load_snapshots(s, since=since, until=until, store_id=store_id, bay_id=bay_id)
    directory = dirs.read_directory(store)
    if region is not None:
        snaps = [sn for sn in snaps if d.region_of(sn.store_id, directory) == region]
    return Scope(end, days, snaps, d.load_catalogue(s), directory)


def _store_meta(store_id: str, sc: Scope, names: dict[str, str]) -> dict[str, Any]:
    info = sc.directory.get(store_id)
    return {
        "store_id": store_id,
        "name": info.name if info else names.get(store_id) or store_id,
        "region": info.region if info else dirs.UNASSIGNED_REGION,
    }


def _names(s: Session) -> dict[str, str]:
    return {r.store_id: r.name for r in s.scalars(sa.select(m.Store)).all()}


def _bay_summary(sn: d.Snap) -> dict[str, Any]:
    k = d.kpis([sn])
    return {
        "bay_id": sn.bay_id,
        "snapshot_id": sn.snapshot_id,
        "captured_at": sn.captured_at.isoformat(),
        "camera_id": sn.camera_id,
        **k.to_json(),
    }


def store_list(s: Session, sc: Scope) -> dict[str, Any]:
    """Every store with its KPI tiles (as the shelves stand now), worst bays and daily trend."""
    names = _names(s)
    by_store: dict[str, list[d.Snap]] = {}
    for sn in sc.snaps:
        by_store.setdefault(sn.store_id, []).append(sn)
    stores = []
    for store_id, snaps in sorted(by_store.items()):
        latest = d.latest_per_bay(snaps)
        k = d.kpis(latest)
        tasks_ = d.build_tasks(latest, sc.catalogue, sc.directory)
        stores.append(
            {
                **_store_meta(store_id, sc, names),
                "kpis": k.to_json(),
                "last_capture": max(sn.captured_at for sn in snaps).isoformat(),
                "worst_bays": [
                    {
                        "bay_id": sn.bay_id,
                        "compliance_pct": bk.to_json()["compliance_pct"],
                        "oos_slots": bk.oos_slots,
                    }
                    for sn, bk in d.worst_bays(latest)
                ],
                "trend": d.daily_trend(snaps, end=sc.end, days=sc.days),
                "open_tasks": len(tasks_),
                "lost_revenue_per_day": round(sum(t.lost_revenue_per_day for t in tasks_), 2),
            }
        )
    return {
        "end": sc.end.isoformat(),
        "days": sc.days,
        "kpis": d.kpis(sc.latest).to_json(),
        "trend": d.daily_trend(sc.snaps, end=sc.end, days=sc.days),
        "stores": stores,
        "open_tasks": sum(st["open_tasks"] for st in stores),
        "lost_revenue_per_day": round(sum(st["lost_revenue_per_day"] for st in stores), 2),
    }


def store_report(s: Session, sc: Scope, store_id: str) -> dict[str, Any]:
    """One store: KPI tiles, its bays now, trend, category and brand breakdown, top tasks."""
    snaps = [sn for sn in sc.snaps if sn.store_id == store_id]
    if not snaps:
        raise ReportError(f"no compliance snapshots for store {store_id!r} in the {sc.days} days to {sc.end}")
    latest = d.latest_per_bay(snaps)
    tasks_ = d.build_tasks(latest, sc.catalogue, sc.directory)
    return {
        **_store_meta(store_id, sc, _names(s)),
        "end": sc.end.isoformat(),
        "days": sc.days,
        "kpis": d.kpis(latest).to_json(),
        "bays": [_bay_summary(sn) for sn in latest],
        "trend": d.daily_trend(snaps, end=sc.end, days=sc.days),
        "by_category": _groups(latest, "category", sc),
        "by_brand": _groups(latest, "brand", sc),
        "tasks": [t.to_json() for t in tasks_],
        "lost_revenue_per_day": round(sum(t.lost_revenue_per_day for t in tasks_), 2),
    }


def _groups(snaps: list[d.Snap], by: str, sc: Scope) -> list[dict[str, Any]]:
    return [{"key": k, **g.to_json()} for k, g in d.group_kpis(snaps, by, sc.catalogue, sc.directory).items()]


def bay_report(
    s: Session, sc: Scope, store: ObjectStore, store_id: str, bay_id: str, snapshot_id: str | None = None
) -> dict[str, Any]:
    """One bay: the chosen (default latest) snapshot's slots, photo overlay and planogram drawing."""
    history = [sn for sn in sc.snaps if sn.store_id == store_id and sn.bay_id == bay_id]
    if snapshot_id is not None:
        row = s.scalar(
            sa.select(m.ComplianceSnapshotRow).where(m.ComplianceSnapshotRow.snapshot_id == snapshot_id)
        )
        if row is None or row.store_id != store_id or row.bay_id != bay_id:
            raise ReportError(f"no snapshot {snapshot_id!r} of bay {bay_id!r} in store {store_id!r}")
        sn = d.Snap.from_row(row)
    elif history:
        sn = history[-1]
    else:
        raise ReportError(f"no compliance snapshots for bay {bay_id!r} of store {store_id!r}")
    plan = dirs.find_bay(dirs.get_planogram(store, sn.planogram_version), bay_id)
    image_size = None
    if sn.image_key:
        try:
            from shelfloop.contract import jpeg_dimensions

            image_size = list(jpeg_dimensions(store.get(sn.image_key)))
        except Exception:  # a missing or damaged object: the page shows the plan without the photo
            image_size = None
    rects = v.overlay(sn, plan, sc.catalogue, frame=tuple(image_size) if image_size else None)
    k = d.kpis([sn])
    slots = []
    for slot in sn.slots:
        meta = sc.catalogue.get(slot["planned_sku"])
        slots.append(
            {
                "shelf": slot["shelf_row"] + 1,
                "position": slot["slot_index"] + 1,
                "planned_sku": slot["planned_sku"],
                "name": meta.name if meta else slot["planned_sku"],
                "status": slot["status"],
                "status_label": v.label(slot["status"]),
                "colour": v.colour(slot["status"]),
                "facings_planned": slot["facings_planned"],
                "facings_found": slot["facings_found"],
                "found_sku": slot.get("found_sku"),
            }
        )
    overlay_counts: dict[str, int] = {}
    for r in rects:
        overlay_counts[r.status] = overlay_counts.get(r.status, 0) + 1
    return {
        **_store_meta(store_id, sc, _names(s)),
        "bay_id": bay_id,
        "snapshot_id": sn.snapshot_id,
        "captured_at": sn.captured_at.isoformat(),
        "camera_id": sn.camera_id,
        "device_id": sn.device_id,
        "planogram_version": sn.planogram_version,
        "kpis": k.to_json(),
        "slots": slots,
        "unplanned": sn.unplanned,
        "image": {"url": f"/reports/snapshots/{sn.snapshot_id}/image", "size": image_size}
        if image_size
        else None,
        "overlay": [r.to_json() for r in rects],
        "overlay_counts": overlay_counts,
        "planogram": v.planogram_drawing(sn, plan, sc.catalogue),
        "legend": v.legend({**k.slot_counts, **k.detection_counts}),
        "history": [
            {
                "snapshot_id": h.snapshot_id,
                "captured_at": h.captured_at.isoformat(),
                "compliance_pct": round(h.compliance_pct, 2),
                "availability_pct": round(h.availability_pct, 2),
            }
            for h in history
        ],
        "tasks": [t.to_json() for t in d.build_tasks([sn], sc.catalogue, sc.directory)],
    }


def tasks(sc: Scope, limit: int | None = None) -> list[dict[str, Any]]:
    """The open tasks of the shelves as they stand now, biggest estimated lost revenue first."""
    out = [t.to_json() for t in d.build_tasks(sc.latest, sc.catalogue, sc.directory)]
    for i, t in enumerate(out, 1):
        t["rank"] = i
    return out[:limit] if limit else out


def aggregates(sc: Scope, by: str) -> dict[str, Any]:
    groups = _groups(sc.latest, by, sc)
    if by == "store":
        for g in groups:
            g["name"] = d.store_name(g["key"], sc.directory)
            g["region"] = d.region_of(g["key"], sc.directory)
    return {
        "by": by,
        "end": sc.end.isoformat(),
        "days": sc.days,
        "total": d.kpis(sc.latest).to_json(),
        "groups": groups,
    }
