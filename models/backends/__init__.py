"""Inference backends, one module each, chosen by a configuration key.

`create_backend("onnxruntime", path)` or `create_backend("tensorrt", path)`; the module of a backend is
imported only when it is chosen, so a CPU box never needs TensorRT installed.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from models.backends.base import InferenceBackend, TensorSpec
from models.errors import BackendUnavailable

BACKENDS = {
    "onnxruntime": ("models.backends.onnxruntime", "OnnxRuntimeBackend"),
    "tensorrt": ("models.backends.tensorrt", "TensorRTBackend"),
}

__all__ = ["BACKENDS", "InferenceBackend", "TensorSpec", "create_backend"]


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
