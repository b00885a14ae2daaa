"""Planogram compliance: score one shelf photo's detections against the bay's planogram.

Pure logic (numpy, msgspec), shared by the store device and the cloud; `check_bay` is the entry point.
The pipeline follows the research notes (shared/research/planogram_al.md §1.3), made robust to what the
synthetic world (and a real store) throws at it:

1. rows: boxes are grouped into shelf rows (given shelf lines, or chains of boxes standing side by side)
   and the groups are mapped onto the planned rows, top to bottom, by an affine fit of shelf heights
   (RANSAC) with the SKUs each group holds as tie-breaker; a planned shelf inside the photo with nothing
   on it is visibly empty, one outside the photo makes the result partial;
2. registration: one camera model for the whole bay, px = a(y)·mm + b(y), fitted by RANSAC (MSAC) on the
   (planned slot centre, detected run centre) pairs of all rows, refined to the bay's homography when the
   evidence spans the bay; the bay's ends are then found at the widest empty stretch (the upright) near
   the registered edges, and products beyond them — the neighbouring bays — are excluded;
3. per row, a width-aware Needleman–Wunsch alignment of the planned slots against the row's tokens:
   runs of facings the recognizer calls the same SKU (soft: one SKU likely enough for every facing) and
   empty stretches. Matches score by the recognizer's probability, other products or gaps standing in a
   slot's place score a little (so swaps keep the order of the rest), skipping costs in proportion to
   width, and displacement only breaks ties: a missed detection is a gap, a shifted block still matches;
4. reconciliation: a planned SKU left unmatched in its row but standing unmatched elsewhere in that row
   is `misplaced_same_row` (with its swap partner), in another row `wrong_shelf`;
5. the rest: `out_of_stock` when the slot's place is visibly empty (an empty stretch stands in for it, or
   its drift-corrected extent is free), `missing_unverified` when it is covered or outside the photo;
   `facing_count_mismatch` for one facing too many, or too few with their room visibly empty;
6. trust: an empty photo, a photo of another bay (its products planned elsewhere in the store, or
   standing on other shelves than planned), missing shelves or many unverifiable slots give a result
   marked `partial`, whose headline figures are withheld.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

import msgspec
import numpy as np

from planograms.metrics import ComplianceMetrics, SkuInfo, compute_metrics
from planograms.schema import Bay, PlanogramError, ShelfRow, Slot, validate_bay

# The same literals as shelfloop.contract's SlotStatus / DetectionStatus (planograms may not import it).
SlotStatus: TypeAlias = Literal[
    "correct",
    "misplaced_same_row",
    "wrong_shelf",
    "out_of_stock",
    "missing_unverified",
    "facing_count_mismatch",
]
DetectionStatus: TypeAlias = Literal["extra_unplanned", "unknown_product"]
CORRECT: Final = "correct"
MISPLACED: Final = "misplaced_same_row"
WRONG_SHELF: Final = "wrong_shelf"
OUT_OF_STOCK: Final = "out_of_stock"
MISSING_UNVERIFIED: Final = "missing_unverified"
FACING_MISMATCH: Final = "facing_count_mismatch"
EXTRA_UNPLANNED: Final = "extra_unplanned"
UNKNOWN_PRODUCT: Final = "unknown_product"
SLOT_STATUSES: Final[tuple[str, ...]] = (
    CORRECT,
    MISPLACED,
    WRONG_SHELF,
    OUT_OF_STOCK,
    MISSING_UNVERIFIED,
    FACING_MISMATCH,
)
DETECTION_STATUSES: Final[tuple[str, ...]] = (EXTRA_UNPLANNED, UNKNOWN_PRODUCT)

Box: TypeAlias = tuple[float, float, float, float]


class ObservationError(ValueError):
    """Detections that cannot be scored (mismatched lengths, boxes that are not boxes, NaNs)."""


# ---------------------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True, eq=False)
class ShelfObservation:
    """The detections of one shelf photo, as arrays (what the detector and recognizer hand over).

    `sku_id[i]` is the recognizer's canonical or variant SKU for box i, None for an unknown product;
    `sku_prob[i]` its probability; `candidates[i]` optional top-k (sku_id, prob) for soft matching.
    `shelf_lines`: y of each shelf edge, as (L,) values or (L, 4) segments x1, y1, x2, y2 (None: rows are
    inferred from the boxes). `visible_gaps`: (G, 4) boxes of empty shelf space from a gap detector; when
    given, a planned slot is out of stock only where a gap box covers it, otherwise the engine measures
    free space between boxes itself.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    sku_id: list[str | None]
    sku_prob: np.ndarray
    image_size: tuple[int, int]  # (width, height) px
    candidates: list[list[tuple[str, float]]] | None = None
    shelf_lines: np.ndarray | None = None
    visible_gaps: np.ndarray | None = None

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float64)
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ObservationError(f"xyxy must be (N, 4), got shape {xyxy.shape}")
        n = len(xyxy)
        if not np.isfinite(xyxy).all():
            raise ObservationError("xyxy holds NaN or infinite coordinates")
        bad = np.flatnonzero((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1]))
        if len(bad):
            raise ObservationError(f"box {int(bad[0])} is empty or inverted: {xyxy[bad[0]].tolist()}")
        conf = _vector(self.confidence, n, "confidence")
        prob = _vector(self.sku_prob, n, "sku_prob")
        skus = list(self.sku_id)
        if len(skus) != n:
            raise ObservationError(f"sku_id has {len(skus)} entries for {n} boxes")
        if any(s is not None and (not isinstance(s, str) or not s) for s in skus):
            raise ObservationError("sku_id entries must be non-empty strings or None")
        w, h = self.image_size
        if not (w > 0 and h > 0):
            raise ObservationError(f"image_size must be positive (width, height), got {self.image_size}")
        cands = self.candidates
        if cands is not None:
            cands = [list(c) for c in cands]
            if len(cands) != n:
                raise ObservationError(f"candidates has {len(cands)} entries for {n} boxes")
            for i, c in enumerate(cands):
                for sku, p in c:
                    if not isinstance(sku, str) or not 0.0 <= float(p) <= 1.0:
                        raise ObservationError(f"candidate {sku!r}, {p!r} of box {i} is not (sku_id, prob)")
        lines = self.shelf_lines
        if lines is not None:
            lines = np.asarray(lines, dtype=np.float64)
            if lines.ndim == 1:
                lines = np.stack([np.zeros_like(lines), lines, np.full_like(lines, w), lines], 1)
            if lines.ndim != 2 or lines.shape[1] != 4 or not np.isfinite(lines).all():
                raise ObservationError("shelf_lines must be (L,) y values or (L, 4) finite segments")
        gaps = self.visible_gaps
        if gaps is not None:
            gaps = np.asarray(gaps, dtype=np.float64).reshape(-1, 4)
            if not np.isfinite(gaps).all():
                raise ObservationError("visible_gaps must be finite (G, 4) boxes")
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "confidence", conf)
        object.__setattr__(self, "sku_prob", prob)
        object.__setattr__(self, "sku_id", skus)
        object.__setattr__(self, "image_size", (int(w), int(h)))
        object.__setattr__(self, "candidates", cands)
        object.__setattr__(self, "shelf_lines", lines)
        object.__setattr__(self, "visible_gaps", gaps)

    def __len__(self) -> int:
        return len(self.xyxy)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> ShelfObservation:
        """A photo in which the detector found nothing."""
        return cls(np.zeros((0, 4)), np.zeros(0), [], np.zeros(0), image_size)


def _vector(values: object, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(arr) != n:
        raise ObservationError(f"{name} has {len(arr)} entries for {n} boxes")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
        raise ObservationError(f"{name} must be probabilities in [0, 1]")
    return arr


class ComplianceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Tuning knobs; the defaults are what the synthetic-world evaluation was measured with."""

    min_match_prob: float = 0.25  # a run is the planned SKU when P(planned SKU) reaches this
    pack_size_sigma: float = 0.15  # log-size tolerance when pack dimensions weigh size variants
    min_elsewhere_prob: float = 0.5  # an empty slot's SKU found elsewhere (misplaced) needs this much
    min_rebalance_prob: float = 0.02  # a boundary facing may move to the neighbouring block that lacks one
    gap_cost: float = 1.0  # skipping a slot or a product, per (width-leaning) slot unit; a match earns 2
    substitution_score: float = 0.5  # another product standing in a slot's place
    gap_stand_in_score: float = 1.6  # an empty stretch standing in a slot's place
    position_weight: float = 0.1  # per slot width of displacement after registration: breaks ties only
    gap_free_fraction: float = 0.5  # a slot is visibly empty when this much of its extent is free
    wrong_bay_share: float = 0.5  # fewer planned SKUs than this among recognised products: wrong bay?
    min_wrong_bay_boxes: int = 4  # ... judged only on at least this many recognised products
    wrong_shelf_share: float = 0.4  # more found products than this on another shelf: wrong bay?
    unverified_share: float = 0.3  # more slots than this unverifiable: the result is partial


# ---------------------------------------------------------------------------------------------------------
# Output


class SlotResult(msgspec.Struct, kw_only=True):
    """The verdict for one planned slot; `boxes` are where its facings really are (px)."""

    shelf_row: int
    slot_index: int
    planned_sku: str
    status: SlotStatus
    facings_planned: int
    facings_found: int
    found_sku: str | None = None
    boxes: list[Box] = []


class UnplannedResult(msgspec.Struct, kw_only=True):
    """A detection in the bay that belongs to no planned slot."""

    status: DetectionStatus
    sku_id: str | None
    box: Box
    score: float
    shelf_row: int | None = None


class BayCompliance(msgspec.Struct, kw_only=True):
    """The compliance of one bay in one photo. When `partial`, `notes` say why and the headline
    compliance figures are withheld (None) rather than reported wrong."""

    bay_id: str
    slots: list[SlotResult]
    unplanned: list[UnplannedResult]
    metrics: ComplianceMetrics
    partial: bool = False
    notes: list[str] = []
    suspected_bay: str | None = None
    excluded_detections: int = 0  # outside the bay's registered extent (neighbouring bays) or rows
    rows_found: list[int] = []  # planned shelf rows seen in the photo


# ---------------------------------------------------------------------------------------------------------
# Internals


@dataclass
class _Run:
    """Consecutive facings (left to right) that the recognizer calls the same SKU."""

    idx: list[int]
    sku: str | None
    probs: dict[str, float]
    x0: float
    x1: float
    facings: int
    gap: bool = False  # an empty stretch of shelf, not a product: it holds a planned slot's place

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2


@dataclass
class _Model:
    """px = (p·mm + q) / (r·mm + 1) along one shelf row: the trace of the camera's homography on the
    row's shelf edge (r = 0: an affine row)."""

    p: float
    q: float
    r: float = 0.0
    fitted: bool = True  # this row's own products agree with it (False: borrowed from the other rows)

    def px(self, mm: float) -> float:
        return (self.p * mm + self.q) / (self.r * mm + 1.0)

    def mm(self, px: float) -> float:
        return (px - self.q) / (self.p - self.r * px)

    def scale(self, mm: float) -> float:
        """px per mm at `mm`."""
        d = self.r * mm + 1.0
        return (self.p - self.r * self.q) / (d * d)


@dataclass
class _Row:
    plan: ShelfRow
    slots: list[Slot]  # left to right
    width_mm: float  # the bay's
    edges: tuple[float, float] = (0.0, 0.0)  # where the bay ends in the photo, px
    group: int | None = None
    empty: bool = False  # no products, but the shelf is inside the photo: visibly empty
    boxes: list[int] = field(default_factory=list)  # in-bay boxes, left to right
    y_px: float | None = None
    model: _Model | None = None
    runs: list[_Run] = field(default_factory=list)
    match: dict[int, int] = field(default_factory=dict)  # slot position -> run position
    stand_in: dict[int, int] = field(default_factory=dict)  # unmatched slot -> token in its place
    anchors: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))  # (slot centre mm, drift px)


