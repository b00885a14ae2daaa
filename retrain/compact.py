"""Ship ONNX weights small: compact storage, fp32 compute.

Large Conv / Gemm / MatMul weights are stored as int8 (one fp32 scale per output channel, turned back
into fp32 by a `Cast` and a `Mul`) or as float16 (a `Cast`). Those nodes have only constant inputs, so
ONNX Runtime (and TensorRT's parser) fold them away when the session is created: the device downloads and
verifies a much smaller file, then runs exactly the fp32 graph it would have run with the rounded weights.
Nothing at run time needs to know about it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHT_INPUTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
MIN_ELEMENTS = 1024  # smaller tensors (biases, small kernels) stay fp32
STORAGES = ("int8", "float16")


def compact_weights(
    src: Path,
    dst: Path,
    storage: str = "int8",
    min_elements: int = MIN_ELEMENTS,
    keep_ends: int = 1,
) -> dict:
    """Write `src` to `dst` with its weights stored as `storage`; returns what was done (for the manifest).

    "int8" (per output channel) is about a quarter of the size, for models whose outputs are robust to
    it, like a detector's boxes; "float16" is half the size and near-lossless, for an embedding that must
    tell look-alikes apart. The first and last `keep_ends` weight layers stay fp32 (the stem sees raw
    pixels, the head writes the output)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if storage not in STORAGES:
        raise ValueError(f"weight storage must be one of {STORAGES}, not {storage!r}")
    model = onnx.load(str(src))
    graph = model.graph
    users: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            users.setdefault(name, []).append((node, k))
    layers = [n.input[WEIGHT_INPUTS[n.op_type]] for n in graph.node if n.op_type in WEIGHT_INPUTS]
    keep = set(layers[:keep_ends] + layers[len(layers) - keep_ends :])
    new_nodes: list[onnx.NodeProto] = []
    converted, before, after = 0, 0, 0
    for tensor in list(graph.initializer):
        name = tensor.name
        w = numpy_helper.to_array(tensor)
        before += w.nbytes
        uses = users.get(name, [])
        as_weight = bool(uses) and all(WEIGHT_INPUTS.get(n.op_type) == k for n, k in uses)
        if not as_weight or name in keep or w.dtype != np.float32 or w.size < min_elements or w.ndim < 2:
            after += w.nbytes
            continue
        graph.initializer.remove(tensor)
        if storage == "float16":
            half = w.astype(np.float16)
            graph.initializer.append(numpy_helper.from_array(half, f"{name}__f16"))
            new_nodes.append(helper.make_node("Cast", [f"{name}__f16"], [name], to=TensorProto.FLOAT))
            after += half.nbytes
        else:
            q, scale = _int8_per_channel(w, _output_axis(w, [n for n, _ in uses]))
            graph.initializer.extend(
                [numpy_helper.from_array(q, f"{name}__i8"), numpy_helper.from_array(scale, f"{name}__scale")]
            )
            new_nodes += [
                helper.make_node("Cast", [f"{name}__i8"], [f"{name}__i8f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{name}__i8f", f"{name}__scale"], [name]),
            ]
            after += q.nbytes + scale.nbytes
        converted += 1
    nodes = new_nodes + list(graph.node)  # the decoding nodes first: the graph stays topologically sorted
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {
        "storage": storage,
        "decoded": "to fp32 by constant folding when the session is created",
        "tensors": converted,
        "weight_bytes_fp32": int(before),
        "weight_bytes_stored": int(after),
    }


def _output_axis(w: np.ndarray, nodes: list) -> int:
    """Axis 0 for Conv weights and Gemm with transB=1; the last axis for MatMul and plain Gemm."""
    for n in nodes:
        trans_b = any(a.name == "transB" and a.i == 1 for a in n.attribute)
        if n.op_type == "MatMul" or (n.op_type == "Gemm" and not trans_b):
            return w.ndim - 1
    return 0


def _int8_per_channel(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    scale = np.abs(w).max(axis=reduce, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)
