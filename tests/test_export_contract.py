"""Each exported model really has the contract of ``mnist_client.contract``, and publishing is atomic.

The models come from the ``model_repo`` fixture (both trainers' ``--quick`` mode,
exported by the real export code) and are loaded the way the servers load them:
``torch.jit.load`` and ``tf.saved_model.load``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf
import torch
from tensorflow.core.framework import types_pb2

from mnist_client import contract, mnist_data
from mnist_reference import MNIST_DATASET_CHECKSUM
from serving.check_set import read_check_set
from serving.model_repository import list_versions, model_base_path, publish_version
from training import model_tf, model_torch

EXPECTED_PARAMETERS = 1_199_882
# Fields export_common.base_metadata writes for both frameworks (documented in docs/export.md).
BASE_FIELDS = {
    "model_name",
    "version",
    "framework",
    "framework_version",
    "format",
    "signature",
    "normalization",
    "parameters",
    "test_accuracy",
    "test_examples",
    "created",
}
# Recorded by both trainers.
TRAINER_FIELDS = {"data_checksum", "train_seconds", "epochs", "hyperparameters"}
# Recorded by the TensorFlow trainer on top.
TF_TRAINER_FIELDS = {"strategy", "replicas", "workers", "images_per_second", "train_examples", "tensorboard_run"}


def version_dir(model_repo: Path, framework_dir: str) -> Path:
    return model_base_path(model_repo, framework_dir, contract.MODEL_NAME) / "1"


def read_metadata(directory: Path) -> dict[str, Any]:
    return json.loads((directory / contract.METADATA_FILENAME).read_text())


@pytest.fixture(scope="module")
def torchscript(model_repo: Path) -> torch.jit.ScriptModule:
    path = version_dir(model_repo, contract.TORCH_FRAMEWORK_DIR) / contract.TORCHSCRIPT_FILENAME
    return torch.jit.load(str(path), map_location="cpu").eval()


@pytest.fixture(scope="module")
def saved_model(model_repo: Path) -> Any:
    return tf.saved_model.load(str(version_dir(model_repo, contract.TF_FRAMEWORK_DIR)))


def run_torchscript(module: torch.jit.ScriptModule, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        out = module(torch.from_numpy(images))
    return out[contract.PROBABILITIES_NAME].numpy(), out[contract.CLASSES_NAME].numpy()


def run_signature(loaded: Any, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = loaded.signatures[contract.SIGNATURE_NAME](**{contract.INPUT_NAME: tf.constant(images)})
    return out[contract.PROBABILITIES_NAME].numpy(), out[contract.CLASSES_NAME].numpy()


def assert_valid_outputs(probabilities: np.ndarray, classes: np.ndarray, batch: int) -> None:
    assert probabilities.dtype == contract.PROBABILITIES_DTYPE and probabilities.shape == (batch, contract.NUM_CLASSES)
    assert classes.dtype == contract.CLASSES_DTYPE and classes.shape == (batch,)
    assert np.all(probabilities >= 0.0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(classes, probabilities.argmax(axis=1))


def assert_records_test_accuracy(classes: np.ndarray, labels: np.ndarray, metadata: dict[str, Any]) -> None:
    """Pixel/255 input, no client-side normalisation, reproduces the accuracy written at export."""
    assert len(labels) == metadata["test_examples"]
    accuracy = float(np.mean(classes == labels))
    # Different batch sizes may flip at most a borderline image or two.
    assert accuracy == pytest.approx(metadata["test_accuracy"], abs=2.0 / len(labels))
    assert accuracy > 0.8, "a --quick model should be far above chance (0.1)"


def spec_as_contract(spec: tf.TensorSpec) -> dict[str, object]:
    """A TensorSpec in the form of ``contract.signature()``: DT_* dtype name, -1 for any size."""
    return {
        "dtype": types_pb2.DataType.Name(spec.dtype.as_datatype_enum),
        "shape": [-1 if dim is None else dim for dim in spec.shape.as_list()],
    }


# --- TorchScript ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_torchscript_outputs_follow_the_contract(
    torchscript: torch.jit.ScriptModule, test_images: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    probabilities, classes = run_torchscript(torchscript, test_images[0][:batch])
    assert_valid_outputs(probabilities, classes, batch)


def test_torchscript_normalises_inside(
    torchscript: torch.jit.ScriptModule, model_repo: Path, mnist_test: mnist_data.Split
) -> None:
    metadata = read_metadata(version_dir(model_repo, contract.TORCH_FRAMEWORK_DIR))
    n = metadata["test_examples"]
    _, classes = run_torchscript(torchscript, mnist_test.scaled()[:n])
    assert_records_test_accuracy(classes, mnist_test.labels[:n], metadata)


def test_torchscript_check_set_is_the_test_images_and_the_files_answers(
    torchscript: torch.jit.ScriptModule, model_repo: Path, mnist_test: mnist_data.Split
) -> None:
    directory = version_dir(model_repo, contract.TORCH_FRAMEWORK_DIR)
    check = read_check_set(directory)
    n = read_metadata(directory)["test_examples"]
    assert check is not None and len(check) == n
    np.testing.assert_array_equal(check.pixels, mnist_test.images[:n])  # MNIST's own uint8 test images
    probabilities, classes = run_torchscript(torchscript, mnist_test.scaled()[:n])
    np.testing.assert_array_equal(check.classes, classes)
    np.testing.assert_allclose(check.probabilities, probabilities, rtol=0, atol=1e-6)


def test_torchscript_rejects_a_wrong_input_shape(torchscript: torch.jit.ScriptModule) -> None:
    with pytest.raises(RuntimeError):
        run_torchscript(torchscript, np.zeros((2, 27, 28), dtype=np.float32))


# --- SavedModel -----------------------------------------------------------------------------------


def test_saved_model_signature_is_exactly_the_contract(saved_model: Any) -> None:
    assert contract.SIGNATURE_NAME in saved_model.signatures
    fn = saved_model.signatures[contract.SIGNATURE_NAME]
    args, kwargs = fn.structured_input_signature
    assert args == ()
    expected = contract.signature()
    assert {name: spec_as_contract(spec) for name, spec in kwargs.items()} == expected["inputs"]
    assert {name: spec_as_contract(spec) for name, spec in fn.structured_outputs.items()} == expected["outputs"]


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_saved_model_outputs_follow_the_contract(
    saved_model: Any, test_images: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    probabilities, classes = run_signature(saved_model, test_images[0][:batch])
    assert_valid_outputs(probabilities, classes, batch)


def test_saved_model_normalises_inside(saved_model: Any, model_repo: Path, mnist_test: mnist_data.Split) -> None:
    metadata = read_metadata(version_dir(model_repo, contract.TF_FRAMEWORK_DIR))
    n = metadata["test_examples"]
    _, classes = run_signature(saved_model, mnist_test.scaled()[:n])
    assert_records_test_accuracy(classes, mnist_test.labels[:n], metadata)


def test_saved_model_rejects_a_wrong_input_shape(saved_model: Any) -> None:
    # The loaded signature does not check static shapes; the graph fails where the shape matters.
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        run_signature(saved_model, np.zeros((2, 28, 27), dtype=np.float32))


def test_warmup_records_are_valid_predict_requests(model_repo: Path, saved_model: Any) -> None:
    from tensorflow_serving.apis import prediction_log_pb2

    path = version_dir(model_repo, contract.TF_FRAMEWORK_DIR) / contract.WARMUP_RELATIVE_PATH
    records = [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    assert len(records) == len(model_tf.WARMUP_BATCH_SIZES)
    for raw, batch in zip(records, model_tf.WARMUP_BATCH_SIZES):
        entry = prediction_log_pb2.PredictionLog.FromString(raw)
        assert entry.WhichOneof("log_type") == "predict_log"
        request = entry.predict_log.request
        assert request.model_spec.name == contract.MODEL_NAME
        assert request.model_spec.signature_name == contract.SIGNATURE_NAME
        assert list(request.inputs) == [contract.INPUT_NAME]
        images = tf.make_ndarray(request.inputs[contract.INPUT_NAME])
        assert images.dtype == contract.INPUT_DTYPE and images.shape == (batch, *contract.IMAGE_SHAPE)
        assert contract.INPUT_MIN <= images.min() and images.max() <= contract.INPUT_MAX
        assert_valid_outputs(*run_signature(saved_model, images), batch)


# --- model.json -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framework_dir", "framework", "model_format", "payload", "extra_fields"),
    [
        (contract.TORCH_FRAMEWORK_DIR, "pytorch", "torchscript", contract.TORCHSCRIPT_FILENAME, set()),
        (contract.TF_FRAMEWORK_DIR, "tensorflow", "saved_model", contract.SAVED_MODEL_FILENAME, TF_TRAINER_FIELDS),
    ],
)
def test_model_json_describes_the_model(
    model_repo: Path, framework_dir: str, framework: str, model_format: str, payload: str, extra_fields: set[str]
) -> None:
    directory = version_dir(model_repo, framework_dir)
    assert (directory / payload).is_file()
    metadata = read_metadata(directory)
    assert BASE_FIELDS | TRAINER_FIELDS | extra_fields <= metadata.keys()
    assert metadata["model_name"] == contract.MODEL_NAME
    assert metadata["version"] == 1
    assert (metadata["framework"], metadata["format"]) == (framework, model_format)
    assert metadata["signature"] == contract.signature()
    assert metadata["normalization"] == {"mean": contract.NORMALIZE_MEAN, "std": contract.NORMALIZE_STD}
    assert metadata["parameters"] == EXPECTED_PARAMETERS
    assert 0.8 < metadata["test_accuracy"] <= 1.0
    assert metadata["data_checksum"] == MNIST_DATASET_CHECKSUM
    assert datetime.fromisoformat(metadata["created"]).tzinfo is not None


# --- atomic publish -------------------------------------------------------------------------------


def test_failed_publish_leaves_nothing_and_keeps_the_version_free(tmp_path: Path) -> None:
    base = model_base_path(tmp_path, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    with pytest.raises(OSError, match="disk full"), publish_version(base) as (staging, version):
        assert version == 1
        (staging / "half-written").write_text("x")
        raise OSError("disk full")
    assert list(base.iterdir()) == []  # no version, no staging folder
    with publish_version(base) as (staging, version):
        (staging / "complete").write_text("x")
    assert version == 1 and list_versions(base) == [1]
    with publish_version(base) as (_, version):
        pass
    assert version == 2 and list_versions(base) == [1, 2]


def test_published_versions_are_immutable(tmp_path: Path) -> None:
    base = model_base_path(tmp_path, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    with publish_version(base, 3):
        pass
    with pytest.raises(FileExistsError, match="already exists"), publish_version(base, 3):
        pass
    assert list_versions(base) == [3]


def test_torchscript_export_failing_its_check_publishes_nothing(
    tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = test_images
    net = model_torch.Net().eval()

    def reject(*_: Any) -> None:
        raise RuntimeError("exported model predicts a different class")

    monkeypatch.setattr(model_torch, "verify_export", reject)
    with pytest.raises(RuntimeError, match="different class"):
        model_torch.export_torchscript(net, tmp_path, images[:16], labels[:16])
    base = model_base_path(tmp_path, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    assert list(base.iterdir()) == []
    monkeypatch.undo()
    path = model_torch.export_torchscript(net, tmp_path, images[:16], labels[:16])
    assert path == base / "1" and list_versions(base) == [1]


def test_saved_model_export_failing_midway_publishes_nothing(
    tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = test_images
    model = model_tf.build_model()

    def fail(*_: Any) -> None:
        raise OSError("disk full while writing warm-up records")

    monkeypatch.setattr(model_tf, "write_warmup_requests", fail)
    with pytest.raises(OSError, match="disk full"):
        model_tf.export_saved_model(model, tmp_path, images[:16], labels[:16])
    base = model_base_path(tmp_path, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    assert list(base.iterdir()) == []


def test_next_free_version_is_one_above_the_highest(tmp_path: Path) -> None:
    base = model_base_path(tmp_path, contract.TORCH_FRAMEWORK_DIR, contract.MODEL_NAME)
    (base / "1").mkdir(parents=True)
    (base / "7").mkdir()
    (base / "latest").mkdir()  # not a version: ignored
    with publish_version(base) as (_, version):
        pass
    assert version == 8
