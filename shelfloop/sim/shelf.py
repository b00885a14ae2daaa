"""Planograms for a synthetic store, and shelf photos rendered from them with injected compliance faults.

A shelf photo is made in three steps: realise the bay (the planogram plus faults: gaps, swaps, extra
products), draw it on a flat canvas in millimetre scale, then photograph the canvas with a tilted camera
under store lighting. Ground truth follows every facing through the same transform.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from planograms.schema import Bay, Planogram, ShelfRow, Slot
from shelfloop.sim import effects
from shelfloop.sim.catalogue import Catalogue, Sku
from shelfloop.sim.packshot import _font, render_packshot

CHILLED = {"juice", "milk", "yoghurt", "soda", "water"}
AMBIENT = {"cereal", "pasta", "snacks", "coffee"}
FACING_GAP_MM = 6.0
SHELF_EDGE_MM = 38.0
MAX_SIDE = 1024  # longest side of a shelf photo, px

SLOT_FAULTS = ("out_of_stock", "facing_count_mismatch", "misplaced_same_row", "wrong_shelf")
SLOT_FAULT_WEIGHTS = (0.35, 0.2, 0.25, 0.2)


def pitch(sku: Sku) -> float:
    return sku.width_mm + FACING_GAP_MM


# ---------------------------------------------------------------------------------------------------------
# Planograms


def plan_store(rng: np.random.Generator, catalogue: Catalogue, n_bays: int, seed: int) -> Planogram:
    """A store format of `n_bays` bays, each merchandised by category with brand blocks, as planners do."""
    by_cat: dict[str, list[Sku]] = {}
    for s in catalogue.skus:
        by_cat.setdefault(s.category, []).append(s)
    cats = sorted(by_cat)
    bays = []
    for b in range(n_bays):
        primary = cats[b % len(cats)]
        group = CHILLED if primary in CHILLED else AMBIENT
        others = [c for c in cats if c in group and c != primary]
        rng.shuffle(others)
        # The bay's own category first, then its neighbours in the store (chilled with chilled).
        pool = [s for c in [primary, *others] for s in sorted(by_cat[c], key=lambda s: (s.family, s.sku_id))]
        bays.append(_plan_bay(rng, f"bay-{b + 1:02d}", "cooler" if primary in CHILLED else "gondola", pool))
    return Planogram(
        planogram_id=f"synthetic-{seed}",
        version="1",
        store_format="synthetic-supermarket",
        effective_from=dt.date(2026, 1, 1),
        bays=bays,
    )


def _plan_bay(rng: np.random.Generator, bay_id: str, fixture: str, pool: list[Sku]) -> Bay:
    width = float(rng.choice([1000.0, 1100.0, 1250.0]))
    n_rows = int(rng.integers(4, 6))
    queue = list(pool)  # brand blocks: consecutive SKUs of a family stay together on a row
    # A small category fills a bay with more facings per SKU rather than leaving shelves empty.
    boost = max(1.0, n_rows * width * 0.92 / max(1.0, sum(pitch(s) for s in pool)) / 2.5)
    rows: list[ShelfRow] = []
    y = 60.0
    for r in range(n_rows):
        target = width * float(rng.uniform(0.9, 0.95))
        picked: list[tuple[Sku, int]] = []
        x = 10.0
        while queue:
            s = queue[0]
            f_max = int((target - x) // pitch(s))
            if f_max < 1:
                break
            queue.pop(0)
            facings = int(min(f_max, round(rng.choice([1, 2, 2, 3, 3, 4]) * boost)))
            picked.append((s, facings))
            x += facings * pitch(s)
        # Planners spread the leftover width over the slots, so a full shelf has no gap at its end.
        pad = (target - x) / max(1, len(picked))
        slots, x = [], 10.0
        for s, facings in picked:
            w = facings * pitch(s) + pad
            slots.append(
                Slot(
                    slot_index=len(slots),
                    sku_id=s.sku_id,
                    facings=facings,
                    x_mm=round(x, 1),
                    width_mm=round(w, 1),
                )
            )
            x += round(w, 1)
        height = max((s.height_mm for s, _ in picked), default=200) * 1.06 + 25
        y += height
        rows.append(ShelfRow(shelf_row=r, y_mm=round(y, 1), height_mm=round(height, 1), slots=slots))
        y += SHELF_EDGE_MM
    return Bay(bay_id=bay_id, fixture=fixture, width_mm=width, height_mm=round(y + 60, 1), rows=rows)


# ---------------------------------------------------------------------------------------------------------
# Realising a bay: the planogram as it is on the day of the photo


@dataclass
class Block:
    """A run of facings of one product, or an empty gap, in the order they stand on the shelf."""

    kind: str  # "product" | "gap"
    width_mm: float
    sku: Sku | None = None
    facings: int = 0
    slot: tuple[int, int] | None = None  # the planned slot this product (or gap) belongs to
    unplanned: str | None = None  # "extra_unplanned" | "unknown_product"


@dataclass
class RealisedBay:
    bay: Bay
    rows: list[list[Block]]
    labels: dict[tuple[int, int], str]
    facings_found: dict[tuple[int, int], int]
    occluded: set[tuple[int, int]] = field(default_factory=set)


def realise_bay(
    rng: np.random.Generator, bay: Bay, catalogue: Catalogue, fault_rate: float, unplanned_rate: float
) -> RealisedBay:
    skus = catalogue.by_id()
    rows = [
        [
            Block("product", s.width_mm, skus[s.sku_id], s.facings, (r.shelf_row, s.slot_index))
            for s in r.slots
        ]
        for r in bay.rows
    ]
    labels = {(r.shelf_row, s.slot_index): "correct" for r in bay.rows for s in r.slots}
    found = {(r.shelf_row, s.slot_index): s.facings for r in bay.rows for s in r.slots}

    def used(row: list[Block]) -> float:
        return sum(b.width_mm for b in row) + (bay.rows[0].slots[0].x_mm if bay.rows[0].slots else 10)

    def free(key):
        return labels[key] == "correct"

    def index_of(row: list[Block], key) -> int:
        return next(i for i, b in enumerate(row) if b.slot == key and b.kind == "product")

    for r, row_plan in enumerate(bay.rows):
        for slot in row_plan.slots:
            key = (r, slot.slot_index)
            if not free(key) or rng.random() >= fault_rate:
                continue
            fault = str(rng.choice(SLOT_FAULTS, p=SLOT_FAULT_WEIGHTS))
            row = rows[r]
            i = index_of(row, key)
            blk = row[i]
            p = pitch(blk.sku)
            if fault == "out_of_stock":
                row[i] = Block("gap", blk.width_mm, slot=key)
                labels[key], found[key] = "out_of_stock", 0
            elif fault == "facing_count_mismatch":
                if blk.facings >= 2:
                    k = int(rng.integers(1, blk.facings))
                    row[i] = Block("product", blk.width_mm - k * p, blk.sku, blk.facings - k, key)
                    row.insert(i + 1, Block("gap", k * p, slot=key))
                    found[key] = blk.facings - k
                elif used(row) + p <= bay.width_mm - 5:
                    row[i] = Block("product", blk.width_mm + p, blk.sku, blk.facings + 1, key)
                    found[key] = blk.facings + 1
                else:
                    continue
                labels[key] = "facing_count_mismatch"
            elif fault == "misplaced_same_row":
                partners = [
                    j
                    for j, b in enumerate(row)
                    if b.kind == "product"
                    and b.slot
                    and b.slot != key
                    and b.unplanned is None
                    and free(b.slot)
                    and abs(j - i) >= 1
                ]
                if not partners:
                    continue
                j = int(rng.choice(partners))
                row[i], row[j] = row[j], row[i]
                labels[key] = labels[row[i].slot] = "misplaced_same_row"
            elif fault == "wrong_shelf":
                options = []
                for r2, row2 in enumerate(rows):
                    if r2 == r:
                        continue
                    for j, b in enumerate(row2):
                        if (
                            b.kind == "product"
                            and b.unplanned is None
                            and b.slot
                            and free(b.slot)
                            and b.sku.height_mm * 1.05 < bay.rows[r].height_mm
                            and blk.sku.height_mm * 1.05 < bay.rows[r2].height_mm
                            and used(row) - blk.width_mm + b.width_mm <= bay.width_mm - 5
                            and used(row2) - b.width_mm + blk.width_mm <= bay.width_mm - 5
                        ):
                            options.append((r2, j))
                if not options:
                    continue
                r2, j = options[int(rng.integers(0, len(options)))]
                other = rows[r2][j]
                rows[r2][j], row[i] = blk, other
                labels[key] = labels[other.slot] = "wrong_shelf"
    # Products that the planogram does not know on this bay: other SKUs and out-of-catalogue items.
    in_bay = {s.sku_id for r in bay.rows for s in r.slots}
    for r, row in enumerate(rows):
        if rng.random() >= unplanned_rate:
            continue
        unknown = rng.random() < 0.4 and catalogue.novel
        fits = [
            s
            for s in (catalogue.novel if unknown else catalogue.skus)
            if s.sku_id not in in_bay and s.height_mm * 1.05 < bay.rows[r].height_mm
        ]
        if not fits:
            continue
        s = fits[int(rng.integers(0, len(fits)))]
        n = int(rng.integers(1, 3))
        if not _squeeze(row, used(row) + n * pitch(s) - (bay.width_mm - 5)):
            n = 1
            if not _squeeze(row, used(row) + pitch(s) - (bay.width_mm - 5)):
                continue
        row.insert(
            int(rng.integers(0, len(row) + 1)),
            Block("product", n * pitch(s), s, n, None, "unknown_product" if unknown else "extra_unplanned"),
        )
    return RealisedBay(bay=bay, rows=rows, labels=labels, facings_found=found)


def _squeeze(row: list[Block], need_mm: float) -> bool:
    """Make `need_mm` of room by pushing products closer together, as shoppers and staff do."""
    if need_mm <= 0:
        return True
    pads = [(b, b.width_mm - b.facings * pitch(b.sku)) for b in row if b.kind == "product" and b.sku]
    room = sum(max(0.0, p) for _, p in pads)
    if room < need_mm:
        return False
    for b, p in pads:
        b.width_mm -= max(0.0, p) * need_mm / room
    return True


# ---------------------------------------------------------------------------------------------------------
# Drawing and photographing


@dataclass
class Facing:
    sku: Sku
    variant: str
    box: tuple[float, float, float, float]  # canvas px
    slot: tuple[int, int] | None
    unplanned: str | None
    in_bay: bool


class _Sprites:
    """Resized packshots, cached per image: the same pack at the same scale is drawn many times."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Image.Image] = {}

    def get(self, sku: Sku, variant: str, w: int, h: int, view: str = "front") -> Image.Image:
        key = (sku.sku_id, variant, w, h, view)
        if key not in self._cache:
            self._cache[key] = render_packshot(sku, variant, view).resize(
                (w, h), Image.Resampling.BILINEAR, reducing_gap=2.0
            )
        return self._cache[key]


