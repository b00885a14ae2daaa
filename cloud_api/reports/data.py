"""From stored compliance snapshots to the numbers, rankings and tasks merchandisers act on.

Definitions (the same as `planograms.metrics`, so a store figure is what its bays' engines reported):

- **compliance %** = correct facings / planned facings, summed over the slots (facing-weighted);
- **on-shelf availability (OSA) %** = 1 - out-of-stock slots / planned slots (slot-weighted);
- a store, region, category or brand figure sums the slots of the **latest snapshot of each bay**
  (the shelf as it stands now); a daily trend point does the same with each bay's last snapshot that day.

Task impact: there is no point-of-sale feed yet, so the velocity proxy is the plan itself: space follows
sales, so a slot's planned facings times `UNITS_PER_FACING_PER_DAY` estimates units sold per day (a SKU's
catalogue attribute ``units_per_day`` overrides it). Lost revenue per day = price x units x the share of
demand a fault loses (`LOSS_SHARE`: all of it out of stock, some when facings are short or the product
is hard to find). Tasks sort by that estimate, then by severity.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.orm import Session

from cloud_api import models as m
from cloud_api.reports.directory import UNASSIGNED_REGION, StoreInfo
from planograms.metrics import correct_facings
from shelfloop.contract import DETECTION_STATUSES, SLOT_STATUSES

__all__ = [
    "LOSS_SHARE",
    "UNITS_PER_FACING_PER_DAY",
    "Kpis",
    "SkuMeta",
    "Snap",
    "Task",
    "build_tasks",
    "daily_trend",
    "group_kpis",
    "kpis",
    "latest_per_bay",
    "load_catalogue",
    "load_snapshots",
    "slot_csv_rows",
]

UNITS_PER_FACING_PER_DAY: Final = 1.5
LOSS_SHARE: Final[dict[str, float]] = {
    "out_of_stock": 1.0,  # every sale of the day is lost
    "missing_unverified": 0.5,  # unknown: as likely empty as not (the task says "check")
    "facing_count_mismatch": 0.25,  # times the missing share of facings: runs out sooner, less visible
    "misplaced_same_row": 0.1,  # shoppers who look in the planned place miss it
    "wrong_shelf": 0.15,
}
SEVERITY: Final[dict[str, tuple[int, str]]] = {
    "out_of_stock": (0, "critical"),
    "facing_count_mismatch": (1, "high"),
    "missing_unverified": (1, "high"),
    "wrong_shelf": (2, "medium"),
    "misplaced_same_row": (2, "medium"),
    "extra_unplanned": (3, "low"),
    "unknown_product": (3, "low"),
}
GROUPINGS: Final = ("store", "region", "category", "brand")


# --------------------------------------------------------------------------------------------------------
# Loading


@dataclass(slots=True)
class Snap:
    """One stored snapshot, unpacked from its row and message body."""

    snapshot_id: str
    store_id: str
    device_id: str
    camera_id: str
    bay_id: str
    planogram_version: str
    captured_at: datetime
    compliance_pct: float
    availability_pct: float
    image_key: str | None
    slots: list[dict[str, Any]]
    unplanned: list[dict[str, Any]]

    @classmethod
    def from_row(cls, row: m.ComplianceSnapshotRow) -> Snap:
        body = row.body or {}
        slots = sorted(body.get("slots") or [], key=lambda s: (s["shelf_row"], s["slot_index"]))
        return cls(
            snapshot_id=row.snapshot_id,
            store_id=row.store_id,
            device_id=row.device_id,
            camera_id=str(body.get("camera_id", "")),
            bay_id=row.bay_id,
            planogram_version=str(body.get("planogram_version", "")),
            captured_at=row.captured_at,
            compliance_pct=row.compliance_pct,
            availability_pct=row.availability_pct,
            image_key=row.image_key,
            slots=slots,
            unplanned=list(body.get("unplanned") or []),
        )

    @property
    def day(self) -> date:
        return self.captured_at.astimezone(UTC).date()


def load_snapshots(
    s: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    store_id: str | None = None,
    bay_id: str | None = None,
) -> list[Snap]:
    """Snapshots in a time window (oldest first); the window keeps a page's work bounded."""
    q = sa.select(m.ComplianceSnapshotRow)
    if since is not None:
        q = q.where(m.ComplianceSnapshotRow.captured_at >= since)
    if until is not None:
        q = q.where(m.ComplianceSnapshotRow.captured_at < until)
    if store_id is not None:
        q = q.where(m.ComplianceSnapshotRow.store_id == store_id)
    if bay_id is not None:
        q = q.where(m.ComplianceSnapshotRow.bay_id == bay_id)
    rows = s.scalars(q.order_by(m.ComplianceSnapshotRow.captured_at, m.ComplianceSnapshotRow.id)).all()
    return [Snap.from_row(r) for r in rows]


