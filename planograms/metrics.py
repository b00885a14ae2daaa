"""The numbers merchandisers read off a compliance result, and the scores we grade the engine with.

Pure Python on purpose: the cloud aggregates these per store, region and brand without numpy. Definitions
follow the research notes (shared/research/planogram_al.md §1.4): compliance = correct facings / planned
facings; on-shelf availability = 1 - out-of-stock slots / planned slots; share of shelf by facings and by
linear width.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import msgspec

UNKNOWN_GROUP = "unknown"  # products the recognizer could not name
UNLISTED_GROUP = "unlisted"  # named SKUs the catalogue mapping has no brand/category for


class SkuInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What share of shelf is grouped by; the catalogue passes one per SKU."""

    brand: str
    category: str
    width_mm: float | None = None  # pack front, from the catalogue: evidence between size variants
    height_mm: float | None = None


class ShareOfShelf(msgspec.Struct, kw_only=True):
    """Fractions (0..1) of the bay's products by brand and by category, counted two ways."""

    brand_by_facings: dict[str, float] = {}
    brand_by_width: dict[str, float] = {}
    category_by_facings: dict[str, float] = {}
    category_by_width: dict[str, float] = {}


class ComplianceMetrics(msgspec.Struct, kw_only=True):
    """Bay-level KPIs. `compliance` and `on_shelf_availability` are None when the result is partial:
    a figure we cannot stand behind is withheld, not reported as 0 %."""

    compliance: float | None
    compliance_verified: float | None  # over the slots whose state could be verified
    on_shelf_availability: float | None
    planned_slots: int
    planned_facings: int
    found_facings: int
    correct_facings: int
    verified_slots: int
    out_of_stock_slots: int
    slot_counts: dict[str, int]
    detection_counts: dict[str, int]
    share_of_shelf: ShareOfShelf


class _SlotLike(Protocol):
    status: str
    facings_planned: int
    facings_found: int


class _DetectionLike(Protocol):
    status: str


def correct_facings(slot: _SlotLike) -> int:
    """Facings standing where the plan wants them: all of a correct slot, up to plan for a miscount."""
    if slot.status == "correct":
        return slot.facings_planned
    if slot.status == "facing_count_mismatch":
        return min(slot.facings_found, slot.facings_planned)
    return 0


def compute_metrics(
    slots: Sequence[_SlotLike],
    detections: Sequence[_DetectionLike],
    products: Iterable[tuple[str | None, float]],
    *,
    catalogue: Mapping[str, SkuInfo] | None = None,
    partial: bool = False,
    slot_labels: Sequence[str] = (),
    detection_labels: Sequence[str] = (),
) -> ComplianceMetrics:
    """KPIs of one bay. `products` are the bay's detected facings as (canonical SKU or None, width mm)."""
    planned_facings = sum(s.facings_planned for s in slots)
    verified = [s for s in slots if s.status != "missing_unverified"]
    correct = sum(correct_facings(s) for s in slots)
    verified_facings = sum(s.facings_planned for s in verified)
    oos = sum(1 for s in slots if s.status == "out_of_stock")
    slot_counts = {label: 0 for label in slot_labels}
    for s in slots:
        slot_counts[s.status] = slot_counts.get(s.status, 0) + 1
    det_counts = {label: 0 for label in detection_labels}
    for d in detections:
        det_counts[d.status] = det_counts.get(d.status, 0) + 1
    return ComplianceMetrics(
        compliance=None if partial or not planned_facings else correct / planned_facings,
        compliance_verified=correct / verified_facings if verified_facings else None,
        on_shelf_availability=None if partial or not slots else 1.0 - oos / len(slots),
        planned_slots=len(slots),
        planned_facings=planned_facings,
        found_facings=sum(s.facings_found for s in slots),
        correct_facings=correct,
        verified_slots=len(verified),
        out_of_stock_slots=oos,
        slot_counts=slot_counts,
        detection_counts=det_counts,
        share_of_shelf=share_of_shelf(products, catalogue),
    )


def share_of_shelf(
    products: Iterable[tuple[str | None, float]], catalogue: Mapping[str, SkuInfo] | None
) -> ShareOfShelf:
    """Facing share and linear share by brand and category; empty without a catalogue to group by."""
    if catalogue is None:
        return ShareOfShelf()
    by: dict[str, dict[str, list[float]]] = {"brand": {}, "category": {}}
    n, width = 0, 0.0
    for sku, w in products:
        info = catalogue.get(sku) if sku is not None else None
        keys = {
            "brand": info.brand if info else UNKNOWN_GROUP if sku is None else UNLISTED_GROUP,
            "category": info.category if info else UNKNOWN_GROUP if sku is None else UNLISTED_GROUP,
        }
        for dim, key in keys.items():
            acc = by[dim].setdefault(key, [0.0, 0.0])
            acc[0] += 1
            acc[1] += max(0.0, w)
        n += 1
        width += max(0.0, w)

    def frac(dim: str, k: int, total: float) -> dict[str, float]:
        items = sorted(by[dim].items(), key=lambda kv: (-kv[1][k], kv[0]))
        return {key: (v[k] / total if total > 0 else 0.0) for key, v in items}

    return ShareOfShelf(
        brand_by_facings=frac("brand", 0, n),
        brand_by_width=frac("brand", 1, width),
        category_by_facings=frac("category", 0, n),
        category_by_width=frac("category", 1, width),
    )


def label_scores(pairs: Iterable[tuple[str, str]], labels: Sequence[str] = ()) -> dict:
    """Per-label precision / recall / F1 / support of (truth, predicted) pairs, and their macro-F1.

    Macro-F1 averages the labels that occur in the truth (support > 0); a label only ever predicted
    still gets a row, so its false positives are visible, and still costs the truth labels their recall.
    """
    tp: dict[str, int] = {}
    fp: dict[str, int] = {}
    fn: dict[str, int] = {}
    seen = list(labels)
    for truth, pred in pairs:
        for label in (truth, pred):
            if label not in seen:
                seen.append(label)
        if truth == pred:
            tp[truth] = tp.get(truth, 0) + 1
        else:
            fp[pred] = fp.get(pred, 0) + 1
            fn[truth] = fn.get(truth, 0) + 1
    per_label: dict[str, dict[str, float | int]] = {}
    f1s = []
    for label in seen:
        t, p, f = tp.get(label, 0), fp.get(label, 0), fn.get(label, 0)
        precision = t / (t + p) if t + p else 0.0
        recall = t / (t + f) if t + f else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": t + f}
        if t + f:
            f1s.append(f1)
    return {"macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "per_label": per_label}
