"""OpenVINO backend: Intel edge boxes (x86 CPUs, and Intel GPUs where OpenVINO sees one).

The precision is explicit. OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it (AMX,
AVX512-BF16), which moves a detector's boxes; so `fp32` is asked for unless the configuration says
otherwise, and what the compiled model really computes in is read back and checked, never assumed.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from models.backends.base import InferenceBackend, TensorSpec, check_input_shapes
from models.errors import BackendUnavailable, ModelError

log = logging.getLogger(__name__)

#: Our precision names to OpenVINO's element types, and the CPU capability each needs.
PRECISIONS = {"fp32": ("f32", "FP32"), "bf16": ("bf16", "BF16"), "fp16": ("f16", "FP16")}


class OpenVinoBackend(InferenceBackend):
    key = "openvino"

    def __init__(
        self,
        model_path: Path,
        precision: str = "fp32",
        device: str = "CPU",
        threads: int | None = None,
        require_precision: bool = False,
    ) -> None:
        super().__init__(model_path)
        if precision not in PRECISIONS:
            raise BackendUnavailable(
                f"unknown OpenVINO precision {precision!r}; choose from {list(PRECISIONS)}"
            )
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailable("openvino is not installed (install shelfloop[intel])") from exc
        if not self.model_path.is_file():
            raise ModelError(f"model file not found: {self.model_path}")
        core = ov.Core()
        if device not in core.available_devices:
            raise BackendUnavailable(f"OpenVINO device {device!r} is not present ({core.available_devices})")
        ov_type, capability = PRECISIONS[precision]
        capabilities = core.get_property(device, "OPTIMIZATION_CAPABILITIES")
        if capability not in capabilities:
            msg = f"{device} cannot compute in {precision} (it offers {capabilities})"
            if require_precision:
                raise BackendUnavailable(msg)
            ov_type = "f32"  # the FALLBACK warning follows, once compiled
        config = {"INFERENCE_PRECISION_HINT": ov_type, "PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads or os.cpu_count() or 1
        try:
            model = core.read_model(str(self.model_path))
            self.quantized = any(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
            if not self.quantized:
                _fold_stored_weights(model)
            self.compiled = core.compile_model(model, device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own for corrupt models
            raise ModelError(f"cannot load {self.model_path.name} with openvino: {exc}") from exc
        got = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = next((k for k, (t, _) in PRECISIONS.items() if t == got), got)
        self.fell_back = self.precision != precision
        if self.fell_back:
            msg = f"{self.model_path.name}: asked for {precision}, {device} computes in {self.precision}"
            if require_precision:
                raise BackendUnavailable(msg)
            log.warning("FALLBACK: %s", msg)
        self._device = device
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one request, reused: cameras on threads take turns
        self._inputs = [_spec(p) for p in self.compiled.inputs]
        self._outputs = [_spec(p) for p in self.compiled.outputs]

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def device(self) -> str:
        label = f"OpenVINO {self._device} {self.precision}"
        return f"{label} with int8 convolutions" if self.quantized else label

    def infer(self, *inputs: np.ndarray) -> list[np.ndarray]:
        check_input_shapes(self.model_path.name, self._inputs, inputs)
        try:
            with self._lock:
                result = self._request.infer(list(inputs))
                # The request reuses its output buffers on the next call: hand out copies.
                return [np.array(result[port]) for port in self.compiled.outputs]
        except Exception as exc:  # type mismatches and bad values come back as RuntimeError
            raise ModelError(f"{self.model_path.name}: inference failed: {exc}") from exc


def _spec(port) -> TensorSpec:
    shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), shape, str(port.get_element_type()))


def _fold_stored_weights(model) -> None:
    """Turn weights stored compactly (int8 or fp16 with a Cast and a Mul, see `retrain.compact`) into plain
    fp32 constants before compiling (not in a graph quantized to compute in int8, see `quantized`).

    OpenVINO reads that pattern as weight compression and keeps the weights compact inside its kernels,
    which fails on 1x1 convolutions fed by a split (OpenVINO 2026.4's ConvertWeightCompressedConv1x1ToMatmul,
    YOLO11's attention block) and is not the fp32 graph ONNX Runtime runs.

    A graph quantized to compute in int8 (`retrain.quantize`: its activations become FakeQuantize) must
    not come here: folding its weights' dequantization to fp32 constants stops OpenVINO's int8 kernels and
    runs it in fp32 with quantized activations, three times slower (the 1.4.0 recognizer: 134 ms against
    43 ms for 16 crops on a Xeon with AMX)."""
    from openvino import opset13

    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convert", "Multiply"):
            continue
        sources = [op.input_value(i).get_node() for i in range(op.get_input_size())]
        if any(s.get_type_name() != "Constant" for s in sources):
            continue
        values = [s.get_data() for s in sources]
        dtype = op.get_output_element_type(0).to_dtype()
        folded = values[0].astype(dtype) if kind == "Convert" else (values[0] * values[1]).astype(dtype)
        op.output(0).replace(opset13.constant(folded).output(0))
