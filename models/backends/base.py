"""The small interface every inference backend implements (Frigate's detector-plugin pattern)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str | None, ...]  # None or a string for a dynamic axis
    dtype: str


class InferenceBackend(ABC):
    """Runs one exported network. Pre- and post-processing stay outside, in the model classes."""

    #: The configuration key that selects this backend (e.g. `edge.backend: onnxruntime`).
    key: str = ""

    def __init__(self, model_path: Path) -> None:
        self.model_path = Path(model_path)

    @property
    @abstractmethod
    def inputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def outputs(self) -> list[TensorSpec]: ...

    @property
    @abstractmethod
    def device(self) -> str:
        """What really runs the network, e.g. 'CPUExecutionProvider' or 'TensorRT 10.3 FP16 on Orin'."""

    @abstractmethod
    def infer(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Run the network on the given input arrays (in input order); returns the outputs in order."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release native resources."""


def check_input_shapes(model_name: str, specs: list[TensorSpec], inputs: tuple[np.ndarray, ...]) -> None:
    """Refuse inputs of the wrong count or shape with their names, before a runtime says it cryptically."""
    if len(inputs) != len(specs):
        raise ModelError(f"{model_name} takes {len(specs)} inputs, got {len(inputs)}")
    for spec, arr in zip(specs, inputs, strict=True):
        want = spec.shape
        if len(want) != arr.ndim or any(
            isinstance(w, int) and w != g for w, g in zip(want, arr.shape, strict=True)
        ):
            raise ModelError(f"{model_name}: input {spec.name} must have shape {want}, got {arr.shape}")
