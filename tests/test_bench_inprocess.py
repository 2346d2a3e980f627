"""bench.inprocess runs end to end on the fixture models (few calls: this checks behaviour, not speed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import inprocess
from mnist_client import contract

FEW_CALLS = {1: 5, 64: 3, inprocess.THROUGHPUT_BATCH: 2}


def test_main_measures_each_served_path_at_equal_threads(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = inprocess.main(
        ["--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--calls-1", "5", "--calls-64", "3",
         "--calls-256", "2", "--threads", "1", "2"]  # fmt: skip
    )
    assert json.loads((tmp_path / "inprocess.json").read_text()) == result
    assert set(result["results"]) == {"threads_1", "threads_2"}
    for threads, measured in result["results"].items():
        count = int(threads.split("_")[1])
        for framework in ("pytorch", "tensorflow"):
            entry = measured[framework]
            assert entry["threads"] == count
            assert entry["accuracy"] > 0.8 and entry["accuracy_images"] == 10_000, "the trained model was measured"
            assert entry["latency"]["1"]["calls"] == 5 and entry["latency"]["64"]["calls"] == 3
            for batch in ("1", "64"):
                assert 0 < entry["latency"][batch]["median_ms"] <= entry["latency"][batch]["p99_ms"]
            assert entry["throughput"]["batch_size"] == 256 and entry["throughput"]["images_per_second"] > 0
        tflite = measured["tflite"]
        assert tflite["threads"] == count and tflite["latency"]["1"]["calls"] == 5
        assert tflite["agreement_with_saved_model"] >= 0.999
        assert abs(tflite["accuracy"] - measured["tensorflow"]["accuracy"]) <= 0.001
        assert set(measured["ratio_tensorflow_over_pytorch"]) == {
            "batch_1_median_ms", "batch_1_p99_ms", "batch_64_median_ms", "batch_64_p99_ms",
            "batch_256_images_per_second",
        }  # fmt: skip
    assert set(result["paths"]) == {"pytorch", "tensorflow", "tflite"}
    table = capsys.readouterr().out
    assert "PyTorch (TorchScript)" in table and "TensorFlow (SavedModel)" in table and "TFLite" in table
    assert result["paths"]["tensorflow"] in table  # one line per framework says what the path is


def test_the_measured_paths_are_the_servers_own(
    model_repo: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """The PyTorch path is the REST worker's LoadedModel (with its optimised copy); the TensorFlow path
    answers what the stand-in's Session answers, which matches the SavedModel called eagerly."""
    import tensorflow as tf

    from serving.torch_server.model_store import LoadedModel

    images, labels = test_images
    torch_dir = model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME / "1"
    predict, version_dir = inprocess.load_torchscript(torch_dir)
    assert isinstance(predict.__self__, LoadedModel) and predict.__self__.optimized is not None
    assert version_dir == torch_dir
    exported = torch.jit.load(str(torch_dir / contract.TORCHSCRIPT_FILENAME)).eval()
    with torch.inference_mode():
        want = exported(torch.from_numpy(images[:32]))
    probabilities, classes = predict(images[:32])
    np.testing.assert_allclose(probabilities, want[contract.PROBABILITIES_NAME].numpy(), atol=1e-5)
    np.testing.assert_array_equal(classes, want[contract.CLASSES_NAME].numpy())

    tf_dir = model_repo / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME / "1"
    predict, _ = inprocess.load_saved_model(tf_dir, threads=1)
    eager = tf.saved_model.load(str(tf_dir)).signatures[contract.SIGNATURE_NAME]
    want = eager(**{contract.INPUT_NAME: tf.constant(images[:32])})
    probabilities, classes = predict(images[:32])
    np.testing.assert_allclose(probabilities, want[contract.PROBABILITIES_NAME].numpy(), atol=1e-5)
    np.testing.assert_array_equal(classes, want[contract.CLASSES_NAME].numpy())


def test_measure_functions_take_a_version_folder_and_restore_torch_threads(
    model_repo: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = test_images
    version_dir = model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME / "1"
    threads_before = torch.get_num_threads()
    measured = inprocess.measure_torch(version_dir, images, labels, calls=FEW_CALLS)
    assert torch.get_num_threads() == threads_before
    assert measured["model_dir"] == str(version_dir) and measured["version"] == 1
    tf_measured = inprocess.measure_tf(
        model_repo / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME / "1", images, labels, threads=1, calls=FEW_CALLS
    )
    assert tf_measured["framework"] == "tensorflow" and tf_measured["threads"] == 1
    assert "classes" not in tf_measured  # only on request (numpy arrays are not JSON)


def test_missing_models_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        inprocess.main(["--models-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no exported model under" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no model.pt here or in its latest version folder"):
        inprocess.measure_torch(tmp_path)
