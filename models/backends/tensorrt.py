"""Native TensorRT backend for NVIDIA devices (Jetson in production).

Engines are built on the device from the bundle's ONNX (FP16, or INT8 from explicit Q/DQ nodes or a
calibration set and cache), cached on disk keyed by TensorRT version, GPU and ONNX hash, and rebuilt in a
background thread while the previous engine keeps serving. Needs `tensorrt` (JetPack's), `cuda-python` and
`onnx` (the `jetson` extra); without a GPU it refuses to start with BackendUnavailable, and the ONNX Runtime
backend is the one to configure.

TensorRT 10 (JetPack 6) picks kernel precisions from builder flags; TensorRT 11 removed those flags and
the INT8 calibrators: every network is strongly typed, so FP16 comes from an ONNX converted to fp16 and
INT8 only from explicit Q/DQ nodes (`retrain bundle --detector-storage qdq-int8`). `network_source`
decides which, from what the installed TensorRT offers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.backends import PRECISIONS
from models.backends.base import InferenceBackend, TensorSpec
from models.errors import BackendUnavailable, ModelError

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 1 << 30


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable("tensorrt is not installed (it ships with JetPack on Jetson)") from exc
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 layout
        except ImportError as exc:
            raise BackendUnavailable("cuda-python is not installed (pip install cuda-python)") from exc
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        raise BackendUnavailable("no CUDA device is visible to this process")
    return trt, cudart


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise ModelError(f"CUDA call failed: {err}")
    return result[1] if isinstance(result, tuple) and len(result) == 2 else result


def gpu_fingerprint(cudart) -> str:
    props = _check(cudart.cudaGetDeviceProperties(0))
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return f"{name.strip()}-sm{props.major}{props.minor}"


def engine_cache_path(
    onnx_path: Path,
    cache_dir: Path,
    precision: str,
    trt_version: str,
    gpu: str,
    input_shape: tuple[int, ...] | None = None,
) -> Path:
    """Engines are only valid for one TensorRT version on one GPU model (and, from an ONNX with dynamic
    inputs, one pinned input shape): all of it goes into the key."""
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
    safe_gpu = "".join(c if c.isalnum() or c in "-_." else "_" for c in gpu)
    shape = "" if input_shape is None else "-" + "x".join(map(str, input_shape))
    return cache_dir / f"{onnx_path.stem}-{digest}{shape}-{precision}-trt{trt_version}-{safe_gpu}.engine"


def _make_calibrator(trt, cudart, batches: Callable[[], Iterator[np.ndarray]], cache_file: Path):
    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds preprocessed calibration images; the cache makes rebuilds skip calibration."""

        def __init__(self) -> None:
            super().__init__()
            self._it = iter(batches())
            self._first = next(self._it, None)
            self._mem = None
            self._batch = 0 if self._first is None else int(self._first.shape[0])

        def get_batch_size(self) -> int:
            return self._batch

        def get_batch(self, names):
            batch = self._first if self._first is not None else next(self._it, None)
            self._first = None
            if batch is None:
                return None
            batch = np.ascontiguousarray(batch, dtype=np.float32)
            if self._mem is None:
                self._mem = _check(cudart.cudaMalloc(batch.nbytes))
            _check(
                cudart.cudaMemcpy(
                    self._mem, batch.ctypes.data, batch.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
                )
            )
            return [int(self._mem)]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.exists() else None

        def write_calibration_cache(self, cache) -> None:
            cache_file.write_bytes(bytes(cache))

    return EntropyCalibrator()


def strongly_typed(trt) -> bool:
    """TensorRT 11 has no precision flags left: its networks take the types the ONNX gives them."""
    return not hasattr(trt.BuilderFlag, "FP16")


@dataclass(frozen=True)
class NetworkSource:
    """What the builder is given for one precision."""

    onnx: bytes  # the model the parser reads
    flags: tuple[str, ...]  # BuilderFlag names to set (weakly typed TensorRT only)
    calibrate: bool  # an INT8 calibrator must measure the activation ranges


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise BackendUnavailable(
            "the TensorRT backend reads the ONNX graph to choose its precisions: install onnx"
        ) from exc
    return onnx


