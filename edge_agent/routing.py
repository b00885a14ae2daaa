"""Uncertainty routing: which crops humans should look at, with what priority, within the device's quota.

Why a policy rather than "send everything below a threshold": annotation time is the scarce resource. A
checkout item that may be billed wrongly outranks a shelf facing; a product the gallery has never seen
(novelty) teaches the model more than one that is merely close to a sibling (low margin). A static shelf
camera sees the same uncertain pack all day, so near-identical crops (same camera, overlapping box,
similar embedding, within a window) go up once and the rest are only counted. Quotas per minute, hour and
day keep one noisy camera from flooding the cloud and the outbox; like Roboflow's active-learning quotas.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from models.detections import Detections
from shelfloop import contract

__all__ = ["DEFAULT_REASON_WEIGHTS", "RoutedCrop", "RoutingPolicy", "UncertaintyRouter", "build_crop"]

DEFAULT_REASON_WEIGHTS: Final[Mapping[str, int]] = {
    "novelty": 40,
    "track_disagreement": 30,
    "low_probability": 20,
    "low_detector_confidence": 15,
    "low_margin": 10,
    "audit_sample": 0,
}
"""Priority added per reason (the strongest counts, each further reason adds a little)."""

SOURCE_BASE_PRIORITY: Final[Mapping[str, int]] = {"checkout": 50, "shelf": 0}
"""Checkout crops always outrank shelf crops: reason weights stay below 50."""


@dataclass(frozen=True)
class RoutingPolicy:
    """Thresholds, quotas and de-duplication settings; every field is configurable per device."""

    detector_band: tuple[float, float] = (0.25, 0.5)
    min_margin: float = 0.10
    min_probability: float = 0.60
    novelty_threshold: float = 0.35
    min_track_agreement: float = 0.60
    audit_rate: float = 0.0
    per_minute: int = 10
    per_hour: int = 100
    per_day: int = 1000
    dedup_similarity: float = 0.95
    dedup_iou: float = 0.5
    dedup_window_s: float = 3600.0
    dedup_memory: int = 512
    reason_weights: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_REASON_WEIGHTS))


@dataclass(frozen=True)
class RoutedCrop:
    """A detection the router chose to send up: its index in the frame's detections, why, how urgently."""

    index: int
    reasons: tuple[contract.UncertaintyReason, ...]
    priority: int


@dataclass
class _Seen:
    camera_id: str
    box: np.ndarray
    embedding: np.ndarray | None
    sku_id: str | None
    at: float


