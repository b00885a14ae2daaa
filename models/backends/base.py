"""The small interface every inference backend implements (Frigate's detector-plugin pattern)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
