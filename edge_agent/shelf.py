"""Shelf pipeline glue: what the models found, handed to the planogram compliance engine."""

from __future__ import annotations

import numpy as np

from models.detections import Detections
from planograms.compliance import ShelfObservation


def observation_from_detections(detections: Detections, image_shape: tuple[int, ...]) -> ShelfObservation:
    """The compliance engine's view of a frame: boxes, SKU decisions (None = unknown), their probabilities
    and the recognizer's top-k candidates for soft matching."""
    h, w = image_shape[:2]
    prob = np.nan_to_num(detections.sku_probability.astype(np.float64), nan=0.0)
    return ShelfObservation(
        xyxy=detections.xyxy.astype(np.float64),
        confidence=detections.confidence.astype(np.float64),
        sku_id=list(detections.sku_id),
        sku_prob=prob,
        image_size=(int(w), int(h)),
        candidates=[list(c) for c in detections.candidates],
    )
