"""The TensorFlow trainer end to end: --quick export, TensorBoard logs, flags, and two MWMS workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf

from mnist_client import contract
from serving.model_repository import list_versions, model_base_path
from stack.processes import free_port
from training import recipe, train_tf

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> tuple[dict[str, Any], Path, Path]:
    """One --quick training run shared by the tests below: (summary, models root, log root)."""
    models, logs = tmp_path_factory.mktemp("models"), tmp_path_factory.mktemp("runs")
    summary = train_tf.main(["--quick", "--data-dir", str(mnist_dir), "--output-dir", str(models),
                             "--log-dir", str(logs), "--version", "2"])
    return summary, models, logs


def tf_base(models: Path) -> Path:
    return model_base_path(models, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)


def summary_tags(directory: Path) -> dict[str, set[str]]:
    """{tag: plugins} over every event file below ``directory``."""
    tags: dict[str, set[str]] = defaultdict(set)
    for events in directory.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                tags[f"{events.parent.name}/{value.tag}"].add(value.metadata.plugin_data.plugin_name)
    return tags


def test_quick_run_exports_a_saved_model_with_metadata(quick_run: tuple[dict[str, Any], Path, Path]) -> None:
    summary, models, _ = quick_run
    export = tf_base(models) / "2"
    assert summary["export_path"] == str(export) and summary["version"] == 2 and not summary["skipped"]
    assert summary["test_accuracy"] > 0.8 and summary["test_examples"] == recipe.QUICK_TEST_EXAMPLES
    assert summary["strategy"] == "default" and summary["replicas"] == summary["workers"] == 1
    assert (export / contract.SAVED_MODEL_FILENAME).is_file()
    assert (export / "variables").is_dir()
    assert (export / contract.WARMUP_RELATIVE_PATH).stat().st_size > 0
    metadata = json.loads((export / contract.METADATA_FILENAME).read_text())
    assert metadata["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=2e-3)
    assert metadata["epochs"] == 1 and metadata["quick"] is True
    assert metadata["train_examples"] == recipe.QUICK_TRAIN_EXAMPLES
    assert metadata["hyperparameters"]["optimizer"] == "adam"
    assert metadata["hyperparameters"]["batch_size"] == recipe.QUICK_DEFAULTS["batch_size"]
    assert metadata["strategy"] == "default" and metadata["workers"] == 1
    assert not [p for p in tf_base(models).iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_quick_run_writes_tensorboard_scalars_histograms_and_samples(
    quick_run: tuple[dict[str, Any], Path, Path],
) -> None:
    summary, _, logs = quick_run
    run_dir = Path(summary["tensorboard_dir"])
    assert run_dir.parent == logs / contract.TF_FRAMEWORK_DIR
    tags = summary_tags(run_dir)
    for tag in ("train/loss", "train/accuracy", "train/learning_rate", "test/loss", "test/accuracy"):
        assert tags[tag] == {"scalars"}, tag
    histograms = [t for t, plugins in tags.items() if plugins == {"histograms"}]
    assert len(histograms) == 8  # kernel and bias of 2 conv + 2 dense layers
    assert tags["samples/test_images"] == {"images"}
    assert tags["samples/predictions"] == {"text"}


def test_skip_if_exists_does_nothing_when_a_version_is_exported(
    quick_run: tuple[dict[str, Any], Path, Path], tmp_path: Path
) -> None:
    _, models, _ = quick_run
    summary = train_tf.main(["--skip-if-exists", "--output-dir", str(models), "--log-dir", str(tmp_path)])
    assert summary["skipped"] and summary["version"] == 2
    assert list_versions(tf_base(models)) == [2]
    assert not list(tmp_path.iterdir()), "a skipped run must not write TensorBoard logs"


def test_existing_version_is_refused_before_training(
    quick_run: tuple[dict[str, Any], Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, models, logs = quick_run
    with pytest.raises(SystemExit) as exit_info:
        train_tf.main(["--quick", "--output-dir", str(models), "--log-dir", str(logs), "--version", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--version 2:" in err and "already exists and versions are immutable" in err and "--skip-if-exists" in err


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_tf.main(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--epochs", "--batch-size", "--lr", "--optimizer", "--seed", "--device", "--data-dir",
                 "--output-dir", "--log-dir", "--version", "--quick", "--skip-if-exists"):  # fmt: skip
        assert flag in out
    assert f"(default: {recipe.DEFAULT_EPOCHS})" in out and "(default: 128)" in out and "(default: adam)" in out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs: 0: expected a positive integer"),
        (["--batch-size", "many"], "--batch-size: 'many' is not an integer"),
        (["--lr", "-0.1"], "--lr: -0.1: expected a positive number"),
        (["--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
        (["--device", "tpu"], "argument --device: 'tpu': expected auto, cpu, cuda or cuda:N"),
        (["--momentum", "0.5"], "--momentum applies to --optimizer sgd only"),
        (["--optimizer", "sgd", "--momentum", "1.5"], "expected a value in [0, 1)"),
        (["--version", "0"], "--version: 0: expected a positive integer"),
        (["--log-interval", "-1"], "argument --log-interval: -1: expected 0 or a positive integer"),
        (["--num-threads", "-2"], "argument --num-threads: -2: expected 0 or a positive integer"),
        (["--data-dir", "/nonexistent/mnist"], "--data-dir /nonexistent/mnist: not a directory"),
    ],
)
def test_bad_flags_give_clear_errors(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_tf.main(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_larger_than_the_data_is_a_clear_error(tmp_path: Path) -> None:
    flags = ["--quick", "--batch-size", "100000", "--output-dir", str(tmp_path), "--log-dir", str(tmp_path)]
    with pytest.raises(ValueError, match="global batch 100000 .* larger than the 4096 training images"):
        train_tf.main(flags)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="this machine has a GPU")
def test_gpu_without_a_gpu_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_tf.main(["--quick", "--device", "gpu", "--output-dir", str(tmp_path), "--log-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--device: device 'cuda' requested but TensorFlow sees no GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ("{not json", "TF_CONFIG is not valid"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', "TF_CONFIG is not valid .*'task'"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 3}}', "not in its cluster"),
    ],
)
def test_malformed_tf_config_is_a_clear_error(
    tf_config: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ValueError, match=message):
        train_tf.main(["--quick", "--output-dir", str(tmp_path), "--log-dir", str(tmp_path)])


@pytest.mark.slow
def test_two_workers_train_with_multi_worker_mirrored_strategy(tmp_path: Path, mnist_dir: Path) -> None:
    """Two local processes under TF_CONFIG: both exit 0, only the chief publishes, the worker cleans up."""
    models, logs, scratch = tmp_path / "models", tmp_path / "runs", tmp_path / "scratch"
    scratch.mkdir()
    ports: set[int] = set()
    while len(ports) < 2:
        ports.add(free_port())
    cluster = {"worker": [f"127.0.0.1:{port}" for port in sorted(ports)]}
    command = [sys.executable, "-m", "training.train_tf", "--quick", "--data-dir", str(mnist_dir)]
    command += ["--output-dir", str(models), "--log-dir", str(logs)]
    workers, log_files = [], [tmp_path / f"worker{i}.log" for i in range(2)]
    for index, log_file in enumerate(log_files):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT),
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
            "TMPDIR": str(scratch),  # where the non-chief worker writes its throw-away export
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "TF_NUM_INTRAOP_THREADS": "1",  # one core per worker on a small machine
            "TF_NUM_INTEROP_THREADS": "1",
        }
        # Output to files, not pipes: a worker blocked on a full pipe would stall the other in a collective.
        with open(log_file, "w") as out:
            workers.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        for worker in workers:
            worker.wait(timeout=WORKERS_TIMEOUT_S)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    outputs = [log_file.read_text() for log_file in log_files]
    for index, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"worker {index} exited with {worker.returncode}:\n{output[-4000:]}"
    assert "MultiWorkerMirroredStrategy strategy, 2 replica(s) on 2 worker(s)" in outputs[0]
    assert "not the chief, nothing published" in outputs[1]

    assert list_versions(tf_base(models)) == [1]
    metadata = json.loads((tf_base(models) / "1" / contract.METADATA_FILENAME).read_text())
    assert metadata["strategy"] == "MultiWorkerMirroredStrategy"
    assert metadata["workers"] == metadata["replicas"] == 2
    assert metadata["hyperparameters"]["global_batch_size"] == 2 * metadata["hyperparameters"]["batch_size"]
    assert metadata["test_accuracy"] > 0.7
    assert len(list((logs / contract.TF_FRAMEWORK_DIR).iterdir())) == 1, "only the chief writes TensorBoard logs"
    assert not list(scratch.glob("train_tf-worker-*")), "the non-chief worker left its temporary export behind"
