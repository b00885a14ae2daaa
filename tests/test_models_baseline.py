"""The shipped baseline bundle: it verifies, its exports match the training framework on real images,
the edge's own decode matches Ultralytics on the same ONNX, and detect -> recognise works end to end."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import shipped_recognizer_in_int8

from models.backends import create_backend
from models.evaluate import build_gallery, evaluate_recognition, image_folder
from models.loader import BASELINE_GALLERY, BASELINE_MODEL, load_gallery, load_model_bundle
from models.recognizer import SkuEmbedder, crop_batch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "retrain" / "baseline"
GROCERY = ROOT.parent / "shared" / "datasets" / "grocery_store"

pytestmark = pytest.mark.skipif(not (BASELINE_MODEL / "manifest.json").is_file(), reason="no baseline bundle")


@pytest.fixture(scope="module")
def bundle():
    mb = load_model_bundle()
    mb.detector.conf_threshold = 0.2  # see _match: compare below the operating threshold
    return mb


def _iou(a, b):
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def _yolo(tmp_path):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    return pytest.importorskip("ultralytics", reason="the train extra is not installed")


def _frames(world: Path, n: int = 6) -> list[Path]:
    shelf = sorted((world / "shelf" / "images").rglob("*.jpg"))
    checkout = sorted((world / "checkout" / "images").rglob("*.jpg"))
    return shelf[: n // 2] + checkout[: n - n // 2]


def _match(ours, theirs_xyxy, theirs_conf, iou_min: float, conf_tol: float, must: float = 0.3) -> float:
    """Share of confident boxes (conf >= `must`, from both sides) with a partner of IoU >= iou_min and a
    confidence within conf_tol. Both sides run at a lower threshold (0.2) so that a box scoring 0.26 on one
    side and 0.24 on the other is a partner, not a mismatch made by the cut-off."""
    if len(ours) == 0 or len(theirs_xyxy) == 0:
        return float(len(ours) == len(theirs_xyxy))
    iou = _iou(ours.xyxy, theirs_xyxy)
    ok, total = 0, 0
    for i in np.flatnonzero(ours.confidence >= must):
        cand = iou[i] >= iou_min
        total += 1
        ok += bool(cand.any() and np.abs(theirs_conf[cand] - ours.confidence[i]).min() <= conf_tol)
    for j in np.flatnonzero(theirs_conf >= must):
        cand = iou[:, j] >= iou_min
        total += 1
        ok += bool(cand.any() and np.abs(ours.confidence[cand] - theirs_conf[j]).min() <= conf_tol)
    return ok / max(1, total)


def test_baseline_bundle_and_gallery_verify(bundle):
    assert bundle.bundle.manifest["kind"] == "model"
    assert bundle.detector.input_size[0] % 32 == 0
    gallery = load_gallery(BASELINE_GALLERY, embedder=bundle.embedder)
    assert len(gallery.skus) > 10


def test_edge_decode_matches_ultralytics_on_the_same_onnx(bundle, small_world, tmp_path):
    """Tolerance: 99 % of confident boxes have a partner with IoU >= 0.98 and confidence within 0.01."""
    ultra = _yolo(tmp_path)
    yolo = ultra.YOLO(str(BASELINE_MODEL / "detector.onnx"), task="detect")
    size = bundle.detector.input_size[0]
    scores = []
    for path in _frames(small_world):
        img = cv2.imread(str(path))
        ours = bundle.detector(img)
        r = yolo.predict(img, imgsz=size, conf=0.2, iou=0.7, device="cpu", verbose=False)[0]
        scores.append(_match(ours, r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), 0.98, 0.01))
        assert len(ours) > 0
    assert min(scores) >= 0.99, scores


def test_detector_onnx_matches_pytorch_weights(bundle, small_world, tmp_path):
    """The export against the training framework: Ultralytics on detector.pt vs the edge on detector.onnx,
    both fed the same square letterbox (`rect=False`; Ultralytics' default pads PyTorch inputs only to a
    multiple of 32, which changes border activations and so low scores). The bundle stores the detector's
    weights as int8 (`retrain.compact`), so the tolerance covers that rounding: in every frame 95 % of
    confident boxes have a partner with IoU >= 0.95 and confidence within 0.03."""
    ultra = _yolo(tmp_path)
    pt = WEIGHTS / "detector.pt"
    if not pt.is_file():
        pytest.skip("no PyTorch detector weights in retrain/baseline")
    yolo = ultra.YOLO(str(pt))
    size = bundle.detector.input_size[0]
    for path in _frames(small_world):
        img = cv2.imread(str(path))
        ours = bundle.detector(img)
        r = yolo.predict(img, imgsz=size, conf=0.2, iou=0.7, device="cpu", verbose=False, rect=False)[0]
        assert _match(ours, r.boxes.xyxy.numpy(), r.boxes.conf.numpy(), 0.95, 0.03) >= 0.95


@pytest.fixture(scope="module")
def torch_recognizer():
    """The shipped recognizer's weights in the training framework."""
    torch = pytest.importorskip("torch", reason="the train extra is not installed")
    from retrain.recognizer import build_model

    pt = WEIGHTS / "recognizer.pt"
    if not pt.is_file():
        pytest.skip("no PyTorch recognizer weights in retrain/baseline")
    ckpt = torch.load(pt, map_location="cpu", weights_only=False)
    net = build_model(ckpt["recipe"]["embed_dim"], ckpt["recipe"]["frozen_blocks"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval()


@pytest.fixture(scope="module")
def fp32_recognizer(bundle, request, tmp_path_factory) -> Path:
    """The shipped recognizer computed in fp32: the bundle's own file, or, where the bundle computes it in
    int8 (`retrain bundle --recognizer-storage qdq-int8`), an fp32 export of the same weights."""
    if not shipped_recognizer_in_int8():
        return BASELINE_MODEL / "recognizer.onnx"
    from retrain.recognizer import export_onnx

    net = request.getfixturevalue("torch_recognizer")
    return export_onnx(net, bundle.embedder.input_size, tmp_path_factory.mktemp("fp32") / "recognizer.onnx")


def test_recognizer_onnx_matches_pytorch_on_real_images(
    bundle, torch_recognizer, fp32_recognizer, small_world
):
    """Tolerance: cosine >= 0.9999 between the fp32 ONNX graph's and PyTorch's embeddings of real crops. A
    bundle that computes in int8 is held to the int8 tolerance (mean cosine >= 0.95 to that fp32 graph,
    as in `test_recognizer_quantized_to_int8_names_the_same_skus`); one that stores fp16 weights and
    computes in fp32 is the fp32 graph itself."""
    import torch

    paths = sorted((small_world / "crops" / "test").rglob("*.jpg"))[:16]
    if GROCERY.is_dir():
        paths += sorted((GROCERY / "dataset" / "val").rglob("*.jpg"))[:8]
    crops = [cv2.imread(str(p)) for p in paths]
    fp32 = SkuEmbedder(create_backend("onnxruntime", fp32_recognizer)).embed(crops)
    size = bundle.embedder.input_size
    x = crop_batch(crops, size)
    with torch.no_grad():
        ref = torch_recognizer(torch.from_numpy(x)).numpy()
    cos = (fp32 * ref).sum(1)
    assert cos.min() >= 0.9999, cos.min()
    shipped = (bundle.embedder.embed(crops) * fp32).sum(1)
    assert shipped.mean() >= 0.95, shipped.mean()


def test_detect_then_recognise_on_a_synthetic_shelf(bundle, small_world):
    """The recognizer, with a gallery of the world's own crops, names most SKUs of held-out crops."""
    gallery = build_gallery(
        bundle.embedder,
        image_folder(small_world / "crops" / "train"),
        "test",
        **{k: v for k, v in bundle.calibration.items() if k != "fitted_on"},
    )
    r = evaluate_recognition(bundle.embedder, gallery, image_folder(small_world / "crops" / "test"))
    assert r["top1"] >= 0.8, r["top1"]
    shelf = sorted((small_world / "shelf" / "images" / "test").glob("*.jpg"))[0]
    img = cv2.imread(str(shelf))
    dets = bundle.recognizer(gallery)(img, bundle.detector(img))
    assert len(dets) > 5
    assert np.isfinite(dets.novelty).all() and (dets.sku_probability > 0).all()
    assert sum(s is not None for s in dets.sku_id) >= len(dets) // 2


def test_detector_quantized_to_int8_finds_the_same_boxes(bundle, small_world, tmp_path):
    """`retrain bundle --detector-storage qdq-int8`: the fp32 export of detector.pt quantized on shelf
    photos computes in int8 with the head's decoding in fp32. Tolerance, over all frames together (a
    checkout frame holds a handful of boxes, one of which moves the share of that frame alone by 20 %):
    90 % of confident boxes have a partner from the fp32 graph with IoU >= 0.85 and confidence within 0.1."""
    ultra = _yolo(tmp_path)
    pytest.importorskip("onnxruntime.quantization", reason="ONNX Runtime's quantization tools are missing")
    from models.detector import ProductDetector
    from retrain.quantize import quantize_detector

    pt = WEIGHTS / "detector.pt"
    if not pt.is_file():
        pytest.skip("no PyTorch detector weights in retrain/baseline")
    import shutil

    size = bundle.detector.input_size[0]
    shutil.copyfile(pt, tmp_path / "detector.pt")  # the export is written beside the weights
    yolo = ultra.YOLO(str(tmp_path / "detector.pt"))
    fp32 = Path(yolo.export(format="onnx", imgsz=size, opset=17, simplify=False, dynamic=True))
    photos = sorted((small_world / "shelf" / "images").rglob("*.jpg"))
    with pytest.raises(ValueError, match="the size it was trained at"):
        quantize_detector(fp32, tmp_path / "int8.onnx", photos[:8])
    info = quantize_detector(fp32, tmp_path / "int8.onnx", photos[:8], (size, size))
    assert info["storage"] == "qdq-int8" and info["calibration_images"] == len(photos[:8])

    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ref = ProductDetector(create_backend("onnxruntime", fp32), conf_threshold=0.2, max_size=(size, size))
    int8 = ProductDetector(
        create_backend("onnxruntime", tmp_path / "int8.onnx"), conf_threshold=0.2, max_size=(size, size)
    )
    matched, boxes = 0.0, 0
    for path in _frames(small_world):
        img = cv2.imread(str(path))
        theirs, ours = ref(img), int8(img)
        assert len(theirs) > 0
        n = int((theirs.confidence >= 0.3).sum() + (ours.confidence >= 0.3).sum())
        matched += n * _match(ours, theirs.xyxy, theirs.confidence, 0.85, 0.1)
        boxes += n
    assert matched / boxes >= 0.9, (matched, boxes)


def test_recognizer_quantized_to_int8_names_the_same_skus(bundle, fp32_recognizer, small_world, tmp_path):
    """`retrain bundle --recognizer-storage qdq-int8`: the shipped recognizer's fp32 graph quantized on one
    split's crops computes in int8. Tolerance, on another split's crops against a gallery of the first:
    embeddings at a mean cosine >= 0.95 to the fp32 graph's, and top-1 within 0.05 of it."""
    pytest.importorskip("onnxruntime.quantization", reason="ONNX Runtime's quantization tools are missing")
    import onnx

    from retrain.quantize import quantize_recognizer

    src, dst = fp32_recognizer, tmp_path / "int8.onnx"
    train = sorted((small_world / "crops" / "train").rglob("*.jpg"))
    with pytest.raises(ValueError, match="calibration crops"):
        quantize_recognizer(src, dst, [])
    info = quantize_recognizer(src, dst, train[:: max(1, len(train) // 32)])
    assert info["storage"] == "qdq-int8" and info["calibration_crops"] >= 32
    ops = {n.op_type for n in onnx.load(str(dst)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8 = SkuEmbedder(create_backend("onnxruntime", dst))
    queries = image_folder(small_world / "crops" / "test")
    crops = [cv2.imread(str(p)) for p, _ in queries]
    fp32 = SkuEmbedder(create_backend("onnxruntime", src))
    cosine = (int8.embed(crops) * fp32.embed(crops)).sum(1)
    assert cosine.mean() >= 0.95, cosine.mean()
    refs = image_folder(small_world / "crops" / "train")
    top1 = {
        name: evaluate_recognition(e, build_gallery(e, refs, "test"), queries)["top1"]
        for name, e in (("fp32", fp32), ("int8", int8))
    }
    assert top1["int8"] >= top1["fp32"] - 0.05, top1
