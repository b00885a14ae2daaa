"""The OpenVINO backend (the `intel` extra) on this machine's CPU: the shipped models run on it and find
ONNX Runtime's boxes and embeddings, precision is what was asked for or said to be otherwise, and bad
configuration gets a clear error."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from conftest import shipped_recognizer_in_int8

from models.backends import check_precision, create_backend
from models.detector import ProductDetector
from models.errors import BackendUnavailable, ModelError
from models.evaluate import _iou
from models.loader import BASELINE_MODEL, load_model_bundle
from models.recognizer import prepare_crop

ov = pytest.importorskip("openvino", reason="openvino is the optional `intel` extra")

DETECTOR = BASELINE_MODEL / "detector.onnx"
RECOGNIZER = BASELINE_MODEL / "recognizer.onnx"
CROP = json.loads((BASELINE_MODEL / "manifest.json").read_text())["recognizer"]["input"][-1]
INT8_RECOGNIZER = shipped_recognizer_in_int8()
RECOGNIZER_COSINE = 0.995 if INT8_RECOGNIZER else 0.99999
"""An fp32 graph must give ONNX Runtime's embeddings; one that computes in int8 (QDQ) runs on each
runtime's own int8 kernels, which round differently (minimum cosine 0.998 measured on 1.4.0)."""


def _cpu_offers(capability: str) -> bool:
    return capability in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _shelf_photos(world, n: int = 2) -> list[np.ndarray]:
    return [cv2.imread(str(p)) for p in sorted((world / "shelf" / "images" / "test").glob("*.jpg"))[:n]]


def test_fp32_runs_the_shipped_models_as_onnxruntime_does(small_world):
    """The shipped ONNX files store their weights compactly (int8 / fp16 plus a rescale), which OpenVINO
    would otherwise keep compressed and fail to compile; in fp32 it must give ONNX Runtime's numbers."""
    ovd = create_backend("openvino", DETECTOR)
    assert ovd.precision == "fp32" and not ovd.fell_back and ovd.device == "OpenVINO CPU fp32"
    fp32 = ProductDetector(create_backend("onnxruntime", DETECTOR))
    on_ov = ProductDetector(ovd)
    for img in _shelf_photos(small_world):
        blob = fp32.preprocess(img)[0]
        np.testing.assert_allclose(ovd.infer(blob)[0], fp32.backend.infer(blob)[0], atol=2e-2, rtol=1e-4)
        a, b = fp32(img), on_ov(img)
        assert len(a) > 5 and len(a) == len(b)
        assert _iou(a.xyxy, b.xyxy).max(1).min() > 0.999
    crops = np.stack([prepare_crop(img[:120, :90], CROP) for img in _shelf_photos(small_world)])
    x = crops.transpose(0, 3, 1, 2).copy()
    ovr = create_backend("openvino", RECOGNIZER)
    assert ovr.inputs[0].shape == (None, 3, CROP, CROP)
    got, want = ovr.infer(x)[0], create_backend("onnxruntime", RECOGNIZER).infer(x)[0]
    assert (got * want).sum(1).min() > RECOGNIZER_COSINE


@pytest.mark.skipif(not INT8_RECOGNIZER, reason="the shipped recognizer computes in fp32")
def test_an_int8_recognizer_runs_its_convolutions_in_int8():
    """A QDQ graph keeps its quantized weights: folded to fp32 constants, as compactly stored weights are,
    they made OpenVINO compute the convolutions in fp32, three times slower than in int8."""
    backend = create_backend("openvino", RECOGNIZER)
    assert backend.device == "OpenVINO CPU fp32 with int8 convolutions"
    runtime = backend.compiled.get_runtime_model()
    convolutions = [
        op.get_rt_info()["runtimePrecision"].astype(str)
        for op in runtime.get_ordered_ops()
        if op.get_rt_info()["layerType"].astype(str) == "Convolution"
    ]
    assert len(convolutions) > 10 and set(convolutions) <= {"u8", "i8"}, convolutions


@pytest.mark.skipif(not _cpu_offers("BF16"), reason="this CPU has no bf16 (AVX512-BF16 or AMX)")
def test_bf16_detector_finds_the_fp32_boxes(small_world):
    ovd = create_backend("openvino", DETECTOR, precision="bf16", require_precision=True)
    assert ovd.precision == "bf16" and ovd.device == "OpenVINO CPU bf16"
    fp32, bf16 = ProductDetector(create_backend("onnxruntime", DETECTOR)), ProductDetector(ovd)
    for img in _shelf_photos(small_world):
        a, b = fp32(img), bf16(img)
        assert len(a) > 5 and abs(len(a) - len(b)) <= 1
        ious = _iou(a.xyxy, b.xyxy).max(1)
        assert np.median(ious) > 0.98 and (ious > 0.9).mean() > 0.95