@dataclass
class _Ctx:
    obs: ShelfObservation
    cfg: ComplianceConfig
    skus: list[str | None]  # canonical top-1 per box
    probs: list[dict[str, float]]  # canonical SKU -> probability per box
    cx: np.ndarray
    width: np.ndarray
    pack_mm: dict[str, tuple[float, float]] = field(default_factory=dict)  # canonical SKU -> (w, h)
    facings_found: dict[tuple[int, int], int] = field(default_factory=dict)  # (row, slot) -> count


def _canonicalizer(variants: Mapping[str, str] | None, known: set[str]) -> Callable[[str | None], str | None]:
    """Packaging variants count as their canonical SKU: by the map, else `<sku_id>.<kind>` of a known SKU."""

    def canon(sku: str | None) -> str | None:
        if sku is None:
            return None
        if variants and sku in variants:
            return variants[sku]
        if sku in known:
            return sku
        head, dot, _ = sku.rpartition(".")
        if dot and head in known:
            return head
        return sku

    return canon


def _box_probs(obs: ShelfObservation, canon: Callable[[str | None], str | None]) -> list[dict[str, float]]:
    out: list[dict[str, float]] = []
    for i, sku in enumerate(obs.sku_id):
        d: dict[str, float] = {}
        if obs.candidates is not None and obs.candidates[i]:
            for cand, p in obs.candidates[i]:
                c = canon(cand)
                if c is not None:
                    d[c] = min(1.0, d.get(c, 0.0) + float(p))
        top = canon(sku)
        if top is not None:
            d[top] = max(d.get(top, 0.0), float(obs.sku_prob[i]))
        out.append(d)
    return out


def _components(adj: np.ndarray) -> list[list[int]]:
    n = len(adj)
    seen = np.zeros(n, dtype=bool)
    comps: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            i = stack.pop()
            comp.append(i)
            for j in np.flatnonzero(adj[i] & ~seen):
                seen[j] = True
                stack.append(int(j))
        comps.append(sorted(comp))
    return comps


def _line_fit(x: np.ndarray, y: np.ndarray, w_med: float) -> tuple[float, float]:
    """bottom = alpha + beta * x, flat when the boxes span too little to measure a tilt."""
    if len(x) >= 2 and np.ptp(x) > 1.5 * w_med:
        beta, alpha = np.polyfit(x, y, 1)
        return float(alpha), float(np.clip(beta, -0.25, 0.25))
    return float(np.median(y)), 0.0


def _cluster_rows(xyxy: np.ndarray) -> list[tuple[list[int], float]]:
    """Rows from the boxes alone: chains of products standing side by side on one shelf edge.

    Neighbouring boxes of one row have nearly equal bottoms even in a tilted photo; chains broken by a gap
    are joined again when they lie on one line.
    """
    cx = (xyxy[:, 0] + xyxy[:, 2]) / 2
    bot = xyxy[:, 3]
    h = xyxy[:, 3] - xyxy[:, 1]
    w_med = float(np.median(xyxy[:, 2] - xyxy[:, 0]))
    dx = np.abs(cx[:, None] - cx[None, :])
    dy = np.abs(bot[:, None] - bot[None, :])
    hmin = np.minimum(h[:, None], h[None, :])
    adj = (dx <= 2.5 * w_med) & (dy <= 0.25 * hmin + 0.12 * dx)
    comps = _components(adj)
    fits = [_line_fit(cx[c], bot[c], w_med) for c in comps]
    merged = True
    while merged and len(comps) > 1:
        merged = False
        best: tuple[float, int, int] | None = None
        for i in range(len(comps)):
            for j in range(i + 1, len(comps)):
                ci, cj = comps[i], comps[j]
                (ai, bi), (aj, bj) = fits[i], fits[j]
                tol = 0.3 * float(min(np.median(h[ci]), np.median(h[cj])))
                ri = float(np.median(np.abs(bot[cj] - (ai + bi * cx[cj]))))
                rj = float(np.median(np.abs(bot[ci] - (aj + bj * cx[ci]))))
                r = min(ri, rj)
                if r <= tol and (best is None or r < best[0]):
                    best = (r, i, j)
        if best is not None:
            _, i, j = best
            comps[i] = sorted(comps[i] + comps[j])
            del comps[j]
            fits[i] = _line_fit(cx[comps[i]], bot[comps[i]], w_med)
            del fits[j]
            merged = True
    out = [(c, float(np.median(bot[c]))) for c in comps]
    return sorted(out, key=lambda t: t[1])


def _rows_from_lines(xyxy: np.ndarray, lines: np.ndarray) -> list[tuple[list[int], float]]:
    """Each box stands on the first shelf edge below its bottom (edges as y ranges: tilt direction free)."""
    ymin = np.minimum(lines[:, 1], lines[:, 3])
    ymax = np.maximum(lines[:, 1], lines[:, 3])
    order = np.argsort((ymin + ymax) / 2)
    ymin, ymax = ymin[order], ymax[order]
    groups: list[list[int]] = [[] for _ in order]
    h = xyxy[:, 3] - xyxy[:, 1]
    for i, (bottom, hi) in enumerate(zip(xyxy[:, 3], h, strict=True)):
        below = np.flatnonzero(ymax >= bottom - 0.15 * hi)
        if len(below):
            groups[int(below[0])].append(i)
    return [(g, float((lo + hi) / 2)) for g, lo, hi in zip(groups, ymin, ymax, strict=True)]


def _order_dp(score: np.ndarray) -> list[tuple[int, int]]:
    """Order-preserving one-to-one assignment of rows to columns with the largest total score."""
    n, m = score.shape
    dp = np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            dp[i, j] = max(dp[i - 1, j], dp[i, j - 1], dp[i - 1, j - 1] + score[i - 1, j - 1])
    pairs: list[tuple[int, int]] = []
    i, j = n, m
    while i > 0 and j > 0:
        if score[i - 1, j - 1] > 0 and dp[i, j] == dp[i - 1, j - 1] + score[i - 1, j - 1]:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif dp[i, j] == dp[i - 1, j]:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _map_rows(
    groups: list[tuple[list[int], float]], rows: list[_Row], ctx: _Ctx, bay: Bay, image_h: int
) -> float | None:
    """Detected row groups -> planned rows, top to bottom.

    Geometry first: shelf heights in the photo are an affine image of the planned shelf heights, found by
    RANSAC over pairs of (group, row) candidates; which SKUs a group holds only breaks ties. Votes alone
    would follow two rows that swapped most of their products.
    """
    if not groups or not rows:
        return None
    n_g, n_r = len(groups), len(rows)
    row_skus = [{s.sku_id for s in r.slots} for r in rows]
    votes = np.zeros((n_g, n_r))
    for g, (idx, _) in enumerate(groups):
        for i in idx:
            s = ctx.skus[i]
            if s is None:
                continue
            for r, skus in enumerate(row_skus):
                if s in skus:
                    votes[g, r] += ctx.probs[i].get(s, 0.0)
    # A group's share of its votes per row, against a typical group's vote mass: one stray box of a
    # row's SKU is not as sure a sign of that row as a whole shelf of them.
    mass = votes.sum(1)
    share = votes / np.maximum(np.maximum(1.0, mass), float(np.median(mass)))[:, None]
    yg = np.array([y for _, y in groups])
    ym = np.array([r.plan.y_mm for r in rows])
    spacing = np.full(n_r, float(bay.height_mm))
    for r in range(n_r - 1):
        gap = abs(float(ym[r + 1] - ym[r]))
        spacing[r] = min(spacing[r], gap)
        spacing[r + 1] = min(spacing[r + 1], gap)
    alpha0 = image_h / max(bay.height_mm, 1.0)
    hyp: list[tuple[float, float]] = []
    for g1 in range(n_g):
        for r1 in range(n_r):
            hyp.append((alpha0, yg[g1] - alpha0 * ym[r1]))
            for g2 in range(g1 + 1, n_g):
                for r2 in range(r1 + 1, n_r):
                    a = (yg[g2] - yg[g1]) / (ym[r2] - ym[r1])
                    if 0.4 * alpha0 < a < 2.5 * alpha0:
                        hyp.append((a, yg[g1] - a * ym[r1]))
    h = np.array(hyp)
    pred = h[:, 0:1, None] * ym[None, None, :] + h[:, 1:2, None]  # (H, 1, R)
    resid = np.abs(yg[None, :, None] - pred)  # (H, G, R)
    inl = resid < 0.35 * h[:, 0:1, None] * spacing[None, None, :]
    # Each planned row counts once, by its best group: two groups near one row (a stray box below the
    # shelf) must not outvote a hypothesis that puts every row on exactly one group.
    quality = np.where(inl, 1.0 + share[None] - 1e-3 * resid, 0.0).max(1).sum(1)
    best = int(np.argmax(quality))
    close = 1.0 - resid[best] / (0.35 * h[best, 0] * spacing[None, :])
    score = np.where(inl[best], 1.0 + share + 0.1 * close, 0.0)
    pairs = _order_dp(score)
    for g, r in pairs:
        rows[r].group = g
        rows[r].y_px = groups[g][1]
    if len(pairs) < 2:
        return None
    g_y = np.array([yg[g] for g, _ in pairs])
    r_y = np.array([ym[r] for _, r in pairs])
    if np.ptp(r_y) <= 0:
        return None
    alpha, beta = np.polyfit(r_y, g_y, 1)
    # A planned shelf with no group: if it lies inside the photo and nothing stands on it, it is empty.
    bottoms = ctx.obs.xyxy[:, 3]
    for r, row in enumerate(rows):
        if row.group is not None:
            continue
        y = float(alpha * ym[r] + beta)
        top = y - alpha * row.plan.height_mm * 0.8
        near = np.abs(bottoms - y) < 0.35 * alpha * spacing[r]
        if top >= 0 and y <= image_h and not near.any():
            row.empty = True
            row.y_px = y
    return float(alpha)


def _split_runs(idx: list[int], ctx: _Ctx) -> list[_Run]:
    """Runs for registration: same top-1 SKU and no wide empty stretch inside (a bay boundary is one)."""
    runs: list[_Run] = []
    w_med = float(np.median(ctx.width[idx])) if idx else 1.0
    for i in idx:
        box = ctx.obs.xyxy[i]
        last = runs[-1] if runs else None
        if (
            last is not None
            and last.sku is not None
            and last.sku == ctx.skus[i]
            and box[0] - last.x1 < 0.35 * w_med
        ):
            last.idx.append(i)
            last.x1 = max(last.x1, float(box[2]))
            last.facings += 1
        else:
            runs.append(_Run([i], ctx.skus[i], {}, float(box[0]), float(box[2]), 1))
    return runs


