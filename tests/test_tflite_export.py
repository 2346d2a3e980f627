"""The TFLite model the TensorFlow export writes beside the SavedModel: its contract and its agreement.

The model comes from the ``model_repo`` fixture (the TF trainer's ``--quick`` mode, exported by the
real export code); the SavedModel it is compared with is loaded as ``tf.saved_model.load`` loads it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow as tf

from mnist_client import contract
from serving.model_repository import model_base_path
from training import model_tf, tflite_model
from training.tflite_model import TfliteAgreementError, TfliteModel


def tf_version_dir(model_repo: Path) -> Path:
    return model_base_path(model_repo, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME) / "1"


@pytest.fixture(scope="module")
def tflite(model_repo: Path) -> TfliteModel:
    return TfliteModel(tf_version_dir(model_repo) / contract.TFLITE_FILENAME, threads=1)


@pytest.fixture(scope="module")
def saved_model_classes(model_repo: Path, test_images: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, classes) of the exported SavedModel's signature on the fixture's test images."""
    signature = tf.saved_model.load(str(tf_version_dir(model_repo))).signatures[contract.SIGNATURE_NAME]
    out = signature(**{contract.INPUT_NAME: tf.constant(test_images[0])})
    return out[contract.PROBABILITIES_NAME].numpy(), out[contract.CLASSES_NAME].numpy()


def test_the_export_writes_a_tflite_file_beside_the_saved_model(model_repo: Path) -> None:
    directory = tf_version_dir(model_repo)
    assert (directory / contract.SAVED_MODEL_FILENAME).is_file()
    assert (directory / contract.TFLITE_FILENAME).stat().st_size > 4 * 1_199_882  # float32 weights, not quantised


def test_tflite_signature_is_the_contract(tflite: TfliteModel) -> None:
    assert tflite.interpreter.get_signature_list() == {
        contract.SIGNATURE_NAME: {"inputs": [contract.INPUT_NAME], "outputs": sorted(contract.OUTPUT_NAMES)}
    }
    (images,) = tflite.runner.get_input_details().values()
    assert images["dtype"] == contract.INPUT_DTYPE
    assert images["shape_signature"].tolist() == [-1, contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH]
    outputs = tflite.runner.get_output_details()
    assert outputs[contract.PROBABILITIES_NAME]["dtype"] == contract.PROBABILITIES_DTYPE
    assert outputs[contract.PROBABILITIES_NAME]["shape_signature"].tolist() == [-1, contract.NUM_CLASSES]
    assert outputs[contract.CLASSES_NAME]["dtype"] == contract.CLASSES_DTYPE
    assert outputs[contract.CLASSES_NAME]["shape_signature"].tolist() == [-1]


