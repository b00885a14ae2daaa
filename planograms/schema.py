"""The planogram: what should be on each shelf, in what order, with how many facings.

Store format -> bays -> shelf rows (top = 0) -> ordered slots. Millimetre coordinates are kept because
width-aware gap costs and shelf registration need them. Pure data and validation: no I/O beyond JSON.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

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
    for bay in planogram.bays:
        for row in bay.rows:
            where_row = f"bay {bay.bay_id} shelf {row.shelf_row}"
            prev_end = -1e9
            for slot in sorted(row.slots, key=lambda s: s.x_mm):
                where = f"{where_row} slot {slot.slot_index}"
                if known is not None and slot.sku_id not in known:
                    problems.append(f"{where}: unknown SKU {slot.sku_id!r}")
                if slot.facings < 1:
                    problems.append(f"{where}: facings must be >= 1, got {slot.facings}")
                if slot.width_mm <= 0:
                    problems.append(f"{where}: width must be > 0 mm")
                if slot.x_mm < prev_end - 0.5:
                    problems.append(
                        f"{where}: overlaps the previous slot ({slot.x_mm:.0f} < {prev_end:.0f} mm)"
                    )
                if slot.x_mm + slot.width_mm > bay.width_mm + 0.5:
                    problems.append(f"{where}: extends past the bay width {bay.width_mm:.0f} mm")
                prev_end = slot.x_mm + slot.width_mm
    if problems:
        raise PlanogramError(problems)


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
