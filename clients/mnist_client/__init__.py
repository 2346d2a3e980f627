"""Client package for the MNIST serving stack (REST and gRPC), with its load tester.

    from mnist_client import RestClient, GrpcClient

    with RestClient("http://127.0.0.1:8080") as client:
        prediction = client.predict(images)   # images: [N, 28, 28] float in [0, 1] or uint8
        prediction.classes, prediction.probabilities

The clients are imported lazily, so that ``import mnist_client`` stays cheap and a REST-only user never
loads grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "RestClient": "mnist_client.rest",
    "GrpcClient": "mnist_client.grpc_client",
    "Prediction": "mnist_client.prediction",
    "ModelMetadata": "mnist_client.prediction",
    "ModelVersionStatus": "mnist_client.prediction",
    "RetryPolicy": "mnist_client.retry",
    "to_model_input": "mnist_client.inputs",
    "MnistClientError": "mnist_client.errors",
    "ClientConfigError": "mnist_client.errors",
    "InvalidInputError": "mnist_client.errors",
    "ServerError": "mnist_client.errors",
    "DeadlineExceededError": "mnist_client.errors",
    "UnavailableError": "mnist_client.errors",
    "ProtocolError": "mnist_client.errors",
}

if TYPE_CHECKING:
    from mnist_client.errors import (
        ClientConfigError,
        DeadlineExceededError,
        InvalidInputError,
        MnistClientError,
        ProtocolError,
        ServerError,
        UnavailableError,
    )
    from mnist_client.grpc_client import GrpcClient
    from mnist_client.inputs import to_model_input
    from mnist_client.prediction import ModelMetadata, ModelVersionStatus, Prediction
    from mnist_client.rest import RestClient
    from mnist_client.retry import RetryPolicy


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mnist_client' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "ClientConfigError",
    "DeadlineExceededError",
    "GrpcClient",
    "InvalidInputError",
    "MnistClientError",
    "ModelMetadata",
    "ModelVersionStatus",
    "Prediction",
    "ProtocolError",
    "RestClient",
    "RetryPolicy",
    "ServerError",
    "UnavailableError",
    "to_model_input",
]
