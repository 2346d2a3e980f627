"""In-process inference of both exported models, each on the path its server runs: the serving floor.

Every figure comes from the object and the call that answers a request in production:

- PyTorch: the REST worker's own loader, ``serving.torch_server.model_store.load_version`` (the export
  checked against the contract and warmed up, with its frozen, inference-optimised copy), called
  through ``LoadedModel.predict`` as a worker calls it;
- TensorFlow: the SavedModel loaded into a ``tf.compat.v1.Session`` by the SavedModel loader, as TF
  Serving (and the stand-in, ``serving.tfs_standin.servable``) loads it, its ``serving_default``
  signature run as one Session callable;
- TFLite: the float32 conversion that the TensorFlow export writes beside the SavedModel
  (``model.tflite``), in ``tf.lite.Interpreter`` (batch-1 latency, accuracy, and its agreement with
  the SavedModel's classes on the whole test set).

Both frameworks are measured at the same thread counts, one thread each and every usable core each,
so the table compares frameworks, not thread settings (PyTorch: ``torch.set_num_threads``; TensorFlow:
the Session's intra- and inter-op pools; TFLite: the interpreter's threads). On real MNIST test images,
numpy in and numpy out:

- latency at batch 1 and batch 64: median and p99 of many timed calls after warm-up;
- throughput at batch 256: images/s over a run of back-to-back calls;
- accuracy on all 10,000 test images.

Each measurement makes its number of calls or stops after ``MAX_SECONDS_PER_MEASURE``
(busy machines), whichever comes first; the JSON records the calls made. The REST and gRPC server
benchmarks import :func:`measure_torch` and :func:`measure_tf` to put this floor beside their own
figures in one run::

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
from mnist_client import contract, mnist_data
from mnist_client.cpus import usable_cpus
from serving.model_repository import latest_version
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
ACCURACY_BATCH = 1000  # images per call when classifying the whole test set for accuracy

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# --- locating and loading the models, as their servers do -------------------------------------------

# One line per path, printed under the table and kept in the JSON: what each figure measured.
PATHS = {
    "pytorch": "the REST worker's path: model_store.load_version (export checked on its check set and warmed "
               "up; batches from the measured crossover on its frozen, inference-optimised copy, CPU passes above "
               "64 images in chunks), LoadedModel.predict, numpy in and out",
    "tensorflow": "TF Serving's path: the SavedModel loaded into a tf.compat.v1.Session, serving_default run as "
                  "one Session callable (as the stand-in's servable runs it), numpy in and out",
    "tflite": "the float32 model.tflite converted from the same SavedModel, in tf.lite.Interpreter, its "
              "serving_default signature runner",
}


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
    """The TorchScript version as a REST worker loads and calls it (CPU)."""
    import torch

    from serving.torch_server.model_store import load_version

    version_dir = resolve_version_dir(model_dir, contract.TORCHSCRIPT_FILENAME)
    model = load_version(version_dir, int(version_dir.name), torch.device("cpu"))
    return model.predict, version_dir


def load_saved_model(model_dir: str | os.PathLike[str], threads: int | None = None) -> tuple[Predict, Path]:
    """The SavedModel as TF Serving loads and runs it: a Session with ``threads`` intra- and inter-op
    threads each (None: TensorFlow's default, one per core), the signature as one Session callable."""
    from serving.tfs_standin.servable import Servable, SessionOptions

    version_dir = resolve_version_dir(model_dir, contract.SAVED_MODEL_FILENAME)
    pools = threads or 0  # 0: TensorFlow's default
    servable = Servable(contract.MODEL_NAME, int(version_dir.name), version_dir,
                        SessionOptions(intra_op_threads=pools, inter_op_threads=pools))
    signature = servable.signature(contract.SIGNATURE_NAME)
    fetch = (contract.PROBABILITIES_NAME, contract.CLASSES_NAME)

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probabilities, classes = servable.run(signature, [images], fetch)
        return probabilities, classes

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


def classify_all(predict: Predict, images: np.ndarray) -> np.ndarray:
    """Predicted classes of every image, in batches of ``ACCURACY_BATCH``."""
    return np.concatenate([
        np.array(predict(np.ascontiguousarray(images[i : i + ACCURACY_BATCH]))[1])
        for i in range(0, len(images), ACCURACY_BATCH)
    ])


def _measure(
    predict: Predict, images: np.ndarray, labels: np.ndarray, calls: dict[int, int] | None
) -> tuple[dict[str, Any], np.ndarray]:
    calls = {**DEFAULT_CALLS, **(calls or {})}
    classes = classify_all(predict, images)
    return {
        "accuracy": round(float(np.mean(classes == labels)), 4),
        "accuracy_images": len(labels),
        "latency": {str(b): latency(predict, images, b, calls[b]) for b in LATENCY_BATCHES},
        "throughput": {
            "batch_size": THROUGHPUT_BATCH,
            **throughput(predict, images, THROUGHPUT_BATCH, calls[THROUGHPUT_BATCH]),
        },
    }, classes


def _images(images: np.ndarray | None, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if images is None or labels is None:
        return mnist_test_images()
    return images, labels


def measure_torch(
    model_dir: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    threads: int = 1,
    calls: dict[int, int] | None = None,
) -> dict[str, Any]:
    """Latency (batch 1, 64), throughput (batch 256) and accuracy of the TorchScript model as served.

    ``model_dir`` is a version folder or the base path (latest version used). ``images``
    default to the real MNIST test set. ``calls`` overrides timed calls per batch size.
    The torch thread count is set to ``threads`` for the measurement and restored after.
    """
    import torch

    predict, version_dir = load_torchscript(model_dir)
    images, labels = _images(images, labels)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        result, _ = _measure(predict, images, labels, calls)
    finally:
        torch.set_num_threads(previous)
    return {"framework": "pytorch", "path": PATHS["pytorch"], "model_dir": str(version_dir),
            "version": int(version_dir.name), "threads": threads, **result}


def measure_tf(
    model_dir: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    threads: int | None = None,
    calls: dict[int, int] | None = None,
    with_classes: bool = False,
) -> dict[str, Any]:
    """Latency (batch 1, 64), throughput (batch 256) and accuracy of the SavedModel as TF Serving runs it.

    ``threads`` sizes the Session's intra- and inter-op pools (None: TensorFlow's default, one thread
    per core, as TF Serving runs unless told otherwise). ``with_classes`` adds the predicted class of
    every image (``classes``, a numpy array), which the TFLite measurement is checked against.
    """
    predict, version_dir = load_saved_model(model_dir, threads)
    images, labels = _images(images, labels)
    result, classes = _measure(predict, images, labels, calls)
    return {"framework": "tensorflow", "path": PATHS["tensorflow"], "model_dir": str(version_dir),
            "version": int(version_dir.name), "threads": threads or usable_cpus(), **result,
            **({"classes": classes} if with_classes else {})}


def measure_tflite(
    model_dir: Path,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    threads: int = 1,
    calls: int = DEFAULT_CALLS[1],
    saved_model_classes: np.ndarray | None = None,
) -> dict[str, Any]:
    """Batch-1 latency and accuracy of the TFLite conversion, and how often its classes match the
    SavedModel's (``saved_model_classes``, for the same images) when given."""
    from training.tflite_model import TfliteModel

    model = TfliteModel(model_dir, threads)
    images, labels = _images(images, labels)
    classes = classify_all(model, images)
    result: dict[str, Any] = {
        "framework": "tflite", "path": PATHS["tflite"], "model_file": str(model.path),
        "version": int(model.path.parent.name), "threads": threads,
        "accuracy": round(float(np.mean(classes == labels)), 4), "accuracy_images": len(labels),
        "latency": {"1": latency(model, images, 1, calls)},
    }
    if saved_model_classes is not None:
        result["agreement_with_saved_model"] = round(float(np.mean(classes == saved_model_classes)), 5)
    return result


# --- command line ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.inprocess",
        description="In-process inference latency, throughput and accuracy of both exported models, each on "
                    "the path its server runs, at one thread and at every usable core (the serving floor).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "bench" / "results", help="JSON goes here")
    parser.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models", help="models root (latest versions)")
    parser.add_argument("--calls-1", type=positive_int, default=DEFAULT_CALLS[1], help="timed calls at batch 1")
    parser.add_argument("--calls-64", type=positive_int, default=DEFAULT_CALLS[64], help="timed calls at batch 64")
    parser.add_argument(
        "--calls-256", type=positive_int, default=DEFAULT_CALLS[THROUGHPUT_BATCH], help="timed calls at batch 256"
    )
    parser.add_argument(
        "--threads", type=positive_int, nargs="+", default=None, metavar="N",
        help="thread counts to measure every framework at (default: 1 and every usable core)",
    )
    return parser


_ROWS = (("pytorch", "PyTorch (TorchScript)"), ("tensorflow", "TensorFlow (SavedModel)"), ("tflite", "TFLite"))


def _cell(entry: dict[str, Any] | None, *keys: str, fmt: str = "{:.3f}") -> str:
    value: Any = entry
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return "-"
        value = value[key]
    return fmt.format(value)


def format_table(result: dict[str, Any]) -> str:
    """One row per framework and thread count, then one line per framework saying what was measured."""
    header = (f"{'framework':<26}{'threads':>8}{'b1 p50 ms':>11}{'b1 p99 ms':>11}{'b64 p50 ms':>12}"
              f"{'b256 img/s':>12}{'accuracy':>10}")
    rows = [header, "-" * len(header)]
    for threads, measured in result["results"].items():
        for key, label in _ROWS:
            entry = measured.get(key)
            if entry is None:
                continue
            rows.append(
                f"{label:<26}{threads.split('_')[1]:>8}{_cell(entry, 'latency', '1', 'median_ms'):>11}"
                f"{_cell(entry, 'latency', '1', 'p99_ms'):>11}{_cell(entry, 'latency', '64', 'median_ms'):>12}"
                f"{_cell(entry, 'throughput', 'images_per_second', fmt='{:,.0f}'):>12}"
                f"{_cell(entry, 'accuracy', fmt='{:.4f}'):>10}"
            )
    rows.append("")
    rows += [f"{label}: {result['paths'][key]}" for key, label in _ROWS if key in result["paths"]]
    for threads, measured in result["results"].items():
        agreement = measured.get("tflite", {}).get("agreement_with_saved_model")
        if agreement is not None:
            rows.append(f"TFLite classes agree with the SavedModel's on {agreement:.2%} of the test images "
                        f"({threads.replace('_', ' ')})")
            break
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
    thread_counts = sorted(set(args.threads or (1, usable_cpus())))

    images, labels = mnist_test_images()
    results: dict[str, dict[str, Any]] = {}
    paths = {key: PATHS[key] for key in ("pytorch", "tensorflow")}
    for threads in thread_counts:
        log.info("measuring PyTorch and TensorFlow as served, %d thread(s) each", threads)
        torch_r = measure_torch(torch_base, images, labels, threads=threads, calls=calls)
        tf_r = measure_tf(tf_base, images, labels, threads=threads, calls=calls, with_classes=True)
        tf_classes = tf_r.pop("classes")
        measured: dict[str, Any] = {"pytorch": torch_r, "tensorflow": tf_r,
                                    "ratio_tensorflow_over_pytorch": ratios(torch_r, tf_r)}
        try:
            measured["tflite"] = measure_tflite(tf_base, images, labels, threads=threads, calls=calls[1],
                                                saved_model_classes=tf_classes)
            paths["tflite"] = PATHS["tflite"]
        except FileNotFoundError as exc:  # an export from before TFLite was written: say so, measure the rest
            log.warning("no TFLite model to measure: %s", exc)
        results[f"threads_{threads}"] = measured

    import tensorflow as tf
    import torch

    result = {
        "benchmark": NAME,
        "images": "MNIST test set (real), float32 pixel/255, numpy in and out",
        "warmup_calls": WARMUP_CALLS,
        "cpus": usable_cpus(),
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "tensorflow": tf.__version__, "python": platform.python_version()},
        "paths": paths,
        "results": results,
    }
    write_result(args.output_dir, NAME, result, format_table(result))
    return result


if __name__ == "__main__":
    main()
