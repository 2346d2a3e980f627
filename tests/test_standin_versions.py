"""Version management: not loaded yet, hot swap under load, broken versions, policies, labels, reload."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2
from tensorflow_serving.config import model_server_config_pb2

from call_load import Load
from mnist_client import contract
from tests.standin_helpers import (
    Stubs,
    copy_version,
    outputs,
    predict_request,
    publish_broken_version,
    running,
    server_options,
    stubs_for,
    tf_base_path,
    wait_for,
)

State = get_model_status_pb2.ModelVersionStatus


@pytest.fixture
def base(model_repo: Path, tmp_path: Path) -> Path:
    """A private base path with version 1 (tests publish more versions into it)."""
    path = tmp_path / contract.MODEL_NAME
    shutil.copytree(tf_base_path(model_repo) / "1", path / "1")
    return path


@pytest.fixture(scope="module")
def image(test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_images[0][:1]


def _health(stubs: Stubs, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(stubs.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def version_calls(stubs: Stubs, image: np.ndarray) -> Callable[[], str]:
    """A call for ``Load``: ``"version N"`` for the version that answered, else ``"CODE: details"``."""

    def call() -> str:
        try:
            return f"version {stubs.predict(image, timeout=10).model_spec.version.value}"
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"

    return call


def test_unavailable_until_a_version_is_loaded_then_serving(tmp_path: Path, model_repo: Path,
                                                            image: np.ndarray) -> None:
    base = tmp_path / contract.MODEL_NAME
    base.mkdir()
    with running(server_options(base), wait=False) as server, stubs_for(server) as stubs:
        with pytest.raises(grpc.RpcError) as caught:
            stubs.predict(image)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no version of model mnist is loaded yet" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stubs.status()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert _health(stubs) == health_pb2.HealthCheckResponse.NOT_SERVING

        shutil.copytree(tf_base_path(model_repo) / "1", base / ".staging")
        (base / ".staging").rename(base / "1")
        server.wait_until_available(timeout=30)

        assert _health(stubs) == health_pb2.HealthCheckResponse.SERVING
        assert _health(stubs, "tensorflow.serving.PredictionService") == health_pb2.HealthCheckResponse.SERVING
        assert stubs.predict(image).model_spec.version.value == 1


def test_new_version_swaps_in_under_concurrent_calls_with_zero_failures(base: Path, image: np.ndarray) -> None:
    with running(server_options(base)) as server, stubs_for(server) as stubs:
        with Load(version_calls(stubs, image)) as load:
            wait_for(lambda: load.count("version 1") >= 20, what="calls on version 1")
            copy_version(base, 1, 2)
            wait_for(lambda: load.count("version 2") >= 20, what="calls on version 2")
        statuses = {s.version: s.state for s in stubs.status()}

    assert set(load.results()) == {"version 1", "version 2"}  # no call failed
    assert statuses == {1: State.END, 2: State.AVAILABLE}


def test_broken_version_is_refused_while_the_old_one_serves(base: Path, image: np.ndarray) -> None:
    with running(server_options(base)) as server, stubs_for(server) as stubs:
        with Load(version_calls(stubs, image)) as load:
            publish_broken_version(base, 2)
            wait_for(lambda: any(s.version == 2 and s.state == State.END for s in stubs.status()),
                     what="version 2 to be refused")
            served_before = load.count("version 1")
            wait_for(lambda: load.count("version 1") >= served_before + 20, what="calls after the refusal")
        [broken] = stubs.status(version=2)
        with pytest.raises(grpc.RpcError) as caught:
            stubs.predict(image, version=2)

    assert set(load.results()) == {"version 1"}  # no call failed, none reached version 2
    assert broken.status.error_code != 0
    assert "version 2 of model mnist failed to load" in broken.status.error_message
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "failed to load" in caught.value.details()


def _write_model_config(path: Path, models: dict[str, Path], labels: dict[str, int] | None = None) -> Path:
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in models.items():
        entry = config.model_config_list.config.add(name=name, base_path=str(base_path), model_platform="tensorflow")
        entry.model_version_policy.all.SetInParent()
        entry.version_labels.update(labels or {})
    path.write_text(str(config))
    return path


def test_all_versions_policy_and_version_labels_from_the_model_config_file(
    base: Path, tmp_path: Path, image: np.ndarray
) -> None:
    copy_version(base, 1, 2)
    config_file = _write_model_config(tmp_path / "models.config", {contract.MODEL_NAME: base},
                                      {"stable": 1, "canary": 2})
    options = server_options(base, model_base_path="", model_config_file=str(config_file))
    with running(options) as server, stubs_for(server) as stubs:
        wait_for(lambda: len([s for s in stubs.status() if s.state == State.AVAILABLE]) == 2, what="both versions")
        latest = stubs.predict(image).model_spec.version.value
        pinned = stubs.predict(image, version=1).model_spec.version.value
        labelled = predict_request(image)
        labelled.model_spec.version_label = "canary"
        canary = stubs.prediction.Predict(labelled, timeout=10).model_spec.version.value
    assert (latest, pinned, canary) == (2, 1, 2)


def test_reload_config_adds_a_model_without_a_restart(base: Path, tmp_path: Path, image: np.ndarray) -> None:
    with running(server_options(base)) as server, stubs_for(server) as stubs:
        request = model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(model_server_config_pb2.ModelServerConfig())
        for name in (contract.MODEL_NAME, "mnist_b"):
            request.config.model_config_list.config.add(name=name, base_path=str(base), model_platform="tensorflow")
        stubs.model.HandleReloadConfigRequest(request, timeout=10)
        server.wait_until_available(timeout=30)
        answers = {name: outputs(stubs.predict(image, name=name))[contract.CLASSES_NAME].tolist()
                   for name in (contract.MODEL_NAME, "mnist_b")}

        bad = model_management_pb2.ReloadConfigRequest()
        bad.config.model_config_list.config.add(name="x", base_path=str(base), model_platform="pytorch")
        with pytest.raises(grpc.RpcError) as caught:
            stubs.model.HandleReloadConfigRequest(bad, timeout=10)

    assert answers[contract.MODEL_NAME] == answers["mnist_b"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_platform 'pytorch'" in caught.value.details()
