"""The MNIST CNN in TensorFlow/Keras, and its export to the model repository as a SavedModel.

Same network as ``training/model_torch.py`` (a test checks the parameter
counts match). The export wraps the Keras model in a ``tf.Module`` whose
``serving_default`` signature is exactly the model contract, with the
normalisation inside, writes TF Serving warm-up records, and converts it to
TFLite (``model.tflite`` beside it, checked against the SavedModel's classes).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from mnist_client import contract
from serving.model_repository import model_base_path, publish_version
from training.export_common import base_metadata, verify_export
from training.tflite_model import check_against_saved_model, convert_saved_model

log = logging.getLogger(__name__)

# How many warm-up requests TF Serving replays on load, and their batch sizes.
WARMUP_BATCH_SIZES = (1, 8, 64)


def build_model() -> tf.keras.Model:
    """Conv(32) -> Conv(64) -> MaxPool -> Dropout -> Dense(128) -> Dropout -> Dense(10) logits."""
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input(shape=(contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH, 1)),  # normalised NHWC
            layers.Conv2D(32, 3, activation="relu"),  # [B, 26, 26, 32]
            layers.Conv2D(64, 3, activation="relu"),  # [B, 24, 24, 64]
            layers.MaxPooling2D(2),  # [B, 12, 12, 64]
            layers.Dropout(0.25),
            layers.Flatten(),  # [B, 9216]
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(contract.NUM_CLASSES),  # logits
        ],
        name="mnist_cnn",
    )


def normalize(images: tf.Tensor) -> tf.Tensor:
    """[B, 28, 28] pixel/255 -> [B, 28, 28, 1] normalised, as the network expects."""
    x = tf.expand_dims(images, -1)
    return (x - contract.NORMALIZE_MEAN) / contract.NORMALIZE_STD


class ServingModule(tf.Module):
    """The contract wrapper whose ``serve`` becomes the ``serving_default`` signature."""

    def __init__(self, model: tf.keras.Model) -> None:
        super().__init__(name="mnist_serving")
        self.model = model
        # Keras 3 wraps each tf.Variable in a keras.Variable; the checkpoint would
        # only hold the wrappers, so session-based loaders (TF Serving, the stand-in,
        # saved_model_cli) fail with "Could not find variable". Track the raw
        # tf.Variables that serve() captures so they are saved and restored.
        self.serving_variables = [v.value for v in model.variables]

    @tf.function(
        input_signature=[
            tf.TensorSpec(shape=contract.input_shape(None), dtype=tf.float32, name=contract.INPUT_NAME)
        ]
    )
    def serve(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = tf.nn.softmax(self.model(normalize(images), training=False), axis=-1)
        return {
            contract.PROBABILITIES_NAME: probabilities,
            contract.CLASSES_NAME: tf.argmax(probabilities, axis=1, output_type=tf.int64),
        }


def predict_with(fn: Any, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Run a serving function (module method or loaded signature) over ``images``: (probabilities, classes)."""
    probs, classes = [], []
    for start in range(0, len(images), batch_size):
        out = fn(images=tf.constant(images[start : start + batch_size], dtype=tf.float32))
        probs.append(out[contract.PROBABILITIES_NAME].numpy())
        classes.append(out[contract.CLASSES_NAME].numpy())
    return np.concatenate(probs), np.concatenate(classes)


def write_warmup_requests(path: Path, sample_images: np.ndarray) -> None:
    """TF Serving replays these PredictRequests on load so the first real call is not slow."""
    # Imported here: the serving-api protos are only needed at export time.
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in WARMUP_BATCH_SIZES:
            images = np.resize(sample_images, (batch, *contract.IMAGE_SHAPE)).astype(np.float32)
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=contract.MODEL_NAME, signature_name=contract.SIGNATURE_NAME)
            )
            request.inputs[contract.INPUT_NAME].CopyFrom(tf.make_tensor_proto(images))
            log_record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log_record.SerializeToString())


def export_saved_model(
    model: tf.keras.Model,
    models_root: str | os.PathLike[str],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    version: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Save ``model`` with the contract signature and publish it as a new version.

    The SavedModel is loaded back and checked against the in-memory model on the
    given test images (same classes, probabilities within 1e-5) before publishing;
    its TFLite conversion must give the SavedModel's class on at least 99.9% of them
    (``training.tflite_model.MIN_AGREEMENT``), else nothing is published.
    """
    module = ServingModule(model)
    base = model_base_path(models_root, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    with publish_version(base, version) as (staging, chosen):
        tf.saved_model.save(module, str(staging), signatures={contract.SIGNATURE_NAME: module.serve})
        write_warmup_requests(staging / contract.WARMUP_RELATIVE_PATH, test_images[: max(WARMUP_BATCH_SIZES)])
        loaded = tf.saved_model.load(str(staging)).signatures[contract.SIGNATURE_NAME]
        ref_probs, ref_classes = predict_with(module.serve, test_images)
        got_probs, got_classes = predict_with(loaded, test_images)
        verify_export(ref_probs, ref_classes, got_probs, got_classes)
        accuracy = float(np.mean(got_classes == test_labels))
        # TensorFlow's mobile path, checked against the SavedModel's classes before anything is published.
        convert_saved_model(staging, staging / contract.TFLITE_FILENAME)
        tflite = check_against_saved_model(
            staging / contract.TFLITE_FILENAME, test_images, test_labels, got_probs, got_classes
        )
        metadata = base_metadata(
            version=chosen,
            framework="tensorflow",
            framework_version=tf.__version__,
            model_format="saved_model",
            parameters=model.count_params(),
            test_accuracy=accuracy,
            test_examples=len(test_labels),
            extra={"tflite": tflite.as_metadata(), **(extra_metadata or {})},
        )
        (staging / contract.METADATA_FILENAME).write_text(json.dumps(metadata, indent=2) + "\n")
    final = base / str(chosen)
    log.info(
        "exported SavedModel version %d to %s (test accuracy %.4f); TFLite beside it: accuracy %.4f, "
        "classes agree with the SavedModel on %.2f%% of %d images",
        chosen,
        final,
        accuracy,
        tflite.test_accuracy,
        100 * tflite.agreement_with_saved_model,
        tflite.test_examples,
    )
    return final
