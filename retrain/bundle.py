"""Assemble, calibrate and sign model bundles and galleries from training outputs."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from models.backends import create_backend
from models.bundle import sign_bundle, trusted_key_of, verify_bundle
from models.errors import BundleError
from models.evaluate import build_gallery, embed_paths, image_folder
from models.gallery import Gallery, fit_temperature
from models.recognizer import SkuEmbedder, model_fingerprint
from retrain.compact import STORAGES, compact_weights
from retrain.quantize import STORAGE as QDQ_INT8
from retrain.quantize import quantize_detector, quantize_recognizer

MODEL_STORAGES = (*STORAGES, "float32", QDQ_INT8)
"""How `retrain bundle` may store either network's weights."""
CALIBRATION_PHOTOS = 40
"""Shelf photos (and half as many checkout photos) of the calibration world that set the int8 detector's
activation ranges."""
CALIBRATION_CROPS = 96
"""Product crops of the calibration world (spread over its SKUs) that set the int8 recognizer's."""


def calibrate(
    embedder: SkuEmbedder,
    references: list[tuple[Path, str]],
    known: list[tuple[Path, str]],
    unknown: list[tuple[Path, str]],
    target_known_acceptance: float = 0.95,
) -> dict:
    """Temperature by NLL on held-out known queries; unknown threshold on novelty.

    With unknown examples the threshold maximises balanced accuracy (known accepted + unknown rejected);
    without, it accepts `target_known_acceptance` of the known queries.
    """
    gallery = build_gallery(embedder, references)
    emb = embed_paths(embedder, [p for p, _ in known])
    ranked, nearest = gallery.sku_scores(emb, 10)
    temperature = fit_temperature(ranked, [lbl for _, lbl in known])
    known_nov = 1 - nearest
    if unknown:
        _, unk_near = gallery.sku_scores(embed_paths(embedder, [p for p, _ in unknown]), 1)
        unk_nov = 1 - unk_near
        candidates = np.unique(np.concatenate([known_nov, unk_nov]))
        scores = [((known_nov <= t).mean() + (unk_nov > t).mean()) / 2 for t in candidates]
        threshold = float(candidates[int(np.argmax(scores))])
        stats = {
            "known_acceptance": float((known_nov <= threshold).mean()),
            "unknown_rejection": float((unk_nov > threshold).mean()),
        }
    else:
        threshold = float(np.quantile(known_nov, target_known_acceptance))
        stats = {"known_acceptance": float((known_nov <= threshold).mean())}
    return {
        "temperature": temperature,
        "unknown_threshold": threshold,
        "fitted_on": {
            "references": len(references),
            "known_queries": len(known),
            "unknown_queries": len(unknown),
            **stats,
        },
    }


