"""In-process inference of both exported models: the floor that serving overhead is measured against.

Loads the latest TorchScript and SavedModel versions (``torch.jit.load``, as the
REST server does; ``tf.saved_model.load`` and its ``serving_default`` signature,
called eagerly as a Python application would, where TF Serving and the stand-in
run the graph through a Session, cheaper per call at batch 1) and calls them
directly on real MNIST test images, numpy in and numpy out:

- latency at batch 1 and batch 64: median and p99 of many timed calls after warm-up;
- throughput at batch 256: images/s over a run of back-to-back calls.

Each measurement makes its number of calls or stops after ``MAX_SECONDS_PER_MEASURE``
(busy machines), whichever comes first; the JSON records the calls made.

Threads: TorchScript runs with ``torch.set_num_threads(1)``, as each gunicorn
worker of the REST server does. TensorFlow runs with its default thread pools
(intra-op = inter-op = all cores), as TF Serving does unless told otherwise;
``--tf-threads N`` pins both pools to N, which only takes effect while
TensorFlow has not started in this process yet (the JSON records what was in
force). The REST and gRPC server benchmarks import :func:`measure_torch` and
:func:`measure_tf` to put this floor beside their own figures in one run::

    python -m bench.inprocess                     # table + bench/results/inprocess.json
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.results import write_result
from mnist_client import contract
from serving.model_repository import latest_version
from training import mnist_data
from training.cli import positive_int

log = logging.getLogger("bench.inprocess")

REPO_ROOT = Path(__file__).resolve().parent.parent
NAME = "inprocess"
LATENCY_BATCHES = (1, 64)
THROUGHPUT_BATCH = 256
# Timed calls per batch size: enough for a stable p99 while the whole bench stays well under a minute.
DEFAULT_CALLS = {1: 2000, 64: 300, THROUGHPUT_BATCH: 60}
# On a busy machine a measurement stops after this long (with at least MIN_CALLS); the JSON says how many ran.
MAX_SECONDS_PER_MEASURE = 10.0
MIN_CALLS = 20
WARMUP_CALLS = 20
ACCURACY_EXAMPLES = 1000  # sanity check that the measured model is the real, trained one

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# --- locating and loading the models -----------------------------------------------------------------


def resolve_version_dir(model_dir: str | os.PathLike[str], payload: str) -> Path:
    """A version folder holding ``payload``; a model base path (``models/tf/mnist``) means its latest version."""
    path = Path(model_dir)
    if (path / payload).is_file():
        return path
    latest = latest_version(path)
    if latest is not None and (path / str(latest) / payload).is_file():
        return path / str(latest)
    raise FileNotFoundError(
        f"{path}: no {payload} here or in its latest version folder; expected a version folder such as "
        f"models/<framework>/{contract.MODEL_NAME}/1 or its base path (run `make train` first)"
    )


def load_torchscript(model_dir: str | os.PathLike[str]) -> tuple[Predict, Path]:
    import torch

    version_dir = resolve_version_dir(model_dir, contract.TORCHSCRIPT_FILENAME)
    module = torch.jit.load(str(version_dir / contract.TORCHSCRIPT_FILENAME), map_location="cpu").eval()

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(images))
        return out[contract.PROBABILITIES_NAME].numpy(), out[contract.CLASSES_NAME].numpy()

    return predict, version_dir


def load_saved_model(model_dir: str | os.PathLike[str]) -> tuple[Predict, Path]:
    import tensorflow as tf

    version_dir = resolve_version_dir(model_dir, contract.SAVED_MODEL_FILENAME)
    loaded = tf.saved_model.load(str(version_dir))
    signature = loaded.signatures[contract.SIGNATURE_NAME]

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        _ = loaded  # the signature only holds weak references to the variables; keep the object alive
        out = signature(**{contract.INPUT_NAME: tf.constant(images)})
        return out[contract.PROBABILITIES_NAME].numpy(), out[contract.CLASSES_NAME].numpy()

    return predict, version_dir


# --- measuring ---------------------------------------------------------------------------------------


def mnist_test_images() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real MNIST test images as the contract wants them (float32 pixel/255), and labels."""
    split = mnist_data.load_split("test")
    return split.scaled(), split.labels


