"""Load verified bundles into ready-to-run models.

Nothing is used before `models.bundle.verify_bundle` has checked its signature and every file hash.
The baseline shipped with ShelfLoop lives in `models/baseline/` and is signed with the development key
whose public half is `models/baseline/keys/`; production deployments add their own trusted keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.backends import check_precision, create_backend
from models.bundle import VerifiedBundle, load_public_keys, verify_bundle
from models.detector import ProductDetector
from models.errors import BundleError, GalleryMismatch
from models.gallery import Gallery
from models.recognizer import SkuEmbedder, SkuRecognizer, model_fingerprint

BASELINE_DIR = Path(__file__).with_name("baseline")
BASELINE_MODEL = BASELINE_DIR / "model"
BASELINE_GALLERY = BASELINE_DIR / "gallery"


def default_trusted_keys(extra: list[Path] | None = None) -> dict[str, bytes]:
    return load_public_keys(sorted((BASELINE_DIR / "keys").glob("*.pub")) + list(extra or []))


@dataclass
class ModelBundle:
    bundle: VerifiedBundle
    detector: ProductDetector
    embedder: SkuEmbedder

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def calibration(self) -> dict:
        return self.bundle.manifest["recognizer"].get("calibration", {})

    def recognizer(self, gallery: Gallery, top_k: int = 5) -> SkuRecognizer:
        return SkuRecognizer(self.embedder, gallery, top_k)


def load_model_bundle(
    path: Path = BASELINE_MODEL,
    trusted_keys: dict[str, bytes] | None = None,
    backend: str = "onnxruntime",
    precision: str | None = None,
    **backend_options,
) -> ModelBundle:
    """Verify and load a model bundle (detector + recognizer) on the configured backend.

    `precision` (default: the backend's own, see `PRECISIONS`) is what the detector computes in. The
    recognizer never takes it: it computes as its bundle was made (fp32, or int8 from a `qdq-int8` bundle,
    with ranges calibrated on product crops), the graph its gallery was embedded with, because look-alike
    SKUs sit closer together than a bf16 or fp16 rounding moves an embedding."""
    precision = check_precision(backend, precision)
    verified = verify_bundle(Path(path), trusted_keys or default_trusted_keys(), kind="model")
    m = verified.manifest
    try:
        det_spec, rec_spec = m["detector"], m["recognizer"]
    except KeyError as exc:
        raise BundleError(f"model bundle {path} lacks the {exc.args[0]!r} section") from exc
    # The largest (training) input, NCHW: what a dynamic-input detector's frames are fitted into.
    det_input = tuple(int(d) for d in det_spec["input"]) if "input" in det_spec else None
    det_options = dict(backend_options)
    if backend != "onnxruntime":
        det_options["precision"] = precision
    if backend == "tensorrt" and det_input is not None:
        det_options["input_shape"] = det_input
    det_backend = create_backend(backend, verified.file(det_spec["file"]), **det_options)
    detector = ProductDetector(
        det_backend,
        det_spec.get("conf_threshold", 0.25),
        det_spec.get("iou_threshold", 0.7),
        max_size=None if det_input is None else (det_input[2], det_input[3]),
    )
    rec_file = verified.file(rec_spec["file"])
    # TensorRT engines are built per input shape; the recognizer keeps ONNX Runtime unless told otherwise.
    rec_backend = create_backend(
        "onnxruntime" if backend == "tensorrt" else backend,
        rec_file,
        **({} if backend == "tensorrt" else backend_options),
    )
    embedder = SkuEmbedder(rec_backend)
    if rec_spec.get("fingerprint") and rec_spec["fingerprint"] != model_fingerprint(rec_file):
        raise BundleError(f"{path}: recognizer fingerprint in the manifest does not match its file")
    return ModelBundle(verified, detector, embedder)


def load_gallery(
    path: Path = BASELINE_GALLERY,
    trusted_keys: dict[str, bytes] | None = None,
    embedder: SkuEmbedder | None = None,
) -> Gallery:
    """Verify and load a gallery; with `embedder`, refuse one built for another embedding model."""
    verified = verify_bundle(Path(path), trusted_keys or default_trusted_keys(), kind="gallery")
    gallery = Gallery.from_directory(verified.path, verified.manifest)
    if embedder is not None and gallery.embedding_model != embedder.fingerprint:
        raise GalleryMismatch(
            f"gallery {gallery.version} was built for embedding model {gallery.embedding_model}, "
            f"not for the loaded {embedder.fingerprint}"
        )
    return gallery
