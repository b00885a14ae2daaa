"""The edge inference runtime on its own: containers, pre/post-processing, backends, galleries, bundles,
and the errors each kind of bad input gets. Uses small real ONNX graphs built here."""

from __future__ import annotations

import base64
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.backends import create_backend
from models.bundle import generate_signing_key, load_public_keys, pack_bundle, sign_bundle, verify_bundle
from models.detections import Detections
from models.detector import ProductDetector, as_bgr, decode_image, letterbox, nms
from models.errors import BackendUnavailable, BadImage, BundleError, GalleryMismatch, ModelError
from models.evaluate import _iou
from models.gallery import Gallery, expected_calibration_error, fit_sku_weights, fit_temperature
from models.loader import BASELINE_MODEL
from models.recognizer import SkuEmbedder, crop_batch, crop_boxes, prepare_crop

onnx = pytest.importorskip("onnx", reason="onnx (train extra) builds the small test graphs")
from onnx import TensorProto, helper  # noqa: E402


def _save(model, path: Path) -> Path:
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _fake_detector(path: Path, input_dims: list) -> Path:
    """A graph with the YOLO head layout [1, 5, anchors] whose output is a constant set of boxes."""
    anchors = np.zeros((1, 5, 6), np.float32)
    # cx, cy, w, h, score for 6 anchors in 64x64 input pixels: two overlapping, one weak.
    anchors[0, :, 0] = [20, 20, 10, 10, 0.9]
    anchors[0, :, 1] = [21, 20, 10, 10, 0.8]  # overlaps anchor 0 -> suppressed
    anchors[0, :, 2] = [45, 40, 12, 20, 0.7]
    anchors[0, :, 3] = [10, 50, 8, 8, 0.1]  # under the confidence threshold
    anchors[0, :, 4] = [30, 6, 10, 8, 0.6]  # wholly inside the letterbox padding of a wide frame
    anchors[0, :, 5] = [50, 13.2, 10, 6.4, 0.55]  # 0.4 px into the frame: a 1.6 px sliver once clipped
    const = helper.make_tensor("boxes", TensorProto.FLOAT, anchors.shape, anchors.ravel())
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, input_dims)
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 6])
    nodes = [
        helper.make_node("ReduceSum", ["images"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["boxes", "z"], ["output0"]),
    ]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    graph = helper.make_graph(nodes, "fake-detector", [x], [y], initializer=[const, zero])
    return _save(helper.make_model(graph), path)


@pytest.fixture(scope="module")
def fake_detector_onnx(tmp_path_factory) -> Path:
    return _fake_detector(tmp_path_factory.mktemp("onnx") / "det.onnx", [1, 3, 64, 64])


@pytest.fixture(scope="module")
def fake_dynamic_detector_onnx(tmp_path_factory) -> Path:
    return _fake_detector(tmp_path_factory.mktemp("onnx") / "det-dyn.onnx", [1, 3, "height", "width"])


@pytest.fixture(scope="module")
def fake_embedder_onnx(tmp_path_factory) -> Path:
    """Embedding = per-channel mean of the pixels (3-d), enough to tell colours apart."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["embedding"], axes=[2, 3], keepdims=0)]
    graph = helper.make_graph(nodes, "fake-embedder", [x], [y])
    return _save(helper.make_model(graph), tmp_path_factory.mktemp("onnx") / "rec.onnx")


# --- detections container -------------------------------------------------------------------------------


def test_detections_stay_aligned_when_filtered():
    d = Detections(np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0.9, 0.2, 0.5], np.float32))
    kept = d[d.confidence > 0.4]
    assert len(kept) == 2
    assert kept.xyxy[1].tolist() == [8, 9, 10, 11]
    assert list(kept.sku_id) == [None, None] and np.isnan(kept.novelty).all()
    with pytest.raises(ValueError, match="entries for 3 boxes"):
        Detections(d.xyxy, d.confidence[:2])


# --- pre- and post-processing ---------------------------------------------------------------------------


def test_letterbox_maps_boxes_back_to_the_frame():
    frame = np.zeros((300, 600, 3), np.uint8)
    boxed, lb = letterbox(frame, (64, 64))
    assert boxed.shape == (64, 64, 3)
    assert lb.scale == pytest.approx(64 / 600) and lb.pad_x == 0 and lb.pad_y == 16
    assert (boxed[:16] == 114).all() and (boxed[-16:] == 114).all()


@pytest.mark.parametrize("tied", [False, True])
def test_nms_matches_brute_force(tied):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 30, (60, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 60).astype(np.float32)
    if tied:  # equal scores keep the lower index first; a zero score is still a candidate
        scores = np.round(scores, 1)
        assert (scores == 0).any()
    keep = nms(boxes, scores, 0.5)

    def iou(a, b):
        ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
        iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = ix * iy
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    expected = []
    for i in np.argsort(-scores, kind="stable"):
        if all(iou(boxes[i], boxes[j]) <= 0.5 for j in expected):
            expected.append(i)
    assert keep.tolist() == expected


def test_detector_decodes_suppresses_and_rescales(fake_detector_onnx):
    det = ProductDetector(create_backend("onnxruntime", fake_detector_onnx), conf_threshold=0.25)
    frame = np.full((128, 256, 3), 90, np.uint8)  # letterboxed by 1/4 with 16 px of padding top and bottom
    out = det(frame)
    assert len(out) == 2  # boxes in the padding clip to nothing or a sliver: dropped, not handed on
    assert out.confidence.tolist() == pytest.approx([0.9, 0.7])
    # anchor 0: (15..25, 15..25) in input px -> minus pad y 16, times 4
    assert out.xyxy[0].tolist() == pytest.approx([60, 0, 100, 36])
    assert out.xyxy[1].tolist() == pytest.approx([156, 56, 204, 128])  # clipped to the frame


def test_a_detector_with_dynamic_input_is_fed_frames_padded_only_to_the_stride(fake_dynamic_detector_onnx):
    backend = create_backend("onnxruntime", fake_dynamic_detector_onnx)
    with pytest.raises(ModelError, match="dynamic size"):
        ProductDetector(backend)
    with pytest.raises(ModelError, match="not a multiple of the stride"):
        ProductDetector(backend, max_size=(60, 64))
    det = ProductDetector(backend, conf_threshold=0.25, max_size=(64, 64))
    frame = np.full((128, 256, 3), 90, np.uint8)
    blob, lb = det.preprocess(frame)
    assert blob.shape == (1, 3, 32, 64) and lb.pad_y == 0  # the square would add 32 rows of padding
    out = det(frame)
    # The same constant head as above, now with no padding to subtract: what was padding is frame.
    assert out.confidence.tolist() == pytest.approx([0.9, 0.7, 0.6, 0.55])
    assert out.xyxy[0].tolist() == pytest.approx([60, 60, 100, 100])
    assert out.xyxy[1].tolist() == pytest.approx([156, 120, 204, 128])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 0, 3), np.uint8), "unusable image"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((10, 10, 2), np.uint8), "channels"),
        ("not an image", "numpy image"),
    ],
)
def test_bad_images_are_refused_by_name(image, message):
    with pytest.raises(BadImage, match=message):
        as_bgr(image)


def test_corrupt_and_empty_image_bytes():
    with pytest.raises(BadImage, match="empty"):
        decode_image(b"")
    with pytest.raises(BadImage, match="does not decode"):
        decode_image(b"\xff\xd8\xff\xe0 not really a jpeg")
    ok = cv2.imencode(".jpg", np.full((8, 8, 3), 200, np.uint8))[1].tobytes()
    assert decode_image(ok).shape == (8, 8, 3)


def test_crops_outside_the_frame_are_an_error():
    frame = np.zeros((50, 50, 3), np.uint8)
    assert crop_boxes(frame, np.array([[10, 10, 30, 40]]))[0].shape[:2] == (33, 21)  # 4 % context
    with pytest.raises(BadImage, match="empty"):
        crop_boxes(frame, np.array([[60, 60, 80, 80]]))


def test_prepare_crop_keeps_aspect_and_pads():
    crop = np.zeros((40, 20, 3), np.uint8)
    crop[:, :, 2] = 255  # red in BGR
    out = prepare_crop(crop, 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert out[16, 16].tolist() == [255, 0, 0]  # RGB now
    assert out[16, 0].tolist() == [128, 128, 128]  # padding left of the narrow crop


def test_crop_batch_is_each_prepared_crop_in_nchw():
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in ((40, 20), (7, 90), (300, 250))]
    crops.append(rng.integers(0, 256, (30, 30), np.uint8))  # grey
    blob = crop_batch(crops, 48)
    assert blob.shape == (4, 3, 48, 48) and blob.dtype == np.float32 and blob.flags.c_contiguous
    np.testing.assert_array_equal(blob, np.stack([prepare_crop(c, 48) for c in crops]).transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="no crops"):
        crop_batch([], 48)


def test_an_embedder_with_a_static_batch_pads_the_last_one(tmp_path, fake_embedder_onnx):
    """A model exported for a fixed batch (as TensorRT engines often are) gets its last batch padded with
    copies of the last crop, and only the real crops' embeddings come back."""
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [4, 3, 32, 32])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [4, 3])
    nodes = [helper.make_node("ReduceMean", ["pixels"], ["embedding"], axes=[2, 3], keepdims=0)]
    static = _save(helper.make_model(helper.make_graph(nodes, "static", [x], [y])), tmp_path / "static.onnx")
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (20 + i, 30, 3), np.uint8) for i in range(6)]
    fixed = SkuEmbedder(create_backend("onnxruntime", static))
    assert fixed.fixed_batch == fixed.batch_size == 4
    want = SkuEmbedder(create_backend("onnxruntime", fake_embedder_onnx)).embed(crops)
    np.testing.assert_allclose(fixed.embed(crops), want, rtol=1e-6)


