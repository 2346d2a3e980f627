"""Shared fixtures and helpers for the TF Serving stand-in tests (no tests here).

Servers run in-process on 127.0.0.1 with an ephemeral port (``running``), or, where a test needs the
process itself (signals, exit status, its log), as ``python -m serving.tfs_standin`` started by the
project's one launcher (``standin_process``: stack.servers.running_server). They are talked to through
the official tensorflow-serving-api stubs, as any TF Serving client would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from mnist_client import contract
from serving.model_repository import model_base_path, publish_version
from serving.tfs_standin.flags import ServerOptions
from serving.tfs_standin.server import ModelServer
from stack.config import free_port_config
from stack.servers import Server, running_server

# Fast reloads for tests: poll the base path often, never wait long between load retries.
FAST = {"file_system_poll_wait_seconds": 1, "max_num_load_retries": 0, "load_retry_interval_micros": 0}


def tf_base_path(models_root: Path) -> Path:
    return model_base_path(models_root, contract.TF_FRAMEWORK_DIR, contract.MODEL_NAME)


def server_options(base_path: Path, **overrides: object) -> ServerOptions:
    values: dict[str, object] = {
        "port": 0,
        "standin_host": "127.0.0.1",
        "model_name": contract.MODEL_NAME,
        "model_base_path": str(base_path),
        **FAST,
        **overrides,
    }
    return ServerOptions(**values)  # type: ignore[arg-type]


@contextlib.contextmanager
def running(options: ServerOptions, wait: bool = True) -> Iterator[ModelServer]:
    server = ModelServer(options)
    server.start()
    try:
        if wait:
            server.wait_until_available(timeout=60)
        yield server
    finally:
        server.stop(grace=5)


@contextlib.contextmanager
def standin_process(base_path: Path, folder: Path, *flags: str, rest_api: bool = False) -> Iterator[Server]:
    """``python -m serving.tfs_standin`` serving ``base_path`` on free ports, its log under ``folder``,
    ready for the block (the model AVAILABLE) and stopped after. ``flags``: more of TF Serving's flags.
    ``rest_api``: also its REST API (``server.rest_url``), else gRPC alone (``server.grpc_target``)."""
    config = free_port_config(base_path.parent, folder, ready_timeout_s=120)
    if not rest_api:
        config = dataclasses.replace(config, tfs_rest_port=0)
    with running_server(config, "tf", flags=[f"--model_base_path={base_path}", *flags], proxy=False) as server:
        yield server


class Stubs:
    """The official stubs on one channel to a running server."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        self.channel = (
            grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        )
        self.prediction = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def predict(self, images: np.ndarray, timeout: float = 30, **spec: object) -> predict_pb2.PredictResponse:
        return self.prediction.Predict(predict_request(images, **spec), timeout=timeout)

    def status(self, version: int | None = None, name: str = contract.MODEL_NAME) -> list:
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        if version is not None:
            request.model_spec.version.value = version
        return list(self.model.GetModelStatus(request, timeout=10).model_version_status)

    def metadata(self, **spec: object) -> get_model_metadata_pb2.GetModelMetadataResponse:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = str(spec.pop("name", contract.MODEL_NAME))
        for key, value in spec.items():
            setattr(request.model_spec, key, value)
        return self.prediction.GetModelMetadata(request, timeout=10)


def predict_request(
    images: np.ndarray,
    name: str = contract.MODEL_NAME,
    version: int | None = None,
    signature_name: str = "",
    output_filter: tuple[str, ...] = (),
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    request.model_spec.signature_name = signature_name
    request.output_filter.extend(output_filter)
    request.inputs[contract.INPUT_NAME].CopyFrom(tf.make_tensor_proto(images))
    return request


@contextlib.contextmanager
def stubs_for(server: ModelServer) -> Iterator[Stubs]:
    stubs = Stubs(f"127.0.0.1:{server.port}")
    try:
        yield stubs
    finally:
        stubs.close()


def outputs(response: predict_pb2.PredictResponse) -> dict[str, np.ndarray]:
    return {alias: tf.make_ndarray(tensor) for alias, tensor in response.outputs.items()}


def copy_version(base: Path, source_version: int, new_version: int) -> Path:
    """Publish a copy of an existing version under a new number, atomically (as training does)."""
    with publish_version(base, new_version) as (staging, _):
        shutil.copytree(base / str(source_version), staging, dirs_exist_ok=True)
    return base / str(new_version)


def publish_broken_version(base: Path, version: int) -> Path:
    """A version whose saved_model.pb is garbage: it must be refused while the old one serves."""
    with publish_version(base, version) as (staging, _):
        (staging / contract.SAVED_MODEL_FILENAME).write_bytes(b"this is not a SavedModel")
    return base / str(version)


def wait_for(condition: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tf_model_copy(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private base path holding a copy of the fixture's TF version 1 (tests add versions to it)."""
    base = tmp_path_factory.mktemp("standin") / contract.MODEL_NAME
    shutil.copytree(tf_base_path(model_repo) / "1", base / "1")
    return base


@pytest.fixture(scope="module", name="server")
def standin_server(tf_model_copy: Path) -> Iterator[ModelServer]:
    """One stand-in per test module on its copy of the fixture model; import it with ``tf_model_copy``."""
    with running(server_options(tf_model_copy)) as server:
        yield server


@pytest.fixture(scope="module", name="stubs")
def standin_stubs(server: ModelServer) -> Iterator[Stubs]:
    """The official stubs on one channel to the module's ``server``."""
    with stubs_for(server) as stubs:
        yield stubs


def expected_outputs(version_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """What the SavedModel itself answers in this process (eager TensorFlow, not the stand-in)."""
    loaded = tf.saved_model.load(str(version_dir))
    result = loaded.signatures[contract.SIGNATURE_NAME](images=tf.constant(images, dtype=tf.float32))
    return {alias: tensor.numpy() for alias, tensor in result.items()}
