"""The planogram: what should be on each shelf, in what order, with how many facings.

Store format -> bays -> shelf rows (top = 0) -> ordered slots. Millimetre coordinates are kept because
width-aware gap costs and shelf registration need them. Pure data and validation: no I/O beyond JSON.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec


class Slot(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    slot_index: int
    sku_id: str
    facings: int
    x_mm: float
    width_mm: float


class ShelfRow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    shelf_row: int  # 0 = top shelf
    y_mm: float  # shelf surface, from the top of the bay
    height_mm: float  # clear height above the shelf surface
    slots: list[Slot]


class Bay(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    bay_id: str
    fixture: str  # "gondola" | "cooler"
    width_mm: float
    height_mm: float
    rows: list[ShelfRow]


class Planogram(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    planogram_id: str
    version: str
    store_format: str
    effective_from: dt.date
    bays: list[Bay]

    def bay(self, bay_id: str) -> Bay:
        for b in self.bays:
            if b.bay_id == bay_id:
                return b
        raise KeyError(f"planogram {self.planogram_id} has no bay {bay_id!r}")


class PlanogramError(ValueError):
    """A planogram that cannot be trusted; `problems` name the bay, shelf row and slot of each fault."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def validate(planogram: Planogram, known_skus: Iterable[str] | None = None) -> None:
    """Raise PlanogramError for unknown SKUs, overlapping or out-of-bay slots and bad facings."""
    known = set(known_skus) if known_skus is not None else None
    problems: list[str] = []
    seen_bays: set[str] = set()
    for bay in planogram.bays:
        if bay.bay_id in seen_bays:
            problems.append(f"bay {bay.bay_id}: appears twice in planogram {planogram.planogram_id}")
        seen_bays.add(bay.bay_id)
        problems.extend(bay_problems(bay, known))
    if problems:
        raise PlanogramError(problems)


def validate_bay(bay: Bay, known_skus: Iterable[str] | None = None) -> None:
    """Raise PlanogramError when one bay cannot be scored (the compliance engine checks its input)."""
    problems = bay_problems(bay, set(known_skus) if known_skus is not None else None)
    if problems:
        raise PlanogramError(problems)


def bay_problems(bay: Bay, known: set[str] | None = None) -> list[str]:
    """Every fault of one bay, each naming the bay, shelf row and slot (empty list: the bay is sound)."""
    problems: list[str] = []
    if bay.width_mm <= 0 or bay.height_mm <= 0:
        problems.append(f"bay {bay.bay_id}: width and height must be > 0 mm")
    rows_seen: set[int] = set()
    for row in bay.rows:
        where_row = f"bay {bay.bay_id} shelf {row.shelf_row}"
        if row.shelf_row in rows_seen:
            problems.append(f"{where_row}: shelf row number appears twice")
        rows_seen.add(row.shelf_row)
        if row.height_mm <= 0:
            problems.append(f"{where_row}: height must be > 0 mm")
        indices_seen: set[int] = set()
        prev_end = -1e9
        for slot in sorted(row.slots, key=lambda s: s.x_mm):
            where = f"{where_row} slot {slot.slot_index}"
            if slot.slot_index in indices_seen:
                problems.append(f"{where}: slot index appears twice on the shelf")
            indices_seen.add(slot.slot_index)
            if known is not None and slot.sku_id not in known:
                problems.append(f"{where}: unknown SKU {slot.sku_id!r}")
            if slot.facings < 1:
                problems.append(f"{where}: facings must be >= 1, got {slot.facings}")
            if slot.width_mm <= 0:
                problems.append(f"{where}: width must be > 0 mm")
            if slot.x_mm < -0.5:
                problems.append(f"{where}: starts before the bay's left edge ({slot.x_mm:.0f} mm)")
            if slot.x_mm < prev_end - 0.5:
                problems.append(f"{where}: overlaps the previous slot ({slot.x_mm:.0f} < {prev_end:.0f} mm)")
            if slot.x_mm + slot.width_mm > bay.width_mm + 0.5:
                problems.append(f"{where}: extends past the bay width {bay.width_mm:.0f} mm")
            prev_end = slot.x_mm + slot.width_mm
    return problems


def in_force(planograms: Iterable[Planogram], on: dt.date, planogram_id: str | None = None) -> Planogram:
    """The version in force on `on`: a reset replaces the previous version from its `effective_from`.

    Versions of one planogram (same `planogram_id`, or all given when there is only one id) are ranked by
    `effective_from`; the latest that is not in the future wins. Two versions starting the same day are
    ambiguous and raise, as does a date before the first version.
    """
    plans = [p for p in planograms if planogram_id is None or p.planogram_id == planogram_id]
    ids = sorted({p.planogram_id for p in plans})
    if len(ids) > 1:
        raise PlanogramError([f"several planograms given ({', '.join(ids)}); pass planogram_id"])
    if not plans:
        what = f"no planogram {planogram_id!r} given" if planogram_id else "no planogram given"
        raise PlanogramError([what])
    started = [p for p in plans if p.effective_from <= on]
    if not started:
        first = min(p.effective_from for p in plans)
        raise PlanogramError([f"planogram {ids[0]}: no version in force on {on} (the first starts {first})"])
    latest = max(p.effective_from for p in started)
    current = [p for p in started if p.effective_from == latest]
    if len(current) > 1:
        versions = ", ".join(sorted(p.version for p in current))
        raise PlanogramError([f"planogram {ids[0]}: versions {versions} all start on {latest}"])
    return current[0]


def from_csv(source: str | Path | Iterable[str], **kwargs: Any) -> Planogram:
    """Read a space-planning CSV export, one row per position (planograms.csv_import.read_planogram_csv)."""
    from planograms.csv_import import read_planogram_csv

    return read_planogram_csv(source, **kwargs)


def dumps(planogram: Planogram) -> bytes:
    return msgspec.json.format(msgspec.json.encode(planogram), indent=2)


def load(path: str | Path, known_skus: Iterable[str] | None = None) -> Planogram:
    """Read and validate a planogram JSON file."""
    try:
        plan = msgspec.json.decode(Path(path).read_bytes(), type=Planogram)
    except msgspec.ValidationError as exc:
        raise PlanogramError([f"{path}: {exc}"]) from exc
    except msgspec.DecodeError as exc:
        raise PlanogramError([f"{path}: not valid JSON ({exc})"]) from exc
    validate(plan, known_skus)
    return plan
