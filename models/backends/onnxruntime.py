"""ONNX Runtime backend: CPU everywhere; CUDA and TensorRT execution providers where they really load.

ONNX Runtime silently falls back to the CPU when a GPU provider fails to load (a missing libcublas, say).
We compare what the session got with what was asked and say so loudly, or refuse when told to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from models.backends.base import InferenceBackend, TensorSpec, check_input_shapes
from models.errors import BackendUnavailable, ModelError

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxRuntimeBackend(InferenceBackend):
    key = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        providers: tuple[str, ...] = ("cpu",),
        threads: int | None = None,
        require_providers: bool = False,
        trt_cache_dir: Path | None = None,
    ) -> None:
        super().__init__(model_path)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable("onnxruntime is not installed (install shelfloop[edge])") from exc
        if not self.model_path.is_file():
            raise ModelError(f"model file not found: {self.model_path}")
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown:
            raise BackendUnavailable(
                f"unknown execution provider(s) {unknown}; choose from {list(PROVIDERS)}"
            )
        wanted = [PROVIDERS[p] for p in providers]
        if "CPUExecutionProvider" not in wanted:
            wanted.append("CPUExecutionProvider")
        compiled_in = set(ort.get_available_providers())
        requested = []
        for name in wanted:
            if name not in compiled_in:
                msg = f"{name} is not compiled into this onnxruntime ({sorted(compiled_in)})"
                if require_providers:
                    raise BackendUnavailable(msg)
                log.warning("%s; skipping it", msg)
                continue
            if name == "TensorrtExecutionProvider":
                cache = str(trt_cache_dir or self.model_path.parent / ".trt-cache")
                requested.append(
                    (
                        name,
                        {
                            "trt_fp16_enable": True,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": cache,
                        },
                    )
                )
            else:
                requested.append(name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The detector and the recognizer take turns on the same cores. By default a session's threads
        # spin on after its run and take the cores from the other session's: stopping them at the end of
        # each run took a checkout pipeline from 14 to 24 frames/s (`bench edge`), with the detector alone
        # as fast as before, since the threads still spin between the operators of one run.
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=requested)
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt models
            raise ModelError(f"cannot load {self.model_path.name} with onnxruntime: {exc}") from exc
        self.active_providers = self.session.get_providers()
        # Compare with what was asked for, not with what was compiled in: a CUDA build on a box without
        # libcublas loads the provider list fine and still runs everything on the CPU.
        missing = [n for n in wanted if n not in self.active_providers]
        self.fell_back = bool(missing)
        if missing:
            msg = f"{self.model_path.name}: asked for {missing}, the session runs on {self.active_providers}"
            if require_providers:
                raise BackendUnavailable(msg)
            log.warning("FALLBACK: %s", msg)
        self._input_names = [i.name for i in self.session.get_inputs()]
        self._output_names = [o.name for o in self.session.get_outputs()]

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(i.name, tuple(i.shape), i.type) for i in self.session.get_inputs()]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(o.name, tuple(o.shape), o.type) for o in self.session.get_outputs()]

    @property
    def device(self) -> str:
        return self.active_providers[0]

    def infer(self, *inputs: np.ndarray) -> list[np.ndarray]:
        check_input_shapes(self.model_path.name, self.inputs, inputs)
        try:
            return self.session.run(self._output_names, dict(zip(self._input_names, inputs, strict=True)))
        except Exception as exc:  # onnxruntime's own error types: type mismatches, bad values
            raise ModelError(f"{self.model_path.name}: inference failed: {exc}") from exc
