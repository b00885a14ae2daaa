"""The planogram compliance engine: every label from hand-built shelves, bad input, properties, and the
synthetic world's ground truth.

Shelves here are "photographed" by a small camera model (scale, offset, shear, crop) from a realised row:
a list of blocks left to right, each a run of facings of one product or an empty stretch, as the
synthetic world's generator lays them out. Neighbouring bays stand at both ends, with SKUs of this bay.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planograms.compliance import (
    CORRECT,
    EXTRA_UNPLANNED,
    FACING_MISMATCH,
    MISPLACED,
    MISSING_UNVERIFIED,
    OUT_OF_STOCK,
    SLOT_STATUSES,
    UNKNOWN_PRODUCT,
    WRONG_SHELF,
    BayCompliance,
    ComplianceConfig,
    ObservationError,
    ShelfObservation,
    bench_bay,
    check_bay,
    synthetic_bay,
)
from planograms.evaluate import evaluate_on_world
from planograms.metrics import SkuInfo, compute_metrics, label_scores
from planograms.schema import Bay, PlanogramError, ShelfRow, Slot

UNIT, GAP, PAD, HEIGHT = 60.0, 6.0, 12.0, 150.0
PITCH = UNIT + GAP
MARGIN = 220.0  # mm of the neighbouring bays in the photo, each side


def plan_bay(rows: list[list[tuple[str, int]]], bay_id: str = "bay-A", width: float | None = None) -> Bay:
    """A bay whose slots hold `facings` facings of 60 mm products side by side, with a little padding."""
    shelf_rows, y = [], 0.0
    for r, items in enumerate(rows):
        y += 230.0
        x, slots = 10.0, []
        for k, (sku, f) in enumerate(items):
            w = f * PITCH + PAD
            slots.append(Slot(slot_index=k, sku_id=sku, facings=f, x_mm=x, width_mm=w))
            x += w
        shelf_rows.append(ShelfRow(shelf_row=r, y_mm=y, height_mm=190.0, slots=slots))
    longest = max(s.x_mm + s.width_mm for r in shelf_rows for s in r.slots)
    return Bay(
        bay_id=bay_id,
        fixture="gondola",
        width_mm=width or round(longest + 60.0),
        height_mm=y + 80.0,
        rows=shelf_rows,
    )


@dataclass
class Gap:
    width_mm: float


Block = tuple[str | None, int] | Gap  # (SKU or None for an unknown product, facings) or an empty stretch


def as_planned(bay: Bay) -> list[list[Block]]:
    return [[(s.sku_id, s.facings) for s in r.slots] for r in bay.rows]


@dataclass
class Camera:
    scale: float = 0.8  # px per mm
    x0: float = 40.0  # px of the bay's left edge at the top shelf
    y0: float = 20.0
    shear: float = 0.0  # px of x per px of y (a camera not square to the bay)
    crop_left_mm: float | None = None  # the photo starts this far into the bay (x0 is then ignored)
    neighbours: tuple[str, ...] = ("A", "X")  # SKUs on the neighbouring bays (A is planned here too)


def photograph(
    bay: Bay,
    realised: list[list[Block]],
    cam: Camera | None = None,
    probs: dict[str, list[tuple[str, float]]] | None = None,
    shelf_lines: bool = False,
) -> ShelfObservation:
    """Boxes of every facing (and of the neighbouring bays' products) in photo pixels."""
    cam = cam or Camera()
    boxes: list[tuple[float, float, float, float]] = []
    skus: list[str | None] = []
    for row, blocks in zip(bay.rows, realised, strict=True):
        x = 10.0
        for b in blocks:
            if isinstance(b, Gap):
                x += b.width_mm
                continue
            sku, n = b
            fx = x + PAD / 2 + GAP / 2
            for _ in range(n):
                boxes.append((fx, row.y_mm - HEIGHT, fx + UNIT, row.y_mm))
                skus.append(sku)
                fx += PITCH
            x += n * PITCH + PAD
        for k, sku in enumerate(cam.neighbours):  # two products on each neighbouring bay
            for fx in (-14.0 - UNIT - k * PITCH, bay.width_mm + 14.0 + k * PITCH):
                boxes.append((fx, row.y_mm - HEIGHT, fx + UNIT, row.y_mm))
                skus.append(sku)
    arr = np.array(boxes)
    x0, left_mm = (cam.x0, -MARGIN) if cam.crop_left_mm is None else (0.0, cam.crop_left_mm)
    y_px = cam.y0 + cam.scale * arr[:, [1, 3]]
    x_px = x0 + cam.scale * (arr[:, [0, 2]] - left_mm) + cam.shear * y_px[:, [1, 1]]
    width = int(x0 + cam.scale * (bay.width_mm + MARGIN - left_mm) + cam.shear * cam.scale * bay.height_mm)
    height = int(cam.y0 * 2 + cam.scale * bay.height_mm)
    xyxy = np.stack([x_px[:, 0], y_px[:, 0], x_px[:, 1], y_px[:, 1]], 1)
    # The photo's edges cut products; a product less than a quarter visible is not detected.
    full = xyxy[:, 2] - xyxy[:, 0]
    xyxy[:, 0] = np.clip(xyxy[:, 0], 0, width)
    xyxy[:, 2] = np.clip(xyxy[:, 2], 0, width)
    keep = (xyxy[:, 2] - xyxy[:, 0]) >= 0.25 * full
    xyxy = xyxy[keep]
    skus = [s for s, k in zip(skus, keep, strict=True) if k]
    cands = None
    prob = np.ones(len(skus))
    if probs:
        cands = []
        for i, s in enumerate(skus):
            top = probs.get(s or "", [(s, 1.0)]) if s else []
            cands.append(list(top))
            if top:
                skus[i], prob[i] = top[0][0], top[0][1]
    lines = None
    if shelf_lines:
        lines = np.array([cam.y0 + cam.scale * r.y_mm for r in bay.rows])
    return ShelfObservation(
        xyxy=xyxy,
        confidence=np.full(len(skus), 0.9),
        sku_id=skus,
        sku_prob=prob,
        image_size=(width, height),
        candidates=cands,
        shelf_lines=lines,
    )


def status(res: BayCompliance) -> dict[tuple[int, int], str]:
    return {(s.shelf_row, s.slot_index): s.status for s in res.slots}


def only(res: BayCompliance, **expected: str) -> None:
    """Every slot is correct except the ones named r<row>s<slot>=status."""
    want = {(s.shelf_row, s.slot_index): CORRECT for s in res.slots}
    for key, value in expected.items():
        r, s = key[1:].split("s")
        want[(int(r), int(s))] = value
    assert status(res) == want, res.notes


BAY = plan_bay(
    [
        [("A", 2), ("B", 1), ("C", 3), ("D", 2)],
        [("E", 3), ("F", 2), ("G", 1), ("H", 2)],
        [("I", 2), ("J", 2), ("K", 2), ("L", 1)],
    ]
)
KNOWN = [chr(c) for c in range(ord("A"), ord("Z") + 1)]
FACINGS = sum(s.facings for r in BAY.rows for s in r.slots)  # 23


def slot_width(bay: Bay, row: int, slot: int) -> float:
    return bay.rows[row].slots[slot].width_mm


# ---------------------------------------------------------------------------------------------------------
# Every label


def test_a_shelf_as_planned_is_fully_compliant():
    res = check_bay(photograph(BAY, as_planned(BAY)), BAY, known_skus=KNOWN)
    only(res)
    assert res.metrics.compliance == 1.0 and res.metrics.on_shelf_availability == 1.0
    assert res.unplanned == [] and not res.partial
    assert res.excluded_detections == 2 * 2 * len(BAY.rows)  # the neighbouring bays' products, 2 a side
    assert all(s.facings_found == s.facings_planned for s in res.slots)
    assert res.slots[0].boxes and res.slots[0].found_sku == "A"


def test_out_of_stock_is_a_visible_gap_in_the_slots_place():
    real = as_planned(BAY)
    real[0][2] = Gap(slot_width(BAY, 0, 2))
    res = check_bay(photograph(BAY, real), BAY)
    only(res, r0s2=OUT_OF_STOCK)
    assert res.metrics.on_shelf_availability == pytest.approx(1 - 1 / 12)
    assert res.metrics.compliance == pytest.approx(1 - 3 / FACINGS)


def test_a_sliver_at_the_photo_edge_does_not_show_an_empty_slots_sku_elsewhere():
    real = as_planned(BAY)
    real[0][2] = Gap(slot_width(BAY, 0, 2))
    obs = photograph(BAY, real, Camera(crop_left_mm=40.0))  # the photo starts inside the bay
    i = obs.sku_id.index("I")  # the first facing still in the photo on the bottom shelf
    y0, y1 = obs.xyxy[i, 1], obs.xyxy[i, 3]
    sliver = [0.0, y0 + 2, 0.2 * (obs.xyxy[i, 2] - obs.xyxy[i, 0]), y1 - 1]  # cut by the photo's side
    res = check_bay(_with_boxes(obs, [(sliver, "C")], prob=0.9), BAY)
    assert status(res)[(0, 2)] == OUT_OF_STOCK


def test_an_empty_slot_stays_out_of_stock_when_a_look_alike_elsewhere_is_only_half_believed():
    real = as_planned(BAY)
    real[0][2] = Gap(slot_width(BAY, 0, 2))
    real[0].append(("Q", 1))  # an unplanned product at the end of the row that looks a little like C
    maybe = check_bay(photograph(BAY, real, probs={"Q": [("Q", 0.6), ("C", 0.35)]}), BAY)
    assert status(maybe)[(0, 2)] == OUT_OF_STOCK
    surely = check_bay(photograph(BAY, real, probs={"Q": [("C", 0.9), ("Q", 0.1)]}), BAY)
    assert status(surely)[(0, 2)] == MISPLACED  # C really stands at the end of its row


def test_a_missed_product_under_another_product_is_unverified_not_out_of_stock():
    real = as_planned(BAY)
    real[1][1] = (None, 2)  # an unknown product stands (or hangs) where F should be
    res = check_bay(photograph(BAY, real), BAY)
    only(res, r1s1=MISSING_UNVERIFIED)
    assert [u.status for u in res.unplanned] == [UNKNOWN_PRODUCT, UNKNOWN_PRODUCT]
    assert res.metrics.out_of_stock_slots == 0


def test_a_slot_outside_the_photo_is_unverified():
    bay = plan_bay([[("A", 1), ("B", 2), ("C", 2)], [("D", 2), ("E", 2), ("F", 1)]])
    res = check_bay(photograph(bay, as_planned(bay), Camera(crop_left_mm=72.0)), bay)
    only(res, r0s0=MISSING_UNVERIFIED, r1s0=CORRECT)  # D keeps one of its two facings in the photo
    assert not res.partial


def test_a_gap_detector_decides_out_of_stock_when_given():
    real = as_planned(BAY)
    real[0][2] = Gap(slot_width(BAY, 0, 2))
    obs = photograph(BAY, real)
    no_gap_boxes = ShelfObservation(
        obs.xyxy, obs.confidence, obs.sku_id, obs.sku_prob, obs.image_size, visible_gaps=np.zeros((0, 4))
    )
    assert status(check_bay(no_gap_boxes, BAY))[(0, 2)] == MISSING_UNVERIFIED
    c = obs.xyxy[next(i for i, s in enumerate(obs.sku_id) if s == "B")]
    gap_box = np.array([[c[2] + 5, c[1], c[2] + 5 + 3 * PITCH * 0.8, c[3]]])
    with_gap = ShelfObservation(
        obs.xyxy, obs.confidence, obs.sku_id, obs.sku_prob, obs.image_size, visible_gaps=gap_box
    )
    assert status(check_bay(with_gap, BAY))[(0, 2)] == OUT_OF_STOCK


def test_a_missed_facing_counts_as_missing_only_without_a_gap_detector():
    obs = photograph(BAY, as_planned(BAY))
    keep = np.ones(len(obs), dtype=bool)
    keep[[i for i, s in enumerate(obs.sku_id) if s == "C"][1]] = False  # the detector missed one facing

    def cut(gaps: np.ndarray | None) -> ShelfObservation:
        skus = [s for s, k in zip(obs.sku_id, keep, strict=True) if k]
        return ShelfObservation(
            obs.xyxy[keep], obs.confidence[keep], skus, obs.sku_prob[keep], obs.image_size, visible_gaps=gaps
        )

    only(check_bay(cut(None), BAY), r0s2=FACING_MISMATCH)  # its room is visibly empty
    res = check_bay(cut(np.zeros((0, 4))), BAY)  # a gap detector saw no gap there
    only(res)
    assert next(s for s in res.slots if s.planned_sku == "C").facings_found == 2


@pytest.mark.parametrize("pair", [(1, 2), (0, 3)], ids=["neighbours", "far apart"])
def test_swapped_slots_of_one_row_are_both_misplaced(pair):
    real = as_planned(BAY)
    i, j = pair
    real[0][i], real[0][j] = real[0][j], real[0][i]
    res = check_bay(photograph(BAY, real), BAY)
    only(res, **{f"r0s{i}": MISPLACED, f"r0s{j}": MISPLACED})
    moved = next(s for s in res.slots if (s.shelf_row, s.slot_index) == (0, i))
    assert moved.found_sku == BAY.rows[0].slots[i].sku_id and moved.boxes


def test_slots_swapped_between_rows_are_on_the_wrong_shelf():
    real = as_planned(BAY)
    real[0][1], real[2][2] = real[2][2], real[0][1]
    res = check_bay(photograph(BAY, real), BAY)
    only(res, r0s1=WRONG_SHELF, r2s2=WRONG_SHELF)
    b = next(s for s in res.slots if s.planned_sku == "B")
    assert b.facings_found == 1 and b.boxes[0][3] > 2 * 230 * 0.8  # found on the bottom shelf


def test_fewer_facings_leaving_a_gap_and_one_facing_too_many():
    real = as_planned(BAY)
    real[1][0] = ("E", 1)  # two of three facings gone ...
    real[1].insert(1, Gap(2 * PITCH))  # ... leaving their room empty
    real[2][1] = ("J", 3)  # one facing too many pushes the rest of the row along
    res = check_bay(photograph(BAY, real), BAY)
    only(res, r1s0=FACING_MISMATCH, r2s1=FACING_MISMATCH)
    found = {s.planned_sku: s.facings_found for s in res.slots}
    assert found["E"] == 1 and found["J"] == 3
    assert res.metrics.correct_facings == FACINGS - 2  # the extra facing of J is not a correct one
    assert res.metrics.found_facings == FACINGS - 2 + 1


def test_products_the_bay_does_not_plan_and_unknown_products():
    real = as_planned(BAY)
    real[0].insert(2, ("Q", 1))  # a catalogue SKU this bay does not plan
    real[2].append((None, 1))  # a product the recognizer does not know
    res = check_bay(photograph(BAY, real), BAY, known_skus=KNOWN)
    only(res)
    got = sorted((u.status, u.sku_id, u.shelf_row) for u in res.unplanned)
    assert got == [(EXTRA_UNPLANNED, "Q", 0), (UNKNOWN_PRODUCT, None, 2)]
    assert res.metrics.detection_counts == {EXTRA_UNPLANNED: 1, UNKNOWN_PRODUCT: 1}


def test_a_packaging_variant_counts_as_its_canonical_sku():
    real = as_planned(BAY)
    real[0][0] = ("A.promo", 2)
    real[1][1] = ("F-summer-pack", 2)
    res = check_bay(photograph(BAY, real), BAY, variants={"F-summer-pack": "F"})
    only(res)
    assert res.unplanned == []


def test_a_shifted_block_still_matches():
    real = as_planned(BAY)
    real[1].insert(0, (None, 1))  # an unknown product squeezed in first pushes the whole row along
    res = check_bay(photograph(BAY, real), BAY)
    only(res)
    assert [u.status for u in res.unplanned] == [UNKNOWN_PRODUCT]


def test_neighbouring_bays_are_excluded_even_when_they_hold_planned_skus():
    bay = plan_bay([[("A", 2), ("B", 2)], [("C", 1), ("D", 3)]], width=400)
    res = check_bay(photograph(bay, as_planned(bay), Camera(neighbours=("A", "D", "C"))), bay)
    only(res)
    assert res.unplanned == [] and res.excluded_detections == 2 * 3 * 2
    assert {s.planned_sku: s.facings_found for s in res.slots} == {"A": 2, "B": 2, "C": 1, "D": 3}


def test_a_look_alike_with_a_soft_score_still_matches_its_planned_slot():
    look_alikes = {"C": [("C-diet", 0.55), ("C", 0.4)], "G": [("G", 0.9), ("G-big", 0.1)]}
    res = check_bay(photograph(BAY, as_planned(BAY), probs=look_alikes), BAY)
    only(res)
    c = next(s for s in res.slots if s.planned_sku == "C")
    assert c.found_sku == "C-diet" and c.facings_found == 3  # what the recognizer said, matched softly
    strict = ComplianceConfig(min_match_prob=0.5)
    obs = photograph(BAY, as_planned(BAY), probs=look_alikes)
    assert status(check_bay(obs, BAY, config=strict))[(0, 2)] != CORRECT


def test_two_look_alike_blocks_the_recognizer_cannot_tell_apart_get_their_planned_facings():
    # C (3 facings) and D (2) side by side, every facing of both read as "C or D" with C slightly ahead:
    # one run of five facings, split back along the plan instead of C over and D missing.
    both = [("C", 0.5), ("D", 0.45)]
    res = check_bay(photograph(BAY, as_planned(BAY), probs={"C": both, "D": both}), BAY)
    only(res)
    assert {s.planned_sku: s.facings_found for s in res.slots if s.shelf_row == 0}["D"] == 2


def test_one_box_over_two_facings_still_counts_both():
    obs = photograph(BAY, as_planned(BAY))
    xyxy = obs.xyxy.copy()
    c = [i for i, s in enumerate(obs.sku_id) if s == "C"]
    xyxy[c[1], 2] = xyxy[c[2], 2]  # the detector merged the last two facings of C into one box
    keep = [i for i in range(len(xyxy)) if i != c[2]]
    merged = ShelfObservation(
        xyxy=xyxy[keep],
        confidence=obs.confidence[keep],
        sku_id=[obs.sku_id[i] for i in keep],
        sku_prob=obs.sku_prob[keep],
        image_size=obs.image_size,
    )
    res = check_bay(merged, BAY)
    only(res)
    assert next(s for s in res.slots if s.planned_sku == "C").facings_found == 3


def _with_boxes(
    obs: ShelfObservation,
    extra: list[tuple[list[float], str | None]],
    confidence: float = 0.5,
    prob: float = 0.9,
    image_size: tuple[int, int] | None = None,
) -> ShelfObservation:
    return ShelfObservation(
        xyxy=np.vstack([obs.xyxy, np.array([b for b, _ in extra], dtype=float).reshape(-1, 4)]),
        confidence=np.concatenate([obs.confidence, np.full(len(extra), confidence)]),
        sku_id=[*obs.sku_id, *(s for _, s in extra)],
        sku_prob=np.concatenate([obs.sku_prob, np.full(len(extra), prob)]),
        image_size=image_size or obs.image_size,
    )


def _c_facings(obs: ShelfObservation) -> list[np.ndarray]:
    """The boxes of C's three facings, left to right (the observation's own arrays: edits stick)."""
    return [obs.xyxy[k] for k, s in enumerate(obs.sku_id) if s == "C"]


def _three_c_facings_and_nothing_unplanned(obs: ShelfObservation) -> None:
    res = check_bay(obs, BAY)
    only(res)
    assert {s.planned_sku: s.facings_found for s in res.slots}["C"] == 3
    assert res.unplanned == []


def test_a_box_over_part_of_a_facing_is_neither_a_facing_nor_a_detection():
    obs = photograph(BAY, as_planned(BAY))
    extra = []
    for sku in ("C", "E"):  # the lower half of C's first facing, unnamed; the label of E's last, named
        i = [k for k, s in enumerate(obs.sku_id) if s == sku][0 if sku == "C" else -1]
        x0, y0, x1, y1 = obs.xyxy[i]
        extra.append(([x0 - 3, (y0 + y1) / 2, x1 - 2, y1 - 1], None if sku == "C" else sku))
    _three_c_facings_and_nothing_unplanned(_with_boxes(obs, extra))


def test_a_box_over_the_upper_part_of_a_facing_is_a_part_of_it():
    obs = photograph(BAY, as_planned(BAY))
    x0, y0, x1, y1 = _c_facings(obs)[1]
    upper = [x0 + 2, y0 + 1, x1 - 3, y0 + 0.82 * (y1 - y0)]  # unnamed; its whole reaches well below it
    _three_c_facings_and_nothing_unplanned(_with_boxes(obs, [(upper, None)]))


def test_a_box_merged_over_facings_that_have_boxes_of_their_own_does_not_split_them():
    obs = photograph(BAY, as_planned(BAY))
    _, second, third = _c_facings(obs)
    merged = [second[0] + 4, second[1] - 3, third[2] + 2, third[3] + 1]  # no SKU fits a crop of two
    _three_c_facings_and_nothing_unplanned(_with_boxes(obs, [(merged, None)]))


def test_a_facing_boxed_as_a_named_and_an_unnamed_piece_is_one_facing():
    obs = photograph(BAY, as_planned(BAY))
    middle = _c_facings(obs)[1]
    x0, y0, x1, y1 = middle.copy()
    w = x1 - x0
    middle[2] = x0 + 0.7 * w  # the named piece; the rest the recognizer cannot name
    _three_c_facings_and_nothing_unplanned(_with_boxes(obs, [([x0 + 0.45 * w, y0 + 1, x1, y1 - 1], None)]))


def test_a_product_stacked_on_a_facing_is_not_a_part_of_it():
    obs = photograph(BAY, as_planned(BAY))
    i = next(k for k, s in enumerate(obs.sku_id) if s == "C")
    x0, y0, x1, y1 = obs.xyxy[i]
    stacked = [x0, y0 - 0.6 * (y1 - y0), x1, y0 + 2]  # a smaller unknown pack lying on top of it
    res = check_bay(_with_boxes(obs, [(stacked, None)]), BAY)
    only(res)
    # Not folded away: like any box off the mapped shelf rows it is counted as an excluded detection.
    assert res.excluded_detections == check_bay(obs, BAY).excluded_detections + 1


def test_a_stray_box_below_the_bottom_shelf_does_not_take_its_place():
    obs = photograph(BAY, as_planned(BAY))
    bottoms = sorted({round(float(b)) for b in obs.xyxy[:, 3]})
    pitch = bottoms[1] - bottoms[0]  # px between shelf edges
    i = obs.sku_id.index("I")  # first facing of the bottom row
    x0, y0, x1, y1 = obs.xyxy[i]
    # A loose, confident-looking box over that facing, reaching 0.4 shelf pitches below its shelf edge.
    stray = [x0 - 4, y0 + 5, x1 + 6, y1 + 0.4 * pitch]
    size = (obs.image_size[0], int(obs.image_size[1] + pitch))
    only(check_bay(_with_boxes(obs, [(stray, "I")], confidence=0.3, prob=1.0, image_size=size), BAY))


def test_one_facing_split_into_two_overlapping_boxes_is_one_facing():
    obs = photograph(BAY, as_planned(BAY))
    i = obs.sku_id.index("H")  # the first of H's two facings
    x0, y0, x1, y1 = obs.xyxy[i]
    w = x1 - x0
    obs.xyxy[i] = [x0, y0, x0 + 0.62 * w, y1]  # the detector saw it as two narrower, overlapping boxes
    res = check_bay(_with_boxes(obs, [([x1 - 0.62 * w, y0, x1, y1], "H")], confidence=0.9, prob=1.0), BAY)
    only(res)
    assert {s.planned_sku: s.facings_found for s in res.slots}["H"] == 2


def test_pack_sizes_from_the_catalogue_tell_size_variants_apart():
    # Every facing of G (60 x 150 mm packs) is read as its smaller sibling G-small first.
    probs = {"G": [("G-small", 0.6), ("G", 0.4)]}
    plain = check_bay(photograph(BAY, as_planned(BAY), probs=probs), BAY)
    assert next(s for s in plain.slots if s.planned_sku == "G").found_sku == "G-small"
    sizes = {"G": SkuInfo(brand="b", category="c", width_mm=UNIT, height_mm=HEIGHT)}
    sizes["G-small"] = SkuInfo(brand="b", category="c", width_mm=0.7 * UNIT, height_mm=0.7 * HEIGHT)
    sized = check_bay(photograph(BAY, as_planned(BAY), probs=probs), BAY, catalogue=sizes)
    only(sized)
    assert next(s for s in sized.slots if s.planned_sku == "G").found_sku == "G"


def test_size_alone_does_not_rename_a_pack_the_recognizer_is_sure_of():
    # G's boxes are half its catalogue size (pieces, occlusion) and just the size of a pack the recognizer
    # all but ruled out: the size weighs in, it does not decide.
    probs = {"G": [("G", 0.999), ("G-small", 0.001)]}
    sizes = {"G": SkuInfo(brand="b", category="c", width_mm=2 * UNIT, height_mm=2 * HEIGHT)}
    sizes["G-small"] = SkuInfo(brand="b", category="c", width_mm=UNIT, height_mm=HEIGHT)
    res = check_bay(photograph(BAY, as_planned(BAY), probs=probs), BAY, catalogue=sizes)
    only(res)
    assert next(s for s in res.slots if s.planned_sku == "G").found_sku == "G"


def test_shelf_lines_given_and_a_visibly_empty_shelf():
    real = as_planned(BAY)
    real[1] = [Gap(sum(s.width_mm for s in BAY.rows[1].slots))]
    for lines in (False, True):
        res = check_bay(photograph(BAY, real, shelf_lines=lines), BAY)
        only(res, r1s0=OUT_OF_STOCK, r1s1=OUT_OF_STOCK, r1s2=OUT_OF_STOCK, r1s3=OUT_OF_STOCK)
        assert not res.partial and res.rows_found == [0, 1, 2]


def test_a_tilted_camera_and_a_cropped_photo():
    real = as_planned(BAY)
    real[2][0], real[2][1] = real[2][1], real[2][0]
    res = check_bay(photograph(BAY, real, Camera(scale=0.55, x0=-10.0, shear=0.04)), BAY)
    only(res, r2s0=MISPLACED, r2s1=MISPLACED)


# ---------------------------------------------------------------------------------------------------------
# Bad input: an error, or a result marked partial — never a compliance figure we cannot stand behind


def test_a_planogram_with_unknown_skus_is_refused():
    with pytest.raises(PlanogramError, match="bay bay-A shelf 0 slot 1: unknown SKU 'B'"):
        check_bay(photograph(BAY, as_planned(BAY)), BAY, known_skus=["A", "C", "D", "E", "F", "G", "H"])


def test_overlapping_slots_are_refused():
    row = ShelfRow(
        shelf_row=0,
        y_mm=230,
        height_mm=190,
        slots=[
            Slot(slot_index=0, sku_id="A", facings=2, x_mm=10, width_mm=150),
            Slot(slot_index=1, sku_id="B", facings=1, x_mm=100, width_mm=80),
        ],
    )
    bay = Bay(bay_id="bay-Z", fixture="gondola", width_mm=400, height_mm=300, rows=[row])
    with pytest.raises(PlanogramError, match="bay bay-Z shelf 0 slot 1: overlaps the previous slot"):
        check_bay(photograph(BAY, as_planned(BAY)), bay)


def test_an_empty_photo_is_partial_and_reports_no_compliance():
    res = check_bay(ShelfObservation.empty((800, 600)), BAY)
    assert res.partial and "no detections" in res.notes[0]
    assert {s.status for s in res.slots} == {MISSING_UNVERIFIED}
    assert res.metrics.compliance is None and res.metrics.on_shelf_availability is None


def test_a_photo_of_another_bay_is_partial_and_names_it():
    other = plan_bay(
        [[("M", 2), ("N", 2), ("O", 2)], [("P", 3), ("Q", 2)], [("R", 2), ("S", 2), ("T", 1)]], "bay-B"
    )
    res = check_bay(photograph(other, as_planned(other)), BAY, other_bays=[BAY, other])
    assert res.partial and res.suspected_bay == "bay-B"
    assert res.metrics.compliance is None
    assert "another bay" in " ".join(res.notes)


def test_a_photo_of_a_bay_with_the_same_products_otherwise_arranged_is_partial():
    same = plan_bay([[(s.sku_id, s.facings) for s in r.slots] for r in reversed(BAY.rows)], "bay-C")
    res = check_bay(photograph(same, as_planned(same)), BAY, other_bays=[BAY, same])
    assert res.partial and res.suspected_bay == "bay-C"
    assert check_bay(photograph(same, as_planned(same)), same, other_bays=[BAY, same]).partial is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"xyxy": np.zeros((2, 3))}, "xyxy must be"),
        ({"xyxy": np.array([[10, 10, 5, 20.0]])}, "empty or inverted"),
        ({"xyxy": np.array([[0, 0, np.nan, 1.0]])}, "NaN"),
        ({"confidence": np.ones(2)}, "confidence has 2"),
        ({"sku_prob": np.array([1.5])}, "probabilities"),
        ({"sku_id": ["A", "B"]}, "sku_id has 2"),
        ({"image_size": (0, 100)}, "image_size"),
        ({"candidates": [[("A", 2.0)]]}, "candidate"),
    ],
)
def test_malformed_detections_raise_observation_errors(kwargs, message):
    base = {
        "xyxy": np.array([[0, 0, 10, 10.0]]),
        "confidence": np.ones(1),
        "sku_id": ["A"],
        "sku_prob": np.ones(1),
        "image_size": (100, 100),
    }
    with pytest.raises(ObservationError, match=message):
        ShelfObservation(**{**base, **kwargs})