# --- backends -------------------------------------------------------------------------------------------


def test_unknown_backend_and_corrupt_model(tmp_path, fake_embedder_onnx):
    with pytest.raises(BackendUnavailable, match="unknown inference backend"):
        create_backend("coral", fake_embedder_onnx)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(fake_embedder_onnx.read_bytes()[:40])
    with pytest.raises(ModelError, match=r"cannot load broken\.onnx"):
        create_backend("onnxruntime", bad)
    with pytest.raises(ModelError, match="not found"):
        create_backend("onnxruntime", tmp_path / "missing.onnx")


def test_wrong_input_size_is_named(fake_embedder_onnx):
    backend = create_backend("onnxruntime", fake_embedder_onnx)
    assert backend.infer(np.zeros((2, 3, 32, 32), np.float32))[0].shape == (2, 3)
    with pytest.raises(ModelError, match=r"must have shape .*got \(1, 3, 64, 64\)"):
        backend.infer(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ModelError, match="takes 1 inputs"):
        backend.infer(np.zeros((1, 3, 32, 32), np.float32), np.zeros(1))


def test_sessions_stop_spinning_when_their_run_ends(fake_embedder_onnx):
    """Detector and recognizer sessions share the cores: one's idle threads must not spin on the other's."""
    session = create_backend("onnxruntime", fake_embedder_onnx).session
    assert session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


