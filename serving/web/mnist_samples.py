"""Real MNIST test images for the page's "random test image" button, read once on first use."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np

from mnist_client import contract, mnist_data

log = logging.getLogger(__name__)


class MnistUnavailable(RuntimeError):
    """The MNIST test files cannot be found or read; the message says where to put them."""


class MnistTestImages:
    """The 10,000 MNIST test images and labels, loaded lazily (the app factory stays fast)."""

    def __init__(self, data_dir: Path | None) -> None:
        self.data_dir = data_dir
        self._split: mnist_data.Split | None = None
        self._lock = threading.Lock()

    def _load(self) -> mnist_data.Split:
        with self._lock:
            if self._split is None:
                try:
                    self._split = mnist_data.load_split("test", self.data_dir)
                except (mnist_data.MnistDataError, OSError) as exc:
                    raise MnistUnavailable(
                        f"MNIST test images are not available ({exc}); set MNIST_WEB_DATA_DIR (or MNIST_DATA_DIR) "
                        "to a directory holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
                    ) from None
                log.info("loaded %d MNIST test images", len(self._split))
            return self._split

    def pick(self) -> dict[str, Any]:
        """``{"index", "label", "image"}``: a random test image as 28 rows of 28 floats in [0, 1]."""
        split = self._load()
        index = random.randrange(len(split))
        image = split.images[index].astype(np.float32) / np.float32(contract.PIXEL_SCALE)
        return {"index": index, "label": int(split.labels[index]), "image": image.tolist()}
