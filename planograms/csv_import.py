"""Planograms from the CSV that space-planning tools export: one row per position.

Blue Yonder / ProSpace, Apollo and most in-house tools can write a flat "position list": bay, shelf,
position, product, facings, width (and sometimes x). That is the lowest common denominator a retailer can
give us, so it is what we import. Every bad cell is reported with its line and its bay / shelf / slot, all
at once, because a planner fixes an export in one go, not one error per run.

Columns (header names are case-insensitive; the aliases in brackets are accepted):

- ``bay_id`` [bay, segment, segment_id]
- ``shelf`` [shelf_row, shelf_number]: 0 = top shelf (``shelves_from_bottom=True`` for tools that count
  from the floor)
- ``position`` [slot, slot_index, position_index, rank_x]: left-to-right order on the shelf
- ``sku`` [sku_id, product_id] or ``upc`` [gtin, ean]: a UPC/GTIN is mapped with ``upc_to_sku``
- ``facings`` [h_facings, hfacings]
- ``width_mm`` [width, slot_width_mm]: the slot's whole width; or ``unit_width_mm`` [product_width_mm]:
  one facing's width, multiplied by the facings
- optional ``x_mm`` [x]: the slot's left edge from the bay's left edge; without it slots are laid side by
  side in position order
- optional ``shelf_y_mm``, ``shelf_height_mm``, ``bay_width_mm``, ``bay_height_mm``, ``fixture``
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from planograms.schema import Bay, Planogram, PlanogramError, ShelfRow, Slot, validate

ALIASES: dict[str, tuple[str, ...]] = {
    "bay_id": ("bay_id", "bay", "segment", "segment_id"),
    "shelf": ("shelf", "shelf_row", "shelf_number"),
    "position": ("position", "slot", "slot_index", "position_index", "rank_x"),
    "sku": ("sku", "sku_id", "product_id"),
    "upc": ("upc", "gtin", "ean"),
    "facings": ("facings", "h_facings", "hfacings"),
    "width_mm": ("width_mm", "width", "slot_width_mm"),
    "unit_width_mm": ("unit_width_mm", "product_width_mm"),
    "x_mm": ("x_mm", "x"),
    "shelf_y_mm": ("shelf_y_mm",),
    "shelf_height_mm": ("shelf_height_mm",),
    "bay_width_mm": ("bay_width_mm",),
    "bay_height_mm": ("bay_height_mm",),
    "fixture": ("fixture",),
}
DEFAULT_SHELF_HEIGHT_MM = 300.0  # nominal clear height when the export has none (used only as a row prior)


@dataclass
class _Position:
    line: int
    bay_id: str
    shelf: int
    position: int
    sku: str
    facings: int
    width_mm: float
    x_mm: float | None
    shelf_y_mm: float | None
    shelf_height_mm: float | None
    bay_width_mm: float | None
    bay_height_mm: float | None
    fixture: str | None


def read_planogram_csv(
    source: str | Path | Iterable[str],
    *,
    planogram_id: str,
    effective_from: dt.date,
    version: str = "1",
    store_format: str = "",
    known_skus: Iterable[str] | None = None,
    upc_to_sku: Mapping[str, str] | None = None,
    shelves_from_bottom: bool = False,
    fixture: str = "gondola",
) -> Planogram:
    """Parse and validate a position-list CSV; raise PlanogramError naming every bad line and slot.

    `source` is a path, or the CSV text as an iterable of lines (an open file works).
    """
    lines = _read_lines(source)
    rows = list(csv.reader(lines, _sniff(lines)))
    if not rows or not any(c.strip() for c in rows[0]):
        raise PlanogramError(["CSV is empty: expected a header row"])
    columns = _columns(rows[0])
    positions: list[_Position] = []
    problems: list[str] = []
    for n, cells in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in cells):
            continue
        pos = _parse_row(n, cells, columns, upc_to_sku, problems)
        if pos is not None:
            positions.append(pos)
    if not positions and not problems:
        problems.append("CSV has a header but no positions")
    if problems:
        raise PlanogramError(problems)
    plan = _build(
        positions,
        planogram_id=planogram_id,
        version=version,
        store_format=store_format,
        effective_from=effective_from,
        shelves_from_bottom=shelves_from_bottom,
        fixture=fixture,
    )
    validate(plan, known_skus)
    return plan


def _read_lines(source: str | Path | Iterable[str]) -> list[str]:
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and "," not in source):
        try:
            text = Path(source).read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise PlanogramError([f"{source}: cannot read ({exc})"]) from exc
        except UnicodeDecodeError:
            text = Path(source).read_text(encoding="cp1252")  # ProSpace-era exports
        return text.splitlines()
    if isinstance(source, str):
        return source.splitlines()
    return [ln.rstrip("\r\n") for ln in source]


def _sniff(lines: list[str]) -> type[csv.Dialect] | csv.Dialect:
    sample = "\n".join(lines[:20])
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|")
    except csv.Error:
        return csv.excel


def _columns(header: list[str]) -> dict[str, int]:
    names = [h.strip().lower().replace(" ", "_").replace("-", "_") for h in header]
    found: dict[str, int] = {}
    for key, aliases in ALIASES.items():
        for alias in aliases:
            if alias in names:
                found[key] = names.index(alias)
                break
    missing = [k for k in ("bay_id", "shelf", "position", "facings") if k not in found]
    if "sku" not in found and "upc" not in found:
        missing.append("sku (or upc)")
    if "width_mm" not in found and "unit_width_mm" not in found:
        missing.append("width_mm (or unit_width_mm)")
    if missing:
        raise PlanogramError([f"CSV header lacks column(s): {', '.join(missing)} (header: {header})"])
    return found


def _parse_row(
    n: int,
    cells: list[str],
    columns: dict[str, int],
    upc_to_sku: Mapping[str, str] | None,
    problems: list[str],
) -> _Position | None:
    def cell(key: str) -> str:
        i = columns.get(key)
        return cells[i].strip() if i is not None and i < len(cells) else ""

    before = len(problems)
    bay_id = cell("bay_id")
    where = f"line {n} (bay {bay_id or '?'} shelf {cell('shelf') or '?'} slot {cell('position') or '?'})"

    def number(key: str, kind: type, required: bool, positive: bool = False) -> float | int | None:
        raw = cell(key)
        if not raw:
            if required:
                problems.append(f"{where}: {key} is empty")
            return None
        try:
            value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
        except ValueError:
            problems.append(f"{where}: {key} {raw!r} is not {'an integer' if kind is int else 'a number'}")
            return None
        if positive and value <= 0:
            problems.append(f"{where}: {key} must be > 0, got {raw}")
            return None
        return value

    if not bay_id:
        problems.append(f"{where}: bay_id is empty")
    shelf = number("shelf", int, True)
    position = number("position", int, True)
    if shelf is not None and shelf < 0:
        problems.append(f"{where}: shelf must be >= 0, got {shelf}")
    if position is not None and position < 0:
        problems.append(f"{where}: position must be >= 0, got {position}")
    facings = number("facings", int, True, positive=True)
    sku = cell("sku")
    upc = cell("upc")
    if not sku and upc:
        if upc_to_sku is None:
            sku = upc
        elif upc in upc_to_sku:
            sku = upc_to_sku[upc]
        else:
            problems.append(f"{where}: UPC {upc} is not in the catalogue")
    if not sku and not upc:
        problems.append(f"{where}: no sku or upc")
    if "width_mm" in columns and cell("width_mm"):
        width = number("width_mm", float, True, positive=True)
    else:
        unit = number("unit_width_mm", float, True, positive=True)
        width = None if unit is None or facings is None else float(unit) * int(facings)
    x_mm = number("x_mm", float, False)
    shelf_y = number("shelf_y_mm", float, False, positive=True)
    shelf_h = number("shelf_height_mm", float, False, positive=True)
    bay_w = number("bay_width_mm", float, False, positive=True)
    bay_h = number("bay_height_mm", float, False, positive=True)
    if len(problems) > before:
        return None
    assert shelf is not None and position is not None and facings is not None and width is not None
    return _Position(
        line=n,
        bay_id=bay_id,
        shelf=int(shelf),
        position=int(position),
        sku=sku,
        facings=int(facings),
        width_mm=float(width),
        x_mm=None if x_mm is None else float(x_mm),
        shelf_y_mm=None if shelf_y is None else float(shelf_y),
        shelf_height_mm=None if shelf_h is None else float(shelf_h),
        bay_width_mm=None if bay_w is None else float(bay_w),
        bay_height_mm=None if bay_h is None else float(bay_h),
        fixture=cell("fixture") or None,
    )


def _build(
    positions: list[_Position],
    *,
    planogram_id: str,
    version: str,
    store_format: str,
    effective_from: dt.date,
    shelves_from_bottom: bool,
    fixture: str,
) -> Planogram:
    problems: list[str] = []
    by_bay: dict[str, dict[int, list[_Position]]] = {}
    for p in positions:
        by_bay.setdefault(p.bay_id, {}).setdefault(p.shelf, []).append(p)
    bays: list[Bay] = []
    for bay_id, shelves in by_bay.items():
        numbers = sorted(shelves)
        if shelves_from_bottom:  # renumber so that 0 is the top shelf, as the schema wants
            top = max(numbers)
            shelves = {top - k: v for k, v in shelves.items()}
            numbers = sorted(shelves)
        rows: list[ShelfRow] = []
        y = 0.0
        for shelf in numbers:
            items = sorted(shelves[shelf], key=lambda p: p.position)
            where = f"bay {bay_id} shelf {shelf}"
            seen: dict[int, int] = {}
            for p in items:
                if p.position in seen:
                    problems.append(
                        f"{where} slot {p.position}: position given twice "
                        f"(lines {seen[p.position]} and {p.line})"
                    )
                seen[p.position] = p.line
            given = [p.x_mm is not None for p in items]
            if any(given) and not all(given):
                lines = ", ".join(str(p.line) for p in items if p.x_mm is None)
                problems.append(f"{where}: x_mm given for some positions but not on line(s) {lines}")
            slots: list[Slot] = []
            x = 0.0
            for p in items:
                x0 = p.x_mm if p.x_mm is not None else x
                slots.append(
                    Slot(slot_index=p.position, sku_id=p.sku, facings=p.facings, x_mm=x0, width_mm=p.width_mm)
                )
                x = x0 + p.width_mm
            height = next((p.shelf_height_mm for p in items if p.shelf_height_mm), DEFAULT_SHELF_HEIGHT_MM)
            y_given = next((p.shelf_y_mm for p in items if p.shelf_y_mm), None)
            y = y_given if y_given is not None else y + height
            rows.append(ShelfRow(shelf_row=shelf, y_mm=y, height_mm=height, slots=slots))
        flat = [p for v in shelves.values() for p in v]
        width = next((p.bay_width_mm for p in flat if p.bay_width_mm), None)
        if width is None:
            width = max((s.x_mm + s.width_mm for r in rows for s in r.slots), default=1.0)
        height = next((p.bay_height_mm for p in flat if p.bay_height_mm), None) or y + 100.0
        bay_fixture = next((p.fixture for p in flat if p.fixture), fixture)
        bays.append(Bay(bay_id=bay_id, fixture=bay_fixture, width_mm=width, height_mm=height, rows=rows))
    if problems:
        raise PlanogramError(problems)
    return Planogram(
        planogram_id=planogram_id,
        version=version,
        store_format=store_format,
        effective_from=effective_from,
        bays=bays,
    )


def to_csv(planogram: Planogram) -> str:
    """Write a planogram as a position list (the inverse of read_planogram_csv, for tests and exports)."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["bay_id", "shelf", "position", "sku", "facings", "width_mm", "x_mm", "shelf_y_mm",
                "shelf_height_mm", "bay_width_mm", "bay_height_mm", "fixture"])  # fmt: skip
    for bay in planogram.bays:
        for row in bay.rows:
            for s in sorted(row.slots, key=lambda s: s.x_mm):
                w.writerow([bay.bay_id, row.shelf_row, s.slot_index, s.sku_id, s.facings, s.width_mm, s.x_mm,
                            row.y_mm, row.height_mm, bay.width_mm, bay.height_mm, bay.fixture])  # fmt: skip
    return out.getvalue()
