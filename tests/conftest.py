"""Shared fixtures: real MNIST test images and a model repository with both exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stack.processes import free_port  # noqa: F401 - the tests import it from here
from training import mnist_data

# Number of real test images the fixture exports check against (fast, still real).
FIXTURE_EXAMPLES = 1000


@pytest.fixture(scope="session")
def mnist_test() -> mnist_data.Split:
    """The real 10,000-image MNIST test split (uint8)."""
    return mnist_data.load_split("test")


@pytest.fixture(scope="session")
def test_images(mnist_test: mnist_data.Split) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 images in [0, 1], labels)`` for the first FIXTURE_EXAMPLES test images."""
    return mnist_test.scaled()[:FIXTURE_EXAMPLES], mnist_test.labels[:FIXTURE_EXAMPLES]


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, test_images: tuple[np.ndarray, np.ndarray]) -> Path:
    """A models root holding ``torch/mnist/1`` and ``tf/mnist/1``, exported by the real export code.

    The networks are quick-trained by the trainers' ``--quick`` mode so that
    predictions are meaningful (well above chance) while the suite stays fast.
    """
    from training import train_tf, train_torch

    root = tmp_path_factory.mktemp("models")
    logs = tmp_path_factory.mktemp("runs")
    common = ["--quick", "--output-dir", str(root), "--log-dir", str(logs), "--version", "1"]
    train_torch.main(common)
    train_tf.main(common)
    return root
