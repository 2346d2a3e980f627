"""The model contract shared by training, serving and clients.

This is the single source of truth for names, shapes, dtypes and constants of
the served MNIST model. It imports only numpy so that the client package can
carry it; training and serving import it from here (``mnist_client.contract``)
instead of keeping copies.
"""

from __future__ import annotations

from typing import Final

import numpy as np

MODEL_NAME: Final = "mnist"
SIGNATURE_NAME: Final = "serving_default"

# Input tensor: raw pixel / 255, float32, shape [batch, 28, 28], values in [0, 1].
INPUT_NAME: Final = "images"
IMAGE_HEIGHT: Final = 28
IMAGE_WIDTH: Final = 28
IMAGE_SHAPE: Final = (IMAGE_HEIGHT, IMAGE_WIDTH)
INPUT_DTYPE: Final = np.float32
INPUT_MIN: Final = 0.0
INPUT_MAX: Final = 1.0
PIXEL_SCALE: Final = 255.0  # clients divide uint8 pixels by this, nothing more

# Outputs.
PROBABILITIES_NAME: Final = "probabilities"  # float32 [batch, NUM_CLASSES], softmax
CLASSES_NAME: Final = "classes"  # int64 [batch]
OUTPUT_NAMES: Final = (PROBABILITIES_NAME, CLASSES_NAME)
NUM_CLASSES: Final = 10
PROBABILITIES_DTYPE: Final = np.float32
CLASSES_DTYPE: Final = np.int64

# Normalisation lives inside the exported models; clients never apply it.
NORMALIZE_MEAN: Final = 0.1307
NORMALIZE_STD: Final = 0.3081

# Model repository layout (TF Serving's convention): <root>/<framework>/<name>/<version>/
TORCH_FRAMEWORK_DIR: Final = "torch"
TF_FRAMEWORK_DIR: Final = "tf"
TORCHSCRIPT_FILENAME: Final = "model.pt"
METADATA_FILENAME: Final = "model.json"
SAVED_MODEL_FILENAME: Final = "saved_model.pb"
WARMUP_RELATIVE_PATH: Final = "assets.extra/tf_serving_warmup_requests"
TFLITE_FILENAME: Final = "model.tflite"  # beside saved_model.pb: the same model as float32 TFLite

# Network interfaces (defaults; every server and client lets them be overridden).
REST_PORT: Final = 8080
TFS_GRPC_PORT: Final = 8500
TFS_REST_PORT: Final = 8501
WEB_PORT: Final = 8000  # the draw-a-digit page (serving.web)


def input_shape(batch: int | None = None) -> tuple[int | None, int, int]:
    """The input tensor shape for ``batch`` images (``None`` for any batch)."""
    return (batch, IMAGE_HEIGHT, IMAGE_WIDTH)


def signature() -> dict[str, dict[str, dict[str, object]]]:
    """The serving signature as plain data: names, dtypes and shapes (-1 = any)."""
    return {
        "inputs": {
            INPUT_NAME: {"dtype": "DT_FLOAT", "shape": [-1, IMAGE_HEIGHT, IMAGE_WIDTH]},
        },
        "outputs": {
            PROBABILITIES_NAME: {"dtype": "DT_FLOAT", "shape": [-1, NUM_CLASSES]},
            CLASSES_NAME: {"dtype": "DT_INT64", "shape": [-1]},
        },
    }