def test_a_missing_shelf_row_is_partial():
    bay = plan_bay([[("A", 2), ("B", 2)], [("C", 2), ("D", 2)], [("E", 2), ("F", 2)]])
    obs = photograph(bay, as_planned(bay))
    top = obs.xyxy[:, 3] < 230 * 0.8 + 20 + 30  # keep only the top shelf ...
    cut = ShelfObservation(  # ... in a photo that ends below it
        obs.xyxy[top], obs.confidence[top], [s for s, k in zip(obs.sku_id, top, strict=True) if k],
        obs.sku_prob[top], (obs.image_size[0], int(230 * 0.8 + 60)),
    )  # fmt: skip
    res = check_bay(cut, bay)
    assert res.partial and res.rows_found == [0]
    assert {s.status for s in res.slots if s.shelf_row > 0} == {MISSING_UNVERIFIED}
    assert res.metrics.compliance is None and res.metrics.compliance_verified == 1.0


# ---------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scale=st.floats(0.35, 1.6),
    x0=st.floats(-0.02, 0.08),
    shear=st.floats(-0.04, 0.04),
    seed=st.integers(0, 2**16),
)
def test_a_perfectly_planned_shelf_scores_100_percent_whatever_the_camera(scale, x0, shear, seed):
    rng = np.random.default_rng(seed)
    rows = [[(f"S{r}{k}", int(rng.integers(1, 5))) for k in range(int(rng.integers(2, 6)))] for r in range(3)]
    bay = plan_bay(rows)
    obs = photograph(bay, as_planned(bay), Camera(scale=scale, x0=x0 * bay.width_mm * scale, shear=shear))
    res = check_bay(obs, bay)
    assert {s.status for s in res.slots} == {CORRECT}, res.notes
    assert res.metrics.compliance == 1.0 and res.unplanned == []


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_the_order_of_the_detections_does_not_matter(seed):
    real = as_planned(BAY)
    real[0][0], real[0][1] = real[0][1], real[0][0]
    real[2][2] = Gap(slot_width(BAY, 2, 2))
    obs = photograph(BAY, real)
    perm = np.random.default_rng(seed).permutation(len(obs))
    shuffled = ShelfObservation(
        obs.xyxy[perm],
        obs.confidence[perm],
        [obs.sku_id[i] for i in perm],
        obs.sku_prob[perm],
        obs.image_size,
    )
    assert status(check_bay(shuffled, BAY)) == status(check_bay(obs, BAY))