def day_window(end: date, days: int) -> tuple[datetime, datetime]:
    """[start of the first day, start of the day after `end`) in UTC."""
    until = datetime.combine(end + timedelta(days=1), time(), UTC)
    return until - timedelta(days=days), until


@dataclass(frozen=True, slots=True)
class SkuMeta:
    name: str
    brand: str
    category: str
    price: float | None
    units_per_day: float | None


def load_catalogue(s: Session) -> dict[str, SkuMeta]:
    """Names, brand, category and price (catalogue attribute) of every SKU."""
    out: dict[str, SkuMeta] = {}
    for sku in s.scalars(sa.select(m.Sku)).all():
        attrs = sku.attributes or {}
        out[sku.sku_id] = SkuMeta(
            name=sku.name,
            brand=sku.brand or "unlisted",
            category=sku.category or "unlisted",
            price=_number(attrs.get("price")),
            units_per_day=_number(attrs.get("units_per_day")),
        )
    return out


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f >= 0 and f == f and f != float("inf") else None


def latest_per_bay(snaps: Iterable[Snap]) -> list[Snap]:
    """Each (store, bay)'s newest snapshot: the shelf as it stands now. Input order breaks ties."""
    latest: dict[tuple[str, str], Snap] = {}
    for sn in snaps:
        key = (sn.store_id, sn.bay_id)
        if key not in latest or sn.captured_at >= latest[key].captured_at:
            latest[key] = sn
    return sorted(latest.values(), key=lambda sn: (sn.store_id, sn.bay_id))


# --------------------------------------------------------------------------------------------------------
# KPIs and aggregates


@dataclass(slots=True)
class Kpis:
    """Sums that every figure derives from, so any grouping adds up exactly."""

    bays: int = 0
    planned_slots: int = 0
    planned_facings: int = 0
    correct_facings: int = 0
    found_facings: int = 0
    oos_slots: int = 0
    slot_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SLOT_STATUSES, 0))
    detection_counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DETECTION_STATUSES, 0))

    def add_slot(self, slot: dict[str, Any]) -> None:
        status = slot["status"]
        self.planned_slots += 1
        self.planned_facings += int(slot["facings_planned"])
        self.found_facings += int(slot["facings_found"])
        self.correct_facings += correct_facings(_SlotView(slot))
        self.oos_slots += status == "out_of_stock"
        self.slot_counts[status] = self.slot_counts.get(status, 0) + 1

    def add_detection(self, det: dict[str, Any]) -> None:
        self.detection_counts[det["status"]] = self.detection_counts.get(det["status"], 0) + 1

    @property
    def compliance_pct(self) -> float | None:
        return 100.0 * self.correct_facings / self.planned_facings if self.planned_facings else None

    @property
    def osa_pct(self) -> float | None:
        return 100.0 * (1 - self.oos_slots / self.planned_slots) if self.planned_slots else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["compliance_pct"] = _round(self.compliance_pct)
        d["osa_pct"] = _round(self.osa_pct)
        return d


