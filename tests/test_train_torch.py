"""The PyTorch trainer end to end: --quick export, TensorBoard logs, flags, and DDP under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mnist_client import contract, mnist_data
from mnist_reference import MNIST_DATASET_CHECKSUM
from serving.check_set import CHECK_SET_FILENAME
from serving.model_repository import list_versions
from training import recipe, train_torch
from training.model_torch import predict_numpy

REPO_ROOT = Path(__file__).resolve().parent.parent
DDP_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[dict[str, Any], Path, Path]:
    """One --quick training run shared by the tests below: (summary, models root, log root)."""
    models, logs = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("runs")
    summary = train_torch.main(["--quick", "--data-dir", str(mnist_dir), "--output-dir", str(models),
                                "--log-dir", str(logs), "--version", "3"])
    return summary, models, logs


def test_quick_run_exports_a_verified_model_with_metadata(
    quick_run: tuple[dict[str, Any], Path, Path], mnist_test: mnist_data.Split
) -> None:
    summary, models, _ = quick_run
    export = models / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME / "3"
    assert summary["export_path"] == str(export) and summary["version"] == 3 and not summary["skipped"]
    assert sorted(p.name for p in export.iterdir()) == [CHECK_SET_FILENAME, contract.METADATA_FILENAME,
                                                        contract.TORCHSCRIPT_FILENAME]

    meta = json.loads((export / contract.METADATA_FILENAME).read_text())
    assert meta["version"] == 3 and meta["framework"] == "pytorch" and meta["format"] == "torchscript"
    assert meta["signature"] == contract.signature()
    assert meta["test_examples"] == recipe.QUICK_TEST_EXAMPLES
    assert meta["test_accuracy"] >= 0.85, "quick mode should be clearly above chance"
    assert meta["test_accuracy"] == summary["test_accuracy"]
    assert meta["data_checksum"] == MNIST_DATASET_CHECKSUM
    assert meta["epochs"] == 1 and meta["world_size"] == 1 and meta["device"] == "cpu"
    assert meta["train_examples"] == recipe.QUICK_TRAIN_EXAMPLES
    assert meta["train_seconds"] > 0 and meta["images_per_second"] > 0
    assert meta["hyperparameters"]["optimizer"] == "adam" and meta["hyperparameters"]["quick"] is True

    # The TorchScript file alone (no Python model code) reproduces the recorded accuracy.
    loaded = torch.jit.load(str(export / contract.TORCHSCRIPT_FILENAME), map_location="cpu").eval()
    n = recipe.QUICK_TEST_EXAMPLES
    probabilities, classes = predict_numpy(loaded, mnist_test.scaled()[:n])
    assert probabilities.dtype == contract.PROBABILITIES_DTYPE and classes.dtype == contract.CLASSES_DTYPE
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert float(np.mean(classes == mnist_test.labels[:n])) == pytest.approx(meta["test_accuracy"])


def test_quick_run_writes_tensorboard_scalars_histograms_and_samples(
    quick_run: tuple[dict[str, Any], Path, Path], mnist_test: mnist_data.Split
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, _, logs = quick_run
    runs = list((logs / contract.TORCH_FRAMEWORK_DIR).iterdir())
    assert len(runs) == 1 and summary["tensorboard_dir"] == str(runs[0])
    # Same layout and tag names as the TensorFlow trainer: <run>/{train,test,samples}.
    assert sorted(p.name for p in runs[0].iterdir()) == ["samples", "test", "train"]

    def load(part: str) -> EventAccumulator:
        return EventAccumulator(str(runs[0] / part), size_guidance={"tensors": 0, "images": 0}).Reload()

    train, test, samples = load("train"), load("test"), load("samples")
    for scalar in ("loss", "accuracy", "learning_rate", "images_per_second"):
        assert scalar in train.Tags()["scalars"], f"missing train scalar {scalar}"
    assert {"loss", "accuracy"} <= set(test.Tags()["scalars"])
    test_accuracy = test.Scalars("accuracy")
    assert [e.step for e in test_accuracy] == [1]
    assert test_accuracy[0].value == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.bias"} <= set(train.Tags()["histograms"])

    image = samples.Images("test_images")[0]
    assert image.width * image.height == contract.IMAGE_WIDTH * contract.IMAGE_HEIGHT * train_torch.SAMPLE_IMAGES
    table = samples.Tensors("predictions/text_summary")[0].tensor_proto.string_val[0].decode()
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line[:3] in {f"| {i}" for i in range(10)}]
    assert [int(row[1]) for row in rows] == mnist_test.labels[: train_torch.SAMPLE_IMAGES].tolist()  # labels
    assert all(0 <= int(row[2]) < contract.NUM_CLASSES for row in rows)  # predictions
    assert all(row[3] == ("yes" if row[1] == row[2] else "**no**") for row in rows)


def test_skip_if_exists_does_nothing_when_a_version_is_exported(
    quick_run: tuple[dict[str, Any], Path, Path], tmp_path: Path
) -> None:
    _, models, _ = quick_run
    base = models / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME
    for extra in ([], ["--version", "3"]):
        flags = ["--skip-if-exists", "--output-dir", str(models), "--log-dir", str(tmp_path), *extra]
        summary = train_torch.main(flags)
        assert summary == {"framework": "pytorch", "skipped": True, "export_path": str(base / "3"), "version": 3}
    assert list_versions(base) == [3]
    assert not (tmp_path / contract.TORCH_FRAMEWORK_DIR).exists()  # not even a TensorBoard run


def test_existing_version_is_refused_before_training(
    quick_run: tuple[dict[str, Any], Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, models, _ = quick_run
    with pytest.raises(SystemExit) as excinfo:
        train_torch.main(["--quick", "--output-dir", str(models), "--version", "3"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "--version 3:" in err and "already exists and versions are immutable" in err


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train_torch.main(["--help"])
    assert excinfo.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for expected in (
        f"--epochs EPOCHS passes over the training set (default: {recipe.DEFAULT_EPOCHS})",
        "(default: 128)",
        "(default: adam)",
        "(default: 0.003 for adam, 0.05 for sgd)",
        "(default: 1)",
        "(default: auto)",
        "$MNIST_DATA_DIR",
        f"(default: {REPO_ROOT / 'models'})",
        f"(default: {REPO_ROOT / 'runs'})",
        "(default: next free)",
        "--quick",
        "--skip-if-exists",
    ):
        assert expected in text, f"{expected!r} not in --help output"
    assert "default: None" not in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "argument --epochs: 0: expected a positive integer"),
        (["--batch-size", "-8"], "argument --batch-size: -8: expected a positive integer"),
        (["--lr", "nan"], "argument --lr: nan: expected a positive number"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice: 'rmsprop'"),
        (["--device", "tpu"], "argument --device: 'tpu': expected auto, cpu, cuda or cuda:N"),
        (["--version", "0"], "argument --version: 0: expected a positive integer"),
        (["--optimizer", "sgd", "--momentum", "1.5"], "--momentum 1.5: expected a value in [0, 1)"),
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
        (["--data-dir", "/nonexistent/mnist"], "--data-dir /nonexistent/mnist: not a directory"),
        (["--num-threads", "-1"], "argument --num-threads: -1: expected 0 or a positive integer"),
        (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate 0.1"),
    ],
)
def test_bad_flags_give_clear_errors(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train_torch.main(["--quick", "--output-dir", str(tmp_path), *flags])
    assert excinfo.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        train_torch.main(["--quick", "--output-dir", str(tmp_path), "--device", "cuda"])
    assert "--device: device 'cuda' requested but CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_train_with_ddp_and_rank0_exports(tmp_path: Path) -> None:
    models, logs = tmp_path / "models", tmp_path / "runs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.train_torch", "--quick", "--output-dir", str(models), "--log-dir", str(logs),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT_S, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "world size 2" in output

    export = models / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME / "1"
    meta = json.loads((export / contract.METADATA_FILENAME).read_text())
    assert meta["world_size"] == 2 and meta["device"] == "cpu"
    assert meta["hyperparameters"]["global_batch_size"] == 2 * meta["hyperparameters"]["batch_size"]
    assert meta["test_accuracy"] >= 0.7  # each process saw half of the quick subset
    assert list_versions(export.parent) == [1]  # only rank 0 exported
    assert len(list((logs / contract.TORCH_FRAMEWORK_DIR).iterdir())) == 1  # only rank 0 logged
    assert list((logs / contract.TORCH_FRAMEWORK_DIR).glob("*/train/events.out.tfevents.*"))
