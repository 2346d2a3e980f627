"""The MNIST CNN in PyTorch, and its export to the model repository as TorchScript.

The network is the classic one from pytorch/examples: two 3x3 convolutions,
max-pool, dropout, two dense layers. ``training/model_tf.py`` builds the same
network in Keras; a test checks both have the same parameter count.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mnist_client import contract
from serving.check_set import pixels_to_images, write_check_set
from serving.model_repository import model_base_path, publish_version
from training.export_common import base_metadata, verify_export

log = logging.getLogger(__name__)

# torch.jit is deprecated in torch 2.13 but still the format TorchServe-style
# servers load without Python source; silence only that one warning here.
warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated.*")


class Net(nn.Module):
    """Conv(32) -> Conv(64) -> MaxPool -> Dropout -> Dense(128) -> Dropout -> Dense(10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)  # 64 channels * 12 * 12 after the pool
        self.fc2 = nn.Linear(128, contract.NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 1, 28, 28] normalised
        x = F.relu(self.conv1(x))  # [B, 32, 26, 26]
        x = F.relu(self.conv2(x))  # [B, 64, 24, 24]
        x = F.max_pool2d(x, 2)  # [B, 64, 12, 12]
        x = self.dropout1(x)
        x = torch.flatten(x, 1)  # [B, 9216]
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return self.fc2(x)  # [B, 10] logits


class ServingModel(nn.Module):
    """The contract wrapper: ``images`` [B, 28, 28] in [0, 1] -> probabilities and classes."""

    def __init__(self, net: Net) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(contract.NORMALIZE_MEAN))
        self.register_buffer("std", torch.tensor(contract.NORMALIZE_STD))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.unsqueeze(1) - self.mean) / self.std  # [B, 28, 28] -> [B, 1, 28, 28]
        probabilities = F.softmax(self.net(x), dim=1)
        return {
            "probabilities": probabilities,
            "classes": torch.argmax(probabilities, dim=1),  # int64 [B]
        }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def predict_numpy(module: torch.nn.Module, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Run a serving module over float32 ``[N, 28, 28]`` images on the CPU: (probabilities, classes)."""
    probs, classes = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            out = module(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])))
            probs.append(out["probabilities"].numpy())
            classes.append(out["classes"].numpy())
    return np.concatenate(probs), np.concatenate(classes)


def export_torchscript(
    net: Net,
    models_root: str | os.PathLike[str],
    test_images: np.ndarray,
    test_labels: np.ndarray,
    version: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Script ``net`` with the contract wrapper and publish it as a new version.

    The file is loaded back and checked against the in-memory model on the given
    test images (same classes, probabilities within 1e-5) before it is published;
    the measured accuracy goes into ``model.json``, and the images with the file's
    answers into ``check_set.npz`` (serving/check_set.py).
    """
    serving = ServingModel(net).to("cpu").eval()
    scripted = torch.jit.script(serving)
    base = model_base_path(models_root, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    with publish_version(base, version) as (staging, chosen):
        model_file = staging / contract.TORCHSCRIPT_FILENAME
        scripted.save(str(model_file))
        loaded = torch.jit.load(str(model_file), map_location="cpu").eval()
        ref_probs, ref_classes = predict_numpy(serving, test_images)
        got_probs, got_classes = predict_numpy(loaded, test_images)
        verify_export(ref_probs, ref_classes, got_probs, got_classes)
        accuracy = float(np.mean(got_classes == test_labels))
        # The test images and the file's own answers, for servers to check the form they serve.
        pixels = np.round(test_images * contract.PIXEL_SCALE).astype(np.uint8)
        if not np.array_equal(pixels_to_images(pixels), test_images):  # not MNIST's own uint8 steps
            got_probs, got_classes = predict_numpy(loaded, pixels_to_images(pixels))
        write_check_set(staging, pixels, got_probs, got_classes)
        metadata = base_metadata(
            version=chosen,
            framework="pytorch",
            framework_version=torch.__version__,
            model_format="torchscript",
            parameters=count_parameters(net),
            test_accuracy=accuracy,
            test_examples=len(test_labels),
            extra=extra_metadata,
        )
        (staging / contract.METADATA_FILENAME).write_text(json.dumps(metadata, indent=2) + "\n")
    final = base / str(chosen)
    log.info("exported TorchScript version %d to %s (test accuracy %.4f)", chosen, final, accuracy)
    return final