@pytest.mark.parametrize("batch", [1, 7, 64, 1])  # back to 1: the runner resizes its input each time
def test_tflite_outputs_follow_the_contract(
    tflite: TfliteModel, test_images: tuple[np.ndarray, np.ndarray], batch: int
) -> None:
    probabilities, classes = tflite(test_images[0][:batch])
    assert probabilities.dtype == contract.PROBABILITIES_DTYPE and probabilities.shape == (batch, contract.NUM_CLASSES)
    assert classes.dtype == contract.CLASSES_DTYPE and classes.shape == (batch,)
    assert np.all(probabilities >= 0.0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(classes, probabilities.argmax(axis=1))


def test_tflite_agrees_with_the_saved_model(
    tflite: TfliteModel,
    saved_model_classes: tuple[np.ndarray, np.ndarray],
    test_images: tuple[np.ndarray, np.ndarray],
) -> None:
    saved_probabilities, saved_classes = saved_model_classes
    probabilities, classes = tflite.predict_all(test_images[0], batch_size=250)
    assert np.mean(classes == saved_classes) >= 0.999
    np.testing.assert_allclose(probabilities, saved_probabilities, atol=1e-4)  # float32 both: round-off only


def test_tflite_normalises_inside(
    saved_model_classes: tuple[np.ndarray, np.ndarray], model_repo: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_images
    accuracy = tflite_model.tflite_accuracy(tf_version_dir(model_repo), images, labels, threads=1)
    saved_accuracy = float(np.mean(saved_model_classes[1] == labels))
    assert accuracy == pytest.approx(saved_accuracy, abs=1 / len(labels))  # pixel/255 in, as for the SavedModel
    assert accuracy > 0.8, "a --quick model should be far above chance (0.1)"


def test_model_json_records_the_tflite_check(
    model_repo: Path, saved_model_classes: tuple[np.ndarray, np.ndarray], test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    metadata: dict[str, Any] = json.loads((tf_version_dir(model_repo) / contract.METADATA_FILENAME).read_text())
    record = metadata["tflite"]
    assert record["file"] == contract.TFLITE_FILENAME
    assert record["bytes"] == (tf_version_dir(model_repo) / contract.TFLITE_FILENAME).stat().st_size
    assert record["test_examples"] == metadata["test_examples"] == len(test_images[1])
    assert record["agreement_with_saved_model"] >= 0.999
    assert record["disagreements"] <= 1
    assert record["test_accuracy"] == pytest.approx(metadata["test_accuracy"], abs=1 / len(test_images[1]))
    assert 0 <= record["max_probability_difference"] < 1e-4


def test_latency_is_measured_on_base_paths_and_version_folders(
    model_repo: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    base = model_base_path(model_repo, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    for path, batch in ((base, 1), (tf_version_dir(model_repo), 4)):
        seconds = tflite_model.tflite_latency(path, batch=batch, repeats=5, threads=1, images=test_images[0])
        assert 0 < seconds < 60


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch": 0}, "batch 0, repeats 5: expected positive counts"),
        ({"repeats": 0, "batch": 1}, "batch 1, repeats 0: expected positive counts"),
        ({"threads": 0}, "threads 0: expected a positive count"),
        ({"batch": 2000}, "1000 images cannot fill a batch of 2000"),
    ],
)
def test_bad_latency_arguments_are_clear_errors(
    model_repo: Path, test_images: tuple[np.ndarray, np.ndarray], kwargs: dict[str, int], message: str
) -> None:
    arguments = {"batch": 1, "repeats": 5, "threads": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        tflite_model.tflite_latency(tf_version_dir(model_repo), images=test_images[0], **arguments)


def test_wrong_input_shape_and_missing_file_are_clear_errors(tflite: TfliteModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"images of shape \(2, 28, 27\): expected \(None, 28, 28\)"):
        tflite(np.zeros((2, 28, 27), dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="no model.tflite here or in its latest version folder"):
        TfliteModel(tmp_path)


def test_too_little_agreement_is_refused(
    tflite: TfliteModel, saved_model_classes: tuple[np.ndarray, np.ndarray], test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_images
    probabilities, classes = saved_model_classes
    wrong = classes.copy()
    wrong[:2] = (wrong[:2] + 1) % contract.NUM_CLASSES  # 2 of 1,000 differ: 99.8%, under 99.9%
    with pytest.raises(TfliteAgreementError, match=r"agree with the SavedModel's on 99\.80% of 1000 .*at least 99\.9%"):
        tflite_model.check_against_saved_model(tflite.path, images, labels, probabilities, wrong)


def test_export_with_a_disagreeing_tflite_publishes_nothing(
    tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = test_images
    # No model can agree on more than 100%: the real check runs and must refuse the export.
    impossible = functools.partial(tflite_model.check_against_saved_model, min_agreement=1.01)
    monkeypatch.setattr(model_tf, "check_against_saved_model", impossible)
    with pytest.raises(TfliteAgreementError, match="expected at least 101.0%"):
        model_tf.export_saved_model(model_tf.build_model(), tmp_path, images[:16], labels[:16])
    base = model_base_path(tmp_path, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    assert list(base.iterdir()) == []  # no version, no staging folder
