"""TensorFlow's mobile path: the SavedModel converted to a float32 TFLite model with the same contract.

``training.model_tf.export_saved_model`` converts each SavedModel it publishes into
``<version>/model.tflite`` (beside ``saved_model.pb``; TF Serving and the stand-in load only the
SavedModel files and ignore it), runs it on the same test images, and refuses to publish if its
classes agree with the SavedModel's on fewer than ``MIN_AGREEMENT`` of them. The converted model
keeps the ``serving_default`` signature: input ``images`` float32 ``[batch, 28, 28]`` in [0, 1],
outputs ``probabilities`` float32 ``[batch, 10]`` and ``classes`` int64 ``[batch]``, normalisation
inside. No quantisation: the weights stay float32, so the two should agree on every image.

The functions below are also what a benchmark calls::

    from training.tflite_model import tflite_latency, tflite_accuracy
    seconds = tflite_latency("models/tf/mnist", batch=1, repeats=2000, threads=1)   # median of one call
    accuracy = tflite_accuracy("models/tf/mnist", images, labels, threads=1)

``path`` is a ``.tflite`` file, a version folder holding ``model.tflite``, or a model base path
(``models/tf/mnist``: its latest version).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client import contract
from serving.model_repository import latest_version

log = logging.getLogger(__name__)

# The TFLite model's classes must match the SavedModel's on at least this share of the test images.
MIN_AGREEMENT = 0.999
# Images per interpreter call when running a whole test set (one input resize, then reused).
EVAL_BATCH_SIZE = 1000
WARMUP_CALLS = 20


class TfliteAgreementError(RuntimeError):
    """The converted model disagrees with the SavedModel on too many images."""


@dataclass(frozen=True)
class TfliteCheck:
    """How the TFLite model did on the test images, beside the SavedModel (recorded in ``model.json``)."""

    file: str
    bytes: int
    test_accuracy: float
    agreement_with_saved_model: float
    disagreements: int
    test_examples: int
    max_probability_difference: float

    def as_metadata(self) -> dict[str, Any]:
        return asdict(self)


def tflite_path(path: str | os.PathLike[str]) -> Path:
    """A ``.tflite`` file, a version folder holding one, or a base path (its latest version) -> the file."""
    given = Path(path)
    if given.is_file():
        return given
    if (given / contract.TFLITE_FILENAME).is_file():
        return given / contract.TFLITE_FILENAME
    latest = latest_version(given)
    if latest is not None and (given / str(latest) / contract.TFLITE_FILENAME).is_file():
        return given / str(latest) / contract.TFLITE_FILENAME
    raise FileNotFoundError(
        f"{given}: no {contract.TFLITE_FILENAME} here or in its latest version folder; expected a .tflite file, "
        f"a version folder such as models/{contract.TF_FRAMEWORK_DIR}/{contract.MODEL_NAME}/1, or its base path "
        "(the TensorFlow export writes it: run `make train-tf`)"
    )


def convert_saved_model(saved_model_dir: str | os.PathLike[str], output: str | os.PathLike[str]) -> int:
    """Convert the ``serving_default`` signature of a SavedModel to float32 TFLite at ``output``; returns its size."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[contract.SIGNATURE_NAME])
    flatbuffer = converter.convert()  # no optimizations set: float32 weights and ops, no quantisation
    Path(output).write_bytes(flatbuffer)
    return len(flatbuffer)


