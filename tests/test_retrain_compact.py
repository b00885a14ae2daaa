"""Compact weight storage: the file shrinks, ONNX Runtime folds the decoding away, the outputs stay close."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx (train extra) writes the compact graphs")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from retrain.compact import compact_weights  # noqa: E402


def _net(path: Path) -> Path:
    """Conv 3->64 (3x3) -> ReLU -> global pool -> Gemm 64->128: weights big enough to be compacted."""
    rng = np.random.default_rng(0)
    conv_w = rng.normal(0, 0.2, (64, 3, 3, 3)).astype(np.float32)
    conv_w[5] *= 40  # one channel far larger than the rest: per-channel scales must cope
    gemm_w = rng.normal(0, 0.1, (128, 64)).astype(np.float32)
    stem_w = rng.normal(0, 0.2, (3, 3, 1, 1)).astype(np.float32)
    head_w = rng.normal(0, 0.1, (128, 128)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["s"]),
        helper.make_node("Conv", ["s", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "gemm_w"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "head_w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 128])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((stem_w, "stem_w"), (conv_w, "conv_w"), (gemm_w, "gemm_w"), (head_w, "head_w"))
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what the installed ONNX Runtime reads, whatever the onnx package writes
    onnx.save(model, str(path))
    return path


def _run(path: Path, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    opts = ort.SessionOptions()
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize(("storage", "max_ratio", "rel_tol"), [("int8", 0.45, 0.02), ("float16", 0.7, 2e-3)])
def test_compact_storage_shrinks_the_file_and_keeps_the_outputs(tmp_path, storage, max_ratio, rel_tol):
    src = _net(tmp_path / "net.onnx")
    dst = tmp_path / f"net-{storage}.onnx"
    report = compact_weights(src, dst, storage, keep_ends=0)
    assert report["storage"] == storage and report["tensors"] == 3  # conv_w, gemm_w, head_w; stem is small
    assert dst.stat().st_size < max_ratio * src.stat().st_size
    x = np.random.default_rng(1).normal(0, 1, (4, 3, 32, 32)).astype(np.float32)
    ref, got = _run(src, x), _run(dst, x, tmp_path / "folded.onnx")
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err <= rel_tol, err
    folded = onnx.load(str(tmp_path / "folded.onnx"))
    assert not [n.op_type for n in folded.graph.node if n.op_type in ("Cast", "Mul")]  # decoded at load


def test_the_ends_stay_fp32_and_a_compact_file_is_left_as_it_is(tmp_path):
    src = _net(tmp_path / "net.onnx")
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    assert compact_weights(src, once, "int8", keep_ends=1)["tensors"] == 2  # conv_w and gemm_w
    kept = {t.name for t in onnx.load(str(once)).graph.initializer}
    assert {"stem_w", "head_w", "conv_w__i8", "conv_w__scale", "gemm_w__i8"} <= kept
    # Only head_w is left to compact: the int8 tensors feed a Cast, not a Conv or Gemm.
    assert compact_weights(once, twice, "int8", keep_ends=0)["tensors"] == 1


def test_unknown_storage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="weight storage"):
        compact_weights(_net(tmp_path / "net.onnx"), tmp_path / "x.onnx", "int4")
