"""The class-agnostic product detector: letterbox, one forward pass, decode and NMS, all in numpy/OpenCV.

Matches Ultralytics' own pre- and post-processing for YOLO detection heads (output `[1, 4 + classes,
anchors]`, boxes as centre/size in input pixels), so the edge needs neither torch nor ultralytics.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from models.backends.base import InferenceBackend
from models.detections import Detections
from models.errors import BadImage, ModelError

PAD_VALUE = 114


MIN_BOX_PX = 2
"""Narrower or lower boxes, after clipping to the frame, are dropped: the recognizer cannot crop them."""


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes to a BGR image; a clear error for empty or corrupt data."""
    if not data:
        raise BadImage("empty image data")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadImage(f"image data ({len(data)} bytes) does not decode")
    return img


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Accept what cameras give (BGR, BGRA, grayscale uint8) and refuse anything else by name."""
    if not isinstance(image, np.ndarray):
        raise BadImage(f"expected a numpy image, got {type(image).__name__}")
    if image.size == 0 or image.ndim not in (2, 3) or min(image.shape[:2]) < 2:
        raise BadImage(f"unusable image of shape {image.shape}")
    if image.dtype != np.uint8:
        raise BadImage(f"expected uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.shape[2] != 3:
        raise BadImage(f"expected 1, 3 or 4 channels, got {image.shape[2]}")
    return image


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the network input: enough to map boxes back."""

    scale: float
    pad_x: float
    pad_y: float


def letterbox(
    image: np.ndarray, size: tuple[int, int], stride: int | None = None
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio to fit `size` (h, w) and pad, centred, as Ultralytics' LetterBox
    does: to `size` itself, or with `stride` only up to the next multiple of it (a model with dynamic
    input then skips the padding's compute: a 4:3 frame needs three quarters of the square)."""
    h, w = image.shape[:2]
    th, tw = size
    r = min(th / h, tw / w)
    new_w, new_h = round(w * r), round(h * r)
    dw, dh = tw - new_w, th - new_h
    if stride:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w, h) != (new_w, new_h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    out = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return out, Letterbox(r, left, top)


def detector_input(
    image: np.ndarray, size: tuple[int, int], stride: int | None = None
) -> tuple[np.ndarray, Letterbox]:
    """The detector's input tensor for a frame: letterboxed to `size` (h, w), or within it to a multiple
    of `stride`, RGB, NCHW, 0..1 float32. The int8 calibration (`retrain.quantize`) feeds exactly this."""
    boxed, lb = letterbox(as_bgr(image), size, stride)
    # BGR -> RGB, HWC -> NCHW and 0..1 in one pass (half the time of the numpy chain, same values).
    return cv2.dnn.blobFromImage(boxed, 1 / 255.0, swapRB=True), lb


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best first.

    OpenCV's C++ loop: a shelf photo has hundreds of candidates, and a Python loop over them cost more
    than a millisecond a frame. Ties keep the lower index, as a stable sort would."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    xywh = np.asarray(boxes, np.float64).copy()
    xywh[:, 2:] -= xywh[:, :2]
    ranks = np.asarray(scores, np.float64)
    ranks = ranks - ranks.min() + 1.0  # OpenCV drops scores at or under its threshold, which must be >= 0
    keep = cv2.dnn.NMSBoxes(xywh, ranks, 0.0, float(iou_threshold))
    return np.asarray(keep, np.int64).reshape(-1)


STRIDE = 32
"""The YOLO heads' largest stride: a dynamic-input detector takes any multiple of it."""


class ProductDetector:
    """Finds every product facing in a frame, whatever its SKU.

    A model exported with a static input gets every frame padded to that square; one with dynamic height
    and width gets frames fitted into `max_size` (the size it was trained at) and padded only to a
    multiple of the stride, as Ultralytics feeds its own PyTorch models.
    """

    def __init__(
        self,
        backend: InferenceBackend,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        max_detections: int = 300,
        max_size: tuple[int, int] | None = None,
    ) -> None:
        self.backend = backend
        shape = backend.inputs[0].shape
        if len(shape) != 4:
            raise ModelError(f"detector input must be NCHW, got {shape}")
        static = all(isinstance(d, int) and d > 0 for d in shape[2:])
        if static:
            self.input_size = (int(shape[2]), int(shape[3]))
        elif max_size is None:
            raise ModelError(f"detector input {shape} has a dynamic size: give the size it was trained at")
        elif any(d % STRIDE for d in max_size):
            raise ModelError(f"detector input size {max_size} is not a multiple of the stride {STRIDE}")
        else:
            self.input_size = (int(max_size[0]), int(max_size[1]))
        self.stride = None if static else STRIDE
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self.max_detections = max_detections

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, Letterbox]:
        return detector_input(image, self.input_size, self.stride)

    def postprocess(self, output: np.ndarray, lb: Letterbox, image_shape: tuple[int, ...]) -> Detections:
        if output.ndim != 3 or output.shape[1] < 5:
            raise ModelError(f"unexpected detector output shape {output.shape}")
        pred = output[0].T  # (anchors, 4 + classes)
        scores = pred[:, 4:].max(axis=1)
        keep = scores > self.conf_threshold
        pred, scores = pred[keep], scores[keep]
        if not len(pred):
            return Detections.empty()
        cx, cy, w, h = pred[:, 0], pred[:, 1], pred[:, 2], pred[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        kept = nms(boxes, scores, self.iou_threshold)[: self.max_detections]
        boxes, scores = boxes[kept], scores[kept]
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - lb.pad_x) / lb.scale
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - lb.pad_y) / lb.scale
        hgt, wid = image_shape[:2]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, wid)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, hgt)
        # A box (nearly) wholly in the letterbox padding clips to a sliver: no crop, no facing.
        seen = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_PX) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_PX)
        boxes, scores = boxes[seen], scores[seen]
        return Detections(boxes.astype(np.float32), scores.astype(np.float32))

    def __call__(self, image: np.ndarray) -> Detections:
        image = as_bgr(image)
        blob, lb = self.preprocess(image)
        (output,) = self.backend.infer(blob)[:1]
        return self.postprocess(output, lb, image.shape)