def _batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Distinct contiguous batches of real images, cycled through by the timed calls."""
    if len(images) < batch:
        raise ValueError(f"{len(images)} images cannot fill a batch of {batch}")
    return [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]


def latency(predict: Predict, images: np.ndarray, batch: int, calls: int) -> dict[str, float]:
    """Median and p99 wall time of single ``predict`` calls at ``batch`` images, after a warm-up."""
    batches = _batches(images, batch)
    for i in range(WARMUP_CALLS):
        predict(batches[i % len(batches)])
    samples = np.empty(calls)
    deadline = time.perf_counter() + MAX_SECONDS_PER_MEASURE
    done = 0
    while done < calls and (done < MIN_CALLS or time.perf_counter() < deadline):
        x = batches[done % len(batches)]
        started = time.perf_counter_ns()
        predict(x)
        samples[done] = time.perf_counter_ns() - started
        done += 1
    ms = samples[:done] / 1e6
    return {
        "median_ms": round(float(np.median(ms)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "min_ms": round(float(ms.min()), 4),
        "calls": done,
    }


def throughput(predict: Predict, images: np.ndarray, batch: int, calls: int) -> dict[str, float]:
    """Images/s over ``calls`` back-to-back ``predict`` calls at ``batch`` images, after a warm-up."""
    batches = _batches(images, batch)
    for i in range(min(WARMUP_CALLS, calls)):
        predict(batches[i % len(batches)])
    started = time.perf_counter()
    deadline = started + MAX_SECONDS_PER_MEASURE
    done = 0
    while done < calls and (done < MIN_CALLS or time.perf_counter() < deadline):
        predict(batches[done % len(batches)])
        done += 1
    seconds = time.perf_counter() - started
    return {"images_per_second": round(done * batch / seconds, 1), "calls": done, "seconds": round(seconds, 3)}


def model_only_ceiling(cpus: int, model_ms: float, caller_cpu_us: float) -> float:
    """Calls/s if each call cost only the model's batch-1 run and the caller's own CPU, on every core.

    The serving benchmarks' upper bound: no server, however thin, passes it on this machine with this
    model, so a target above it is out of reach here whatever the serving code does.
    """
    return round(cpus * 1000 / (model_ms + caller_cpu_us / 1000), 1)


def accuracy(predict: Predict, images: np.ndarray, labels: np.ndarray) -> float:
    _, classes = predict(np.ascontiguousarray(images[:ACCURACY_EXAMPLES]))
    return round(float(np.mean(classes == labels[:ACCURACY_EXAMPLES])), 4)


def _measure(
    predict: Predict, images: np.ndarray, labels: np.ndarray, calls: dict[int, int] | None
) -> dict[str, Any]:
    calls = {**DEFAULT_CALLS, **(calls or {})}
    return {
        "accuracy_first_1000": accuracy(predict, images, labels),
        "latency": {str(b): latency(predict, images, b, calls[b]) for b in LATENCY_BATCHES},
        "throughput": {
            "batch_size": THROUGHPUT_BATCH,
            **throughput(predict, images, THROUGHPUT_BATCH, calls[THROUGHPUT_BATCH]),
        },
    }


def measure_torch(
    model_dir: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    threads: int = 1,
    calls: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Latency (batch 1, 64) and throughput (batch 256) of the TorchScript model, in this process.

    ``model_dir`` is a version folder or the base path (latest version used). ``images``
    default to the real MNIST test set. ``calls`` overrides timed calls per batch size.
    The torch thread count is set to ``threads`` for the measurement and restored after.
    """
    import torch

    predict, version_dir = load_torchscript(model_dir)
    if images is None or labels is None:
        images, labels = mnist_test_images()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result = _measure(predict, images, labels, calls)
    finally:
        torch.set_num_threads(previous)
    return {
        "framework": "pytorch",
        "model_dir": str(version_dir),
        "version": int(version_dir.name),
        "threads": {"intra_op": threads},
        **result,
    }