def test_missing_gpu_provider_is_reported_not_hidden(fake_embedder_onnx, caplog):
    backend = create_backend("onnxruntime", fake_embedder_onnx, providers=("cuda", "cpu"))
    import onnxruntime as ort

    if "CUDAExecutionProvider" in backend.active_providers:
        pytest.skip("this machine really runs CUDA")
    assert backend.fell_back and backend.device == "CPUExecutionProvider"
    assert ort.get_device() or True
    with pytest.raises(BackendUnavailable):
        create_backend("onnxruntime", fake_embedder_onnx, providers=("cuda",), require_providers=True)


def test_tensorrt_backend_refuses_cleanly_without_a_gpu(fake_detector_onnx):
    try:
        backend = create_backend("tensorrt", fake_detector_onnx)
    except BackendUnavailable as exc:
        assert any(w in str(exc) for w in ("tensorrt", "cuda", "CUDA"))
        pytest.skip(f"no TensorRT here: {exc}")
    ort_out = create_backend("onnxruntime", fake_detector_onnx).infer(np.zeros((1, 3, 64, 64), np.float32))[0]
    trt_out = backend.infer(np.zeros((1, 3, 64, 64), np.float32))[0]
    np.testing.assert_allclose(trt_out, ort_out, atol=1e-2)