def _runs(idx: list[int], ctx: _Ctx) -> list[_Run]:
    """Runs for alignment: a facing joins the run while one SKU stays likely enough (`min_match_prob`)
    for every facing of it — so a look-alike that the recognizer prefers for one facing of a block does
    not break the block into pieces, and two neighbouring look-alike blocks do not merge."""
    runs: list[_Run] = []
    sums: list[dict[str, float]] = []
    common: list[set[str]] = []
    least = ctx.cfg.min_match_prob
    for i in idx:
        box = ctx.obs.xyxy[i]
        last = runs[-1] if runs else None
        sku, mine = ctx.skus[i], ctx.probs[i]
        likely = {s for s, p in mine.items() if p >= least}
        if last is None:
            shared: set[str] = set()
            joins = False
        elif last.sku is None or sku is None:
            shared = set()
            joins = last.sku is None and sku is None
        else:
            shared = common[-1] & likely
            joins = bool(shared)
        if joins and last is not None:
            # A box stacked on top of the previous one is the same facing, not another.
            prev = ctx.obs.xyxy[last.idx[-1]]
            overlap = min(prev[2], box[2]) - max(prev[0], box[0])
            if overlap < 0.5 * min(prev[2] - prev[0], box[2] - box[0]):
                last.facings += 1
            last.idx.append(i)
            last.x1 = max(last.x1, float(box[2]))
            common[-1] = shared
            for s_, p in mine.items():
                sums[-1][s_] = sums[-1].get(s_, 0.0) + p
        else:
            runs.append(_Run([i], sku, {}, float(box[0]), float(box[2]), 1))
            sums.append(dict(mine))
            common.append(likely)
    for run, acc, keep in zip(runs, sums, common, strict=True):
        run.probs = {s: p / len(run.idx) for s, p in acc.items()}
        if run.sku is not None and keep:
            run.sku = max(keep, key=lambda s: (acc.get(s, 0.0), s == run.sku))
    return runs


