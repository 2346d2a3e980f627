"""Result types shared by the REST and gRPC clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mnist_client import contract


@dataclass(frozen=True)
class Prediction:
    """The model's answer for a batch of N images.

    ``classes``: int64 ``[N]``; ``probabilities``: float32 ``[N, 10]`` (softmax rows);
    ``model_version``: the version that answered, when the server says (gRPC always does; TF Serving's
    REST API does not).
    """

    classes: np.ndarray
    probabilities: np.ndarray
    model_version: int | None = None

    def __len__(self) -> int:
        return int(self.classes.shape[0])


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a signature: TensorFlow dtype name (``"DT_FLOAT"``) and shape (-1 = any size)."""

    dtype: str
    shape: tuple[int, ...] | None  # None: unknown rank


@dataclass(frozen=True)
class ModelMetadata:
    """A served model's signature, as reported by the server."""

    name: str
    version: int | None
    signature_name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    method_name: str = ""
    raw: Any = field(default=None, repr=False, compare=False)  # the decoded server answer

    def signature(self) -> dict[str, dict[str, dict[str, object]]]:
        """The signature in :func:`mnist_client.contract.signature`'s form, for direct comparison."""

        def as_dict(specs: dict[str, TensorSpec]) -> dict[str, dict[str, object]]:
            return {
                name: {"dtype": spec.dtype, "shape": None if spec.shape is None else list(spec.shape)}
                for name, spec in specs.items()
            }

        return {"inputs": as_dict(self.inputs), "outputs": as_dict(self.outputs)}

    def matches_contract(self) -> bool:
        """Whether the served signature is exactly the model contract's."""
        return self.signature() == contract.signature()


@dataclass(frozen=True)
class ModelVersionStatus:
    """State of one model version (TF Serving's ModelVersionStatus)."""

    version: int
    state: str  # "START", "LOADING", "AVAILABLE", "UNLOADING", "END" or "UNKNOWN"
    error_code: str = "OK"
    error_message: str = ""

    @property
    def available(self) -> bool:
        return self.state == "AVAILABLE"
