"""Evaluation through the edge runtime path (ONNX files, our own pre/post-processing), never the training
graph: what is measured is what the devices run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from models.detector import ProductDetector
from models.errors import BadImage
from models.gallery import Gallery, expected_calibration_error
from models.recognizer import SkuEmbedder

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def image_folder(root: Path) -> list[tuple[Path, str]]:
    """`root/<label>/*.jpg` as (path, label) pairs."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root}")
    return [
        (p, d.name)
        for d in sorted(root.iterdir())
        if d.is_dir()
        for p in sorted(d.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


def embed_paths(embedder: SkuEmbedder, paths: list[Path], batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(paths), batch):
        imgs = []
        for p in paths[i : i + batch]:
            img = cv2.imread(str(p))
            if img is None:
                raise BadImage(f"{p} does not decode")
            imgs.append(img)
        out.append(embedder.embed(imgs))
    return np.concatenate(out) if out else np.zeros((0, embedder.dim), np.float32)


def build_gallery(
    embedder: SkuEmbedder,
    items: list[tuple[Path, str]],
    version: str = "eval",
    temperature: float = 0.05,
    unknown_threshold: float = 1.0,
    variant_of: Callable[[Path, str], str] | None = None,
    scoring: str = "nearest",
) -> Gallery:
    emb = embed_paths(embedder, [p for p, _ in items])
    labels = [lbl for _, lbl in items]
    variants = [variant_of(p, lbl) if variant_of else lbl for p, lbl in items]
    return Gallery(
        emb, labels, variants, embedder.fingerprint, version, temperature, unknown_threshold, scoring
    )


def evaluate_recognition(
    embedder: SkuEmbedder,
    gallery: Gallery,
    queries: list[tuple[Path, str]],
    k: int = 5,
    query_embeddings: np.ndarray | None = None,
) -> dict:
    """Top-1/top-5 and per-class accuracy on queries whose SKU is in the gallery; ECE of the calibrated
    top-1 probability; unknown-rejection rate on queries whose SKU is not. `query_embeddings` (of the
    queries, in order) spares embedding them again when one query set meets several galleries."""
    if not queries:
        raise ValueError("no query images")
    emb = embed_paths(embedder, [p for p, _ in queries]) if query_embeddings is None else query_embeddings
    truth = [lbl for _, lbl in queries]
    result = gallery.classify(emb, k)
    known_skus = set(gallery.sku_ids)
    known = np.array([t in known_skus for t in truth])
    top1 = np.array([c[0][0] == t if c else False for c, t in zip(result.candidates, truth, strict=True)])
    top5 = np.array([t in [n for n, _ in c[:5]] for c, t in zip(result.candidates, truth, strict=True)])
    accepted = np.array([s is not None for s in result.sku_id])
    per_class: dict[str, dict] = {}
    for t, ok in zip(truth, top1, strict=True):
        if t in known_skus:
            d = per_class.setdefault(t, {"n": 0, "correct": 0})
            d["n"] += 1
            d["correct"] += int(ok)
    for d in per_class.values():
        d["accuracy"] = d["correct"] / d["n"]
    n_known = int(known.sum())
    return {
        "queries": len(queries),
        "known_queries": n_known,
        "unknown_queries": int((~known).sum()),
        "gallery_references": len(gallery.sku_ids),
        "gallery_skus": len(gallery.skus),
        "top1": float(top1[known].mean()) if n_known else None,
        "top5": float(top5[known].mean()) if n_known else None,
        "open_set_top1": float((top1 & accepted)[known].mean()) if n_known else None,
        "known_acceptance_rate": float(accepted[known].mean()) if n_known else None,
        "ece": expected_calibration_error(result.probability[known], top1[known]) if n_known else None,
        "unknown_rejection_rate": float((~accepted[~known]).mean()) if (~known).any() else None,
        "scoring": gallery.scoring,
        "temperature": gallery.temperature,
        "unknown_threshold": gallery.unknown_threshold,
        "per_class": dict(sorted(per_class.items())),
    }


# ---------------------------------------------------------------------------------------------------------
# Detection: COCO-style AP at IoU 0.50 and 0.50:0.95 over a YOLO-format data set


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix1 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy1 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix2 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter + 1e-9)


def average_precision(tp: np.ndarray, conf: np.ndarray, n_gt: int) -> float:
    """101-point interpolated AP (COCO) from per-detection true-positive flags."""
    if n_gt == 0:
        return float("nan")
    order = np.argsort(-conf, kind="stable")
    tp = tp[order].astype(np.float64)
    fp = 1 - tp
    tpc, fpc = np.cumsum(tp), np.cumsum(fp)
    recall = tpc / n_gt
    precision = tpc / np.maximum(tpc + fpc, 1e-9)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    points = np.linspace(0, 1, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


def read_yolo_labels(label_path: Path, width: int, height: int) -> np.ndarray:
    if not label_path.exists():
        return np.zeros((0, 4), np.float32)
    rows = [list(map(float, ln.split()[1:5])) for ln in label_path.read_text().splitlines() if ln.strip()]
    if not rows:
        return np.zeros((0, 4), np.float32)
    a = np.asarray(rows, np.float32)
    cx, cy, w, h = a[:, 0] * width, a[:, 1] * height, a[:, 2] * width, a[:, 3] * height
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def evaluate_detection(detector: ProductDetector, images: list[Path]) -> dict:
    """mAP50 and mAP50-95 of the detector on images with YOLO labels beside them (images/ -> labels/)."""
    thresholds = np.linspace(0.5, 0.95, 10)
    tps: list[np.ndarray] = []
    confs: list[np.ndarray] = []
    n_gt = 0
    for path in images:
        img = cv2.imread(str(path))
        if img is None:
            raise BadImage(f"{path} does not decode")
        parts = list(path.parts)
        i = len(parts) - 1 - parts[::-1].index("images")
        parts[i] = "labels"
        gt = read_yolo_labels(Path(*parts).with_suffix(".txt"), img.shape[1], img.shape[0])
        det = detector(img)
        n_gt += len(gt)
        tp = np.zeros((len(det), len(thresholds)), bool)
        if len(det) and len(gt):
            ious = _iou(det.xyxy, gt)
            order = np.argsort(-det.confidence, kind="stable")
            for t_i, t in enumerate(thresholds):
                taken = np.zeros(len(gt), bool)
                for d in order:
                    cand = np.where(~taken & (ious[d] >= t))[0]
                    if len(cand):
                        g = cand[np.argmax(ious[d, cand])]
                        taken[g] = True
                        tp[d, t_i] = True
        tps.append(tp)
        confs.append(det.confidence)
    tp_all = np.concatenate(tps) if tps else np.zeros((0, 10), bool)
    conf_all = np.concatenate(confs) if confs else np.zeros(0)
    aps = [average_precision(tp_all[:, i], conf_all, n_gt) for i in range(len(thresholds))]
    return {
        "images": len(images),
        "ground_truth_boxes": n_gt,
        "detections": len(conf_all),
        "map50": aps[0],
        "map50_95": float(np.mean(aps)),
    }
