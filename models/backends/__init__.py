"""Inference backends, one module each, chosen by a configuration key.

`create_backend(key, path)` with key `onnxruntime`, `tensorrt` or `openvino`; the module of a backend is
imported only when it is chosen, so a CPU box never needs TensorRT or OpenVINO installed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from models.backends.base import InferenceBackend, TensorSpec
from models.errors import BackendUnavailable

BACKENDS = {
    "onnxruntime": ("models.backends.onnxruntime", "OnnxRuntimeBackend"),
    "tensorrt": ("models.backends.tensorrt", "TensorRTBackend"),
    "openvino": ("models.backends.openvino", "OpenVinoBackend"),
}

#: What each backend can compute in; the first is its default.
PRECISIONS = {
    "onnxruntime": ("fp32",),
    "tensorrt": ("fp16", "fp32", "int8"),
    "openvino": ("fp32", "bf16", "fp16"),
}

__all__ = ["BACKENDS", "PRECISIONS", "InferenceBackend", "TensorSpec", "check_precision", "create_backend"]


def check_precision(key: str, precision: str | None) -> str:
    """The precision `key` will compute in (its default for None); a clear error for a pair that cannot be."""
    if key not in BACKENDS:
        raise BackendUnavailable(f"unknown inference backend {key!r}; choose one of {', '.join(BACKENDS)}")
    if precision is None:
        return PRECISIONS[key][0]
    if precision not in PRECISIONS[key]:
        raise BackendUnavailable(
            f"backend {key!r} computes in {', '.join(PRECISIONS[key])}, not {precision!r}"
        )
    return precision


def create_backend(key: str, model_path: str | Path, **options) -> InferenceBackend:
    """Instantiate the backend named by `key` for the model at `model_path`."""
    if key not in BACKENDS:
        raise BackendUnavailable(f"unknown inference backend {key!r}; choose one of {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[key]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - both modules import lazily inside
        raise BackendUnavailable(f"backend {key!r} cannot be imported: {exc}") from exc
    return getattr(module, class_name)(Path(model_path), **options)