def _variant(rng: np.random.Generator, sku: Sku) -> str:
    kinds = [v.kind for v in sku.variants if v.kind != "standard"]
    return str(rng.choice(kinds)) if kinds and rng.random() < 0.35 else "standard"


def render_shelf(
    rng: np.random.Generator, real: RealisedBay, catalogue: Catalogue, neighbour_pool: list[Sku]
) -> dict:
    """Draw and photograph one bay. Returns the RGB image and every label in output pixels."""
    bay = real.bay
    s = 1000.0 / bay.width_mm  # canvas px per mm
    margin = 0.16 * bay.width_mm
    cw, ch = int((bay.width_mm + 2 * margin) * s), int(bay.height_mm * s)
    cooler = bay.fixture == "cooler"
    back = (38, 42, 48) if cooler else tuple(int(v) for v in rng.integers(195, 240, 3))
    canvas = Image.new("RGB", (cw, ch), back)
    draw = ImageDraw.Draw(canvas)
    if not cooler:  # pegboard holes on the back panel
        step = max(6, int(25 * s))
        hole = tuple(max(0, c - 45) for c in back)
        for yy in range(step // 2, ch, step):
            for xx in range(step // 2, cw, step):
                draw.ellipse([xx - 1.5, yy - 1.5, xx + 1.5, yy + 1.5], fill=hole)
    else:  # LED strip on top, lit back wall
        draw.rectangle([0, 0, cw, int(25 * s)], fill=(235, 240, 250))
    x_off = margin * s
    sprites = _Sprites()
    facings: list[Facing] = []
    gap_boxes: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
    edge_col = (60, 60, 66) if cooler else tuple(int(v) for v in rng.integers(150, 225, 3))

    for r, row in enumerate(real.rows):
        plan_row = bay.rows[r]
        surface = plan_row.y_mm * s
        x = plan_row.slots[0].x_mm if plan_row.slots else 10.0
        for blk in row:
            if blk.kind == "gap":
                gap_boxes.setdefault(blk.slot, []).append(
                    (
                        x_off + x * s,
                        surface - plan_row.height_mm * 0.8 * s,
                        x_off + (x + blk.width_mm) * s,
                        surface,
                    )
                )
                x += blk.width_mm
                continue
            variant = _variant(rng, blk.sku)
            fx = x + (blk.width_mm - blk.facings * pitch(blk.sku)) / 2
            for _ in range(blk.facings):
                jitter = float(rng.uniform(-1.5, 1.5))
                facings.append(
                    _place(
                        canvas,
                        sprites,
                        rng,
                        blk.sku,
                        variant,
                        x_off + (fx + jitter + 3) * s,
                        surface,
                        s,
                        blk.slot,
                        blk.unplanned,
                        True,
                    )
                )
                fx += pitch(blk.sku)
            x += blk.width_mm
    # Neighbouring bays at both sides: they fill the margins so the photo cuts products at its edges.
    for side in (0, 1):
        for plan_row in bay.rows:
            surface = plan_row.y_mm * s
            fits = [p for p in neighbour_pool if p.height_mm * 1.05 < plan_row.height_mm] or neighbour_pool
            x = -margin + 4 if side == 0 else bay.width_mm + 8
            end = -6 if side == 0 else bay.width_mm + margin
            while True:
                sku = fits[int(rng.integers(0, len(fits)))]
                if x + pitch(sku) > end:
                    break
                facings.append(
                    _place(
                        canvas, sprites, rng, sku, "standard", x_off + x * s, surface, s, None, None, False
                    )
                )
                x += pitch(sku)
    # Shelf edges with price labels at the planned slot positions, then uprights between bays.
    tag_font = _font(-1, max(7, int(13 * s)))
    shelf_lines = []
    skus = catalogue.by_id()
    for plan_row in bay.rows:
        y0 = plan_row.y_mm * s - 6 * s
        y1 = plan_row.y_mm * s + SHELF_EDGE_MM * s
        draw.rectangle([0, y0, cw, y1], fill=edge_col)
        draw.line(
            [(0, y0), (cw, y0)], fill=tuple(min(255, c + 40) for c in edge_col), width=max(1, int(2 * s))
        )
        shelf_lines.append((0.0, plan_row.y_mm * s, float(cw), plan_row.y_mm * s))
        for slot in plan_row.slots:
            tx = x_off + slot.x_mm * s + 4 * s
            promo = rng.random() < 0.12
            draw.rectangle(
                [tx, y0 + 5 * s, tx + 46 * s, y0 + 30 * s], fill=(250, 220, 40) if promo else (250, 250, 250)
            )
            draw.text(
                (tx + 3 * s, y0 + 7 * s), f"{skus[slot.sku_id].price:.2f}", font=tag_font, fill=(20, 20, 20)
            )
            for k in range(10):
                bx = tx + 28 * s + k * 1.6 * s
                draw.line([(bx, y0 + 22 * s), (bx, y0 + 28 * s)], fill=(30, 30, 30), width=1)
        # The shadow the shelf above throws onto the row below.
        shadow = Image.new("L", (cw, int(60 * s)), 0)
        sd = ImageDraw.Draw(shadow)
        for k in range(shadow.height):
            sd.line([(0, k), (cw, k)], fill=int(90 * (1 - k / shadow.height)))
        canvas.paste((0, 0, 0), (0, int(y1)), shadow)
    upright = (90, 92, 98)
    for ux in (x_off - 14 * s, x_off + bay.width_mm * s):
        draw.rectangle([ux, 0, ux + 14 * s, ch], fill=upright)
    # Wobblers (shelf-talkers) hanging from a shelf edge: they hide the tops of products below.
    wobblers = []
    for plan_row in bay.rows[:-1]:
        if rng.random() < 0.3:
            wx = x_off + float(rng.uniform(0.05, 0.85)) * bay.width_mm * s
            wy = (plan_row.y_mm + SHELF_EDGE_MM) * s
            ww, wh = 75 * s, float(rng.uniform(70, 110)) * s
            col = [(220, 30, 40), (250, 200, 0), (30, 120, 220)][int(rng.integers(0, 3))]
            draw.rectangle([wx, wy, wx + ww, wy + wh], fill=col)
            draw.text(
                (wx + ww / 2, wy + wh / 2),
                str(rng.choice(["SALE", "NEW", "-30%", "2 FOR 1"])),
                font=_font(0, int(18 * s)),
                fill=(255, 255, 255),
                anchor="mm",
            )
            wobblers.append((wx, wy, wx + ww, wy + wh))

    # The camera: frames the whole bay (and a bit of its neighbours), not square to it, under store lighting.
    img = np.asarray(canvas)
    vw = bay.width_mm * s * float(rng.uniform(0.98, 1.12))
    vx0 = x_off + bay.width_mm * s / 2 - vw / 2 + float(rng.uniform(-0.035, 0.035)) * bay.width_mm * s
    vh = ch * float(rng.uniform(0.97, 1.02))
    vy0 = (ch - vh) / 2
    scale = MAX_SIDE / max(vw, vh)
    out_w, out_h = int(round(vw * scale / 32) * 32), int(round(vh * scale / 32) * 32)
    to_out = np.array([[out_w / vw, 0, -vx0 * out_w / vw], [0, out_h / vh, -vy0 * out_h / vh], [0, 0, 1]])
    hmat = effects.random_homography(out_w, out_h, rng, 0.04) @ to_out
    photo = effects.warp(img, hmat, out_w, out_h, border=back)
    lighting = (
        "dim_fridge"
        if cooler and rng.random() < 0.8
        else str(rng.choice(["fluorescent", "warm", "cold", "window_glare"]))
    )
    if cooler:
        photo = effects.fridge_door(photo, rng)
    photo = effects.apply_lighting(photo, lighting, rng)
    photo = effects.degrade(photo, rng)

    def to_photo(boxes):
        return effects.warp_boxes(np.asarray(boxes, np.float32).reshape(-1, 4), hmat)

    # Occlusion by wobblers, in canvas space.
    occl = np.zeros(len(facings))
    for wb in wobblers:
        for k, f in enumerate(facings):
            ix = max(0.0, min(f.box[2], wb[2]) - max(f.box[0], wb[0]))
            iy = max(0.0, min(f.box[3], wb[3]) - max(f.box[1], wb[1]))
            occl[k] += ix * iy / max(1.0, (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    boxes = to_photo([f.box for f in facings])
    return {
        "image": photo,
        "lighting": lighting,
        "facings": facings,
        "boxes": boxes,
        "occlusion": np.clip(occl, 0, 1),
        "gap_boxes": {k: to_photo(v) for k, v in gap_boxes.items()},
        "shelf_lines": to_photo([(x0, y0, x1, y0 + 1) for x0, y0, x1, _ in shelf_lines]),
    }


def _place(
    canvas: Image.Image,
    sprites: _Sprites,
    rng,
    sku: Sku,
    variant: str,
    x_px: float,
    surface_px: float,
    s: float,
    slot,
    unplanned,
    in_bay: bool,
) -> Facing:
    w, h = max(4, int(sku.width_mm * s)), max(4, int(sku.height_mm * s))
    sprite = sprites.get(sku, variant, w, h)
    pushed_back = rng.random() < 0.08
    if pushed_back:  # a facing pulled back from the shelf edge: smaller, higher, darker
        w2, h2 = max(4, int(w * 0.92)), max(4, int(h * 0.92))
        sprite = sprite.resize((w2, h2), Image.Resampling.BILINEAR)
        dark = Image.new("RGBA", sprite.size, (0, 0, 0, 0))
        dark.putalpha(sprite.getchannel("A").point(lambda a: int(a * 0.35)))
        sprite = Image.alpha_composite(sprite, dark)
        x_px += (w - w2) / 2
        y_top = surface_px - h2 - 10 * s
        w, h = w2, h2
    else:
        y_top = surface_px - h
    # Soft contact shadow, then the pack.
    shadow = sprite.getchannel("A").filter(ImageFilter.GaussianBlur(2)).point(lambda a: int(a * 0.35))
    canvas.paste((0, 0, 0), (int(x_px + 3 * s), int(y_top + 2 * s)), shadow)
    canvas.paste(sprite, (int(x_px), int(y_top)), sprite)
    return Facing(
        sku, variant, (int(x_px), int(y_top), int(x_px) + w, int(y_top) + h), slot, unplanned, in_bay
    )