def _pair_hypotheses(
    mm: np.ndarray, px: np.ndarray, wt: np.ndarray, tol: np.ndarray, a_lo: float, a_hi: float, keep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Two-point (a, b) hypotheses of one row, the `keep` that most of the row's facings agree with."""
    i, j = np.triu_indices(len(mm), 1)
    sel = np.abs(mm[j] - mm[i]) > 1.0
    i, j = i[sel], j[sel]
    if not len(i):
        return np.zeros(0), np.zeros(0)
    a = (px[j] - px[i]) / (mm[j] - mm[i])
    ok = (a > a_lo) & (a < a_hi)
    a, b = a[ok], (px[i] - a * mm[i])[ok]
    if not len(a):
        return a, b
    resid = np.abs(a[:, None] * mm[None, :] + b[:, None] - px[None, :]) / a[:, None]
    score = np.maximum(0.0, 1.0 - (resid / tol[None, :]) ** 2) @ wt
    top = np.argsort(-score, kind="stable")[:keep]
    return a[top], b[top]


def _register(
    rows: list[_Row], groups: list[tuple[list[int], float]], ctx: _Ctx, bay: Bay, v_scale: float | None
) -> int:
    """Register the planogram to the photo: px = a(y)·mm + b(y), scale and offset linear in the row's y.

    A photo is one camera: scale and offset change smoothly from shelf to shelf (perspective), so the
    model is fitted by RANSAC on the (planned slot centre, detected run centre) pairs of all rows at once,
    with hypotheses built from pairs of per-row fits. A row whose few recognised products include a
    swapped one cannot pull its own registration off; rows with enough agreeing products are then refined
    on their own. Returns how many rows have products of their own that agree with the model.
    """
    img_w = ctx.obs.image_size[0]
    if v_scale is not None:  # pixels are square: the shelves' spacing gives the scale within a margin
        prior = v_scale
        a_lo, a_hi = 0.7 * prior, 1.4 * prior
    else:
        prior = img_w / bay.width_mm
        a_lo, a_hi = 0.3 * prior, 3.0 * prior
    # (mm, px, weight, tolerance mm, row y px, row, shelf y mm, run bottom px)
    data: list[tuple[float, float, float, float, float, int, float, float]] = []
    for k, row in enumerate(rows):
        if row.group is None or row.y_px is None:
            continue
        idx = sorted(groups[row.group][0], key=lambda i: ctx.cx[i])
        for run in _split_runs(idx, ctx):
            for s in row.slots:
                if run.sku == s.sku_id:
                    # A block of many facings is no surer of its place than a single one (a swapped
                    # block is as big as it was), so weights grow slowly with the facings.
                    weight = 1.0 + 0.25 * min(run.facings, s.facings)
                    tol = min(max(0.5 * s.width_mm / s.facings, 20.0), 45.0)  # half a facing, in bounds
                    bottom = float(np.median(ctx.obs.xyxy[run.idx, 3]))
                    data.append(
                        (s.x_mm + s.width_mm / 2, run.cx, weight, tol, row.y_px, k, row.plan.y_mm, bottom)
                    )
    if not data:
        return 0
    arr = np.asarray(data, dtype=np.float64)
    mm, px, wt, tol, ys, rk, y_mm, py = arr.T
    tight = np.maximum(0.6 * tol, 20.0)
    rk = rk.astype(int)
    per_row: list[tuple[float, np.ndarray, np.ndarray]] = []
    for k in sorted(set(rk.tolist())):
        sel = rk == k
        a, b = _pair_hypotheses(mm[sel], px[sel], wt[sel], tol[sel], a_lo, a_hi, keep=8)
        if len(a):
            per_row.append((float(ys[sel][0]), a, b))
    if not per_row:
        # No row holds two products of its plan: a single product anchors the offset at the prior scale.
        best = int(np.argmax(wt))
        h = np.array([[prior, 0.0, px[best] - prior * mm[best], 0.0]])
    else:
        hyps = [np.stack([a, np.zeros_like(a), b, np.zeros_like(b)], 1) for _, a, b in per_row]
        for n1, (y1, a1, b1) in enumerate(per_row):
            for y2, a2, b2 in per_row[n1 + 1 :]:
                if abs(y2 - y1) < 1.0:
                    continue
                A1, A2 = np.meshgrid(a1, a2, indexing="ij")
                B1, B2 = np.meshgrid(b1, b2, indexing="ij")
                sa, sb = (A2 - A1) / (y2 - y1), (B2 - B1) / (y2 - y1)
                hyps.append(
                    np.stack([(A1 - sa * y1).ravel(), sa.ravel(), (B1 - sb * y1).ravel(), sb.ravel()], 1)
                )
        h = np.concatenate(hyps)
    a_y = h[:, 0:1] + h[:, 1:2] * ys[None, :]
    b_y = h[:, 2:3] + h[:, 3:4] * ys[None, :]
    # One camera: the scale changes little from the top shelf to the bottom one (perspective of a few
    # per cent), which rules out hypotheses that fit a swapped block by bending the whole bay.
    valid = (a_y > a_lo).all(1) & (a_y < a_hi).all(1) & (a_y.max(1) <= 1.25 * a_y.min(1))
    resid = np.abs(a_y * mm[None, :] + b_y - px[None, :]) / np.maximum(a_y, 1e-9)
    inl = (resid <= tol[None, :]) & valid[:, None]
    # MSAC: an inlier counts by how well it fits, so a loose hypothesis does not tie with the right one.
    score = (np.where(inl, 1.0 - (resid / tol[None, :]) ** 2, 0.0)) @ wt
    # Prefer the simpler camera: each 5 % of scale change between the top and bottom shelves costs as
    # much as one agreeing product.
    score -= ((a_y.max(1) / np.maximum(a_y.min(1), 1e-9) - 1.0) / 0.05) ** 2
    # ... and so does each 5 % of the bay's width that the offset slides from the top shelf to the bottom.
    shear = np.abs(h[:, 3]) * np.ptp(ys) / np.maximum(a_y.mean(1) * bay.width_mm, 1e-9)
    score -= (shear / 0.05) ** 2
    best = int(np.argmax(score))
    use = inl[best]
    model = h[best].copy()
    model = _refit_bilinear(model, mm, px, wt, ys, rk, use, bay.width_mm, a_lo)
    # The shelf front is a plane: with two or more rows, refine to the camera's homography (exact under
    # perspective, where the affine rows above are off by a few per cent at the bay's ends).
    # Then refine to the camera's homography on the bilinear model's inliers, tightened: a swapped or
    # under-faced block whose centre is off by less than half a facing passed the first test but should
    # not steer the final fit. The homography has more freedom than the data may support, so it is kept
    # only when its inliers span the bay and it stays close to the bilinear model everywhere in the bay.
    hom = None
    a_b = model[0] + model[1] * ys
    resid_b = np.abs(a_b * mm + model[2] + model[3] * ys - px) / a_b
    core = use & (resid_b <= tight)
    if (
        len(set(rk[core].tolist())) >= 2
        and core.sum() >= 5
        and mm[core].min() < 0.35 * bay.width_mm
        and mm[core].max() > 0.65 * bay.width_mm
    ):
        hom = _fit_homography(np.stack([mm, y_mm], 1)[core], np.stack([px, py], 1)[core], wt[core])
        if hom is not None and _strays(_apply_h(hom, mm[core], y_mm[core]), px[core], a_b[core], tight[core]):
            hom = None
        if hom is not None:
            limit = 0.03 * bay.width_mm
            for row in rows:
                if row.y_px is None:
                    continue
                a_r = model[0] + model[1] * row.y_px
                b_r = model[2] + model[3] * row.y_px
                ends = np.array([0.0, bay.width_mm])
                x_h = _apply_h(hom, ends, np.full(2, row.plan.y_mm))
                if _strays(x_h, a_r * ends + b_r, a_r, limit):
                    hom = None
                    break
    n_fitted = 0
    for k, row in enumerate(rows):
        if row.y_px is None:
            continue
        sel = rk == k
        model_r = None
        if hom is not None:
            model_r = _row_from_h(hom, row.plan.y_mm, bay.width_mm)
        if model_r is None:
            model_r = _Model(float(model[0] + model[1] * row.y_px), float(model[2] + model[3] * row.y_px))
        fitted = False
        if sel.any():
            res = np.array(
                [abs(model_r.px(m) - x) / model_r.scale(m) for m, x in zip(mm[sel], px[sel], strict=True)]
            )
            fitted = bool((res <= tol[sel]).any())
        n_fitted += fitted
        model_r.fitted = fitted
        row.model = model_r
    return n_fitted


def _refit_bilinear(
    model: np.ndarray,
    mm: np.ndarray,
    px: np.ndarray,
    wt: np.ndarray,
    ys: np.ndarray,
    rk: np.ndarray,
    use: np.ndarray,
    width_mm: float,
    a_lo: float,
) -> np.ndarray:
    """Least squares on the inliers for px = (a0 + a1·y)·mm + b0 + b1·y.

    Products stand a centimetre or two off their planned centre (pushed along the shelf), so a row with
    one product hardly measures the camera: the height terms a1, b1 are damped towards a flat camera by
    two pseudo-observations, each worth two products that many pixels off.
    """
    if use.sum() < 2 or np.ptp(mm[use]) <= 0:
        return model
    dy = float(np.ptp(ys)) if np.ptp(ys) > 0 else 1.0
    y0 = float(ys.mean())
    sw = np.sqrt(wt[use])
    design = np.stack([mm, mm * (ys - y0), np.ones_like(mm), ys - y0], 1)[use] * sw[:, None]
    target = px[use] * sw
    damp = 0.5
    prior = np.array([[0.0, damp * dy * width_mm / 2, 0.0, 0.0], [0.0, 0.0, 0.0, damp * dy]])
    sol, *_ = np.linalg.lstsq(np.vstack([design, prior]), np.concatenate([target, np.zeros(2)]), rcond=None)
    out = np.array([sol[0] - sol[1] * y0, sol[1], sol[2] - sol[3] * y0, sol[3]])
    a_sol = out[0] + out[1] * ys
    if (a_sol > a_lo).all() and a_sol.max() <= 1.25 * a_sol.min():
        return out
    return model


def _fit_homography(src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> np.ndarray | None:
    """Weighted DLT with Hartley normalisation: plan (x mm, shelf y mm) -> photo (x px, y px)."""
    if len(src) < 4 or np.ptp(src[:, 1]) <= 0 or np.ptp(src[:, 0]) <= 0:
        return None

    def normalise(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = pts.mean(0)
        d = float(np.mean(np.linalg.norm(pts - c, axis=1)))
        f = math.sqrt(2.0) / max(d, 1e-9)
        t = np.array([[f, 0.0, -f * c[0]], [0.0, f, -f * c[1]], [0.0, 0.0, 1.0]])
        return (pts - c) * f, t

    s_n, ts = normalise(src)
    d_n, td = normalise(dst)
    x, y = s_n[:, 0], s_n[:, 1]
    u, v = d_n[:, 0], d_n[:, 1]
    zero, one = np.zeros_like(x), np.ones_like(x)
    rows_u = np.stack([-x, -y, -one, zero, zero, zero, u * x, u * y, u], 1)
    rows_v = np.stack([zero, zero, zero, -x, -y, -one, v * x, v * y, v], 1)
    sw = np.sqrt(weight)[:, None]
    design = np.concatenate([rows_u * sw, rows_v * sw])
    try:
        _, _, vt = np.linalg.svd(design, full_matrices=False)
    except np.linalg.LinAlgError:
        return None
    hn = vt[-1].reshape(3, 3)
    h = np.linalg.inv(td) @ hn @ ts
    if abs(h[2, 2]) < 1e-12:
        return None
    return h / h[2, 2]


def _apply_h(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Image x of bay points; inf or NaN where the homography sends a point to infinity."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / (h[2, 0] * x + h[2, 1] * y + h[2, 2])


def _strays(x_h: np.ndarray, x_px: np.ndarray, scale, tol) -> bool:
    """Whether a homography misplaces any point by more than `tol` (in mm at `scale` px/mm). A point it
    sends to infinity strays too: NaN compares false, so a bare `>` test would keep that homography."""
    return bool((~np.isfinite(x_h)).any() or (np.abs(x_h - x_px) / scale > tol).any())


def _row_from_h(h: np.ndarray, y_mm: float, width_mm: float) -> _Model | None:
    """The homography's trace on one shelf edge, or None when it folds over inside the bay."""
    big_s = h[2, 1] * y_mm + h[2, 2]
    if abs(big_s) < 1e-12:
        return None
    model = _Model(h[0, 0] / big_s, (h[0, 1] * y_mm + h[0, 2]) / big_s, h[2, 0] / big_s)
    ends = [model.r * x + 1.0 for x in (-0.2 * width_mm, 1.2 * width_mm)]
    if min(ends) <= 0.05 or model.scale(0.0) <= 0 or model.scale(width_mm) <= 0:
        return None
    return model


def _interval_coverage(lo: float, hi: float, spans: list[tuple[float, float]]) -> float:
    """Length of [lo, hi] covered by the union of `spans` (sorted by start)."""
    covered, cur_lo, cur_hi = 0.0, None, None
    for s0, s1 in spans:
        s0, s1 = max(s0, lo), min(s1, hi)
        if s1 <= s0:
            continue
        if cur_hi is None or s0 > cur_hi:
            if cur_hi is not None and cur_lo is not None:
                covered += cur_hi - cur_lo
            cur_lo, cur_hi = s0, s1
        else:
            cur_hi = max(cur_hi, s1)
    if cur_hi is not None and cur_lo is not None:
        covered += cur_hi - cur_lo
    return covered


def _gap_tokens(row: _Row, kept: list[int], ctx: _Ctx, bay: Bay) -> list[_Run]:
    """Empty stretches of the row (between products, or between a bay edge and its first product) wide
    enough to have held a facing: they keep the place of what is missing in the alignment. At the bay's
    ends the margin the planner left empty does not count."""
    assert row.model is not None
    img_w = ctx.obs.image_size[0]
    first = min((s.x_mm for s in row.slots), default=0.0)
    last = max((s.x_mm + s.width_mm for s in row.slots), default=bay.width_mm)
    lo = max(0.0, row.edges[0] + row.model.px(first) - row.model.px(0.0))
    hi = min(float(img_w), row.edges[1] - (row.model.px(bay.width_mm) - row.model.px(last)))
    boxes = sorted((float(ctx.obs.xyxy[i, 0]), float(ctx.obs.xyxy[i, 2])) for i in kept)
    w_med = float(np.median([b - a for a, b in boxes])) if boxes else 0.0
    out: list[_Run] = []
    edge = lo
    for x0, x1 in [*boxes, (hi, hi)]:
        if x0 - edge >= 0.6 * w_med and w_med > 0:
            out.append(_Run([], None, {}, edge, x0, 0, gap=True))
        edge = max(edge, x1)
    return out


def _align(
    plan: list[Slot], tokens: list[_Run], model: _Model, cfg: ComplianceConfig
) -> tuple[dict[int, int], dict[int, int]]:
    """Needleman–Wunsch of the planned slots against the row's tokens (runs and gaps, left to right).

    Returns (slot -> token of the same SKU, slot -> token standing in its place). Scores are in slot
    units, leaning on width: a match earns 2·p (p = the run's probability of the planned SKU); anything
    else standing in a slot's place earns a little, so swapped blocks keep their neighbours in place, as a
    planner reads the row; an empty stretch standing in a slot's place earns more (it explains a missing
    product); skipping a slot or a product costs in proportion to its width, skipping an empty stretch
    almost nothing. A small displacement term after registration only breaks ties.
    """
    n, m = len(plan), len(tokens)
    if not n or not m:
        return {}, {}
    w_tok = [model.mm(t.x1) - model.mm(t.x0) for t in tokens]
    c_tok = [model.mm(t.cx) for t in tokens]
    w_mean = max(1.0, sum(s.width_mm for s in plan) / n)
    slot_w = [0.5 + 0.5 * s.width_mm / w_mean for s in plan]
    tok_w = [0.5 + 0.5 * max(w, 0.0) / w_mean for w in w_tok]
    g = cfg.gap_cost
    dele = [g * w for w in slot_w]
    ins = [(0.1 if t.gap else g) * w for t, w in zip(tokens, tok_w, strict=True)]
    sub = cfg.substitution_score
    score: list[list[float]] = []
    same: list[list[bool]] = []
    for i, s in enumerate(plan):
        c = s.x_mm + s.width_mm / 2
        row: list[float] = []
        row_same: list[bool] = []
        for k, t in enumerate(tokens):
            p = 0.0 if t.gap else t.probs.get(s.sku_id, 0.0)
            tie = cfg.position_weight * abs(c_tok[k] - c) / w_mean
            unit = min(slot_w[i], tok_w[k])
            if p >= cfg.min_match_prob:
                row.append(2.0 * p * slot_w[i] - tie)
                row_same.append(True)
            elif t.gap:  # an empty stretch where a slot should be explains it better than a product does
                row.append(cfg.gap_stand_in_score * unit - tie)
                row_same.append(False)
            else:
                row.append(sub * unit - tie)
                row_same.append(False)
        score.append(row)
        same.append(row_same)
    dp = [[0.0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        dp[i][0] = dp[i - 1][0] - dele[i - 1]
    for j in range(1, m + 1):
        dp[0][j] = dp[0][j - 1] - ins[j - 1]
    for i in range(1, n + 1):
        prev, cur, sc, d = dp[i - 1], dp[i], score[i - 1], dele[i - 1]
        for j in range(1, m + 1):
            best = prev[j] - d
            left = cur[j - 1] - ins[j - 1]
            if left > best:
                best = left
            diag = prev[j - 1] + sc[j - 1]
            if diag > best:
                best = diag
            cur[j] = best
    match: dict[int, int] = {}
    stand_in: dict[int, int] = {}
    i, j = n, m
    while i > 0 and j > 0:
        if math.isclose(dp[i][j], dp[i - 1][j - 1] + score[i - 1][j - 1], abs_tol=1e-9):
            (match if same[i - 1][j - 1] else stand_in)[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif math.isclose(dp[i][j], dp[i - 1][j] - dele[i - 1], abs_tol=1e-9):
            i -= 1
        else:
            j -= 1
    return match, stand_in


def _set_anchors(row: _Row, exclude: set[int] | frozenset[int] = frozenset()) -> None:
    """Drift of matched runs from their registered slot centres: shifts along the row are local."""
    assert row.model is not None
    exact, loose = [], []
    for si, ri in row.match.items():
        if si in exclude:
            continue
        s, run = row.slots[si], row.runs[ri]
        c = s.x_mm + s.width_mm / 2
        item = (c, run.cx - row.model.px(c))
        (exact if run.facings == s.facings else loose).append(item)
    use = sorted(exact or loose)
    row.anchors = (np.array([u[0] for u in use]), np.array([u[1] for u in use]))


def _drift(row: _Row, mm: float, exclude: float | None = None) -> float:
    cs, ds = row.anchors
    if exclude is not None and len(cs):
        keep = np.abs(cs - exclude) > 1e-6
        cs, ds = cs[keep], ds[keep]
    if not len(cs):
        return 0.0
    return float(np.interp(mm, cs, ds))


def _bay_edge(row: _Row, idx: list[int], ctx: _Ctx, bay: Bay, edge_mm: float) -> float:
    """Where the bay ends in the photo: the widest empty stretch near the registered edge (the upright
    and the planners' end margins stand there), or the registered edge itself when there is none."""
    assert row.model is not None
    at = row.model.px(edge_mm)
    window = row.model.scale(edge_mm) * max(0.06 * bay.width_mm, 50.0)
    img_w = float(ctx.obs.image_size[0])
    spans = sorted((float(ctx.obs.xyxy[i, 0]), float(ctx.obs.xyxy[i, 2])) for i in idx)
    best: tuple[float, float] | None = None
    end = 0.0
    for x0, x1 in [*spans, (img_w, img_w)]:
        gap = x0 - end
        mid = (x0 + end) / 2
        if gap > 0 and abs(mid - at) <= window and (best is None or gap > best[0]):
            best = (gap, mid)
        end = max(end, x1)
    if best is None or best[0] < row.model.scale(edge_mm) * 12.0:
        return at
    return best[1]


def _weigh_pack_sizes(row: _Row, idx: list[int], ctx: _Ctx) -> None:
    """Size variants of one product look alike to the recognizer but not on the shelf: weigh each box's
    candidate SKUs by how well its size, at the row's registered scale, fits their pack dimensions from
    the catalogue. Boxes cut by the photo edge say nothing about size."""
    if not ctx.pack_mm or row.model is None:
        return
    img_w, img_h = ctx.obs.image_size
    sigma = ctx.cfg.pack_size_sigma
    for i in idx:
        x1, y1, x2, y2 = ctx.obs.xyxy[i]
        probs = ctx.probs[i]
        sized = [s for s in probs if s in ctx.pack_mm]
        if len(sized) < 2 or x1 <= 1 or y1 <= 1 or x2 >= img_w - 1 or y2 >= img_h - 1:
            continue
        scale = row.model.scale(row.model.mm((x1 + x2) / 2))
        if not scale > 0:
            continue
        w, h = (x2 - x1) / scale, (y2 - y1) / scale
        # Robust: a box cut short (a piece, an occluded pack) misleads, so size alone never decides.
        like = {
            s: _SIZE_OUTLIER + (1 - _SIZE_OUTLIER) * math.exp(-0.5 * (log_w**2 + log_h**2) / sigma**2)
            for s in sized
            for log_w, log_h in [(math.log(w / ctx.pack_mm[s][0]), math.log(h / ctx.pack_mm[s][1]))]
        }
        mass = sum(probs[s] for s in sized)
        weighed = {s: probs[s] * like[s] for s in sized}
        total = sum(weighed.values())
        if total <= 0:
            continue
        for s in sized:
            probs[s] = mass * weighed[s] / total
        if ctx.skus[i] is not None:
            ctx.skus[i] = max(probs, key=lambda s: probs[s])


_SIZE_OUTLIER = 0.02  # the share of boxes whose size says nothing of their pack


def _solve_row(row: _Row, idx: list[int], ctx: _Ctx, bay: Bay) -> tuple[list[int], list[int]]:
    """Keep the boxes whose centre lies inside the bay's registered extent and align them.

    Returns (kept, excluded). The planner leaves a few cm at each end of a bay and the upright stands
    between bays, so a product centre is well inside [0, width] or well outside it.
    """
    assert row.model is not None
    idx = sorted(idx, key=lambda i: ctx.cx[i])
    lo_px = _bay_edge(row, idx, ctx, bay, 0.0)
    hi_px = _bay_edge(row, idx, ctx, bay, bay.width_mm)
    kept = [i for i in idx if lo_px <= ctx.cx[i] <= hi_px]
    row.edges = (lo_px, hi_px)
    row.boxes = kept
    _weigh_pack_sizes(row, kept, ctx)
    row.runs = sorted(_runs(kept, ctx) + _gap_tokens(row, kept, ctx, bay), key=lambda t: t.cx)
    row.match, row.stand_in = _align(row.slots, row.runs, row.model, ctx.cfg)
    if _split_merged(row, ctx):
        row.match, row.stand_in = _align(row.slots, row.runs, row.model, ctx.cfg)
    _rebalance(row, ctx)
    _set_anchors(row)
    inside = set(kept)
    return kept, [i for i in idx if i not in inside]


def _split_merged(row: _Row, ctx: _Ctx) -> bool:
    """Split a run matched to a slot with more facings than planned when the next planned slot has no run
    and the surplus facings at that end may be its SKU: the recognizer found two neighbouring look-alike
    blocks equally likely for both SKUs and they merged into one run. True when the row's runs changed."""
    least = ctx.cfg.min_match_prob
    split: list[tuple[int, _Run]] = []
    for si, ri in sorted(row.match.items()):
        run, s = row.runs[ri], row.slots[si]
        if _count_facings(ctx.obs, run.idx) <= s.facings:
            continue
        for d in (1, -1):
            sj = si + d
            if not 0 <= sj < len(row.slots) or sj in row.match or row.slots[sj].sku_id == s.sku_id:
                continue
            other = row.slots[sj]
            keep, moved = list(run.idx), []
            while (
                len(keep) > 1
                and _count_facings(ctx.obs, keep) > s.facings
                and _count_facings(ctx.obs, moved) < other.facings
                and ctx.probs[keep[-1 if d > 0 else 0]].get(other.sku_id, 0.0) >= least
            ):
                moved.insert(len(moved) if d < 0 else 0, keep.pop(-1 if d > 0 else 0))
            if moved and _count_facings(ctx.obs, keep) == s.facings:
                run.idx = keep
                _restat(run, ctx)
                run.sku = s.sku_id
                part = _Run(moved, other.sku_id, {}, 0.0, 0.0, 0)
                _restat(part, ctx)
                split.append((ri, part))
                break
    for _, part in split:
        row.runs.append(part)
    if split:
        row.runs.sort(key=lambda t: t.cx)
    return bool(split)


def _rebalance(row: _Row, ctx: _Ctx) -> None:
    """Move facings across the boundary of two neighbouring matched blocks when one has too many and the
    other too few and the recognizer allows the facing to be the other SKU: two look-alike blocks side by
    side are often split one facing off."""
    least = ctx.cfg.min_rebalance_prob
    pairs = sorted(row.match.items(), key=lambda kv: kv[1])
    for (sa, ra), (sb, rb) in itertools.pairwise(pairs):
        if rb != ra + 1:
            continue
        a, b = row.runs[ra], row.runs[rb]
        fa, fb = row.slots[sa].facings, row.slots[sb].facings
        sku_a, sku_b = row.slots[sa].sku_id, row.slots[sb].sku_id
        moved = False
        while (
            len(a.idx) > 1
            and a.facings > fa
            and b.facings < fb
            and ctx.probs[a.idx[-1]].get(sku_b, 0) >= least
        ):
            b.idx.insert(0, a.idx.pop())
            _restat(a, ctx)
            _restat(b, ctx)
            moved = True
        while (
            not moved
            and len(b.idx) > 1
            and b.facings > fb
            and a.facings < fa
            and ctx.probs[b.idx[0]].get(sku_a, 0) >= least
        ):
            a.idx.append(b.idx.pop(0))
            _restat(a, ctx)
            _restat(b, ctx)


def _restat(run: _Run, ctx: _Ctx) -> None:
    boxes = ctx.obs.xyxy[run.idx]
    run.x0, run.x1 = float(boxes[:, 0].min()), float(boxes[:, 2].max())
    run.facings = _count_facings(ctx.obs, run.idx)
    acc: dict[str, float] = {}
    for i in run.idx:
        for s, p in ctx.probs[i].items():
            acc[s] = acc.get(s, 0.0) + p
    run.probs = {s: p / len(run.idx) for s, p in acc.items()}


def _slot_extent(row: _Row, s: Slot, exclude_self: bool) -> tuple[float, float]:
    """The slot's place in the photo: registered, moved with the products around it (local drift), but
    never past the bay's ends, where the planners' end margin absorbs any push along the shelf."""
    assert row.model is not None
    c = s.x_mm + s.width_mm / 2
    d = _drift(row, c, exclude=c if exclude_self else None)
    lo, hi = row.model.px(s.x_mm), row.model.px(s.x_mm + s.width_mm)
    bay_lo, bay_hi = row.model.px(0.0), row.model.px(row.width_mm)
    d = min(max(d, bay_lo - lo), bay_hi - hi) if hi - lo < bay_hi - bay_lo else 0.0
    return lo + d, hi + d


@dataclass
class _Evidence:
    free: float  # px of the slot's extent, inside the photo, with no product (or inside a gap box)
    length: float  # px of the whole extent
    visible: float  # px inside the photo
    hidden_facings: int  # facings that may stand beyond the photo edge, unseen


def _evidence(row: _Row, s: Slot, lo: float, hi: float, facing_px: float, ctx: _Ctx, gaps: list) -> _Evidence:
    img_w = ctx.obs.image_size[0]
    v0, v1 = max(lo, 0.0), min(hi, float(img_w))
    visible = max(0.0, v1 - v0)
    out = (hi - lo) - visible
    # A facing less than about a quarter visible at the photo edge is not detected at all; the facings
    # stand centred in their slot, so half the slot's spare width lies between the edge and the first.
    spare = max(0.0, (hi - lo) - s.facings * facing_px) / 2
    f = max(facing_px, 1e-6)
    hidden = max(0, int((out - spare + 0.25 * facing_px) // f)) if out > 1e-6 else 0
    if visible <= 0:
        return _Evidence(0.0, hi - lo, 0.0, hidden)
    if gaps is not None:
        free = _interval_coverage(v0, v1, gaps)
    else:
        spans = sorted((float(ctx.obs.xyxy[i, 0]), float(ctx.obs.xyxy[i, 2])) for i in row.boxes)
        free = visible - _interval_coverage(v0, v1, spans)
        if out > 1e-6:  # the sliver of a hidden facing is empty-looking but proves nothing
            free = max(0.0, free - 0.3 * facing_px)
    return _Evidence(free, hi - lo, visible, hidden)


def _gap_spans(obs: ShelfObservation, rows: list[_Row], ctx: _Ctx) -> dict[int, list[tuple[float, float]]]:
    """Gap boxes from a gap detector, given to the mapped row whose shelf they stand on."""
    spans: dict[int, list[tuple[float, float]]] = {k: [] for k in range(len(rows))}
    if obs.visible_gaps is None:
        return spans
    ys = [(k, r.y_px) for k, r in enumerate(rows) if r.y_px is not None]
    for g in obs.visible_gaps:
        if not ys:
            break
        k = min(ys, key=lambda t: abs(float(g[3]) - t[1]))[0]
        spans[k].append((float(min(g[0], g[2])), float(max(g[0], g[2]))))
    for k in spans:
        spans[k].sort()
    return spans


def _box(obs: ShelfObservation, i: int) -> Box:
    x1, y1, x2, y2 = (round(float(v), 1) for v in obs.xyxy[i])
    return (x1, y1, x2, y2)


# ---------------------------------------------------------------------------------------------------------
# The engine


def check_bay(
    observation: ShelfObservation,
    bay: Bay,
    *,
    known_skus: Iterable[str] | None = None,
    variants: Mapping[str, str] | None = None,
    catalogue: Mapping[str, SkuInfo] | None = None,
    other_bays: Sequence[Bay] = (),
    config: ComplianceConfig | None = None,
    probe: bool = True,
) -> BayCompliance:
    """Score one photo of `bay` against its planogram.

    `known_skus`: the catalogue's SKU ids; a planogram naming others raises PlanogramError (as do
    overlapping slots). `variants`: packaging variant id -> canonical SKU. `catalogue`: brand and category
    per SKU, for share of shelf. `other_bays`: the store's other bays, to name the bay a photo really
    shows when it is not this one (`probe=False` skips scoring against them). Raises ObservationError /
    PlanogramError for malformed input; returns a result marked `partial` (headline figures withheld)
    when the photo cannot be trusted.
    """
    cfg = config or ComplianceConfig()
    known = set(known_skus) if known_skus is not None else None
    validate_bay(bay, known)
    obs = observation
    planned = {s.sku_id for r in bay.rows for s in r.slots}
    vocab = planned | (known or set()) | {s.sku_id for ob in other_bays for r in ob.rows for s in r.slots}
    canon = _canonicalizer(variants, vocab)
    probs = _box_probs(obs, canon)
    skus = [canon(s) for s in obs.sku_id]
    ctx = _Ctx(
        obs=obs,
        cfg=cfg,
        skus=skus,
        probs=probs,
        cx=(obs.xyxy[:, 0] + obs.xyxy[:, 2]) / 2,
        width=obs.xyxy[:, 2] - obs.xyxy[:, 0],
        pack_mm={
            sku: (info.width_mm, info.height_mm)
            for sku, info in (catalogue or {}).items()
            if info.width_mm and info.height_mm
        },
    )
    rows = [
        _Row(plan=r, slots=sorted(r.slots, key=lambda s: s.x_mm), width_mm=bay.width_mm)
        for r in sorted(bay.rows, key=lambda r: r.shelf_row)
    ]
    notes: list[str] = []
    partial = False

    if len(obs) == 0:
        return _all_unverified(bay, rows, ["no detections in the photo: nothing can be verified"], catalogue)

    img_w, img_h = obs.image_size
    suspected, note = _wrong_bay(bay, other_bays if probe else (), skus, ctx, cfg)
    if note:
        partial = True
        notes.append(note)

    groups = (
        _rows_from_lines(obs.xyxy, obs.shelf_lines)
        if obs.shelf_lines is not None and len(obs.shelf_lines)
        else _cluster_rows(obs.xyxy)
    )
    # A part of a facing, or a box merged over facings that have boxes of their own, is neither a facing
    # of its own nor a detection to report.
    parts = set(_fragments(obs, ctx))
    redundant = parts | _merged_duplicates(obs, parts)
    if redundant:
        groups = [(kept, y) for idx, y in groups if (kept := [i for i in idx if i not in redundant])]
    v_scale = _map_rows(groups, rows, ctx, bay, img_h)
    n_fitted = _register(rows, groups, ctx, bay, v_scale)
    if n_fitted == 0:
        partial = True
        notes.append(f"no planned product of bay {bay.bay_id} was recognised: the photo cannot be registered")
        prior = _Model(img_w / bay.width_mm, 0.0, 0.0, False)
        for row in rows:
            if row.group is not None or row.empty:
                row.model = prior

    mapped_groups = {r.group for r in rows if r.group is not None}
    excluded = sum(len(g[0]) for k, g in enumerate(groups) if k not in mapped_groups)
    for row in rows:
        if row.group is None or row.model is None:
            continue
        _, out = _solve_row(row, groups[row.group][0], ctx, bay)
        excluded += len(out)
    empty_rows = [r.plan.shelf_row for r in rows if r.empty and r.model is not None]
    if empty_rows:
        notes.append(f"shelf row(s) {empty_rows}: no product on the shelf, which is in the photo")
    for row in rows:
        if row.empty and row.model is None:
            row.empty = False
    missing_rows = [r.plan.shelf_row for r in rows if r.group is None and not r.empty]
    if missing_rows:
        partial = True
        notes.append(f"shelf row(s) {missing_rows} not found in the photo: their slots are unverified")

    results = _label(rows, ctx, bay)
    unplanned: list[UnplannedResult] = []
    products: list[tuple[str | None, float]] = []
    claimed = {i for res in results.values() for i in res[1]}
    for row in rows:
        if row.model is None:
            continue
        for i in row.boxes:
            x0, x1 = float(obs.xyxy[i, 0]), float(obs.xyxy[i, 2])
            products.append((skus[i], row.model.mm(x1) - row.model.mm(x0)))
            if i in claimed:
                continue
            sku = skus[i]
            status = UNKNOWN_PRODUCT if sku is None else EXTRA_UNPLANNED
            score = float(obs.confidence[i]) * (probs[i].get(sku, 0.0) if sku is not None else 1.0)
            unplanned.append(
                UnplannedResult(
                    status=status, sku_id=sku, box=_box(obs, i), score=score, shelf_row=row.plan.shelf_row
                )
            )
    slots: list[SlotResult] = []
    for row in rows:
        for s in row.slots:
            status, boxes, found_sku = results[(row.plan.shelf_row, s.slot_index)]
            n_found = ctx.facings_found.get((row.plan.shelf_row, s.slot_index), _count_facings(obs, boxes))
            slots.append(
                SlotResult(
                    shelf_row=row.plan.shelf_row,
                    slot_index=s.slot_index,
                    planned_sku=s.sku_id,
                    status=status,
                    facings_planned=s.facings,
                    facings_found=n_found,
                    found_sku=found_sku,
                    boxes=[_box(obs, i) for i in boxes],
                )
            )
    slots.sort(key=lambda r: (r.shelf_row, r.slot_index))
    unverified = sum(1 for s in slots if s.status == MISSING_UNVERIFIED)
    if unverified and not missing_rows:
        notes.append(f"{unverified} slot(s) could not be verified (hidden or outside the photo)")
    # The same products arranged otherwise: most of what is found stands on another shelf than planned.
    # Or much of the bay cannot be seen where the photo should show it.
    found = [s for s in slots if s.status in (CORRECT, FACING_MISMATCH, MISPLACED, WRONG_SHELF)]
    elsewhere = sum(1 for s in found if s.status == WRONG_SHELF)
    suspicious = False
    if not partial and len(found) >= 3 and elsewhere > cfg.wrong_shelf_share * len(found):
        suspicious = True
        notes.append(
            f"{elsewhere} of the {len(found)} planned products found stand on another shelf than planned "
            f"in bay {bay.bay_id}: the photo probably shows another bay, or the planogram is out of date"
        )
    if not partial and unverified > cfg.unverified_share * len(slots):
        suspicious = True
        notes.append(f"{unverified} of {len(slots)} slots could not be verified: the result is partial")
    if suspicious:
        partial = True
        if probe:
            suspected = _best_other_bay(obs, bay, other_bays, found, known, variants, cfg)
            if suspected:
                notes.append(f"the photo matches bay {suspected}")
    metrics = compute_metrics(
        slots,
        unplanned,
        products,
        catalogue=catalogue,
        partial=partial,
        slot_labels=SLOT_STATUSES,
        detection_labels=DETECTION_STATUSES,
    )
    return BayCompliance(
        bay_id=bay.bay_id,
        slots=slots,
        unplanned=unplanned,
        metrics=metrics,
        partial=partial,
        notes=notes,
        suspected_bay=suspected,
        excluded_detections=excluded,
        rows_found=[r.plan.shelf_row for r in rows if r.group is not None or r.empty],
    )


def _wrong_bay(
    bay: Bay, other_bays: Sequence[Bay], skus: list[str | None], ctx: _Ctx, cfg: ComplianceConfig
) -> tuple[str | None, str | None]:
    """Is this the bay in the photo at all? Judged on the recognised products in the middle of the
    photo, away from the neighbouring bays: too few of them planned here, or another bay of the store
    plans clearly more of them. Returns (the bay they match, a note) or (None, None)."""
    img_w = ctx.obs.image_size[0]
    central = [i for i in range(len(skus)) if 0.2 * img_w <= ctx.cx[i] <= 0.8 * img_w and skus[i] is not None]
    if len(central) < cfg.min_wrong_bay_boxes:
        return None, None

    def share(b: Bay) -> float:
        planned = {s.sku_id for r in b.rows for s in r.slots}
        return sum(skus[i] in planned for i in central) / len(central)

    own = share(bay)
    others = sorted(((share(b), b.bay_id) for b in other_bays if b.bay_id != bay.bay_id), reverse=True)
    best_share, best_id = others[0] if others else (0.0, None)
    if own >= cfg.wrong_bay_share and best_share < own + 0.2:
        return None, None
    suspected = best_id if best_share > own else None
    note = f"only {own:.0%} of the recognised products are planned in bay {bay.bay_id}"
    if suspected:
        note += f"; {best_share:.0%} are planned in bay {suspected}"
    return suspected, note + ": the photo probably shows another bay"


def _best_other_bay(
    obs: ShelfObservation,
    bay: Bay,
    other_bays: Sequence[Bay],
    found: list[SlotResult],
    known: set[str] | None,
    variants: Mapping[str, str] | None,
    cfg: ComplianceConfig,
) -> str | None:
    """Score the photo against the store's other bays that plan most of the same products; the one whose
    products stand where its plan wants them, clearly more than here, is the bay in the photo."""
    own = sum(1 for s in found if s.status in (CORRECT, FACING_MISMATCH)) / max(1, len(found))
    best: tuple[float, str] | None = None
    for other in other_bays:
        if other.bay_id == bay.bay_id:
            continue
        try:
            res = check_bay(obs, other, known_skus=known, variants=variants, config=cfg, probe=False)
        except PlanogramError:
            continue
        got = [s for s in res.slots if s.status in (CORRECT, FACING_MISMATCH, MISPLACED, WRONG_SHELF)]
        if len(got) < 3:
            continue
        in_place = sum(1 for s in got if s.status in (CORRECT, FACING_MISMATCH)) / len(got)
        if in_place >= own + 0.2 and (best is None or in_place > best[0]):
            best = (in_place, other.bay_id)
    return best[1] if best else None


def _pairwise(xyxy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Widths, heights, and for every pair of boxes their horizontal and vertical overlaps (negative:
    the space between them)."""
    w = xyxy[:, 2] - xyxy[:, 0]
    h = xyxy[:, 3] - xyxy[:, 1]
    ox = np.minimum(xyxy[:, None, 2], xyxy[None, :, 2]) - np.maximum(xyxy[:, None, 0], xyxy[None, :, 0])
    oy = np.minimum(xyxy[:, None, 3], xyxy[None, :, 3]) - np.maximum(xyxy[:, None, 1], xyxy[None, :, 1])
    return w, h, ox, oy


def _fragments(obs: ShelfObservation, ctx: _Ctx) -> dict[int, int]:
    """Boxes that cover only part of another box's facing -> that box.

    On dark or busy packs the detector sometimes adds a box over part of a facing (its lower half, its
    label) beside the box of the whole facing. The part stands inside the whole's width and height; the
    recognizer often cannot name it, and as a box of its own it would split a block of facings or count
    one facing twice. A product stacked on another is not a part (it stands above it), nor is a facing
    inside a box merged over several (the whole must be about one facing wide) or inside a loose box that
    reaches well below the shelf edge: a whole ends at most a little below its part, unless it stands on
    the edge its neighbours stand on (then the part is a box over its top).
    """
    xyxy = obs.xyxy
    w, h, ox, oy = _pairwise(xyxy)
    whole = (  # whole[i, j]: box j could be the whole facing box i is a part of
        (h[None, :] * _PART_MAX_HEIGHT >= h[:, None])
        & (w[None, :] <= _WHOLE_MAX_WIDTH * w[:, None])
        & (ox >= _PART_MIN_INSIDE * w[:, None])
        & (oy >= _PART_MIN_INSIDE * h[:, None])
        & ((xyxy[None, :, 3] - xyxy[:, None, 3] <= _OVERHANG * h[None, :]) | _on_shelf_edge(xyxy)[None, :])
    )
    parts: dict[int, int] = {}
    for i in sorted(map(int, np.flatnonzero(whole.any(1))), key=lambda i: h[i]):  # a part's whole is taller
        cands = [int(j) for j in np.flatnonzero(whole[i]) if int(j) not in parts]
        if not cands:
            continue
        j = max(cands, key=lambda j: h[j])
        parts[i] = j
        if ctx.skus[j] is None and ctx.skus[i] is not None:  # the whole takes the name the part was given
            ctx.skus[j], ctx.probs[j] = ctx.skus[i], ctx.probs[i]
    # A facing boxed as two overlapping pieces, one named and one the recognizer cannot name: the unnamed
    # piece is part of the named one (as a run of its own it would cut its block in two).
    named = np.array([s is not None for s in ctx.skus])
    span = np.maximum(xyxy[:, None, 2], xyxy[None, :, 2]) - np.minimum(xyxy[:, None, 0], xyxy[None, :, 0])
    piece = (  # piece[i, j]: unnamed box i is the rest of named box j's facing
        ~named[:, None]
        & named[None, :]
        & (w[:, None] <= w[None, :])
        & (ox >= _PIECE_MIN_OVERLAP * w[:, None])
        & (oy >= _PART_MIN_INSIDE * np.maximum(h[:, None], h[None, :]))
        & (span <= _WHOLE_MAX_WIDTH * w[None, :])
    )
    for i in map(int, np.flatnonzero(piece.any(1))):
        if i not in parts and (cands := [int(j) for j in np.flatnonzero(piece[i]) if int(j) not in parts]):
            parts[i] = max(cands, key=lambda j: ox[i, j])
    return parts


def _on_shelf_edge(xyxy: np.ndarray) -> np.ndarray:
    """Boxes that stand on the edge a neighbouring facing stands on: a box beside it, about as tall, ends
    at the same height. Such a box is a whole facing even where a part of it ends higher up (a box over
    its top); a loose box reaching below the shelf edge has no such neighbour."""
    w, h, ox, _ = _pairwise(xyxy)
    beside = (
        (ox <= 0.5 * np.minimum(w[:, None], w[None, :]))
        & (-ox <= _NEIGHBOUR_GAP * w[:, None])  # -ox: the space between the two boxes
        & (np.abs(np.log(np.maximum(h[None, :], 1e-6) / np.maximum(h[:, None], 1e-6))) <= _SIMILAR_HEIGHT)
        & (np.abs(xyxy[:, None, 3] - xyxy[None, :, 3]) <= _SAME_EDGE * h[:, None])
    )
    np.fill_diagonal(beside, False)
    return beside.any(1)


_NEIGHBOUR_GAP = 1.0  # a neighbour stands at most this many of the box's widths away, ...
_SIMILAR_HEIGHT = math.log(1.4)  # ... is as tall within this log-ratio ...
_SAME_EDGE = 0.06  # ... and ends within this share of the box's height of the same line


def _merged_duplicates(obs: ShelfObservation, parts: set[int]) -> set[int]:
    """Boxes merged over two or more facings that the detector also boxed one by one (`parts`, folded
    into their facings already, count as neither).

    The merged box says nothing the single boxes do not, and as a run of its own (the recognizer cannot
    name a crop of several facings) it would cut their block in two and hide a facing from the count.
    """
    xyxy = obs.xyxy
    w, h, ox, oy = _pairwise(xyxy)
    inside = (  # inside[j, i]: box i is one whole facing of those box j spans
        (ox >= _MERGED_MIN_INSIDE * w[None, :])
        & (oy >= _MERGED_MIN_INSIDE * h[:, None])
        & (w[None, :] <= _MERGED_MAX_SHARE * w[:, None])
    )
    np.fill_diagonal(inside, False)
    if parts:
        folded = np.array(sorted(parts))
        inside[folded, :] = False
        inside[:, folded] = False
    merged: set[int] = set()
    for j in map(int, np.flatnonzero(inside.sum(1) >= 2)):
        spans = sorted((float(xyxy[i, 0]), float(xyxy[i, 2])) for i in np.flatnonzero(inside[j]))
        if _interval_coverage(float(xyxy[j, 0]), float(xyxy[j, 2]), spans) >= _MERGED_COVERED * w[j]:
            merged.add(j)
    return merged


_MERGED_MIN_INSIDE = 0.7  # a single facing spans this much of the merged box's height, and this much of
# its own width lies inside the merged box ...
_MERGED_MAX_SHARE = 0.75  # ... and is at most this share of its width; ...
_MERGED_COVERED = 0.7  # ... the single boxes cover this share of the merged box's width

_PART_MAX_HEIGHT = 0.85  # a part is at most this share of its whole's height ...
_PART_MIN_INSIDE = 0.6  # ... with this share of its width and height inside the whole ...
_WHOLE_MAX_WIDTH = 1.6  # ... which is at most this many times as wide as the part ...
_OVERHANG = 0.15  # ... and reaches below it by at most this share of its own height
_PIECE_MIN_OVERLAP = 0.4  # an unnamed piece lies this much of its width over the named one


def _count_facings(obs: ShelfObservation, boxes: list[int]) -> int:
    """Facings side by side. A box stacked over another is the same facing, and so is a box that spans
    two facings already counted (a merged detection): narrow boxes are counted first."""
    taken: list[np.ndarray] = []
    for i in sorted(boxes, key=lambda i: obs.xyxy[i, 2] - obs.xyxy[i, 0]):
        box = obs.xyxy[i]
        if not any(
            min(t[2], box[2]) - max(t[0], box[0]) >= 0.5 * min(t[2] - t[0], box[2] - box[0]) for t in taken
        ):
            taken.append(box)
    return len(taken)


def _label(rows: list[_Row], ctx: _Ctx, bay: Bay) -> dict[tuple[int, int], tuple[str, list[int], str | None]]:
    """Slot verdicts from the row alignments, reconciled across rows."""
    cfg = ctx.cfg
    out: dict[tuple[int, int], tuple[str, list[int], str | None]] = {}
    # Unmatched slots and unmatched runs over the whole bay.
    open_slots: list[tuple[int, int]] = []  # (row k, slot position)
    open_runs: list[tuple[int, int]] = []  # (row k, run position)
    for k, row in enumerate(rows):
        if row.model is None:
            continue
        used = set(row.match.values())
        open_slots += [(k, si) for si in range(len(row.slots)) if si not in row.match]
        open_runs += [
            (k, ri)
            for ri, r in enumerate(row.runs)
            if ri not in used and r.sku is not None and not r.gap and not _edge_sliver(r, row, ctx)
        ]
    cands: list[tuple[float, int, int]] = []
    for u, (k, si) in enumerate(open_slots):
        s = rows[k].slots[si]
        c = s.x_mm + s.width_mm / 2
        # A slot whose place stands visibly empty is out of stock unless its SKU is clearly elsewhere: a
        # look-alike the recognizer half-believes is not enough.
        stand_in = rows[k].stand_in.get(si)
        empty_here = stand_in is not None and rows[k].runs[stand_in].gap
        least = cfg.min_elsewhere_prob if empty_here else cfg.min_match_prob
        for v, (k2, ri) in enumerate(open_runs):
            run = rows[k2].runs[ri]
            p = run.probs.get(s.sku_id, 0.0)
            if p < least:
                continue
            model = rows[k2].model
            assert model is not None
            dist = abs(model.mm(run.cx) - c) / bay.width_mm
            cands.append(((0.0 if k2 == k else 10.0) + dist + (1.0 - p), u, v))
    found: dict[int, int] = {}  # open slot -> open run
    taken: set[int] = set()
    for _, u, v in sorted(cands):
        if u not in found and v not in taken:
            found[u] = v
            taken.add(v)
    misplaced: dict[tuple[int, int], int] = {}  # (row, slot pos) -> run pos, same row
    for u, v in found.items():
        k, si = open_slots[u]
        k2, ri = open_runs[v]
        run = rows[k2].runs[ri]
        s = rows[k].slots[si]
        status = MISPLACED if k2 == k else WRONG_SHELF
        out[(rows[k].plan.shelf_row, s.slot_index)] = (status, list(run.idx), run.sku)
        if k2 == k:
            misplaced[(k, si)] = ri
    flipped = _swap_partners(rows, misplaced)
    gaps = _gap_spans(ctx.obs, rows, ctx)
    for k, row in enumerate(rows):  # drift anchors: only products that stand where the plan wants them
        out_of_place = {si for kk, si in flipped if kk == k}
        if out_of_place:
            _set_anchors(row, out_of_place)
    for k, row in enumerate(rows):
        if row.model is None:
            continue
        for si, ri in row.match.items():
            s, run = row.slots[si], row.runs[ri]
            key = (row.plan.shelf_row, s.slot_index)
            if (k, si) in flipped:
                out[key] = (MISPLACED, list(run.idx), run.sku)
                continue
            n = _count_facings(ctx.obs, run.idx)
            if n < s.facings:  # one box over two facings (a merged detection) still shows both
                n = max(n, min(s.facings, _facings_by_width(row, s, run, ctx)))
            elif n > s.facings and _overlapping(ctx.obs, run.idx):
                # Boxes overlapping side by side (one facing split in two) leave no room for both: the
                # width they cover says how many facings stand there.
                n = min(n, max(s.facings, _facings_by_width(row, s, run, ctx)))
            ctx.facings_found[key] = n
            over = n > s.facings
            under = n < s.facings and _missing_facings_visible(row, s, run, n, ctx, gaps[k])
            status = FACING_MISMATCH if over or under else CORRECT
            out[key] = (status, list(run.idx), run.sku)
    for k, row in enumerate(rows):
        for si, s in enumerate(row.slots):
            key = (row.plan.shelf_row, s.slot_index)
            if key in out:
                continue
            if row.model is None:
                out[key] = (MISSING_UNVERIFIED, [], None)
                continue
            out[key] = (_empty_or_unverified(row, si, ctx, gaps[k]), [], None)
    return out


def _edge_sliver(run: _Run, row: _Row, ctx: _Ctx) -> bool:
    """A run that is only a narrow sliver cut by the photo's side: most of the pack is out of the photo,
    so neither its SKU nor its bay (the neighbouring bay starts there) is known well enough to call the
    SKU found on another shelf or elsewhere in the row."""
    img_w = float(ctx.obs.image_size[0])
    xyxy = ctx.obs.xyxy[run.idx]
    if not (xyxy[:, 0].min() <= 1.0 or xyxy[:, 2].max() >= img_w - 1.0) or not row.boxes:
        return False
    return run.x1 - run.x0 < _SLIVER * float(np.median(ctx.width[row.boxes]))


_SLIVER = 0.5  # narrower than this share of the row's typical box


def _overlapping(obs: ShelfObservation, boxes: list[int], share: float = 0.25) -> bool:
    """Two neighbouring boxes overlap by more than `share` of the narrower one's width."""
    spans = sorted((float(obs.xyxy[i, 0]), float(obs.xyxy[i, 2])) for i in boxes)
    return any(
        min(a1, b1) - max(a0, b0) > share * min(a1 - a0, b1 - b0)
        for (a0, a1), (b0, b1) in itertools.pairwise(spans)
    )


def _facings_by_width(row: _Row, s: Slot, run: _Run, ctx: _Ctx) -> int:
    """Facings the run's boxes cover at the slot's planned pitch (its width per facing, spare included,
    so this never counts more than stand there)."""
    assert row.model is not None
    pitch = row.model.scale(s.x_mm + s.width_mm / 2) * s.width_mm / max(1, s.facings)
    spans = sorted((float(ctx.obs.xyxy[i, 0]), float(ctx.obs.xyxy[i, 2])) for i in run.idx)
    covered = _interval_coverage(spans[0][0], spans[-1][1], spans) if spans else 0.0
    return round(covered / pitch) if pitch > 0 else 0


def _missing_facings_visible(
    row: _Row, s: Slot, run: _Run, n: int, ctx: _Ctx, gap_spans: list[tuple[float, float]]
) -> bool:
    """Too few facings: is the room of the missing ones visibly empty beside the run?

    The room is measured from the run itself (the block may have been pushed along the shelf), on
    either side, inside the photo and the bay, net of the spare width the plan gives the slot. Facings
    cut off by the photo edge leave no visible room and are not counted missing. With a gap detector,
    only its gap boxes count as empty room (a missed detection is not a gap).
    """
    assert row.model is not None
    mine = sorted((float(ctx.obs.xyxy[i, 0]), float(ctx.obs.xyxy[i, 2])) for i in run.idx)
    width = float(np.median([b - a for a, b in mine]))
    # Centre to centre of neighbouring facings; a hole inside the run counts as well.
    steps = [b[0] - a[0] for a, b in itertools.pairwise(mine) if b[0] - a[0] < 1.6 * width]
    pitch = float(np.median(steps)) if steps else 1.1 * width
    need = (s.facings - n) * pitch
    slot_px = row.model.scale(s.x_mm + s.width_mm / 2) * s.width_mm
    spare = max(0.0, slot_px - s.facings * pitch) / 2
    img_w = float(ctx.obs.image_size[0])
    lo_lim, hi_lim = max(0.0, row.edges[0]), min(img_w, row.edges[1])
    others = sorted(
        (float(ctx.obs.xyxy[i, 0]), float(ctx.obs.xyxy[i, 2])) for i in row.boxes if i not in set(run.idx)
    )
    detector = ctx.obs.visible_gaps is not None
    inside = (run.x1 - run.x0) - n * pitch + (pitch - width)  # room left by facings missing in the run
    best = _interval_coverage(run.x0, run.x1, gap_spans) if detector else inside
    for a, b in ((run.x1, run.x1 + need + spare), (run.x0 - need - spare, run.x0)):
        v0, v1 = max(a, lo_lim), min(b, hi_lim)
        if v1 <= v0:
            continue
        if detector:
            best = max(best, _interval_coverage(v0, v1, gap_spans))
        else:
            best = max(best, (v1 - v0) - _interval_coverage(v0, v1, others) - spare)
    return best >= 0.5 * need


def _empty_or_unverified(row: _Row, si: int, ctx: _Ctx, gap_spans: list[tuple[float, float]]) -> str:
    """A slot with no product anywhere: out of stock when its place is visibly empty, else unverified.

    The place is read two ways: the empty stretch the alignment put in the slot's place (robust to
    products pushed along the shelf), or the free share of the slot's registered extent. A gap detector's
    boxes, when given, replace both. Facings that may stand beyond the photo edge prove nothing.
    """
    assert row.model is not None
    s = row.slots[si]
    lo, hi = _slot_extent(row, s, exclude_self=False)
    facing_px = 0.9 * row.model.scale(s.x_mm + s.width_mm / 2) * s.width_mm / s.facings
    detector = ctx.obs.visible_gaps is not None
    ev = _evidence(row, s, lo, hi, facing_px, ctx, gap_spans if detector else None)
    if ev.hidden_facings >= s.facings:
        return MISSING_UNVERIFIED
    if not detector and si in row.stand_in:
        tok = row.runs[row.stand_in[si]]
        if tok.gap and tok.x1 - tok.x0 >= 0.4 * min(hi - lo, s.facings * facing_px / 0.9):
            return OUT_OF_STOCK
    empty = ev.free >= ctx.cfg.gap_free_fraction * max(ev.visible, 0.5 * ev.length)
    return OUT_OF_STOCK if empty else MISSING_UNVERIFIED


def _swap_partners(rows: list[_Row], misplaced: dict[tuple[int, int], int]) -> set[tuple[int, int]]:
    """Matched slots that traded places with a misplaced one: both are misplaced.

    The alignment keeps one of two swapped neighbours in order and leaves the other out; the one it kept
    is the swap partner when the two stand next to each other in the photo, in the opposite order to the
    plan, and each stands nearer the other's planned place than its own.
    """
    flipped: set[tuple[int, int]] = set()
    by_row: dict[int, list[int]] = {}
    for k, si in misplaced:
        by_row.setdefault(k, []).append(si)
    for k, sis in by_row.items():
        row = rows[k]
        model = row.model
        assert model is not None

        def centre_mm(ri: int) -> float:
            return model.mm(row.runs[ri].cx)  # noqa: B023

        def plan_c(si: int) -> float:
            s = row.slots[si]  # noqa: B023
            return s.x_mm + s.width_mm / 2

        def gain(su: int, ru: int, sx: int, rx: int) -> float:
            straight = abs(centre_mm(ru) - plan_c(su)) + abs(centre_mm(rx) - plan_c(sx))
            swapped = abs(centre_mm(ru) - plan_c(sx)) + abs(centre_mm(rx) - plan_c(su))
            return straight - swapped

        # Misplaced slots that explain each other (a swap both of whose halves the alignment left out).
        alone = set(sis)
        pairs = sorted(
            ((gain(u, misplaced[(k, u)], v, misplaced[(k, v)]), u, v) for u in sis for v in sis if u < v),
            reverse=True,
        )
        for g, u, v in pairs:
            if g > 0 and u in alone and v in alone:
                alone -= {u, v}
        slot_of_run = {ri: si for si, ri in row.match.items()} | {misplaced[(k, si)]: si for si in sis}
        for u in sorted(alone):
            ru = misplaced[(k, u)]
            best: tuple[float, int] | None = None
            for sx, rx in row.match.items():
                if (k, sx) in flipped:
                    continue
                lo, hi = min(u, sx), max(u, sx)
                if any(t in row.match for t in range(lo + 1, hi)):
                    continue  # a slot in between stands where planned: not neighbours in the plan
                r0, r1 = min(ru, rx), max(ru, rx)
                if any(t in slot_of_run for t in range(r0 + 1, r1)):
                    continue  # another planned product stands between them in the photo
                if (u < sx) == (ru < rx):
                    continue  # same order as planned: not a swap
                g = gain(u, ru, sx, rx)
                margin = 0.25 * min(row.slots[u].width_mm, row.slots[sx].width_mm)
                if g > margin and (best is None or g > best[0]):
                    best = (g, sx)
            if best is not None:
                flipped.add((k, best[1]))
    return flipped


def _all_unverified(
    bay: Bay, rows: list[_Row], notes: list[str], catalogue: Mapping[str, SkuInfo] | None
) -> BayCompliance:
    slots = [
        SlotResult(
            shelf_row=r.plan.shelf_row,
            slot_index=s.slot_index,
            planned_sku=s.sku_id,
            status=MISSING_UNVERIFIED,
            facings_planned=s.facings,
            facings_found=0,
        )
        for r in rows
        for s in r.slots
    ]
    metrics = compute_metrics(
        slots,
        [],
        [],
        catalogue=catalogue,
        partial=True,
        slot_labels=SLOT_STATUSES,
        detection_labels=DETECTION_STATUSES,
    )
    return BayCompliance(
        bay_id=bay.bay_id, slots=slots, unplanned=[], metrics=metrics, partial=True, notes=notes
    )


# ---------------------------------------------------------------------------------------------------------
# Micro-benchmark (the lead wires it under `shelfloop bench`; never a timed unit test)


def synthetic_bay(n_facings: int = 200, rows: int = 5, seed: int = 0) -> tuple[Bay, ShelfObservation]:
    """A bay of about `n_facings` facings and a perfect, slightly tilted photo of it (for benchmarks)."""
    rng = np.random.default_rng(seed)
    per_row = max(1, n_facings // rows)
    unit, gap = 60.0, 6.0
    width = per_row * (unit + gap) + 40.0
    shelf_rows: list[ShelfRow] = []
    boxes, skus = [], []
    scale = 1000.0 / width
    y = 0.0
    n_sku = 0
    for r in range(rows):
        y += 250.0
        slots, x, left = [], 10.0, per_row
        while left > 0:
            f = int(min(left, rng.integers(1, 5)))
            sku = f"sku-{n_sku:04d}"
            n_sku += 1
            slots.append(
                Slot(slot_index=len(slots), sku_id=sku, facings=f, x_mm=x, width_mm=f * (unit + gap))
            )
            for k in range(f):
                fx = x + k * (unit + gap) + 3
                tilt = 0.02 * fx
                boxes.append(
                    ((fx) * scale, (y - 200 + tilt) * scale, (fx + unit) * scale, (y + tilt) * scale)
                )
                skus.append(sku)
            x += f * (unit + gap)
            left -= f
        shelf_rows.append(ShelfRow(shelf_row=r, y_mm=y, height_mm=230.0, slots=slots))
    bay = Bay(bay_id="bench", fixture="gondola", width_mm=width, height_mm=y + 50, rows=shelf_rows)
    n = len(boxes)
    obs = ShelfObservation(
        xyxy=np.array(boxes),
        confidence=np.full(n, 0.9),
        sku_id=skus,
        sku_prob=np.full(n, 0.95),
        image_size=(1000, int((y + 50) * scale) + 1),
    )
    return bay, obs


def bench_bay(n_facings: int = 200, repeats: int = 20) -> float:
    """Milliseconds to score one bay of `n_facings` facings (median of `repeats` runs)."""
    bay, obs = synthetic_bay(n_facings)
    check_bay(obs, bay)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        check_bay(obs, bay)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


__all__ = [
    "CORRECT",
    "DETECTION_STATUSES",
    "EXTRA_UNPLANNED",
    "FACING_MISMATCH",
    "MISPLACED",
    "MISSING_UNVERIFIED",
    "OUT_OF_STOCK",
    "SLOT_STATUSES",
    "UNKNOWN_PRODUCT",
    "WRONG_SHELF",
    "BayCompliance",
    "ComplianceConfig",
    "DetectionStatus",
    "ObservationError",
    "PlanogramError",
    "ShelfObservation",
    "SlotResult",
    "SlotStatus",
    "UnplannedResult",
    "bench_bay",
    "check_bay",
    "synthetic_bay",
]
