"""One typed container for what the models found in a frame, passed along the whole pipeline.

Like Roboflow supervision's `Detections`: parallel arrays, indexable by masks, so filtering and NMS never
lose track of which score belongs to which box.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np


@dataclass(frozen=True, eq=False)
class Detections:
    xyxy: np.ndarray  # (N, 4) float32, pixels of the source frame
    confidence: np.ndarray  # (N,) detector confidence
    # Recognition, filled by the recognizer: None / NaN where not (yet) recognised.
    sku_id: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) object: str | None
    sku_probability: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) calibrated top-1
    margin: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) top-1 minus top-2
    novelty: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) distance to nearest reference
    candidates: tuple[tuple[tuple[str, float], ...], ...] = ()  # per box: top-k (sku_id, probability)
    embedding: np.ndarray | None = None  # (N, D) L2-normalised
    tracker_id: np.ndarray = field(default=None)  # type: ignore[assignment]  # (N,) int, -1 = untracked

    def __post_init__(self) -> None:
        n = len(self.xyxy)
        defaults = {
            "sku_id": np.full(n, None, dtype=object),
            "sku_probability": np.full(n, np.nan, dtype=np.float32),
            "margin": np.full(n, np.nan, dtype=np.float32),
            "novelty": np.full(n, np.nan, dtype=np.float32),
            "tracker_id": np.full(n, -1, dtype=np.int64),
        }
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if not self.candidates:
            object.__setattr__(self, "candidates", tuple(() for _ in range(n)))
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and len(v) != n:
                raise ValueError(f"Detections.{f.name} has {len(v)} entries for {n} boxes")

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index) -> Detections:
        """Select by boolean mask, index array or slice; every field stays aligned."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        return replace(
            self,
            xyxy=self.xyxy[idx],
            confidence=self.confidence[idx],
            sku_id=self.sku_id[idx],
            sku_probability=self.sku_probability[idx],
            margin=self.margin[idx],
            novelty=self.novelty[idx],
            candidates=tuple(self.candidates[i] for i in idx),
            embedding=None if self.embedding is None else self.embedding[idx],
            tracker_id=self.tracker_id[idx],
        )

    @property
    def area(self) -> np.ndarray:
        return (self.xyxy[:, 2] - self.xyxy[:, 0]) * (self.xyxy[:, 3] - self.xyxy[:, 1])
