"""How many GPUs the REST server's workers may use, asked in gunicorn's master before any fork.

The master must not initialise CUDA (a forked child cannot use a CUDA context made before the fork),
so it asks through NVML, as ``PYTORCH_NVML_BASED_CUDA_CHECK`` makes torch do. The workers then pick
their device themselves (``model_store.resolve_device``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def visible_gpus(requested_device: str) -> int:
    """GPUs that workers asked to run on ``requested_device`` (auto, cpu, cuda, cuda:N) would use."""
    if requested_device == "cpu":
        return 0
    import torch  # not at import time: a CPU-only server never pays for it in the master

    if torch.version.cuda is None:  # a CPU-only build of torch
        return 0
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if not torch.cuda.is_available():
        return 0
    if requested_device.startswith("cuda:"):
        return 1
    return torch.cuda.device_count()


def least_used_gpu(gpus: int, in_use: list[int]) -> int:
    """The GPU index with the fewest workers on it (the lowest such index): one worker per GPU first."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: expected at least one GPU")
    return min(range(gpus), key=lambda index: (in_use.count(index), index))
