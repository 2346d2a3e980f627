"""The GPU check's child processes: each framework's part runs, and is observed, in a process of its own.

    python -m bench.gpu_check.child probe-torch --result FILE
    python -m bench.gpu_check.child probe-tf --result FILE
    python -m bench.gpu_check.child train-torch --result FILE -- <training.train_torch flags>
    python -m bench.gpu_check.child train-tf --result FILE -- <training.train_tf flags>
    python -m bench.gpu_check.child rest-worker-memory --result FILE    (MNIST_REST_* from the environment)

Each writes one JSON object to FILE. The device a part used is read in the process that used it: the
trainer's own summary and the CUDA allocator's peak for PyTorch; for TensorFlow, which GPUs it could see
and whether its allocator on GPU:0 was ever used (``tf.config.list_physical_devices``,
``tf.config.experimental.get_memory_info``). One process per framework also keeps PyTorch's and
TensorFlow's CUDA libraries (different CUDA releases) out of each other's way.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.gpu_check.observe import MIB, gpu_memory_by_pid
from bench.gpu_check.settings import LARGEST_REQUEST

log = logging.getLogger("bench.gpu_check.child")

TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu")


def probe_torch(argv: list[str]) -> dict[str, Any]:
    """PyTorch's build and the CUDA devices it sees."""
    import torch

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append({"index": index, "name": props.name, "memory_mib": round(props.total_memory / MIB),
                            "capability": f"{props.major}.{props.minor}"})
    return {"version": torch.__version__, "cuda_build": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "devices": devices}


def installed(names: tuple[str, ...]) -> dict[str, str]:
    """The installed distributions among ``names``, with their versions."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def probe_tf(argv: list[str]) -> dict[str, Any]:
    """TensorFlow's build (which distribution, built with CUDA or not) and the GPUs it sees."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {
        "version": tf.__version__,
        "distributions": installed(TF_DISTRIBUTIONS),
        "built_with_cuda": bool(tf.test.is_built_with_cuda()),
        "gpus": [{"name": gpu.name, "device_name": tf.config.experimental.get_device_details(gpu).get("device_name")}
                 for gpu in gpus],
    }


def train_torch(argv: list[str]) -> dict[str, Any]:
    """training.train_torch as ``make train-torch`` runs it, and the device it trained on."""
    import torch

    from training import train_torch as trainer

    summary = trainer.main(argv)
    device = torch.device(summary["device"])
    result: dict[str, Any] = {"summary": summary, "device": str(device)}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        result["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
    return result


def train_tf(argv: list[str]) -> dict[str, Any]:
    """training.train_tf as ``make train-tf`` runs it, and whether it computed on a GPU: TensorFlow places
    ops on its first visible GPU when it sees one; the GPU allocator's peak says whether it did."""
    import tensorflow as tf

    from training import train_tf as trainer

    summary = trainer.main(argv)
    visible = tf.config.get_visible_devices("GPU")
    result: dict[str, Any] = {
        "summary": summary,
        "built_with_cuda": bool(tf.test.is_built_with_cuda()),
        "visible_gpus": [gpu.name for gpu in visible],
        "device": "CPU",
    }
    if visible:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"]
        result["peak_gpu_memory_mib"] = round(peak / MIB, 1)
        if peak > 0:
            result["device"] = "GPU:0"
            result["device_name"] = tf.config.experimental.get_device_details(visible[0]).get("device_name")
    return result


def rest_worker_memory(argv: list[str]) -> dict[str, Any]:
    """One REST worker as gunicorn starts it (``create_app`` with the MNIST_REST_* settings of this
    process's environment), and the memory it holds: after loading (the model, its optimised copy and
    their warm-up), then after answering a request of 1 image, of the micro-batcher's largest batch and
    of the largest request. On CUDA: the caching allocator's figures (``torch.cuda.memory_allocated`` /
    ``memory_reserved``; reserved memory stays with the worker) and nvidia-smi's for the whole process,
    its CUDA context included. On the CPU: no GPU memory, the process's resident memory only."""
    import numpy as np
    import psutil
    import torch

    from mnist_client import contract
    from serving.torch_server.app import create_app
    from serving.torch_server.codecs import NPY_CONTENT_TYPE
    from serving.torch_server.config import ServerConfig
    from serving.torch_server.model_store import resolve_device

    config = ServerConfig.load()
    device = resolve_device(config.device)
    app = create_app()
    client = app.test_client()
    cuda = device.type == "cuda"

    def snapshot(label: str, images: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"after": label, "images": images,
                                 "rss_mib": round(psutil.Process().memory_info().rss / MIB, 1)}
        if cuda:
            torch.cuda.synchronize(device)
            entry.update(allocated_mib=round(torch.cuda.memory_allocated(device) / MIB, 1),
                         reserved_mib=round(torch.cuda.memory_reserved(device) / MIB, 1),
                         peak_allocated_mib=round(torch.cuda.max_memory_allocated(device) / MIB, 1))
            torch.cuda.reset_peak_memory_stats(device)
        return entry

    steps = [snapshot("load and warm-up", 0)]
    sizes = sorted({1, config.batch_max_size, min(LARGEST_REQUEST, config.max_batch)})
    for size in sizes:
        body = io.BytesIO()
        np.save(body, np.zeros((size, *contract.IMAGE_SHAPE), dtype=np.uint8))
        response = client.post(f"/v1/models/{config.model_name}:predict", data=body.getvalue(),
                                content_type=NPY_CONTENT_TYPE)
        if response.status_code != 200:
            raise RuntimeError(f"a request of {size} images answered {response.status_code}: {response.get_data()!r}")
        steps.append(snapshot(f"a request of {size} image{'' if size == 1 else 's'}", size))
    result: dict[str, Any] = {"device": str(device), "steps": steps, "batch_max_size": config.batch_max_size}
    if cuda:
        by_pid = gpu_memory_by_pid()
        result["nvidia_smi_process_mib"] = None if by_pid is None else by_pid.get(os.getpid())
    return result


COMMANDS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "probe-torch": probe_torch,
    "probe-tf": probe_tf,
    "train-torch": train_torch,
    "train-tf": train_tf,
    "rest-worker-memory": rest_worker_memory,
}


def _plain(value: Any) -> Any:
    """numpy scalars (the trainers' summaries hold some) as Python numbers; anything else as text."""
    return value.item() if hasattr(value, "item") else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check.child", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write the result to")
    argv = sys.argv[1:] if argv is None else argv
    # Everything after "--" is the trainer's (train-*), parsed by the trainer itself.
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    rest = argv[split + 1 :]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    result = COMMANDS[args.command](rest)
    args.result.write_text(json.dumps(result, indent=2, default=_plain) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