def _qdq_graph(path: Path) -> Path:
    """An activation quantized and dequantized with fixed ranges: explicit int8, as `qdq-int8` exports."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 8, 8])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 255])
    zero = helper.make_tensor("zero", TensorProto.UINT8, [], [0])
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "scale", "zero"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
        helper.make_node("Relu", ["dq"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [x], [y], initializer=[scale, zero])
    return _save(helper.make_model(graph), path)


def test_tensorrt_precision_follows_the_installed_tensorrt(tmp_path):
    """TensorRT 10 takes precision flags (and an INT8 calibrator); TensorRT 11 removed them and reads
    precision from the graph. Both are decided here, without a GPU."""
    from models.backends.tensorrt import NetworkSource as Source
    from models.backends.tensorrt import has_qdq, network_source

    plain = (BASELINE_MODEL / "detector.onnx").read_bytes()
    qdq = _qdq_graph(tmp_path / "qdq.onnx").read_bytes()
    assert not has_qdq(plain) and has_qdq(qdq)
    # TensorRT 10: the bundle's ONNX as it is, precision by flags; a calibrator only where no Q/DQ is.
    assert network_source(plain, "fp16", False) == Source(plain, ("FP16",), False)
    assert network_source(plain, "int8", False) == Source(plain, ("FP16", "INT8"), True)
    assert network_source(qdq, "int8", False) == Source(qdq, ("FP16", "INT8"), False)
    assert network_source(qdq, "fp32", False) == Source(qdq, ("INT8",), False)
    # TensorRT 11: no flags; fp16 from a converted graph, int8 only from Q/DQ nodes.
    assert network_source(plain, "fp32", True) == Source(plain, (), False)
    assert network_source(qdq, "int8", True) == Source(qdq, (), False)
    with pytest.raises(ModelError, match="Q/DQ"):
        network_source(plain, "int8", True)
    with pytest.raises(ModelError, match="precision"):
        network_source(plain, "bf16", True)


def test_fp16_detector_for_tensorrt_11_finds_the_same_boxes(small_world, tmp_path):
    """The fp16 graph a strongly typed TensorRT builds keeps fp32 inputs and outputs, is topologically
    sorted (its parser requires it) and, run here by ONNX Runtime, finds the fp32 graph's boxes."""
    from models.backends.tensorrt import network_source

    src = BASELINE_MODEL / "detector.onnx"
    source = network_source(src.read_bytes(), "fp16", True)
    assert source.flags == () and not source.calibrate
    model = onnx.load_from_string(source.onnx)
    onnx.checker.check_model(model)  # checks the node order too
    assert [v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)] == [
        TensorProto.FLOAT
    ] * 2
    assert any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer)
    fp16_path = tmp_path / "detector-fp16.onnx"
    fp16_path.write_bytes(source.onnx)
    fp32 = ProductDetector(create_backend("onnxruntime", src))
    fp16 = ProductDetector(create_backend("onnxruntime", fp16_path))
    for photo in sorted((small_world / "shelf" / "images" / "test").glob("*.jpg"))[:2]:
        img = cv2.imread(str(photo))
        a, b = fp32(img), fp16(img)
        assert len(a) > 5 and abs(len(a) - len(b)) <= 1
        ious = _iou(a.xyxy, b.xyxy).max(1)
        assert np.median(ious) > 0.98 and (ious > 0.9).mean() > 0.95


def test_tensorrt_engine_of_the_shipped_detector_matches_onnxruntime(small_world, tmp_path):
    """On a GPU: the fp16 engine finds ONNX Runtime's boxes, is cached, and a rebuild swaps in while the
    old engine serves. Skipped where TensorRT or a GPU is missing."""
    src = BASELINE_MODEL / "detector.onnx"
    try:
        trt_backend = create_backend("tensorrt", src, cache_dir=tmp_path / "engines")
    except BackendUnavailable as exc:
        pytest.skip(f"no TensorRT here: {exc}")
    engines = sorted((tmp_path / "engines").glob("*.engine"))
    assert len(engines) == 1 and "fp16" in engines[0].name
    built = engines[0].stat().st_mtime_ns
    fp32 = ProductDetector(create_backend("onnxruntime", src))
    on_gpu = ProductDetector(trt_backend)
    img = cv2.imread(str(sorted((small_world / "shelf" / "images" / "test").glob("*.jpg"))[0]))
    a, b = fp32(img), on_gpu(img)
    assert len(a) > 5 and abs(len(a) - len(b)) <= 1
    assert np.median(_iou(a.xyxy, b.xyxy).max(1)) > 0.98
    again = create_backend("tensorrt", src, cache_dir=tmp_path / "engines")  # from the cache, not rebuilt
    assert engines[0].stat().st_mtime_ns == built
    swapped = []
    again.rebuild_in_background(src, on_ready=swapped.append).join(timeout=600)
    assert swapped == [True] and len(ProductDetector(again)(img)) == len(b)


# --- gallery --------------------------------------------------------------------------------------------