class _SlotView:
    """Attribute access over a slot dict, for `planograms.metrics.correct_facings`."""

    __slots__ = ("facings_found", "facings_planned", "status")

    def __init__(self, slot: dict[str, Any]) -> None:
        self.status = slot["status"]
        self.facings_planned = int(slot["facings_planned"])
        self.facings_found = int(slot["facings_found"])


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def kpis(snaps: Iterable[Snap]) -> Kpis:
    k = Kpis()
    for sn in snaps:
        k.bays += 1
        for slot in sn.slots:
            k.add_slot(slot)
        for det in sn.unplanned:
            k.add_detection(det)
    return k


def group_kpis(
    snaps: Iterable[Snap],
    by: str,
    catalogue: dict[str, SkuMeta],
    directory: dict[str, StoreInfo],
) -> dict[str, Kpis]:
    """KPIs per store, region, category or brand (slots grouped by their planned SKU's catalogue entry;
    unplanned detections by their own SKU, ``unknown`` for unrecognised products)."""
    if by not in GROUPINGS:
        raise ValueError(f"group by one of {', '.join(GROUPINGS)}")
    out: dict[str, Kpis] = {}
    for sn in snaps:
        if by in ("store", "region"):
            key = sn.store_id if by == "store" else region_of(sn.store_id, directory)
            k = out.setdefault(key, Kpis())
            k.bays += 1
            for slot in sn.slots:
                k.add_slot(slot)
            for det in sn.unplanned:
                k.add_detection(det)
            continue
        seen: set[str] = set()
        for slot in sn.slots:
            key = _sku_group(slot["planned_sku"], by, catalogue)
            k = out.setdefault(key, Kpis())
            if key not in seen:
                k.bays += 1
                seen.add(key)
            k.add_slot(slot)
        for det in sn.unplanned:
            key = _sku_group(det.get("sku_id"), by, catalogue) if det.get("sku_id") else "unknown"
            out.setdefault(key, Kpis()).add_detection(det)
    return dict(sorted(out.items()))


def _sku_group(sku_id: str | None, by: str, catalogue: dict[str, SkuMeta]) -> str:
    meta = catalogue.get(sku_id or "")
    if meta is None:
        return "unlisted"
    return meta.category if by == "category" else meta.brand


def region_of(store_id: str, directory: dict[str, StoreInfo]) -> str:
    info = directory.get(store_id)
    return info.region if info else UNASSIGNED_REGION


def store_name(store_id: str, directory: dict[str, StoreInfo]) -> str:
    info = directory.get(store_id)
    return info.name if info else store_id


def daily_trend(snaps: Sequence[Snap], *, end: date, days: int) -> list[dict[str, Any]]:
    """One point per day: each bay's last snapshot that day; days without any capture have None."""
    by_day: dict[date, list[Snap]] = {}
    for sn in snaps:
        by_day.setdefault(sn.day, []).append(sn)
    points = []
    for i in range(days - 1, -1, -1):
        d = end - timedelta(days=i)
        k = kpis(latest_per_bay(by_day.get(d, [])))
        points.append(
            {
                "day": d.isoformat(),
                "compliance_pct": _round(k.compliance_pct),
                "osa_pct": _round(k.osa_pct),
                "oos_slots": k.oos_slots if k.bays else None,
                "bays": k.bays,
            }
        )
    return points


# --------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(slots=True)
class Task:
    """One thing to do on the shop floor, with what it is worth."""

    store_id: str
    store_name: str
    region: str
    bay_id: str
    shelf: int | None  # 1 = top shelf, as staff count them
    position: int | None  # 1 = leftmost slot of the shelf
    status: str
    severity: str
    sku_id: str | None
    sku_name: str
    brand: str
    category: str
    facings_planned: int
    facings_found: int
    price: float | None
    units_per_day: float | None
    lost_revenue_per_day: float
    action: str
    snapshot_id: str
    captured_at: datetime
    _rank: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_rank")
        d["captured_at"] = self.captured_at.isoformat()
        return d