# ---------------------------------------------------------------------------------------------------------
# Metrics and results


def test_share_of_shelf_by_brand_and_category():
    catalogue = {k: SkuInfo(brand="Acme" if k in "ABCD" else "Bolt", category="snacks") for k in KNOWN}
    real = as_planned(BAY)
    real[2].append((None, 1))
    res = check_bay(photograph(BAY, real), BAY, catalogue=catalogue)
    sos = res.metrics.share_of_shelf
    n = FACINGS + 1
    assert sos.brand_by_facings == pytest.approx({"Bolt": 15 / n, "Acme": 8 / n, "unknown": 1 / n})
    assert sum(sos.brand_by_width.values()) == pytest.approx(1.0)
    assert sos.category_by_facings == pytest.approx({"snacks": FACINGS / n, "unknown": 1 / n})


def test_the_result_encodes_as_json_with_the_contract_labels():
    res = check_bay(photograph(BAY, as_planned(BAY)), BAY)
    data = json.loads(msgspec.json.encode(res))
    assert set(SLOT_STATUSES) == set(data["metrics"]["slot_counts"])
    assert data["slots"][0]["status"] == CORRECT and len(data["slots"][0]["boxes"][0]) == 4


def test_label_scores_and_metrics_arithmetic():
    scores = label_scores([("a", "a"), ("a", "b"), ("b", "b"), ("c", "x")])
    assert scores["per_label"]["a"] == {
        "precision": 1.0,
        "recall": 0.5,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert scores["per_label"]["x"]["support"] == 0
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)

    @dataclass
    class S:
        status: str
        facings_planned: int
        facings_found: int

    m = compute_metrics([S(CORRECT, 2, 2), S(FACING_MISMATCH, 3, 1), S(OUT_OF_STOCK, 1, 0)], [], [])
    assert m.compliance == pytest.approx(3 / 6) and m.on_shelf_availability == pytest.approx(2 / 3)


