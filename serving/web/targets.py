"""The model servers the page compares, each reached through the client package (REST or gRPC).

Each answer is timed here, around the client call, so the page shows the round trip as this backend
saw it: encoding, network, the server's work and decoding. Targets are asked one after the other, not
at once: on a small machine concurrent calls would compete for the same cores and inflate each other's
times. A target that fails becomes an entry with ``"error"``; the others still answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from mnist_client.errors import MnistClientError
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from mnist_client.retry import NO_RETRIES
from serving.web.config import TargetSpec

log = logging.getLogger(__name__)

# gRPC backs off up to 2 minutes between reconnects by default; a page should see a restarted server soon.
_GRPC_RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000))


class Target:
    """One serving target with its client (thread-safe, shared by the request threads)."""

    def __init__(self, spec: TargetSpec, timeout_s: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.client: RestClient | GrpcClient
        if spec.protocol == "rest":
            # JSON, not .npy: TF Serving's REST API takes JSON only, and one image is small either way.
            self.client = RestClient(spec.address, timeout=timeout_s, binary=False, retry=NO_RETRIES)
        else:
            self.client = GrpcClient(
                spec.address, timeout=timeout_s, retry=NO_RETRIES, channel_options=_GRPC_RECONNECT_OPTIONS
            )

    def describe(self) -> dict[str, str]:
        return {"target": self.spec.name, "framework": self.spec.framework, "protocol": self.spec.protocol}

    def predict(self, image: np.ndarray) -> dict[str, Any]:
        """One ``[28, 28]`` float32 image -> the page's entry: class, probabilities, latency, or error."""
        entry: dict[str, Any] = self.describe()
        started = time.perf_counter()
        try:
            prediction = self.client.predict(image)
        except MnistClientError as error:
            log.info("%s failed: %s", self.spec.name, error)
            entry["error"] = str(error)
            return entry
        latency_ms = (time.perf_counter() - started) * 1000.0
        entry["class"] = int(prediction.classes[0])
        entry["probabilities"] = [float(p) for p in prediction.probabilities[0]]
        entry["latency_ms"] = round(latency_ms, 3)
        return entry

    def status(self) -> dict[str, Any]:
        """The target's description, its address and whether it is ready to predict now."""
        return {**self.describe(), "address": self.spec.address, "ready": self.client.ready(timeout=self.timeout_s)}

    def close(self) -> None:
        self.client.close()
