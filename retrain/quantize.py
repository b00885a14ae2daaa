"""Run the detector or the recognizer in int8: static post-training quantization to a QDQ ONNX graph.

Compact storage (`retrain.compact`) shrinks the file but computes in fp32. On CPUs with VNNI (and on
TensorRT, which reads explicit Q/DQ nodes) int8 convolutions are much cheaper, which is what a device on a
power budget wants. Activation ranges come from real shelf and checkout photos, or product crops for the
recognizer (the 99.99th percentile of each activation: a min/max range spends the 8 bits on a few
outliers); weights are int8 per output channel. The detection head's decoding (distribution-to-box,
sigmoid, the concatenation of pixel coordinates with 0..1 scores into one tensor) stays fp32: one int8
scale cannot hold both, and quantizing it zeroes every score.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.detector import detector_input
from models.recognizer import crop_batch

STORAGE = "qdq-int8"
CALIBRATION_PERCENTILE = 99.99
COMPUTED = (
    "int8 (QDQ: weights per output channel, activations uint8, "
    f"{CALIBRATION_PERCENTILE} percentile calibration)"
)


def _head_decode_nodes(graph: Any) -> list[str]:  # an onnx.GraphProto (onnx is imported lazily)
    """Nodes of the module that writes the output (Ultralytics' Detect) outside its conv branches
    (`cv2` boxes, `cv3` classes): the decoding that must stay fp32."""
    producer = next(n for n in graph.node if graph.output[0].name in n.output)
    parts = producer.name.split("/")
    if len(parts) < 3:
        raise ValueError(f"cannot find the detection head from output node {producer.name!r}")
    head = "/".join(parts[:2]) + "/"
    branches = (head + "cv2", head + "cv3")
    return [n.name for n in graph.node if n.name.startswith(head) and not n.name.startswith(branches)]


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise ValueError(f"calibration image {path} does not decode")
    return img


def _blobs(images: list[Path], size: tuple[int, int]) -> Iterator[np.ndarray]:
    for path in images:
        yield detector_input(_read(path), size)[0]


def _crop_blobs(crops: list[Path], size: int) -> Iterator[np.ndarray]:
    for path in crops:
        yield crop_batch([_read(path)], size)


def _quantize(
    src: Path,
    dst: Path,
    input_name: str,
    blobs: Iterator[np.ndarray],
    exclude: Callable[[Any], list[str]],
    skip_symbolic_shape: bool = False,
) -> int:
    """QDQ int8 of `src` into `dst`, activation ranges from `blobs` fed as `input_name`; `exclude(graph)`
    names nodes kept fp32. Returns how many were kept."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Blobs(CalibrationDataReader):
        def get_next(self) -> dict | None:
            blob = next(blobs, None)
            return None if blob is None else {input_name: blob}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=skip_symbolic_shape)
        excluded = exclude(onnx.load(str(prepared)).graph)
        quantize_static(
            str(prepared),
            str(dst),
            Blobs(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
            nodes_to_exclude=excluded,
        )
    return len(excluded)


def quantize_detector(
    src: Path, dst: Path, calibration_images: list[Path], max_size: tuple[int, int] | None = None
) -> dict:
    """Write the int8 (QDQ) form of detector `src` to `dst`; returns what was done, for the manifest.

    The calibration photos go in padded to the model's static input or, for a dynamic one, to the square
    `max_size` it was trained at: ONNX Runtime's calibrators stack every batch into one array, so all
    must share a shape, and the grey padding moves no activation range the device's stride-padded frames
    would not."""
    import onnx

    if not calibration_images:
        raise ValueError("int8 quantization needs calibration images (shelf and checkout photos)")
    model_input = onnx.load(str(src), load_external_data=False).graph.input[0]
    shape = [d.dim_value for d in model_input.type.tensor_type.shape.dim]  # 0: dynamic
    dynamic = not (shape[2] > 0 and shape[3] > 0)
    if dynamic and max_size is None:
        raise ValueError(f"{src.name} takes inputs of any size: give the size it was trained at")
    blobs = _blobs(calibration_images, max_size if dynamic else (shape[2], shape[3]))
    # Symbolic shape inference cannot follow the head's reshapes through a free height and width.
    kept = _quantize(src, dst, model_input.name, blobs, _head_decode_nodes, skip_symbolic_shape=dynamic)
    return {
        "storage": STORAGE,
        "computed": COMPUTED,
        "calibration_images": len(calibration_images),
        "kept_fp32": f"{kept} nodes of the detection head's decoding",
    }


def quantize_recognizer(src: Path, dst: Path, calibration_crops: list[Path]) -> dict:
    """Write the int8 (QDQ) form of recognizer `src` to `dst`, its activation ranges from product crops
    prepared as the device prepares them; returns what was done, for the manifest. Every node is
    quantized: the embedding is L2-normalised at the end, so no output mixes scales."""
    import onnx

    if not calibration_crops:
        raise ValueError("int8 quantization needs calibration crops (a world's crops/train)")
    model_input = onnx.load(str(src), load_external_data=False).graph.input[0]
    dims = model_input.type.tensor_type.shape.dim
    size = dims[2].dim_value
    if size <= 0 or dims[3].dim_value != size:
        raise ValueError(f"{src.name} has no fixed square input to calibrate at")
    _quantize(src, dst, model_input.name, _crop_blobs(calibration_crops, size), lambda graph: [])
    return {"storage": STORAGE, "computed": COMPUTED, "calibration_crops": len(calibration_crops)}