def has_qdq(onnx_bytes: bytes) -> bool:
    """Whether the model carries its own int8 ranges: QuantizeLinear nodes on activations (compact weight
    storage's Cast and Mul are no quantization: they fold into fp32 weights)."""
    graph = _onnx().load_from_string(onnx_bytes).graph
    return any(n.op_type == "QuantizeLinear" for n in graph.node)


def fp16_onnx(onnx_bytes: bytes) -> bytes:
    """The model computing in fp16 with fp32 inputs and outputs, for a strongly typed engine.

    ONNX Runtime's converter leaves its input casts at the end of the node list; TensorRT's parser wants
    the nodes in topological order, so they are sorted again."""
    onnx = _onnx()
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=True)
    graph = model.graph
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ModelError(f"fp16 graph has nodes whose inputs nothing produces: {waiting[0].name}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def network_source(onnx_bytes: bytes, precision: str, strongly_typed: bool) -> NetworkSource:
    """The model and flags that give `precision` on this TensorRT (see the module docstring)."""
    if precision not in PRECISIONS["tensorrt"]:
        raise ModelError(f"unknown TensorRT precision {precision!r}")
    qdq = has_qdq(onnx_bytes)
    if not strongly_typed:
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("FP16", "INT8")}[precision]
        if qdq and "INT8" not in flags:  # explicit Q/DQ nodes need the flag but bring their own ranges
            flags += ("INT8",)
        return NetworkSource(onnx_bytes, flags, precision == "int8" and not qdq)
    if precision == "fp16" and not qdq:
        return NetworkSource(fp16_onnx(onnx_bytes), (), False)
    if precision == "int8" and not qdq:
        raise ModelError(
            "this TensorRT builds INT8 only from explicit Q/DQ nodes: use a bundle whose detector computes "
            "in int8 (`retrain bundle --detector-storage qdq-int8`), or precision fp16"
        )
    return NetworkSource(onnx_bytes, (), False)  # fp32, or Q/DQ int8 as the model says


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    precision: str = "fp16",
    calibration: Callable[[], Iterator[np.ndarray]] | None = None,
    input_shape: tuple[int, ...] | None = None,
) -> Path:
    """Build and serialise an engine from ONNX. INT8 without Q/DQ nodes needs a calibration batch iterator
    (or its cache), and only TensorRT 10 can use one.

    An ONNX input with dynamic dimensions is pinned to `input_shape` (one optimisation profile, min = opt
    = max): an engine serves one shape best, and the detector then pads frames to it.
    """
    trt, cudart = _import_trt()
    source = network_source(onnx_path.read_bytes(), precision, strongly_typed(trt))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(source.onnx):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    dynamic = [network.get_input(i) for i in range(network.num_inputs)]
    dynamic = [t for t in dynamic if any(d < 0 for d in t.shape)]
    profile = None
    if dynamic:
        if input_shape is None:
            raise ModelError(f"{onnx_path.name} has dynamic input shapes: give the input shape to build for")
        profile = builder.create_optimization_profile()
        for t in dynamic:
            profile.set_shape(t.name, input_shape, input_shape, input_shape)
        config.add_optimization_profile(profile)
    for flag in source.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if source.calibrate:
        cache = engine_path.with_suffix(".calib")
        if calibration is None and not cache.exists():
            raise ModelError("INT8 needs a calibration set (or an existing calibration cache)")
        config.int8_calibrator = _make_calibrator(trt, cudart, calibration or (lambda: iter(())), cache)
        if profile is not None:
            config.set_calibration_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine for {onnx_path.name}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)  # atomic: a half-written engine is never picked up
    return engine_path


