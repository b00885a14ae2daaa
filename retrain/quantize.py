"""Run the detector in int8: static post-training quantization to a QDQ ONNX graph.

Compact storage (`retrain.compact`) shrinks the file but computes in fp32. On CPUs with VNNI (and on
TensorRT, which reads explicit Q/DQ nodes) int8 convolutions are much cheaper, which is what a device on a
power budget wants. Activation ranges come from real shelf and checkout photos (the 99.99th percentile
of each activation: a min/max range spends the 8 bits on a few outliers); weights are int8 per output
channel. The detection head's decoding (distribution-to-box, sigmoid, the concatenation of pixel
coordinates with 0..1 scores into one tensor) stays fp32: one int8 scale cannot hold both, and
quantizing it zeroes every score.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.detector import detector_input

STORAGE = "qdq-int8"
CALIBRATION_PERCENTILE = 99.99


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


def _blobs(images: list[Path], size: tuple[int, int]) -> Iterator[np.ndarray]:
    for path in images:
        img = cv2.imread(str(path))
        if img is None:
            raise ValueError(f"calibration image {path} does not decode")
        yield detector_input(img, size)[0]


def quantize_detector(
    src: Path, dst: Path, calibration_images: list[Path], max_size: tuple[int, int] | None = None
) -> dict:
    """Write the int8 (QDQ) form of detector `src` to `dst`; returns what was done, for the manifest.

    The calibration photos go in padded to the model's static input or, for a dynamic one, to the square
    `max_size` it was trained at: ONNX Runtime's calibrators stack every batch into one array, so all
    must share a shape, and the grey padding moves no activation range the device's stride-padded frames
    would not."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration_images:
        raise ValueError("int8 quantization needs calibration images (shelf and checkout photos)")

    class Photos(CalibrationDataReader):
        def __init__(self, name: str, size: tuple[int, int]) -> None:
            self._it = ({name: b} for b in _blobs(calibration_images, size))

        def get_next(self) -> dict | None:
            return next(self._it, None)

    model_input = onnx.load(str(src), load_external_data=False).graph.input[0]
    shape = [d.dim_value for d in model_input.type.tensor_type.shape.dim]  # 0: dynamic
    dynamic = not (shape[2] > 0 and shape[3] > 0)
    if dynamic and max_size is None:
        raise ValueError(f"{src.name} takes inputs of any size: give the size it was trained at")
    photos = Photos(model_input.name, max_size if dynamic else (shape[2], shape[3]))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Symbolic shape inference cannot follow the head's reshapes through a free height and width.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=dynamic)
        graph = onnx.load(str(prepared)).graph
        excluded = _head_decode_nodes(graph)
        quantize_static(
            str(prepared),
            str(dst),
            photos,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
            nodes_to_exclude=excluded,
        )
    return {
        "storage": STORAGE,
        "computed": "int8 (QDQ: weights per output channel, activations uint8, "
        f"{CALIBRATION_PERCENTILE} percentile calibration)",
        "calibration_images": len(calibration_images),
        "kept_fp32": f"{len(excluded)} nodes of the detection head's decoding",
    }