class UncertaintyRouter:
    """Applies a `RoutingPolicy` to each frame's detections; keeps quota and de-duplication state."""

    def __init__(
        self,
        policy: RoutingPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.policy = policy or RoutingPolicy()
        self._clock = clock
        self._rng = rng or np.random.default_rng()
        self._sent: deque[float] = deque()
        self._seen: dict[str, deque[_Seen]] = {}
        self._tracks_sent: dict[tuple[str, int], float] = {}
        self.routed = 0
        self.deduplicated = 0
        self.over_quota = 0

    # -- decisions ------------------------------------------------------------------------------------

    def reasons(
        self, det: Detections, i: int, track_agreement: float | None = None
    ) -> list[contract.UncertaintyReason]:
        """Why detection ``i`` is uncertain (empty: the models are sure enough)."""
        p = self.policy
        found: list[contract.UncertaintyReason] = []
        novelty = float(det.novelty[i])
        if np.isfinite(novelty) and novelty >= p.novelty_threshold:
            found.append("novelty")
        if track_agreement is not None and track_agreement < p.min_track_agreement:
            found.append("track_disagreement")
        prob = float(det.sku_probability[i])
        if np.isfinite(prob) and prob < p.min_probability:
            found.append("low_probability")
        low, high = p.detector_band
        if low <= float(det.confidence[i]) < high:
            found.append("low_detector_confidence")
        margin = float(det.margin[i])
        if np.isfinite(margin) and margin < p.min_margin:
            found.append("low_margin")
        if not found and p.audit_rate > 0 and self._rng.random() < p.audit_rate:
            found.append("audit_sample")
        return found

    def priority(self, source: contract.Source, reasons: Sequence[str]) -> int:
        """Base by source plus the strongest reason, +2 per further reason, capped below the next source."""
        weights = [self.policy.reason_weights.get(r, 0) for r in reasons]
        extra = (max(weights) if weights else 0) + 2 * max(0, len(weights) - 1)
        return int(min(100, SOURCE_BASE_PRIORITY[source] + min(49, extra)))

    def route(
        self,
        camera_id: str,
        source: contract.Source,
        detections: Detections,
        *,
        track_agreement: Sequence[float | None] | None = None,
    ) -> list[RoutedCrop]:
        """The detections of one frame to send, highest priority first, after de-duplication and quotas."""
        candidates: list[RoutedCrop] = []
        for i in range(len(detections)):
            agreement = None if track_agreement is None else track_agreement[i]
            found = self.reasons(detections, i, agreement)
            if found:
                candidates.append(RoutedCrop(i, tuple(found), self.priority(source, found)))
        candidates.sort(key=lambda r: -r.priority)
        now = self._clock()
        chosen: list[RoutedCrop] = []
        for cand in candidates:
            if self._is_duplicate(camera_id, detections, cand.index, now):
                self.deduplicated += 1
                continue
            if not self._take_quota(now):
                self.over_quota += 1
                continue
            self._remember(camera_id, detections, cand.index, now)
            chosen.append(cand)
            self.routed += 1
        return chosen

    # -- de-duplication -------------------------------------------------------------------------------

    def _is_duplicate(self, camera_id: str, det: Detections, i: int, now: float) -> bool:
        p = self.policy
        track = int(det.tracker_id[i])
        if track >= 0:  # one item on the counter is one crop, however many frames show it
            at = self._tracks_sent.get((camera_id, track))
            if at is not None and now - at <= p.dedup_window_s:
                return True
        seen = self._seen.get(camera_id)
        if not seen:
            return False
        while seen and now - seen[0].at > p.dedup_window_s:
            seen.popleft()
        box = det.xyxy[i].astype(np.float64)
        emb = None if det.embedding is None else det.embedding[i].astype(np.float64)
        for old in seen:
            if _iou(old.box, box) < p.dedup_iou:
                continue
            if emb is not None and old.embedding is not None:
                if float(np.dot(old.embedding, emb)) >= p.dedup_similarity:
                    return True
            elif old.sku_id == det.sku_id[i]:
                return True  # no embeddings: same place, same guess
        return False

    def _remember(self, camera_id: str, det: Detections, i: int, now: float) -> None:
        track = int(det.tracker_id[i])
        if track >= 0:
            self._tracks_sent[(camera_id, track)] = now
            while len(self._tracks_sent) > self.policy.dedup_memory:
                del self._tracks_sent[next(iter(self._tracks_sent))]  # oldest first (insertion order)
        seen = self._seen.setdefault(camera_id, deque(maxlen=self.policy.dedup_memory))
        emb = None if det.embedding is None else det.embedding[i].astype(np.float64)
        if emb is not None:
            norm = float(np.linalg.norm(emb))
            emb = emb / norm if norm > 0 else emb
        seen.append(_Seen(camera_id, det.xyxy[i].astype(np.float64), emb, det.sku_id[i], now))

    # -- quotas ---------------------------------------------------------------------------------------

    def _take_quota(self, now: float) -> bool:
        p = self.policy
        while self._sent and now - self._sent[0] > 86_400:
            self._sent.popleft()
        if len(self._sent) >= p.per_day:
            return False
        times = np.fromiter(self._sent, dtype=np.float64, count=len(self._sent))
        if int((times > now - 3600).sum()) >= p.per_hour or int((times > now - 60).sum()) >= p.per_minute:
            return False
        self._sent.append(now)
        return True

    def quota_used(self) -> dict[str, int]:
        now = self._clock()
        times = np.fromiter(self._sent, dtype=np.float64, count=len(self._sent))
        return {
            "minute": int((times > now - 60).sum()),
            "hour": int((times > now - 3600).sum()),
            "day": int((times > now - 86_400).sum()),
        }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def build_crop(
    frame: np.ndarray,
    det: Detections,
    routed: RoutedCrop,
    *,
    store_id: str,
    device_id: str,
    camera_id: str,
    source: contract.Source,
    model_version: str,
    gallery_version: str,
    captured_at: object | None = None,
    bay_id: str | None = None,
    pad: float = 0.1,
    max_side: int = 320,
    quality: int = 85,
) -> contract.UncertainCrop:
    """The `UncertainCrop` for one routed detection: a padded JPEG crop (BGR frame) and its evidence."""
    import cv2

    h, w = frame.shape[:2]
    i = routed.index
    x1, y1, x2, y2 = (float(v) for v in det.xyxy[i])
    x1, y1 = min(max(0.0, x1), w - 1.0), min(max(0.0, y1), h - 1.0)
    x2, y2 = min(max(x1 + 1.0, x2), float(w)), min(max(y1 + 1.0, y2), float(h))
    px, py = (x2 - x1) * pad, (y2 - y1) * pad
    cx1, cy1 = int(max(0, x1 - px)), int(max(0, y1 - py))
    cx2, cy2 = int(min(w, np.ceil(x2 + px))), int(min(h, np.ceil(y2 + py)))
    patch = frame[cy1:cy2, cx1:cx2]
    scale = max_side / max(patch.shape[:2])
    if scale < 1.0:
        patch = cv2.resize(patch, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    candidates: list[contract.SkuCandidate] = []
    for sku, score in sorted(det.candidates[i], key=lambda c: -c[1])[:20]:
        if sku not in {c.sku_id for c in candidates}:
            candidates.append(contract.SkuCandidate(sku_id=str(sku), score=float(np.clip(score, 0.0, 1.0))))
    margin, novelty = float(det.margin[i]), float(det.novelty[i])
    track = int(det.tracker_id[i])
    return contract.UncertainCrop(
        crop_id=contract.new_crop_id(),
        store_id=store_id,
        device_id=device_id,
        camera_id=camera_id,
        captured_at=captured_at or contract.utc_now(),  # type: ignore[arg-type]
        source=source,
        model_version=model_version,
        gallery_version=gallery_version,
        detector_confidence=float(np.clip(det.confidence[i], 0.0, 1.0)),
        box=contract.BoundingBox(x1=x1, y1=y1, x2=x2, y2=y2),
        frame_width=int(w),
        frame_height=int(h),
        candidates=candidates,
        reasons=list(routed.reasons),
        priority=routed.priority,
        margin=float(np.clip(margin, 0.0, 1.0)) if np.isfinite(margin) else None,
        novelty=max(0.0, novelty) if np.isfinite(novelty) else None,
        bay_id=bay_id,
        track_id=track if track >= 0 else None,
        jpeg=_encode_jpeg(patch, quality),
    )