class _Engine:
    """A deserialised engine with its device buffers and stream."""

    def __init__(self, trt, cudart, path: Path) -> None:
        self.cudart = cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelError(f"cannot deserialise TensorRT engine {path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cudart.cudaStreamCreate())
        self.io: list[tuple[str, bool, tuple[int, ...], np.dtype]] = []
        self.buffers: dict[str, int] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input and any(d < 0 for d in self.engine.get_tensor_shape(name)):
                # Built for one shape (build_engine's profile): set it, and outputs follow from it.
                self.context.set_input_shape(name, tuple(self.engine.get_tensor_profile_shape(name, 0)[2]))
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"{path.name}: dynamic shape on {name} that no profile fixes")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.io.append((name, is_input, shape, dtype))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self.buffers[name] = _check(cudart.cudaMalloc(nbytes))
            self.context.set_tensor_address(name, int(self.buffers[name]))

    def infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        cu = self.cudart
        ins = [io for io in self.io if io[1]]
        if len(inputs) != len(ins):
            raise ModelError(f"engine takes {len(ins)} inputs, got {len(inputs)}")
        for (name, _, shape, dtype), arr in zip(ins, inputs, strict=True):
            if tuple(arr.shape) != shape:
                raise ModelError(f"input {name} must have shape {shape}, got {tuple(arr.shape)}")
            arr = np.ascontiguousarray(arr, dtype=dtype)
            _check(
                cu.cudaMemcpyAsync(
                    self.buffers[name],
                    arr.ctypes.data,
                    arr.nbytes,
                    cu.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    self.stream,
                )
            )
        if not self.context.execute_async_v3(self.stream):
            raise ModelError("TensorRT execution failed")
        outs = []
        for name, is_input, shape, dtype in self.io:
            if is_input:
                continue
            host = np.empty(shape, dtype)
            _check(
                cu.cudaMemcpyAsync(
                    host.ctypes.data,
                    self.buffers[name],
                    host.nbytes,
                    cu.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    self.stream,
                )
            )
            outs.append(host)
        _check(cu.cudaStreamSynchronize(self.stream))
        return outs

    def close(self) -> None:
        for ptr in self.buffers.values():
            self.cudart.cudaFree(ptr)
        self.cudart.cudaStreamDestroy(self.stream)


class TensorRTBackend(InferenceBackend):
    """Serves a cached engine; `rebuild_in_background` prepares a new one without stopping inference."""

    key = "tensorrt"

    def __init__(
        self,
        model_path: Path,
        precision: str = "fp16",
        cache_dir: Path | None = None,
        calibration: Callable[[], Iterator[np.ndarray]] | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(model_path)
        if precision not in PRECISIONS["tensorrt"]:
            raise BackendUnavailable(f"unknown TensorRT precision {precision!r}")
        self.trt, self.cudart = _import_trt()
        self.precision = precision
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        self.cache_dir = Path(cache_dir or self.model_path.parent / ".engines")
        self._lock = threading.Lock()
        self._builder: threading.Thread | None = None
        self.build_error: Exception | None = None
        self._engine = _Engine(self.trt, self.cudart, self._engine_for(self.model_path, calibration))

    def _engine_for(self, onnx_path: Path, calibration) -> Path:
        gpu = gpu_fingerprint(self.cudart)
        path = engine_cache_path(
            onnx_path, self.cache_dir, self.precision, self.trt.__version__, gpu, self.input_shape
        )
        if not path.exists():
            log.info("building TensorRT %s engine for %s on %s", self.precision, onnx_path.name, gpu)
            build_engine(onnx_path, path, self.precision, calibration, self.input_shape)
        return path

    def rebuild_in_background(
        self, onnx_path: Path, on_ready: Callable[[bool], None] | None = None, calibration=None
    ) -> threading.Thread:
        """Build (or load from cache) an engine for a new ONNX and swap it in atomically when ready."""

        def work() -> None:
            try:
                engine = _Engine(self.trt, self.cudart, self._engine_for(Path(onnx_path), calibration))
            except Exception as exc:  # reported, and the old engine keeps serving
                self.build_error = exc
                log.error("TensorRT rebuild failed, keeping the current engine: %s", exc)
                if on_ready:
                    on_ready(False)
                return
            with self._lock:
                old, self._engine = self._engine, engine
                self.model_path = Path(onnx_path)
            old.close()
            if on_ready:
                on_ready(True)

        self._builder = threading.Thread(target=work, name="trt-build", daemon=True)
        self._builder.start()
        return self._builder

    @property
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec(n, s, str(d)) for n, is_in, s, d in self._engine.io if is_in]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec(n, s, str(d)) for n, is_in, s, d in self._engine.io if not is_in]

    @property
    def device(self) -> str:
        return f"TensorRT {self.trt.__version__} {self.precision} on {gpu_fingerprint(self.cudart)}"

    def infer(self, *inputs: np.ndarray) -> list[np.ndarray]:
        with self._lock:
            return self._engine.infer(list(inputs))

    def close(self) -> None:
        with self._lock:
            self._engine.close()
