"""The SKU recognizer: an embedding network whose nearest references in a gallery name the SKU.

A new SKU needs reference images, not new weights. The exported ONNX takes RGB pixels in 0..255 and does
its own normalisation and L2 normalisation, so training and the edge cannot disagree about them.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from models.backends.base import InferenceBackend
from models.detections import Detections
from models.detector import as_bgr
from models.errors import BadImage, ModelError
from models.gallery import Gallery

CROP_PAD_VALUE = 128


def _square(crop_bgr: np.ndarray, size: int) -> np.ndarray:
    """A crop resized with its aspect kept and padded to a `size` square (BGR uint8)."""
    crop = as_bgr(crop_bgr)
    h, w = crop.shape[:2]
    r = size / max(h, w)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    resized = cv2.resize(crop, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    pad = (CROP_PAD_VALUE,) * 3
    return cv2.copyMakeBorder(resized, y0, size - nh - y0, x0, size - nw - x0, cv2.BORDER_CONSTANT, value=pad)


def prepare_crop(crop_bgr: np.ndarray, size: int) -> np.ndarray:
    """A product crop as the network sees it: aspect kept, padded to a square, RGB float32 in 0..255 (HWC)."""
    return _square(crop_bgr, size)[:, :, ::-1].astype(np.float32)


def crop_batch(crops: list[np.ndarray], size: int) -> np.ndarray:
    """Crops as the network's NCHW float32 input, `prepare_crop` of each: OpenCV swaps the channels,
    converts and transposes in one pass, 2-3x faster than stacking per-crop float arrays (a shelf photo
    holds dozens of products, and at 288 px this was a tenth of the frame)."""
    if not crops:
        raise ValueError("no crops to batch")
    squares = [_square(c, size) for c in crops]
    return cv2.dnn.blobFromImages(squares, 1.0, (size, size), (0, 0, 0), swapRB=True, crop=False)


def crop_boxes(image_bgr: np.ndarray, xyxy: np.ndarray, pad: float = 0.04) -> list[np.ndarray]:
    """Cut detections out of a frame with a little context, clipped to the frame."""
    h, w = image_bgr.shape[:2]
    crops = []
    for x1, y1, x2, y2 in np.asarray(xyxy, np.float32):
        px, py = (x2 - x1) * pad, (y2 - y1) * pad
        a, b = int(max(0, x1 - px)), int(max(0, y1 - py))
        c, d = int(min(w, x2 + px)), int(min(h, y2 + py))
        if c - a < 2 or d - b < 2:
            raise BadImage(
                f"box {[round(float(v), 1) for v in (x1, y1, x2, y2)]} is empty inside a {w}x{h} frame"
            )
        crops.append(image_bgr[b:d, a:c])
    return crops


class SkuEmbedder:
    """Runs the embedding network on batches of crops."""

    def __init__(self, backend: InferenceBackend, batch_size: int = 16) -> None:
        self.backend = backend
        spec = backend.inputs[0]
        if len(spec.shape) != 4 or not isinstance(spec.shape[2], int):
            raise ModelError(f"recognizer input must be NCHW with a static size, got {spec.shape}")
        self.input_size = int(spec.shape[2])
        batch_dim = spec.shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) else None
        self.batch_size = self.fixed_batch or batch_size
        self.fingerprint = model_fingerprint(backend.model_path)

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        out = []
        for i in range(0, len(crops), self.batch_size):
            blob = crop_batch(crops[i : i + self.batch_size], self.input_size)
            n = len(blob)
            if self.fixed_batch and n < self.fixed_batch:
                blob = np.concatenate([blob, np.repeat(blob[-1:], self.fixed_batch - n, axis=0)])
            emb = self.backend.infer(blob)[0][:n]
            out.append(emb.astype(np.float32))
        emb = np.concatenate(out)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if not np.all(np.isfinite(emb)) or np.any(norms < 1e-6):
            raise ModelError("the recognizer produced non-finite or zero embeddings")
        return emb / norms

    @property
    def dim(self) -> int:
        shape = self.backend.outputs[0].shape
        return int(shape[-1]) if isinstance(shape[-1], int) else 0


def model_fingerprint(path: Path) -> str:
    """Identifies the embedding space: a gallery is only valid for the network that embedded it."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32]


class SkuRecognizer:
    """Embeds detections and looks them up in the gallery: top-k SKUs, calibrated, with a novelty score."""

    def __init__(self, embedder: SkuEmbedder, gallery: Gallery, top_k: int = 5) -> None:
        if not isinstance(gallery, Gallery):
            raise TypeError("gallery must be a models.gallery.Gallery")
        gallery.check_compatible(embedder.fingerprint)
        self.embedder, self.gallery, self.top_k = embedder, gallery, top_k

    def recognise_crops(self, crops: list[np.ndarray]):
        return self.gallery.classify(self.embedder.embed(crops), self.top_k)

    def __call__(self, image_bgr: np.ndarray, detections: Detections) -> Detections:
        if not len(detections):
            return detections
        result = self.recognise_crops(crop_boxes(as_bgr(image_bgr), detections.xyxy))
        return replace(
            detections,
            sku_id=result.sku_id,
            sku_probability=result.probability,
            margin=result.margin,
            novelty=result.novelty,
            candidates=result.candidates,
            embedding=result.embedding,
        )