def measure_tf(
    model_dir: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    threads: int | None = None,
    calls: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Latency (batch 1, 64) and throughput (batch 256) of the SavedModel's signature, in this process.

    ``threads=None`` keeps TensorFlow's thread pools as they are (by default one
    thread per core). A number pins the intra- and inter-op pools, which is only
    possible before TensorFlow has started; otherwise the pools in force are kept
    and a warning is logged. The result records the pools actually used.
    """
    import tensorflow as tf

    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            log.warning("TensorFlow already started in this process; keeping its thread pools, not %d", threads)
    predict, version_dir = load_saved_model(model_dir)
    if images is None or labels is None:
        images, labels = mnist_test_images()
    result = _measure(predict, images, labels, calls)
    return {
        "framework": "tensorflow",
        "model_dir": str(version_dir),
        "version": int(version_dir.name),
        "threads": _tf_threads(),
        **result,
    }


def _tf_threads() -> dict[str, int | str]:
    import tensorflow as tf

    cores = os.cpu_count() or 1

    def describe(value: int) -> int | str:
        return value if value else f"default ({cores} cores)"

    return {
        "intra_op": describe(tf.config.threading.get_intra_op_parallelism_threads()),
        "inter_op": describe(tf.config.threading.get_inter_op_parallelism_threads()),
    }


# --- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inprocess",
        description="In-process inference latency and throughput of both exported models (the serving floor).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root (latest versions)")
    parser.add_argument("--calls-1", type=positive_int, default=DEFAULT_CALLS[1], help="timed calls at batch 1")
    parser.add_argument("--calls-64", type=positive_int, default=DEFAULT_CALLS[64], help="timed calls at batch 64")
    parser.add_argument(
        "--calls-256", type=positive_int, default=DEFAULT_CALLS[THROUGHPUT_BATCH], help="timed calls at batch 256"
    )
    parser.add_argument("--torch-threads", type=positive_int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--tf-threads",
        type=positive_int,
        default=None,
        help="pin TensorFlow's intra/inter-op pools (default: TensorFlow's own, one thread per core)",
    )
    return parser


def format_table(result: dict[str, Any]) -> str:
    torch_r, tf_r = result["results"]["pytorch"], result["results"]["tensorflow"]
    header = f"{'measure':<26}{'pytorch':>12}{'tensorflow':>12}{'tf/torch':>10}"
    rows = [header, "-" * len(header)]
    for batch in LATENCY_BATCHES:
        for stat in ("median_ms", "p99_ms"):
            a, b = torch_r["latency"][str(batch)][stat], tf_r["latency"][str(batch)][stat]
            rows.append(f"{f'batch {batch} {stat[:-3]} (ms)':<26}{a:>12.3f}{b:>12.3f}{b / a:>10.2f}")
    a, b = torch_r["throughput"]["images_per_second"], tf_r["throughput"]["images_per_second"]
    rows.append(f"{f'batch {THROUGHPUT_BATCH} images/s':<26}{a:>12,.0f}{b:>12,.0f}{b / a:>10.2f}")
    return "\n".join(rows)


def ratios(torch_r: dict[str, Any], tf_r: dict[str, Any]) -> dict[str, float]:
    """TensorFlow over PyTorch for each figure (latency: >1 means TF is slower; images/s: >1 means faster)."""
    out = {}
    for batch in LATENCY_BATCHES:
        for stat in ("median_ms", "p99_ms"):
            key = f"batch_{batch}_{stat}"
            out[key] = round(tf_r["latency"][str(batch)][stat] / torch_r["latency"][str(batch)][stat], 3)
    out[f"batch_{THROUGHPUT_BATCH}_images_per_second"] = round(
        tf_r["throughput"]["images_per_second"] / torch_r["throughput"]["images_per_second"], 3
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch_base = args.models_dir / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME
    tf_base = args.models_dir / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME
    for base in (torch_base, tf_base):
        if latest_version(base) is None:
            parser.error(f"no exported model under {base}; run `make train` first (or pass --models-dir)")
    calls = {1: args.calls_1, 64: args.calls_64, THROUGHPUT_BATCH: args.calls_256}

    images, labels = mnist_test_images()
    log.info("measuring TorchScript from %s (%d torch thread(s))", torch_base, args.torch_threads)
    torch_r = measure_torch(torch_base, images, labels, threads=args.torch_threads, calls=calls)
    log.info("measuring the SavedModel signature from %s", tf_base)
    tf_r = measure_tf(tf_base, images, labels, threads=args.tf_threads, calls=calls)

    import tensorflow as tf
    import torch

    result = {
        "benchmark": NAME,
        "images": "MNIST test set (real), float32 pixel/255, numpy in and out",
        "warmup_calls": WARMUP_CALLS,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "tensorflow": tf.__version__, "python": platform.python_version()},
        "results": {"pytorch": torch_r, "tensorflow": tf_r},
        "ratio_tensorflow_over_pytorch": ratios(torch_r, tf_r),
    }
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
