"""Checkout tracking: follow each item across frames and vote its SKU over the whole track.

Why our own small IoU tracker: supervision's ByteTrack was deprecated in 0.28 and removed in 0.30 (the
current 0.31 has none); its successor, the ``trackers`` package (2.6), is torch-free but pulls
supervision, SciPy and PyAV (FFmpeg) into the edge install for what is, at a checkout counter (a few
items, slow motion, a fixed camera), greedy IoU matching with a lost-frame buffer. ByteTrack's one extra
idea that matters here, keeping low-confidence boxes to continue existing tracks, is kept.

Why voting: one frame can show the back of a pack or a hand over it; the item's SKU is the weighted
majority over every frame of its track, and an item whose votes do not agree, or whose best SKU is not
probable enough, is ``unresolved`` for a human, never billed as a guess.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime

import numpy as np

from models.detections import Detections
from shelfloop import contract

__all__ = ["CheckoutVote", "IouTracker", "Track", "TrackerConfig"]


@dataclass(frozen=True)
class TrackerConfig:
    """Matching and voting thresholds for one checkout camera."""

    iou_threshold: float = 0.3
    activation_confidence: float = 0.4  # weaker boxes only continue existing tracks (ByteTrack's idea)
    max_lost_frames: int = 15
    min_votes: int = 3
    min_agreement: float = 0.6
    min_probability: float = 0.5


@dataclass
class Track:
    """One item on the counter: its box now, and the evidence gathered over its frames."""

    track_id: int
    box: np.ndarray
    first_seen: datetime
    last_seen: datetime
    frames: int = 0
    lost: int = 0
    weights: dict[str | None, float] = field(default_factory=lambda: defaultdict(float))
    probs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def vote(self, sku_id: str | None, probability: float, candidates: tuple[tuple[str, float], ...]) -> None:
        weight = probability if np.isfinite(probability) and probability > 0 else 0.05
        self.weights[sku_id] += weight
        for sku, p in candidates:
            self.probs[sku].append(float(p))
        self.frames += 1

    @property
    def agreement(self) -> float:
        """Share of the vote weight behind the leading SKU (unknown counts against every SKU)."""
        total = sum(self.weights.values())
        known = {k: v for k, v in self.weights.items() if k is not None}
        return max(known.values()) / total if known and total > 0 else 0.0


@dataclass(frozen=True)
class CheckoutVote:
    """The verdict on a finished track."""

    track: Track
    status: contract.CheckoutStatus
    sku_id: str | None
    probability: float
    candidates: list[tuple[str, float]]
    reason: str | None


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)), np.float64)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


class IouTracker:
    """Greedy IoU matching of detections to live tracks; finished tracks come back voted."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(self, det: Detections, at: datetime) -> tuple[Detections, list[CheckoutVote]]:
        """Assign track ids to this frame's detections and close the tracks lost for too long."""
        cfg = self.config
        boxes = det.xyxy.astype(np.float64)
        ids = np.full(len(det), -1, np.int64)
        iou = _iou_matrix(np.array([t.box for t in self.tracks]).reshape(-1, 4), boxes)
        matched_tracks: set[int] = set()
        if iou.size:
            for flat in np.argsort(-iou, axis=None):
                ti, di = np.unravel_index(flat, iou.shape)
                if iou[ti, di] < cfg.iou_threshold:
                    break
                if ti in matched_tracks or ids[di] >= 0:
                    continue
                matched_tracks.add(int(ti))
                ids[di] = self.tracks[ti].track_id
        by_id = {t.track_id: t for t in self.tracks}
        for di in range(len(det)):
            if ids[di] < 0:
                if float(det.confidence[di]) < cfg.activation_confidence:
                    continue
                track = Track(self._next_id, boxes[di], at, at)
                self._next_id += 1
                self.tracks.append(track)
                by_id[track.track_id] = track
                ids[di] = track.track_id
            track = by_id[int(ids[di])]
            track.box, track.last_seen, track.lost = boxes[di], at, 0
            track.vote(det.sku_id[di], float(det.sku_probability[di]), det.candidates[di])
        seen = set(int(i) for i in ids if i >= 0)
        finished: list[CheckoutVote] = []
        alive: list[Track] = []
        for track in self.tracks:
            if track.track_id not in seen:
                track.lost += 1
            if track.lost > cfg.max_lost_frames:
                finished.append(self.verdict(track))
            else:
                alive.append(track)
        self.tracks = alive
        return replace(det, tracker_id=ids), finished

    def agreement(self, det: Detections) -> list[float | None]:
        """Per detection, how much its track's votes agree so far (None: untracked or too few votes)."""
        by_id = {t.track_id: t for t in self.tracks}
        out: list[float | None] = []
        for tid in det.tracker_id:
            track = by_id.get(int(tid))
            out.append(
                track.agreement if track is not None and track.frames >= self.config.min_votes else None
            )
        return out

    def flush(self) -> list[CheckoutVote]:
        """Close every open track (shutdown, or the end of a basket)."""
        finished = [self.verdict(t) for t in self.tracks]
        self.tracks = []
        return finished

    def verdict(self, track: Track) -> CheckoutVote:
        cfg = self.config
        means = sorted(((sku, float(np.mean(p))) for sku, p in track.probs.items()), key=lambda x: -x[1])
        candidates = [(sku, float(np.clip(p, 0, 1))) for sku, p in means[:5]]
        known = {k: v for k, v in track.weights.items() if k is not None}
        if not known:
            return CheckoutVote(track, "unresolved", None, 0.0, candidates, "unknown product")
        best = max(known, key=lambda k: known[k])
        prob = float(np.clip(np.mean(track.probs.get(best, [0.0])), 0.0, 1.0))
        reason = None
        if track.frames < cfg.min_votes:
            reason = f"seen in {track.frames} frames, fewer than {cfg.min_votes}"
        elif track.agreement < cfg.min_agreement:
            reason = f"frames disagree: {track.agreement:.0%} for the leading SKU"
        elif prob < cfg.min_probability:
            reason = f"low probability {prob:.2f}"
        if reason is not None:
            return CheckoutVote(track, "unresolved", None, prob, candidates, reason)
        return CheckoutVote(track, "resolved", best, prob, candidates, None)