class TfliteModel:
    """One TFLite interpreter running the contract signature: ``model(images) -> (probabilities, classes)``.

    Not thread-safe (an interpreter holds its tensors); use one per thread.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        import tensorflow as tf

        if threads is not None and threads < 1:
            raise ValueError(f"threads {threads}: expected a positive count, or None for TFLite's default")
        self.path = tflite_path(path)
        with warnings.catch_warnings():
            # TF 2.21 still ships tf.lite.Interpreter and warns that LiteRT (ai_edge_litert) succeeds it.
            warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
            self.interpreter = tf.lite.Interpreter(model_path=str(self.path), num_threads=threads)
        signatures = self.interpreter.get_signature_list()
        if contract.SIGNATURE_NAME not in signatures:
            raise ValueError(f"{self.path}: no {contract.SIGNATURE_NAME!r} signature (found {sorted(signatures)})")
        self.runner = self.interpreter.get_signature_runner(contract.SIGNATURE_NAME)
        self.threads = threads

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[B, 28, 28]`` in [0, 1] -> (probabilities ``[B, 10]``, classes ``[B]``)."""
        if images.ndim != 3 or images.shape[1:] != contract.IMAGE_SHAPE:
            raise ValueError(f"images of shape {images.shape}: expected {contract.input_shape(None)}")
        # The runner resizes the input (and re-plans its tensors) when the batch size changes.
        out = self.runner(**{contract.INPUT_NAME: np.ascontiguousarray(images, dtype=contract.INPUT_DTYPE)})
        return out[contract.PROBABILITIES_NAME], out[contract.CLASSES_NAME]

    def predict_all(self, images: np.ndarray, batch_size: int = EVAL_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """Run every image in batches of ``batch_size``: (probabilities, classes) for all of them."""
        probabilities, classes = [], []
        for start in range(0, len(images), batch_size):
            p, c = self(images[start : start + batch_size])
            probabilities.append(p.copy())  # the runner's output buffers are reused by the next call
            classes.append(c.copy())
        return np.concatenate(probabilities), np.concatenate(classes)


def check_against_saved_model(
    path: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    saved_model_probabilities: np.ndarray,
    saved_model_classes: np.ndarray,
    *,
    min_agreement: float = MIN_AGREEMENT,
) -> TfliteCheck:
    """Accuracy of the TFLite model and its agreement with the SavedModel's outputs on the same images.

    Raises :class:`TfliteAgreementError` when fewer than ``min_agreement`` of the classes match.
    """
    model = TfliteModel(path)
    probabilities, classes = model.predict_all(images)
    disagreements = int(np.sum(classes != saved_model_classes))
    agreement = 1.0 - disagreements / len(classes)
    check = TfliteCheck(
        file=model.path.name,
        bytes=model.path.stat().st_size,
        test_accuracy=float(np.mean(classes == labels)),
        agreement_with_saved_model=agreement,
        disagreements=disagreements,
        test_examples=len(labels),
        max_probability_difference=float(np.max(np.abs(probabilities - saved_model_probabilities))),
    )
    if agreement < min_agreement:
        raise TfliteAgreementError(
            f"{model.path}: the TFLite model's classes agree with the SavedModel's on {agreement:.2%} of "
            f"{len(classes)} test images ({disagreements} differ); expected at least {min_agreement:.1%}"
        )
    return check


def tflite_accuracy(
    path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, *, threads: int | None = None
) -> float:
    """Share of ``images`` (float32 ``[N, 28, 28]`` in [0, 1]) whose predicted class is the label."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"{len(images)} images and {len(labels)} labels: expected as many of each, at least one")
    _, classes = TfliteModel(path, threads).predict_all(images)
    return float(np.mean(classes == labels))


def tflite_latency(
    path: str | os.PathLike[str],
    batch: int = 1,
    repeats: int = 1000,
    threads: int | None = 1,
    images: np.ndarray | None = None,
) -> float:
    """Median wall time in seconds of one interpreter call on ``batch`` real test images, after a warm-up.

    ``threads`` is the interpreter's thread count (None: TFLite's default). ``images`` default to the
    MNIST test set; the timed calls cycle through distinct batches of them.
    """
    if batch < 1 or repeats < 1:
        raise ValueError(f"batch {batch}, repeats {repeats}: expected positive counts")
    if images is None:
        from mnist_client import mnist_data

        images = mnist_data.load_split("test").scaled()
    if len(images) < batch:
        raise ValueError(f"{len(images)} images cannot fill a batch of {batch}")
    batches = [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images) - batch + 1, batch)]
    model = TfliteModel(path, threads)
    for i in range(WARMUP_CALLS):
        model(batches[i % len(batches)])
    samples = np.empty(repeats)
    for i in range(repeats):
        started = time.perf_counter()
        model(batches[i % len(batches)])
        samples[i] = time.perf_counter() - started
    return float(np.median(samples))