def test_bench_bay_reports_milliseconds():
    bay, obs = synthetic_bay(40, rows=2)
    assert {s.status for s in check_bay(obs, bay).slots} == {CORRECT}
    assert 0 < bench_bay(40, repeats=1) < 10_000


# ---------------------------------------------------------------------------------------------------------
# The synthetic world's ground truth


def test_ground_truth_detections_on_the_small_world(small_world):
    result = evaluate_on_world(small_world, split="all")
    assert result["images"] == 20
    assert result["macro_f1"] >= 0.99, result["errors"]
    assert result["out_of_stock_recall"] >= 0.99
    assert result["partial_images"] == 0
    for label in ("correct", "misplaced_same_row", "wrong_shelf", "out_of_stock"):
        assert result["per_label"][label]["support"] > 0


def test_a_homography_that_sends_a_point_to_infinity_is_rejected():
    """The bay-to-image homography is kept only if it places every fitted facing; one whose denominator
    vanishes at a facing gives NaN or inf there, which a plain `>` test would have let through."""
    from planograms.compliance import _apply_h, _strays

    h = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.01, 0.0, -1.0]])  # w = 0 at x = 100 mm
    x_mm = np.array([0.0, 100.0, 200.0])
    x_h = _apply_h(h, x_mm, np.zeros(3))
    assert not np.isfinite(x_h[1])
    good = x_h.copy()
    good[1] = 0.0
    assert _strays(x_h, good, 1.0, 0.5)
    assert not _strays(good, good, 1.0, 0.5)
    assert _strays(good, good + 1.0, 1.0, 0.5)