def _colour_crops() -> tuple[list[np.ndarray], list[str]]:
    colours = {"red-can": (0, 0, 230), "green-box": (0, 200, 0), "blue-bottle": (220, 0, 0)}
    crops, labels = [], []
    for name, bgr in colours.items():
        for shade in (0, 15, 30):
            crops.append(np.full((40, 30, 3), np.clip(np.array(bgr) + shade, 0, 255), np.uint8))
            labels.append(name)
    return crops, labels


def test_gallery_names_the_sku_and_flags_unknowns(fake_embedder_onnx):
    embedder = SkuEmbedder(create_backend("onnxruntime", fake_embedder_onnx))
    crops, labels = _colour_crops()
    variants = [f"{lbl}.promo" if i % 3 == 2 else lbl for i, lbl in enumerate(labels)]
    gallery = Gallery(embedder.embed(crops), labels, variants, embedder.fingerprint, "g1", 0.02, 0.05)
    queries = [np.full((20, 20, 3), (0, 0, 240), np.uint8), np.full((20, 20, 3), (200, 200, 200), np.uint8)]
    result = gallery.classify(embedder.embed(queries), k=3)
    assert result.sku_id[0] == "red-can" and result.candidates[0][0][0] == "red-can"
    assert result.probability[0] > 0.5 and result.margin[0] > 0
    assert result.sku_id[1] is None and result.novelty[1] > 0.05  # grey is nothing we sell
    with pytest.raises(GalleryMismatch, match="rebuild the gallery"):
        gallery.check_compatible("sha256:another-model")


def test_gallery_round_trip_and_temperature_fit(tmp_path, fake_embedder_onnx):
    embedder = SkuEmbedder(create_backend("onnxruntime", fake_embedder_onnx))
    crops, labels = _colour_crops()
    gallery = Gallery(embedder.embed(crops), labels, labels, embedder.fingerprint, "g2")
    manifest = gallery.save(tmp_path / "g")
    again = Gallery.from_directory(tmp_path / "g", manifest)
    assert again.skus == gallery.skus and again.embedding_model == embedder.fingerprint
    ranked = [[("a", 0.9), ("b", 0.5)], [("a", 0.6), ("b", 0.55)], [("b", 0.7), ("a", 0.4)]]
    t = fit_temperature(ranked, ["a", "b", "b"])
    assert 0.005 <= t <= 1.0
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([1, 0])) == pytest.approx(0.4)


def _clusters(counts: dict[str, int], spread: float = 0.3, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Unit embeddings scattered around one random direction per SKU, `counts[sku]` of each."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for sku, n in counts.items():
        centre = rng.normal(size=16)
        rows.append(centre / np.linalg.norm(centre) + spread * rng.normal(size=(n, 16)) / 4)
        labels += [sku] * n
    emb = np.concatenate(rows).astype(np.float32)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True), labels


def test_sku_weights_weigh_every_sku_alike_whatever_its_reference_count():
    emb, labels = _clusters({"cola": 12, "cherry-cola": 4, "water": 8})
    weights = fit_sku_weights(emb, labels)
    assert weights.shape == (3, 16) and np.allclose(np.linalg.norm(weights, axis=1), 1, atol=1e-5)
    means = np.stack([emb[[lbl == s for lbl in labels]].mean(0) for s in sorted(set(labels))])
    assert ((weights @ means.T).argmax(1) == np.arange(3)).all()  # each SKU's weight points at its own
    # Ten copies of every cola reference are the same evidence, not ten times the say.
    extra = np.concatenate([emb] + [emb[:12]] * 9)
    assert np.allclose(fit_sku_weights(extra, labels + ["cola"] * 108), weights, atol=1e-4)


def test_blend_scores_an_sku_half_by_its_nearest_reference_half_by_its_weight(tmp_path):
    emb, labels = _clusters({"cola": 30, "cherry-cola": 5, "water": 10}, spread=0.6)
    gallery = Gallery(emb, labels, labels, "sha256:m", "g3", 0.05, 0.5, scoring="blend")
    queries = _clusters({"cherry-cola": 6}, spread=0.6, seed=1)[0]
    ranked, nearest = gallery.sku_scores(queries, 3)
    row = {s: i for i, s in enumerate(gallery.skus)}
    for q, scores in zip(queries, ranked, strict=True):
        for sku, score in scores:
            own = emb[[lbl == sku for lbl in labels]]
            expected = 0.5 * ((own @ q).max() + gallery.sku_weights[row[sku]] @ q)
            assert score == pytest.approx(expected, abs=1e-5)
    assert np.allclose(nearest, (queries @ emb.T).max(1), atol=1e-5)  # novelty stays the nearest reference's
    manifest = gallery.save(tmp_path / "g")
    assert manifest["scoring"] == "blend" and (tmp_path / "g" / "sku_weights.npy").is_file()
    again = Gallery.from_directory(tmp_path / "g", manifest)
    assert again.scoring == "blend" and np.array_equal(again.sku_weights, gallery.sku_weights)
    for before, after in zip(ranked, again.sku_scores(queries, 3)[0], strict=True):  # embeddings kept in fp16
        assert [s for s, _ in after] == [s for s, _ in before]
        assert [v for _, v in after] == pytest.approx([v for _, v in before], abs=2e-3)