TASK_CSV_FIELDS: Final = (
    "rank",
    "store_id",
    "store_name",
    "region",
    "bay_id",
    "shelf",
    "position",
    "severity",
    "status",
    "sku_id",
    "sku_name",
    "brand",
    "category",
    "facings_planned",
    "facings_found",
    "price",
    "units_per_day",
    "lost_revenue_per_day",
    "action",
    "snapshot_id",
    "captured_at",
)


def bay_label(bay_id: str) -> str:
    """ "Bay 05" for an id like ``bay-05``, "Bay X" otherwise: how staff read it on the aisle sign."""
    return "Bay " + (bay_id[4:] if bay_id.lower().startswith("bay-") else bay_id)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _row_centres(sn: Snap) -> list[tuple[float, int]]:
    """(median box centre y, shelf row) of each row with boxes: where unplanned products stand."""
    ys: dict[int, list[float]] = {}
    for slot in sn.slots:
        for b in slot.get("boxes") or []:
            ys.setdefault(slot["shelf_row"], []).append((b["y1"] + b["y2"]) / 2)
    return sorted((statistics.median(v), row) for row, v in ys.items())


def _nearest_row(box: dict[str, Any], centres: list[tuple[float, int]]) -> int | None:
    if not centres:
        return None
    cy = (box["y1"] + box["y2"]) / 2
    return min(centres, key=lambda c: abs(c[0] - cy))[1]


def build_tasks(
    latest: Iterable[Snap], catalogue: dict[str, SkuMeta], directory: dict[str, StoreInfo]
) -> list[Task]:
    """Every fault in the latest snapshot of each bay, as plain-language tasks, biggest impact first."""
    tasks: list[Task] = []
    for sn in latest:
        region, sname = region_of(sn.store_id, directory), store_name(sn.store_id, directory)

        def make(
            status: str,
            sku_id: str | None,
            shelf_row: int | None,
            *,
            sn: Snap = sn,
            sname: str = sname,
            region: str = region,
            **kw: Any,
        ) -> Task:
            meta = catalogue.get(sku_id or "")
            rank, severity = SEVERITY[status]
            return Task(
                store_id=sn.store_id,
                store_name=sname,
                region=region,
                bay_id=sn.bay_id,
                shelf=None if shelf_row is None else shelf_row + 1,
                status=status,
                severity=severity,
                sku_id=sku_id,
                sku_name=meta.name if meta else (sku_id or "unlisted product"),
                brand=meta.brand if meta else "",
                category=meta.category if meta else "",
                price=meta.price if meta else None,
                snapshot_id=sn.snapshot_id,
                captured_at=sn.captured_at,
                _rank=rank,
                **kw,
            )

        for slot in sn.slots:
            status = slot["status"]
            if status == "correct":
                continue
            planned, found = int(slot["facings_planned"]), int(slot["facings_found"])
            meta = catalogue.get(slot["planned_sku"])
            units = (meta.units_per_day if meta else None) or planned * UNITS_PER_FACING_PER_DAY
            share = LOSS_SHARE.get(status, 0.0)
            if status == "facing_count_mismatch":
                share *= max(0, planned - found) / planned if planned else 0.0
            price = meta.price if meta else None
            lost = round((price or 0.0) * units * share, 2)
            name = meta.name if meta else slot["planned_sku"]
            where = f"{bay_label(sn.bay_id)}, shelf {slot['shelf_row'] + 1}"
            pos = slot["slot_index"] + 1
            if status == "out_of_stock":
                action = f"{where}: restock {name} — {_plural(planned, 'facing')} empty"
            elif status == "facing_count_mismatch" and found < planned:
                action = f"{where}: fill {planned - found} of {_plural(planned, 'facing')} of {name}"
            elif status == "facing_count_mismatch":
                action = f"{where}: take back {found - planned} extra facing(s) of {name} (plan: {planned})"
            elif status == "misplaced_same_row":
                action = f"{where}: move {name} to position {pos} from the left"
            elif status == "wrong_shelf":
                shelf = slot["shelf_row"] + 1
                action = f"{bay_label(sn.bay_id)}: move {name} back to shelf {shelf}, position {pos}"
            else:
                action = f"{where}: check {name} by eye — the camera could not verify it"
            tasks.append(
                make(
                    status,
                    slot["planned_sku"],
                    slot["shelf_row"],
                    position=pos,
                    facings_planned=planned,
                    facings_found=found,
                    units_per_day=round(units, 2),
                    lost_revenue_per_day=lost,
                    action=action,
                )
            )
        centres = _row_centres(sn)
        for det in sn.unplanned:
            row = _nearest_row(det["box"], centres)
            where = bay_label(sn.bay_id) + (f", shelf {row + 1}" if row is not None else "")
            if det["status"] == "extra_unplanned":
                meta = catalogue.get(det.get("sku_id") or "")
                name = meta.name if meta else str(det.get("sku_id"))
                action = f"{where}: remove {name} — not on this bay's plan"
            else:
                action = f"{where}: remove the unlisted product, or send it to the catalogue team"
            tasks.append(
                make(
                    det["status"],
                    det.get("sku_id"),
                    row,
                    position=None,
                    facings_planned=0,
                    facings_found=1,
                    units_per_day=None,
                    lost_revenue_per_day=0.0,
                    action=action,
                )
            )
    tasks.sort(
        key=lambda t: (-t.lost_revenue_per_day, t._rank, t.store_id, t.bay_id, t.shelf or 0, t.position or 0)
    )
    return tasks


