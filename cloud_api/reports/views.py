"""What the bay page draws: coloured boxes over the shelf photo, and the planogram to scale beside it.

Slot results carry the boxes of the facings that were found; an out-of-stock or unverified slot has none,
so its place is estimated from the planogram: per shelf, a straight fit from the slots that stand where
the plan wants them (planogram millimetres -> photo pixels). Estimated boxes are drawn dashed and say so.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Final

from cloud_api.reports.data import SkuMeta, Snap
from planograms.schema import Bay

__all__ = ["STATUS_STYLE", "Rect", "legend", "overlay", "planogram_drawing"]

# status -> (colour, label for people); the brief's colour code, tuned for contrast on photos and paper.
STATUS_STYLE: Final[dict[str, tuple[str, str]]] = {
    "correct": ("#1f9d55", "Correct"),
    "out_of_stock": ("#e02424", "Out of stock"),
    "misplaced_same_row": ("#f28c18", "Misplaced (same shelf)"),
    "wrong_shelf": ("#8b3fd9", "Wrong shelf"),
    "facing_count_mismatch": ("#f4c20d", "Facings mismatch"),
    "extra_unplanned": ("#1e6fe0", "Extra (not on plan)"),
    "unknown_product": ("#e0209c", "Unknown product"),
    "missing_unverified": ("#8a94a3", "Not verified"),
}
_ANCHORS: Final = ("correct", "facing_count_mismatch")


def colour(status: str) -> str:
    return STATUS_STYLE.get(status, ("#555555", status))[0]


def label(status: str) -> str:
    return STATUS_STYLE.get(status, ("#555555", status))[1]


def legend(counts: dict[str, int] | None = None) -> list[dict[str, Any]]:
    return [
        {"status": s, "colour": c, "label": lab, "count": (counts or {}).get(s)}
        for s, (c, lab) in STATUS_STYLE.items()
    ]


@dataclass(frozen=True, slots=True)
class Rect:
    status: str
    x: float
    y: float
    w: float
    h: float
    title: str
    estimated: bool = False
    shelf: int | None = None
    position: int | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("x", "y", "w", "h"):
            d[k] = round(d[k], 1)
        return d


def _fit(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Least-squares px = a + b * mm; None when the points do not pin a slope."""
    if len(points) < 2:
        return None
    mx = statistics.fmean(p[0] for p in points)
    my = statistics.fmean(p[1] for p in points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx <= 1e-9:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def _name(sku: str | None, catalogue: dict[str, SkuMeta]) -> str:
    meta = catalogue.get(sku or "")
    return meta.name if meta else (sku or "unlisted product")


def overlay(
    sn: Snap, bay: Bay | None, catalogue: dict[str, SkuMeta], frame: tuple[int, int] | None = None
) -> list[Rect]:
    """Boxes to draw over the photo, in photo pixels: found facings, estimated empty places (cut to the
    `frame` when it is known: a slot at the photo's edge is partly outside it), extras."""
    rects: list[Rect] = []
    for slot in sn.slots:
        title = f"{label(slot['status'])}: {_name(slot['planned_sku'], catalogue)}"
        for b in slot.get("boxes") or []:
            rects.append(
                Rect(
                    slot["status"],
                    b["x1"],
                    b["y1"],
                    b["x2"] - b["x1"],
                    b["y2"] - b["y1"],
                    title,
                    shelf=slot["shelf_row"] + 1,
                    position=slot["slot_index"] + 1,
                )
            )
    if bay is not None:
        for r in _estimated(sn, bay, catalogue):
            if frame is not None:
                x1, y1 = max(r.x, 0.0), max(r.y, 0.0)
                x2, y2 = min(r.x + r.w, float(frame[0])), min(r.y + r.h, float(frame[1]))
                if x2 - x1 < 4 or y2 - y1 < 4:
                    continue  # the empty place is outside the photo: the slot table still lists it
                r = Rect(r.status, x1, y1, x2 - x1, y2 - y1, r.title, True, r.shelf, r.position)
            rects.append(r)
    for det in sn.unplanned:
        b = det["box"]
        what = _name(det.get("sku_id"), catalogue) if det.get("sku_id") else "product not in the catalogue"
        rects.append(
            Rect(
                det["status"],
                b["x1"],
                b["y1"],
                b["x2"] - b["x1"],
                b["y2"] - b["y1"],
                f"{label(det['status'])}: {what}",
            )
        )
    return rects


def _estimated(sn: Snap, bay: Bay, catalogue: dict[str, SkuMeta]) -> list[Rect]:
    plan = {(r.shelf_row, s.slot_index): (r, s) for r in bay.rows for s in r.slots}
    x_pts: dict[int, list[tuple[float, float]]] = {}
    y_band: dict[int, list[tuple[float, float]]] = {}
    for slot in sn.slots:
        key = (slot["shelf_row"], slot["slot_index"])
        boxes = slot.get("boxes") or []
        if slot["status"] not in _ANCHORS or not boxes or key not in plan:
            continue
        _, s = plan[key]
        cx = statistics.fmean((b["x1"] + b["x2"]) / 2 for b in boxes)
        x_pts.setdefault(slot["shelf_row"], []).append((s.x_mm + s.width_mm / 2, cx))
        y_band.setdefault(slot["shelf_row"], []).extend((b["y1"], b["y2"]) for b in boxes)
    pooled = _fit([p for pts in x_pts.values() for p in pts])
    # Shelf surfaces (mm) against the bottoms of the products standing on them (px), for empty shelves.
    y_fit = _fit(
        [
            (r.y_mm, statistics.median(b[1] for b in y_band[r.shelf_row]))
            for r in bay.rows
            if r.shelf_row in y_band
        ]
    )
    heights = [b[1] - b[0] for band in y_band.values() for b in band]
    out: list[Rect] = []
    for slot in sn.slots:
        if slot.get("boxes") or (slot["shelf_row"], slot["slot_index"]) not in plan:
            continue
        row, s = plan[(slot["shelf_row"], slot["slot_index"])]
        fx = _fit(x_pts.get(row.shelf_row, []))
        if fx is None and len(x_pts.get(row.shelf_row, [])) == 1 and pooled is not None:
            (mm0, px0), b = x_pts[row.shelf_row][0], pooled[1]
            fx = (px0 - b * mm0, b)  # one anchor on this shelf: its position, the bay's scale
        fx = fx or pooled
        band = y_band.get(row.shelf_row)
        if band:
            y1, y2 = statistics.median(b[0] for b in band), statistics.median(b[1] for b in band)
        elif y_fit is not None and heights:
            y2 = y_fit[0] + y_fit[1] * row.y_mm
            y1 = y2 - statistics.median(heights)
        else:
            continue
        if fx is None:
            continue
        x1 = fx[0] + fx[1] * s.x_mm
        x2 = fx[0] + fx[1] * (s.x_mm + s.width_mm)
        if x2 - x1 < 2 or y2 - y1 < 2:
            continue
        title = f"{label(slot['status'])} (estimated place): {_name(slot['planned_sku'], catalogue)}"
        out.append(
            Rect(
                slot["status"],
                x1,
                y1,
                x2 - x1,
                y2 - y1,
                title,
                estimated=True,
                shelf=row.shelf_row + 1,
                position=s.slot_index + 1,
            )
        )
    return out


def planogram_drawing(sn: Snap, bay: Bay | None, catalogue: dict[str, SkuMeta]) -> dict[str, Any]:
    """The bay as planned (to scale when the planogram is known), each slot filled by its status now."""
    status = {(sl["shelf_row"], sl["slot_index"]): sl for sl in sn.slots}
    slots: list[dict[str, Any]] = []
    shelves: list[dict[str, float]] = []
    if bay is not None:
        width, height = bay.width_mm, bay.height_mm
        for row in bay.rows:
            shelves.append({"y": row.y_mm, "x": 0.0, "w": width})
            for s in row.slots:
                slots.append(
                    _slot_box(
                        row.shelf_row,
                        s.slot_index,
                        s.sku_id,
                        s.facings,
                        s.x_mm,
                        row.y_mm - row.height_mm,
                        s.width_mm,
                        row.height_mm,
                        status,
                        catalogue,
                    )
                )
    else:  # no planogram on file: draw the plan from the slots, one unit per facing
        rows: dict[int, list[dict[str, Any]]] = {}
        for sl in sn.slots:
            rows.setdefault(sl["shelf_row"], []).append(sl)
        unit, row_h = 100.0, 320.0
        width = max((sum(sl["facings_planned"] for sl in r) * unit for r in rows.values()), default=unit) + 20
        height = row_h * max(len(rows), 1) + 20
        for i, (shelf_row, rs) in enumerate(sorted(rows.items())):
            x, top = 10.0, 10 + i * row_h
            shelves.append({"y": top + row_h - 10, "x": 0.0, "w": width})
            for sl in sorted(rs, key=lambda v: v["slot_index"]):
                w = sl["facings_planned"] * unit
                slots.append(
                    _slot_box(
                        shelf_row,
                        sl["slot_index"],
                        sl["planned_sku"],
                        sl["facings_planned"],
                        x,
                        top + 10,
                        w,
                        row_h - 20,
                        status,
                        catalogue,
                    )
                )
                x += w
    return {"width": width, "height": height, "slots": slots, "shelves": shelves, "to_scale": bay is not None}


def _slot_box(
    shelf_row: int,
    slot_index: int,
    sku: str,
    facings: int,
    x: float,
    y: float,
    w: float,
    h: float,
    status: dict[tuple[int, int], dict[str, Any]],
    catalogue: dict[str, SkuMeta],
) -> dict[str, Any]:
    res = status.get((shelf_row, slot_index))
    st = res["status"] if res else "none"
    name = _name(sku, catalogue)
    font = max(14.0, min(34.0, h / 7))
    chars = max(3, int((w - 24) / (font * 0.64)))
    short = name if len(name) <= chars else name[: chars - 1] + "…"
    return {
        "x": x,
        "y": y,
        "w": w,
        "h": h,
        "status": st,
        "colour": colour(st) if res else "#d0d5dd",
        "facings": facings,
        "dividers": [x + w * i / facings for i in range(1, facings)],
        "name": name,
        "short": short,
        "font": font,
        "shelf": shelf_row + 1,
        "position": slot_index + 1,
        "found": res["facings_found"] if res else None,
        "label": label(st) if res else "not in this snapshot",
    }