def test_a_gallery_scoring_that_cannot_be_used_is_refused(tmp_path):
    emb, labels = _clusters({"cola": 4, "water": 4})
    with pytest.raises(BundleError, match="unknown gallery scoring 'vote'"):
        Gallery(emb, labels, labels, "sha256:m", scoring="vote")
    with pytest.raises(BundleError, match="SKU weights of shape"):
        Gallery(emb, labels, labels, "sha256:m", scoring="blend", sku_weights=np.ones((3, 16), np.float32))
    manifest = Gallery(emb, labels, labels, "sha256:m", scoring="blend").save(tmp_path / "g")
    (tmp_path / "g" / "sku_weights.npy").unlink()
    with pytest.raises(BundleError, match="unreadable"):
        Gallery.from_directory(tmp_path / "g", manifest)
    old = Gallery(emb, labels, labels, "sha256:m").save(tmp_path / "old")
    del old["scoring"]  # a gallery made before the scoring rule was named
    assert Gallery.from_directory(tmp_path / "old", old).scoring == "nearest"


# --- bundles --------------------------------------------------------------------------------------------


@pytest.fixture()
def signed(tmp_path, fake_embedder_onnx):
    key = tmp_path / "keys" / "k.pem"
    generate_signing_key(key)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "recognizer.onnx").write_bytes(fake_embedder_onnx.read_bytes())
    (bundle / "notes.txt").write_text("made by a test\n")
    sign_bundle(bundle, {"name": "t", "kind": "model", "version": "1.2.3"}, key)
    return bundle, load_public_keys([key.with_suffix(".pub")])


def test_signed_bundle_verifies_and_packs(signed, tmp_path):
    bundle, keys = signed
    v = verify_bundle(bundle, keys, kind="model")
    assert v.version == "1.2.3" and set(v.manifest["files"]) == {"recognizer.onnx", "notes.txt"}
    archive = pack_bundle(bundle, tmp_path / "b.tar.gz")
    assert verify_bundle(archive, keys, extract_to=tmp_path / "x").version == "1.2.3"
    with pytest.raises(BundleError, match="expected a gallery"):
        verify_bundle(bundle, keys, kind="gallery")


@pytest.mark.parametrize("attack", ["tamper", "truncate", "delete", "manifest", "unsigned", "foreign-key"])
def test_tampered_bundles_are_refused_with_the_reason(signed, tmp_path, attack):
    bundle, keys = signed
    f = bundle / "recognizer.onnx"
    expected = {
        "tamper": "sha256",
        "truncate": "truncated",
        "delete": "missing",
        "manifest": "bad signature",
        "unsigned": "unsigned",
        "foreign-key": "not trusted",
    }[attack]
    if attack == "tamper":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif attack == "truncate":
        f.write_bytes(f.read_bytes()[:-10])
    elif attack == "delete":
        f.unlink()
    elif attack == "manifest":
        m = json.loads((bundle / "manifest.json").read_text())
        m["version"] = "9.9.9"
        (bundle / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    elif attack == "unsigned":
        (bundle / "manifest.sig").unlink()
    elif attack == "foreign-key":
        other = tmp_path / "other.pem"
        generate_signing_key(other)
        keys = load_public_keys([other.with_suffix(".pub")])
    with pytest.raises(BundleError, match=expected):
        verify_bundle(bundle, keys)


def test_archive_with_path_traversal_is_refused(tmp_path, signed):
    _, keys = signed
    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../../escaped.txt")
    with pytest.raises(BundleError, match="not a readable bundle archive"):
        verify_bundle(evil, keys, extract_to=tmp_path / "out")
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_public_key_files_are_checked(tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text(base64.b64encode(b"short").decode())
    with pytest.raises(BundleError, match="not an ed25519"):
        load_public_keys([bad])
