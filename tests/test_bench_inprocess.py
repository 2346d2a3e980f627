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


def test_main_writes_json_and_prints_a_table(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = inprocess.main(
        ["--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--calls-1", "5", "--calls-64", "3",
         "--calls-256", "2"]  # fmt: skip
    )
    assert json.loads((tmp_path / "inprocess.json").read_text()) == result
    for framework in ("pytorch", "tensorflow"):
        measured = result["results"][framework]
        assert measured["accuracy_first_1000"] > 0.8, "the trained model, not a random one, was measured"
        assert measured["latency"]["1"]["calls"] == 5 and measured["latency"]["64"]["calls"] == 3
        for batch in ("1", "64"):
            assert 0 < measured["latency"][batch]["median_ms"] <= measured["latency"][batch]["p99_ms"]
        assert measured["throughput"]["batch_size"] == 256 and measured["throughput"]["images_per_second"] > 0
    assert result["results"]["pytorch"]["threads"] == {"intra_op": 1}
    assert set(result["ratio_tensorflow_over_pytorch"]) == {
        "batch_1_median_ms",
        "batch_1_p99_ms",
        "batch_64_median_ms",
        "batch_64_p99_ms",
        "batch_256_images_per_second",
    }
    table = capsys.readouterr().out
    assert "batch 1 median (ms)" in table and "batch 256 images/s" in table


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
        model_repo / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME / "1", images, labels, calls=FEW_CALLS
    )
    assert tf_measured["framework"] == "tensorflow" and set(tf_measured["threads"]) == {"intra_op", "inter_op"}


def test_missing_models_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        inprocess.main(["--models-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no exported model under" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no model.pt here or in its latest version folder"):
        inprocess.measure_torch(tmp_path)
