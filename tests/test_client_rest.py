"""RestClient against a TF-Serving-shaped REST server on 127.0.0.1 (tests/client_fakes.py).

The real PyTorch server and TF Serving stand-in are exercised in tests/test_client_integration.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from client_fakes import Behaviour, RestServer, fake_model
from mnist_client import contract
from mnist_client.errors import (
    ClientConfigError,
    DeadlineExceededError,
    InvalidInputError,
    ServerError,
    UnavailableError,
)
from mnist_client.rest import JSON_CONTENT_TYPE, NPY_CONTENT_TYPE, RestClient
from mnist_client.retry import RetryPolicy
from stack.processes import free_port


@pytest.fixture()
def server():
    server = RestServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (64, 28, 28), dtype=np.uint8)


def expected(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return fake_model(images.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("binary", [False, True, "auto"])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_predict_returns_the_servers_classes_and_probabilities(server, images, binary, batch):
    with RestClient(server.url, binary=binary, binary_threshold=16) as client:
        prediction = client.predict(images[:batch])
    probabilities, classes = expected(images[:batch])
    assert prediction.classes.dtype == np.int64 and prediction.classes.shape == (batch,)
    assert prediction.probabilities.dtype == np.float32 and prediction.probabilities.shape == (batch, 10)
    np.testing.assert_array_equal(prediction.classes, classes)
    np.testing.assert_allclose(prediction.probabilities, probabilities, rtol=1e-6)
    use_npy = binary is True or (binary == "auto" and batch >= 16)
    assert server.behaviour.content_types == [NPY_CONTENT_TYPE if use_npy else JSON_CONTENT_TYPE]


def test_float_and_single_image_inputs(server, images):
    floats = images[:2].astype(np.float32) / 255
    with RestClient(server.url) as client:
        np.testing.assert_array_equal(client.predict(floats).classes, expected(images[:2])[1])
        single = client.predict(images[5])
    assert single.classes.shape == (1,) and single.classes[0] == expected(images[5:6])[1][0]


def test_auto_binary_sends_json_to_tf_serving_which_has_no_npy(images):
    server = RestServer(Behaviour(tf_serving_rest=True))
    try:
        with RestClient(server.url, binary="auto", binary_threshold=4) as client:
            prediction = client.predict(images[:32])
            assert client.ready()  # no /readyz: readiness comes from the model status
    finally:
        server.stop()
    np.testing.assert_array_equal(prediction.classes, expected(images[:32])[1])
    assert server.behaviour.content_types == [JSON_CONTENT_TYPE]


def test_prepared_request_is_reused(server, images):
    with RestClient(server.url) as client:
        prepared = client.prepare(images[:8])
        first, second = client.predict(prepared), client.predict(prepared)
    np.testing.assert_array_equal(first.classes, second.classes)
    assert server.behaviour.calls["predict"] == 2


def test_connections_are_kept_alive_and_reused(server, images):
    with RestClient(server.url) as client:
        for _ in range(5):
            client.predict(images[:1])
    assert len(set(server.behaviour.peers)) == 1


def test_metadata_status_and_readiness(server):
    with RestClient(server.url) as client:
        metadata = client.metadata()
        assert metadata.matches_contract() and metadata.name == contract.MODEL_NAME and metadata.version == 1
        [status] = client.model_status()
        assert status.version == 1 and status.available
        assert client.ready()
        server.behaviour.ready = False
        assert not client.ready()
        with pytest.raises(DeadlineExceededError, match="not ready within 0.3 s"):
            client.wait_until_ready(timeout=0.3, poll_interval=0.05)
        server.behaviour.ready = True
        client.wait_until_ready(timeout=5)


def test_pinned_version_goes_to_the_version_url(server, images):
    with RestClient(server.url, model_version=1) as client:
        client.predict(images[:1])
    with RestClient(server.url, model_version=7) as client, pytest.raises(ServerError) as caught:
        client.predict(images[:1])
    assert caught.value.status == 404 and caught.value.code == "NOT_FOUND"
    assert "Specific(mnist, 7)" in caught.value.server_message


@pytest.mark.parametrize(
    ("status", "error_type", "code"),
    [
        (400, ServerError, "INVALID_ARGUMENT"),
        (413, ServerError, "RESOURCE_EXHAUSTED"),
        (500, ServerError, "INTERNAL"),
        (503, UnavailableError, "UNAVAILABLE"),
        (504, DeadlineExceededError, "DEADLINE_EXCEEDED"),
    ],
)
def test_http_errors_carry_status_code_and_server_message(server, images, status, error_type, code):
    server.behaviour.fail_status = status
    with RestClient(server.url) as client, pytest.raises(error_type) as caught:
        client.predict(images[:1])
    error = caught.value
    assert (error.status, error.code) == (status, code)
    assert error.server_message == f"failing on purpose with {status}"
    assert f"HTTP {status}" in str(error) and "/v1/models/mnist:predict" in str(error)
    assert server.behaviour.calls["predict"] == 1  # a predict that reached the server is never retried


def test_timeout_raises_deadline_exceeded(server, images):
    server.behaviour.stall_seconds = 1.0
    with RestClient(server.url, timeout=0.2) as client, pytest.raises(DeadlineExceededError, match="within 0.2 s"):
        client.predict(images[:1])
    assert server.behaviour.calls["predict"] == 1


def test_unreachable_server_is_unavailable_and_never_sent(images):
    with RestClient(f"http://127.0.0.1:{free_port()}", timeout=0.5, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(UnavailableError, match="could not connect") as caught:
            client.predict(images[:1])
        assert caught.value.request_sent is False
        assert client.ready() is False


def test_bearer_token_is_sent_and_a_missing_one_is_a_401(images):
    server = RestServer(Behaviour(token="s3cret"))
    try:
        with RestClient(server.url, token="s3cret") as client:
            client.predict(images[:1])
            assert client.ready() and client.metadata().matches_contract()
        assert server.behaviour.headers[0]["Authorization"] == "Bearer s3cret"
        with RestClient(server.url) as client, pytest.raises(ServerError) as caught:
            client.predict(images[:1])
        assert caught.value.status == 401 and caught.value.code == "UNAUTHENTICATED"
        assert "s3cret" not in repr(RestClient(server.url, token="s3cret"))
    finally:
        server.stop()


def test_invalid_input_is_rejected_before_sending(server):
    with RestClient(server.url) as client, pytest.raises(InvalidInputError, match=r"shape \[1, 28, 29\]"):
        client.predict(np.zeros((1, 28, 29), np.float32))
    assert server.behaviour.calls["predict"] == 0


def test_closed_client_refuses_calls(server, images):
    client = RestClient(server.url)
    client.close()
    client.close()
    with pytest.raises(ClientConfigError, match="closed"):
        client.predict(images[:1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_url": "127.0.0.1:8080"}, "expected http://host"),
        ({"base_url": "ftp://host"}, "expected http://host"),
        ({"base_url": "http://host:99999"}, "invalid port"),
        ({"base_url": "http://user:pw@host"}, "credentials"),
        ({"timeout": 0}, "timeout is 0"),
        ({"timeout": -1.0}, "timeout is -1.0"),
        ({"binary": "yes"}, "binary is 'yes'"),
        ({"binary_threshold": 0}, "binary_threshold is 0"),
        ({"model_version": 0}, "model_version is 0"),
        ({"model_name": ""}, "model_name is ''"),
        ({"ca_file": "/nonexistent.pem"}, "https:// URL"),
        ({"base_url": "https://h", "ca_file": "/nonexistent.pem"}, "not a readable file"),
        ({"token": "a\nb"}, "token"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ClientConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        RestClient(**kwargs)
