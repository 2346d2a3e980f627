"""Shared fixtures: real MNIST test images, a model repository with both exports, kubectl, TLS certificates.

MNIST comes from one place, never from the internet: ``$MNIST_DATA_DIR`` if set, else the shared copy
``<repo>/../shared/data/mnist`` (relative to this checkout, not to the current directory). Tests that
need it take the ``mnist_dir`` fixture, directly or through ``mnist_test``/``model_repo``, and skip,
naming what is missing, when neither holds the four files.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mnist_client import mnist_data
from tls_certs import make_certs

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_DIR_VARIABLE = "MNIST_DATA_DIR"
SHARED_MNIST_DIR = REPO_ROOT.parent / "shared" / "data" / "mnist"
# A mirror that refuses at once: a test that would fall through to a download fails fast instead.
NO_DOWNLOAD_MIRROR = "http://127.0.0.1:9/no-downloads-in-tests/"

# Number of real test images the fixture exports check against (fast, still real).
FIXTURE_EXAMPLES = 1000


def _find_mnist_dir() -> tuple[Path | None, str]:
    """The data directory and, when there is none, why not."""
    configured = os.environ.get(MNIST_DIR_VARIABLE)
    directory = Path(configured) if configured else SHARED_MNIST_DIR
    missing = [name for name in sorted(mnist_data.FILES) if not (directory / name).is_file()]
    if not missing:
        return directory, ""
    where = f"${MNIST_DIR_VARIABLE}={configured}" if configured else f"{directory} (${MNIST_DIR_VARIABLE} unset)"
    return None, (f"MNIST data not found: {where} lacks {', '.join(missing)}; set {MNIST_DIR_VARIABLE} to a "
                  "directory holding the four original gzipped IDX files (the tests never download them)")


@pytest.fixture(scope="session", autouse=True)
def mnist_data_source() -> Iterator[Path | None]:
    """Point every loader (trainers, load tester, subprocesses) at the one data directory, or at no mirror."""
    directory, _ = _find_mnist_dir()
    with pytest.MonkeyPatch.context() as patch:
        if directory is not None:
            patch.setenv(MNIST_DIR_VARIABLE, str(directory))
        patch.setenv("MNIST_MIRRORS", NO_DOWNLOAD_MIRROR)
        yield directory


@pytest.fixture(scope="session")
def mnist_dir(mnist_data_source: Path | None) -> Path:
    """The directory holding the four MNIST files; the test is skipped, saying why, when there is none."""
    if mnist_data_source is None:
        pytest.skip(_find_mnist_dir()[1])
    return mnist_data_source


@pytest.fixture(scope="session")
def mnist_test(mnist_dir: Path) -> mnist_data.Split:
    """The real 10,000-image MNIST test split (uint8)."""
    return mnist_data.load_split("test", mnist_dir)


@pytest.fixture(scope="session")
def test_images(mnist_test: mnist_data.Split) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 images in [0, 1], labels)`` for the first FIXTURE_EXAMPLES test images."""
    return mnist_test.scaled()[:FIXTURE_EXAMPLES], mnist_test.labels[:FIXTURE_EXAMPLES]


@pytest.fixture(scope="session")
def model_repo(
    tmp_path_factory: pytest.TempPathFactory, test_images: tuple[np.ndarray, np.ndarray], mnist_dir: Path
) -> Path:
    """A models root holding ``torch/mnist/1`` and ``tf/mnist/1``, exported by the real export code.

    The networks are quick-trained by the trainers' ``--quick`` mode so that
    predictions are meaningful (well above chance) while the suite stays fast.
    """
    from training import train_tf, train_torch

    root = tmp_path_factory.mktemp("models")
    logs = tmp_path_factory.mktemp("runs")
    common = ["--quick", "--data-dir", str(mnist_dir), "--output-dir", str(root), "--log-dir", str(logs),
              "--version", "1"]
    train_torch.main(common)
    train_tf.main(common)
    return root


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl's path (it renders the Kubernetes manifests); the test is skipped, saying what to install, without it."""
    from deploy.k8s.manifest_check import KUBECTL_MISSING

    path = shutil.which("kubectl")
    if path is None:
        pytest.skip(KUBECTL_MISSING)
    return path


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TLS files by name (tls_certs.CERT_FILES: a CA, server and client certificates and keys, another CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests make their certificates with the openssl command: install openssl")
    return make_certs(tmp_path_factory.mktemp("tls"))
