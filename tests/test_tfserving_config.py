"""The real TF Serving configuration in serving/tfserving/, checked with the stand-in's readers.

The stand-in parses TF Serving's text formats strictly (an unknown field is an
error), so these tests catch a misspelt field before the container does, and
serve the model with the very files the container uses.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mnist_client import contract
from serving.tfs_standin.config import (
    load_batching_options,
    load_model_configs,
    load_monitoring_config,
)
from serving.tfs_standin.flags import ServerOptions, tensorflow_model_server_flags
from tests.standin_helpers import outputs, running, server_options, stubs_for, tf_base_path
from training.model_tf import WARMUP_BATCH_SIZES

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "serving" / "tfserving"
MODELS_CONFIG = CONFIG_DIR / "models.config"
GPU_BATCHING = CONFIG_DIR / "batching_parameters.txt"
CPU_BATCHING = CONFIG_DIR / "batching_parameters_cpu.txt"
MONITORING = CONFIG_DIR / "monitoring.config"
CONTAINER_MODELS_ROOT = "/models"
# The batch size the benchmarks and the load tester send in one request.
BENCH_BATCH = 256


def test_models_config_serves_mnist_from_the_container_model_path() -> None:
    [model] = load_model_configs(ServerOptions(model_config_file=str(MODELS_CONFIG)))
    assert model.name == contract.MODEL_NAME
    assert model.base_path == Path(CONTAINER_MODELS_ROOT, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)
    assert (model.policy.kind, model.policy.num_versions) == ("latest", 1)
    assert model.version_labels == {}


def test_the_stand_in_serves_with_models_config(model_repo: Path, tmp_path: Path,
                                                test_images: tuple[np.ndarray, np.ndarray]) -> None:
    base = tmp_path / "mnist"
    shutil.copytree(tf_base_path(model_repo) / "1", base / "1")
    config = tmp_path / "models.config"
    container_base = f"{CONTAINER_MODELS_ROOT}/{contract.TF_FRAMEWORK_DIR}/{contract.MODEL_NAME}"
    config.write_text(MODELS_CONFIG.read_text().replace(f'"{container_base}"', f'"{base}"'))
    options = server_options(base, model_base_path="", model_config_file=str(config))
    with running(options) as server, stubs_for(server) as stubs:
        answer = outputs(stubs.predict(test_images[0][:3]))
    assert answer[contract.CLASSES_NAME].shape == (3,)


@pytest.mark.parametrize("path", [GPU_BATCHING, CPU_BATCHING], ids=["gpu", "cpu"])
def test_batching_files_accept_every_request_we_send(path: Path) -> None:
    options = load_batching_options(path)
    # A request larger than max_batch_size is refused, and warm-up batches are requests too.
    assert options.max_batch_size >= max(WARMUP_BATCH_SIZES)
    assert options.max_batch_size >= BENCH_BATCH
    assert options.num_batch_threads >= 1  # set explicitly, never "one per core of whatever host"
    assert not options.pad_variable_length_inputs


def test_gpu_batching_quantises_shapes_and_bounds_waiting() -> None:
    gpu, cpu = load_batching_options(GPU_BATCHING), load_batching_options(CPU_BATCHING)
    assert gpu.allowed_batch_sizes and gpu.allowed_batch_sizes[-1] == gpu.max_batch_size
    assert all(b == 2 * a for a, b in zip(gpu.allowed_batch_sizes, gpu.allowed_batch_sizes[1:]))
    assert 0 < gpu.batch_timeout_micros <= 5000  # "a few milliseconds" at most
    # The CPU file pads nothing and never waits; both refuse the same request sizes.
    assert cpu.allowed_batch_sizes == () and cpu.batch_timeout_micros == 0
    assert cpu.max_batch_size == gpu.max_batch_size


@pytest.mark.parametrize("path", [GPU_BATCHING, CPU_BATCHING], ids=["gpu", "cpu"])
def test_the_stand_in_loads_and_serves_with_each_batching_file(
    path: Path, model_repo: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    base = tf_base_path(model_repo)
    options = server_options(base, enable_batching=True, batching_parameters_file=str(path))
    with running(options) as server, stubs_for(server) as stubs:  # warm-up ran through the batcher
        answer = outputs(stubs.predict(test_images[0][:BENCH_BATCH]))
    assert answer[contract.PROBABILITIES_NAME].shape == (BENCH_BATCH, contract.NUM_CLASSES)


def test_monitoring_config_turns_on_prometheus_at_the_documented_path() -> None:
    prometheus = load_monitoring_config(MONITORING).prometheus_config
    assert prometheus.enable
    assert prometheus.path == "/monitoring/prometheus/metrics"


def _flags_in(text: str) -> set[str]:
    return set(re.findall(r"--([a-z][a-z0-9_]*)=", text))


@pytest.mark.parametrize(
    "path",
    [REPO_ROOT / "docker" / "tfserving-entrypoint.sh", REPO_ROOT / "deploy" / "k8s" / "base" / "serving" /
     "tfserving-deployment.yaml"],
    ids=["docker-entrypoint", "k8s-deployment"],
)
def test_container_command_lines_use_real_flags_and_our_config_files(path: Path) -> None:
    text = path.read_text()  # both files are tracked: a missing one is a failure, not a skip
    flags = _flags_in(text)
    assert {"port", "model_config_file", "enable_batching", "batching_parameters_file"} <= flags
    unknown = flags - tensorflow_model_server_flags()
    assert not unknown, f"not tensorflow_model_server flags: {sorted(unknown)}"
    for config_path in re.findall(r"/etc/tfserving/([\w.]+)", text):
        assert (CONFIG_DIR / config_path).is_file(), f"{path.name} names /etc/tfserving/{config_path}"

