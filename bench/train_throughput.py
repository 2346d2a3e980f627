"""Training throughput (images/s) of the PyTorch and the Keras CNN, same batch size, measured in one run.

PyTorch: ``training.model_torch.Net`` driven by ``training.train_torch.train_step``
(Adam, cross-entropy). TensorFlow: ``training.model_tf.build_model`` compiled
with Adam and sparse categorical cross-entropy on logits, driven by
``train_on_batch`` (the compiled Keras train function). Both train on the same
real MNIST batches, normalised up front, with the same number of CPU threads,
and both hand the loss back to Python every step. After a warm-up, timed
windows of ``--steps`` steps alternate between the frameworks (so a change in
machine load hits both) and the median of ``--repeats`` windows is reported::

    python -m bench.train_throughput                 # table + bench/results/train_throughput.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.results import write_result
from mnist_client import contract, mnist_data
from mnist_client.cpus import usable_cpus
from training.cli import positive_int

log = logging.getLogger("bench.train_throughput")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "train_throughput"
FRAMEWORKS = ("pytorch", "tensorflow")
LEARNING_RATE = 1e-3  # does not change the cost of a step; any sane value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_throughput",
        description="Training images/s of the PyTorch and the Keras CNN at the same batch size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument(
        "--models-dir", type=Path, default=REPO_ROOT / "models", help="unused; accepted because bench.run_all passes it"
    )
    parser.add_argument("--batch-size", type=positive_int, default=128, help="images per step, both frameworks")
    parser.add_argument("--steps", type=positive_int, default=20, help="training steps per timed window")
    parser.add_argument("--warmup-steps", type=positive_int, default=5, help="untimed steps first, per framework")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed windows per framework (median kept)")
    parser.add_argument("--threads", type=positive_int, default=usable_cpus(), help="intra-op threads, both")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: as mnist_client.mnist_data finds it)")
    return parser


def load_batches(data_dir: str | None, batch_size: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` distinct batches of real training images, normalised, NHWC float32 ``[B, 28, 28, 1]``."""
    train = mnist_data.load_split("train", data_dir)
    needed = batch_size * count
    if needed > len(train):
        raise ValueError(f"{count} batches of {batch_size} need {needed} images; MNIST has {len(train)}")
    x = (train.scaled()[:needed] - contract.NORMALIZE_MEAN) / contract.NORMALIZE_STD
    x = x.astype(np.float32).reshape(count, batch_size, *contract.IMAGE_SHAPE, 1)  # [count, B, 28, 28, 1]
    y = train.labels[:needed].astype(np.int64).reshape(count, batch_size)
    return list(zip(x, y))


def torch_stepper(batches: list[tuple[np.ndarray, np.ndarray]], threads: int) -> Callable[[int], None]:
    """A function running ``n`` PyTorch training steps over the batches, round robin."""
    import torch

    from training.model_torch import Net
    from training.train_torch import train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = Net().train()
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    # NHWC -> NCHW [B, 1, 28, 28], converted once so the loop times training only
    tensors = [
        (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(y)) for x, y in batches
    ]
    position = 0

    def run(n: int) -> None:
        nonlocal position
        for _ in range(n):
            x, y = tensors[position % len(tensors)]
            loss, _ = train_step(net, optimizer, x, y)
            loss.item()
            position += 1

    return run


def keras_stepper(batches: list[tuple[np.ndarray, np.ndarray]], threads: int) -> Callable[[int], None]:
    """A function running ``n`` Keras training steps over the batches, round robin."""
    import tensorflow as tf

    from training.model_tf import build_model

    try:  # only possible before TensorFlow runs its first op in this process
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        log.warning(
            "TensorFlow was already initialised in this process: its thread pools keep their sizes (intra-op %d)",
            tf.config.threading.get_intra_op_parallelism_threads(),
        )
    tf.keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate=LEARNING_RATE),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tensors = [(tf.constant(x), tf.constant(y)) for x, y in batches]
    position = 0

    def run(n: int) -> None:
        nonlocal position
        for _ in range(n):
            x, y = tensors[position % len(tensors)]
            model.train_on_batch(x, y)  # returns the loss as a Python float: a sync per step, as in PyTorch
            position += 1

    return run


def measure(args: argparse.Namespace) -> dict[str, Any]:
    batches = load_batches(args.data_dir, args.batch_size, min(args.steps, 60_000 // args.batch_size))
    steppers = {"pytorch": torch_stepper(batches, args.threads), "tensorflow": keras_stepper(batches, args.threads)}
    for name, run in steppers.items():
        log.info("warming up %s (%d steps)", name, args.warmup_steps)
        run(args.warmup_steps)
    windows: dict[str, list[float]] = {name: [] for name in FRAMEWORKS}
    for repeat in range(args.repeats):
        # Alternate which framework goes first so drifting machine load does not favour one.
        order = FRAMEWORKS if repeat % 2 == 0 else FRAMEWORKS[::-1]
        for name in order:
            started = time.perf_counter()
            steppers[name](args.steps)
            seconds = time.perf_counter() - started
            windows[name].append(args.steps * args.batch_size / seconds)
            log.info("repeat %d/%d %s: %.0f images/s", repeat + 1, args.repeats, name, windows[name][-1])
    return {
        name: {
            "images_per_second": round(statistics.median(ips), 1),
            "min_images_per_second": round(min(ips), 1),
            "max_images_per_second": round(max(ips), 1),
            "windows_images_per_second": [round(v, 1) for v in ips],
        }
        for name, ips in windows.items()
    }


def _versions() -> dict[str, str]:
    import tensorflow as tf
    import torch

    return {"torch": torch.__version__, "tensorflow": tf.__version__, "python": platform.python_version()}


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def format_table(result: dict[str, Any]) -> str:
    rows = [f"{'framework':<12}{'batch':>7}{'images/s (median)':>20}{'min':>9}{'max':>9}"]
    for name in FRAMEWORKS:
        r = result["frameworks"][name]
        rows.append(
            f"{name:<12}{result['batch_size']:>7}{r['images_per_second']:>20,.0f}"
            f"{r['min_images_per_second']:>9,.0f}{r['max_images_per_second']:>9,.0f}"
        )
    ratio, threads = result["ratio_tensorflow_over_pytorch"], result["threads"]
    rows.append(f"tensorflow / pytorch: {ratio:.2f}x  ({threads} threads each)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    load_before = _load_average()
    frameworks = measure(args)
    result = {
        "benchmark": NAME,
        "batch_size": args.batch_size,
        "steps_per_window": args.steps,
        "warmup_steps": args.warmup_steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpus": usable_cpus(),
        "platform": platform.platform(),
        # Other work on the machine skews both; PyTorch's OpenMP threads suffer most from oversubscription.
        "load_average_1min": {"before": load_before, "after": _load_average()},
        "versions": _versions(),
        "frameworks": frameworks,
        "ratio_tensorflow_over_pytorch": round(
            frameworks["tensorflow"]["images_per_second"] / frameworks["pytorch"]["images_per_second"], 3
        ),
    }
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