def test_a_precision_the_cpu_lacks_is_said_or_refused(caplog):
    missing = next((p for p, cap in (("bf16", "BF16"), ("fp16", "FP16")) if not _cpu_offers(cap)), None)
    if missing is None:
        pytest.skip("this CPU computes in fp32, bf16 and fp16 alike")
    with caplog.at_level(logging.WARNING):
        backend = create_backend("openvino", DETECTOR, precision=missing)
    assert backend.fell_back and backend.precision == "fp32" and "FALLBACK" in caplog.text
    with pytest.raises(BackendUnavailable, match=f"cannot compute in {missing}"):
        create_backend("openvino", DETECTOR, precision=missing, require_precision=True)


def test_bad_configuration_and_input_are_named(tmp_path):
    with pytest.raises(BackendUnavailable, match="unknown OpenVINO precision 'int8'"):
        create_backend("openvino", DETECTOR, precision="int8")
    with pytest.raises(BackendUnavailable, match="device 'NPU' is not present"):
        create_backend("openvino", DETECTOR, device="NPU")
    with pytest.raises(ModelError, match="not found"):
        create_backend("openvino", tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(DETECTOR.read_bytes()[:4096])
    with pytest.raises(ModelError, match=r"cannot load broken\.onnx with openvino"):
        create_backend("openvino", broken)
    backend = create_backend("openvino", RECOGNIZER)
    with pytest.raises(ModelError, match=r"must have shape .*got \(1, 3, 64, 64\)"):
        backend.infer(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ModelError, match="takes 1 inputs"):
        backend.infer(np.zeros((1, 3, CROP, CROP), np.float32), np.zeros(1))


def test_precision_is_checked_against_the_backend_before_anything_loads():
    assert check_precision("onnxruntime", None) == "fp32"
    assert check_precision("tensorrt", None) == "fp16"
    assert check_precision("openvino", "bf16") == "bf16"
    with pytest.raises(BackendUnavailable, match="'onnxruntime' computes in fp32, not 'bf16'"):
        check_precision("onnxruntime", "bf16")
    with pytest.raises(BackendUnavailable, match="'openvino' computes in fp32, bf16, fp16, not 'int8'"):
        load_model_bundle(backend="openvino", precision="int8")


def test_bundle_on_openvino_keeps_the_recognizer_as_it_was_made():
    """The detector's precision is not the recognizer's: it stays fp32 (with int8 convolutions when its
    bundle quantized it), the graph its gallery was embedded with."""
    precision = "bf16" if _cpu_offers("BF16") else "fp32"
    mb = load_model_bundle(backend="openvino", precision=precision)
    assert mb.detector.backend.device == f"OpenVINO CPU {precision}"
    int8 = " with int8 convolutions" if INT8_RECOGNIZER else ""
    assert mb.embedder.backend.device == f"OpenVINO CPU fp32{int8}"


def test_eval_detection_on_openvino_scores_as_onnxruntime(small_world, tmp_path):
    from typer.testing import CliRunner

    from shelfloop.cli import app

    scores = {}
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / f"{backend}.json"
        args = ["eval", "detection", "--dataset", str(small_world), "--backend", backend, "--json", str(out)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        scores[backend] = json.loads(out.read_text())
    assert scores["onnxruntime"]["map50"] > 0.5
    for key in ("map50", "map50_95"):
        assert abs(scores["openvino"][key] - scores["onnxruntime"][key]) < 1e-3
    refused = CliRunner().invoke(app, [*args[:4], "--backend", "onnxruntime", "--precision", "bf16"])
    assert refused.exit_code == 2 and "computes in fp32, not 'bf16'" in refused.output


def test_cameras_on_threads_share_one_backend():
    """One infer request serves every camera thread: each call gets its own answer, none is refused."""
    from concurrent.futures import ThreadPoolExecutor

    backend = create_backend("openvino", RECOGNIZER)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 255, (2, 3, CROP, CROP)).astype(np.float32) for _ in range(8)]
    alone = [backend.infer(x)[0] for x in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda x: backend.infer(x)[0], batches * 3))
    for i, got in enumerate(together):
        np.testing.assert_allclose(got, alone[i % len(batches)], atol=1e-5)
