"""Healthcheck of the TF Serving stand-in image: exit 0 when a version of the model is AVAILABLE.

The real image's probe (docker/tfserving-healthcheck.sh) asks TF Serving's REST API; this asks the
same question over gRPC (ModelService/GetModelStatus on TFS_GRPC_PORT, for TFS_MODEL_NAME) through
the client package the image already carries. The
stand-in answers NOT_FOUND until a version has loaded and warmed up, so the container turns healthy
only once it can serve predictions.
"""

from __future__ import annotations

import os
import sys

from mnist_client.errors import MnistClientError
from mnist_client.grpc_client import GrpcClient


def main() -> int:
    port = os.environ.get("TFS_GRPC_PORT", "")
    model = os.environ.get("TFS_MODEL_NAME", "")
    if not port.isdigit() or not model:
        print(
            f"unhealthy: TFS_GRPC_PORT is {port!r} and TFS_MODEL_NAME is {model!r}; "
            "expected the gRPC port number and the served model's name",
            file=sys.stderr,
        )
        return 1
    host = os.environ.get("TFS_HEALTHCHECK_HOST", "127.0.0.1")
    timeout_s = float(os.environ.get("TFS_HEALTHCHECK_TIMEOUT_S", "4"))
    target = f"{host}:{port}"
    try:
        with GrpcClient(target, model_name=model, timeout=timeout_s) as client:
            versions = client.model_status()
    except MnistClientError as exc:  # unreachable, model not found yet, deadline
        print(f"unhealthy: GetModelStatus({model}) on {target} failed: {exc}", file=sys.stderr)
        return 1
    available = [v.version for v in versions if v.available]
    if not available:
        states = ", ".join(f"{v.version}: {v.state}" for v in versions) or "none"
        print(f"unhealthy: model {model} has no version AVAILABLE yet (versions {states})", file=sys.stderr)
        return 1
    print(f"healthy: model {model} version(s) {available} AVAILABLE on {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