def task_csv_rows(tasks: Sequence[Task]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for i, t in enumerate(tasks, 1):
        d = t.to_json()
        d["rank"] = i
        rows.append(["" if d[f] is None else d[f] for f in TASK_CSV_FIELDS])
    return rows


SLOT_CSV_FIELDS: Final = (
    "snapshot_id",
    "store_id",
    "bay_id",
    "captured_at",
    "planogram_version",
    "shelf",
    "position",
    "planned_sku",
    "sku_name",
    "brand",
    "category",
    "status",
    "facings_planned",
    "facings_found",
    "found_sku",
)


def slot_csv_rows(snaps: Iterable[Snap], catalogue: dict[str, SkuMeta]) -> list[list[Any]]:
    """One row per planned slot of each snapshot (the raw verdicts, for a spreadsheet or BI tool)."""
    rows: list[list[Any]] = []
    for sn in snaps:
        for slot in sn.slots:
            meta = catalogue.get(slot["planned_sku"])
            rows.append(
                [
                    sn.snapshot_id,
                    sn.store_id,
                    sn.bay_id,
                    sn.captured_at.isoformat(),
                    sn.planogram_version,
                    slot["shelf_row"] + 1,
                    slot["slot_index"] + 1,
                    slot["planned_sku"],
                    meta.name if meta else "",
                    meta.brand if meta else "",
                    meta.category if meta else "",
                    slot["status"],
                    slot["facings_planned"],
                    slot["facings_found"],
                    slot.get("found_sku") or "",
                ]
            )
    return rows


def worst_bays(latest: Sequence[Snap], n: int = 3) -> list[tuple[Snap, Kpis]]:
    scored = [(sn, kpis([sn])) for sn in latest]
    scored.sort(key=lambda p: p[1].compliance_pct if p[1].compliance_pct is not None else 101.0)
    return scored[:n]


def filter_snaps(snaps: Iterable[Snap], keep: Callable[[Snap], bool]) -> list[Snap]:
    return [sn for sn in snaps if keep(sn)]
