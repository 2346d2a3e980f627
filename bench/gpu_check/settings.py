"""What the GPU check serves with, written once: the REST server's GPU settings and the stand-in's batching.

The REST server on a GPU runs one gunicorn worker (one CUDA context and one model copy per GPU, instead
of one per CPU core), many request threads, and the micro-batcher, so that concurrent single-image
requests share a forward pass: on a GPU a pass of 64 images costs about what a pass of 1 costs.
docker-compose.yml's torch-rest service runs the same values (tests/test_gpu_check.py checks that they
agree). The check passes them explicitly, so what it measures does not depend on the server's defaults.

The stand-in batches with TF Serving's parameters files, as the tf-serving service does: the GPU file on
a GPU, the CPU file on the CPU (serving/tfserving/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

REPO_ROOT: Final = Path(__file__).resolve().parents[2]

# MNIST_REST_* settings of the PyTorch REST server on a GPU (docs/rest-server.md names each).
REST_GPU_ENV: Final[dict[str, str]] = {
    "MNIST_REST_WORKERS": "1",  # one worker per GPU; the check and compose give a server one GPU
    "MNIST_REST_THREADS": "64",  # gthread: up to 64 requests in the worker at once, to batch together
    "MNIST_REST_BATCHING": "on",
    "MNIST_REST_BATCH_MAX_SIZE": "64",
}

TFSERVING_DIR: Final = REPO_ROOT / "serving" / "tfserving"
STANDIN_BATCHING_FILES: Final[dict[str, Path]] = {
    "cuda": TFSERVING_DIR / "batching_parameters.txt",
    "cpu": TFSERVING_DIR / "batching_parameters_cpu.txt",
}

# The three load levels, the load tester's closed loop (requests in flight).
CONCURRENCY: Final = (1, 16, 64)
# The largest request the REST server accepts by default: the worker's memory is measured after one.
LARGEST_REQUEST: Final = 1024
# A served model answering well above chance (0.1) on the load tester's labelled images: below this a
# device gives wrong answers. Quick models (--quick) reach about 0.92, a full epoch about 0.98.
MIN_ACCURACY: Final = 0.8


def standin_flags(device_kind: str) -> list[str]:
    """The stand-in's batching flags for ``cuda`` or ``cpu``: TF Serving's parameters file for that device."""
    return ["--enable_batching=true", f"--batching_parameters_file={STANDIN_BATCHING_FILES[device_kind]}"]