def assemble_model_bundle(
    detector_dir: Path,
    recognizer_dir: Path,
    out: Path,
    version: str,
    signing_key: Path,
    calibration_world: Path | None = None,
    metrics: dict | None = None,
    made_by: list[str] | None = None,
    detector_storage: str = "int8",
    recognizer_storage: str = "float16",
) -> dict:
    """Put the two ONNX files into `out` with compact weight storage (`retrain.compact`; "float32" copies
    them as they are; "qdq-int8" quantizes a model to compute in int8, `retrain.quantize`), calibrate
    the recognizer, write and sign the manifest."""
    for kind, storage in (("detector", detector_storage), ("recognizer", recognizer_storage)):
        if storage == QDQ_INT8 and calibration_world is None:  # before `out` is replaced
            raise ValueError(f"int8 {kind} compute needs a calibration world (its images calibrate it)")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    det_src = Path(detector_dir) / "detector.onnx"
    det_report = json.loads((Path(detector_dir) / "train_report.json").read_text())
    if detector_storage == QDQ_INT8:
        world = Path(calibration_world)
        photos = sorted((world / "shelf" / "images").rglob("*.jpg"))[:CALIBRATION_PHOTOS]
        photos += sorted((world / "checkout" / "images").rglob("*.jpg"))[: CALIBRATION_PHOTOS // 2]
        trained_at = (int(det_report["input"][2]), int(det_report["input"][3]))
        det_weights = quantize_detector(det_src, out / "detector.onnx", photos, trained_at)
    else:
        det_weights = _place(det_src, out / "detector.onnx", detector_storage)
    rec_src = Path(recognizer_dir) / "recognizer.onnx"
    if recognizer_storage == QDQ_INT8:
        crops = sorted((Path(calibration_world) / "crops" / "train").rglob("*.jpg"))
        crops = crops[:: max(1, len(crops) // CALIBRATION_CROPS)][:CALIBRATION_CROPS]
        rec_weights = quantize_recognizer(rec_src, out / "recognizer.onnx", crops)
    else:
        rec_weights = _place(rec_src, out / "recognizer.onnx", recognizer_storage)
    weights = {"detector": det_weights, "recognizer": rec_weights}
    rec_report = json.loads((Path(recognizer_dir) / "recognizer_report.json").read_text())
    embedder = SkuEmbedder(create_backend("onnxruntime", out / "recognizer.onnx"))
    calibration = {"temperature": 0.05, "unknown_threshold": 1.0, "fitted_on": None}
    if calibration_world is not None:
        w = Path(calibration_world)
        novel = image_folder(w / "novel" / "val") if (w / "novel" / "val").is_dir() else []
        calibration = calibrate(
            embedder, image_folder(w / "crops" / "train"), image_folder(w / "crops" / "val"), novel
        )
    manifest = {
        "name": "shelfloop-baseline",
        "kind": "model",
        "version": version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "weights": weights,
        "detector": {
            "file": "detector.onnx",
            "input": det_report["input"],
            "classes": ["product"],
            "conf_threshold": 0.25,
            "iou_threshold": 0.7,
            "layout": "yolo: [1, 4 + classes, anchors]",
            "training": det_report,
        },
        "recognizer": {
            "file": "recognizer.onnx",
            "input": rec_report["input"],
            "pixels": "RGB 0..255",
            "embedding_dim": rec_report["recipe"]["embed_dim"],
            "fingerprint": model_fingerprint(out / "recognizer.onnx"),
            "calibration": calibration,
            "training": {k: v for k, v in rec_report.items() if k != "history"},
        },
        "metrics": metrics or {},
        "made_by": made_by or [],
    }
    return sign_bundle(out, manifest, signing_key)


SIGNATURE_FIELDS = ("format_version", "files", "key_id")
"""What `sign_bundle` adds to a manifest: written again by every signature."""


def metric_figures(report: dict) -> dict:
    """The scalar figures of an `eval` or `bench` JSON; per-class tables and error lists stay in the file."""
    return {k: v for k, v in report.items() if v is None or isinstance(v, int | float | str | bool)}


def attach_metrics(bundle_dir: Path, metrics: dict[str, dict], signing_key: Path) -> dict:
    """Record evaluation figures in a signed bundle's manifest (`metrics`) and sign it again.

    The figures are measured on the assembled bundle, so they can only come after it. The bundle is
    verified with the same key first: a tampered or foreign one is refused, never signed anew."""
    if not Path(bundle_dir).is_dir():
        raise BundleError(f"{bundle_dir}: attach metrics to a bundle directory, then pack it")
    verified = verify_bundle(Path(bundle_dir), trusted_key_of(signing_key))
    manifest = {k: v for k, v in verified.manifest.items() if k not in SIGNATURE_FIELDS}
    manifest["metrics"] = {**manifest.get("metrics", {}), **metrics}
    return sign_bundle(verified.path, manifest, signing_key)


def _place(src: Path, dst: Path, storage: str) -> dict:
    if storage == "float32":
        shutil.copyfile(src, dst)
        return {"storage": "float32"}
    return compact_weights(src, dst, storage)


def build_gallery_bundle(
    model_dir: Path,
    references: list[Path],
    out: Path,
    version: str,
    signing_key: Path,
    temperature: float | None = None,
    unknown_threshold: float | None = None,
    scoring: str = "nearest",
) -> dict:
    """Embed reference ImageFolders (`<sku_id>/*.jpg`; packshot files named `<variant_id>.jpg` keep their
    variant) with the bundle's recognizer and sign the gallery for it."""
    model_manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    rec = model_manifest["recognizer"]
    embedder = SkuEmbedder(create_backend("onnxruntime", Path(model_dir) / rec["file"]))
    items = [it for r in references for it in image_folder(r)]
    cal = rec.get("calibration") or {}
    gallery = build_gallery(
        embedder,
        items,
        version,
        temperature or cal.get("temperature", 0.05),
        unknown_threshold or cal.get("unknown_threshold", 1.0),
        variant_of=lambda p, lbl: p.stem if p.stem.startswith(lbl) and not p.stem.endswith(".back") else lbl,
        scoring=scoring,
    )
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    manifest = gallery.save(
        out,
        {
            "name": "shelfloop-gallery",
            "model_version": model_manifest["version"],
            "built_from": [str(r) for r in references],
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return sign_bundle(out, manifest, signing_key)


__all__ = [
    "Gallery",
    "assemble_model_bundle",
    "attach_metrics",
    "build_gallery_bundle",
    "calibrate",
    "metric_figures",
]
