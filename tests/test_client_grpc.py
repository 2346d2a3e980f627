"""GrpcClient against gRPC servers built on the official tensorflow-serving-api stubs (tests/client_fakes.py).

Each call here also proves wire compatibility: the client's own messages (proto package mnist_client.tfs)
are parsed by TensorFlow Serving's generated code and the other way round.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from client_fakes import Behaviour, GrpcServer, fake_model
from mnist_client import contract
from mnist_client.errors import (
    ClientConfigError,
    DeadlineExceededError,
    InvalidInputError,
    ServerError,
    UnavailableError,
)
from mnist_client.grpc_client import GrpcClient
from mnist_client.retry import RetryPolicy
from stack.processes import free_port


@pytest.fixture()
def server():
    server = GrpcServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (64, 28, 28), dtype=np.uint8)


def expected(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return fake_model(images.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("use_tensor_content", [True, False])
@pytest.mark.parametrize("batch", [1, 64])
def test_predict_returns_classes_probabilities_and_version(server, images, use_tensor_content, batch):
    with GrpcClient(server.target, use_tensor_content=use_tensor_content) as client:
        prediction = client.predict(images[:batch])
    probabilities, classes = expected(images[:batch])
    assert prediction.classes.dtype == np.int64 and prediction.probabilities.dtype == np.float32
    np.testing.assert_array_equal(prediction.classes, classes)
    np.testing.assert_array_equal(prediction.probabilities, probabilities)
    assert prediction.model_version == 1 and len(prediction) == batch


def test_single_float_image_and_prepared_requests(server, images):
    with GrpcClient(server.target) as client:
        single = client.predict(images[3].astype(np.float64) / 255)
        prepared = client.prepare(images[:4])
        first, second = client.predict(prepared), client.predict(prepared)
    assert single.classes.tolist() == expected(images[3:4])[1].tolist()
    np.testing.assert_array_equal(first.classes, second.classes)
    assert server.behaviour.calls["predict"] == 3


def test_metadata_status_and_readiness(server):
    with GrpcClient(server.target) as client:
        metadata = client.metadata()
        assert metadata.matches_contract(), metadata.signature()
        assert (metadata.name, metadata.version, metadata.signature_name) == ("mnist", 1, contract.SIGNATURE_NAME)
        [status] = client.model_status()
        assert (status.version, status.state, status.error_code) == (1, "AVAILABLE", "OK")
        assert client.ready()
        server.behaviour.ready = False
        assert client.model_status()[0].state == "LOADING"
        assert not client.ready()
        with pytest.raises(DeadlineExceededError, match="not ready within"):
            client.wait_until_ready(timeout=0.3, poll_interval=0.05)


def test_health_readiness(server):
    from grpc_health.v1 import health_pb2

    with GrpcClient(server.target, readiness="health") as client:
        assert client.ready()
        server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert not client.ready()


def test_pinned_version(server, images):
    with GrpcClient(server.target, model_version=1) as client:
        assert client.predict(images[:1]).model_version == 1
    with GrpcClient(server.target, model_version=9) as client, pytest.raises(ServerError) as caught:
        client.predict(images[:1])
    assert caught.value.code == "NOT_FOUND" and "Specific(mnist, 9)" in caught.value.server_message


@pytest.mark.parametrize(
    ("code", "error_type"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, ServerError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ServerError),
        (grpc.StatusCode.INTERNAL, ServerError),
        (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    ],
)
def test_status_codes_carry_code_and_server_message(server, images, code, error_type):
    server.behaviour.fail_code = code
    with GrpcClient(server.target) as client, pytest.raises(error_type) as caught:
        client.predict(images[:1])
    assert caught.value.code == code.name and caught.value.status is None
    assert caught.value.server_message == f"failing on purpose with {code.name}"
    assert server.behaviour.calls["predict"] == 1  # it reached the server: never retried
    if error_type is UnavailableError:
        assert caught.value.request_sent is True


def test_deadline(server, images):
    server.behaviour.stall_seconds = 1.0
    with GrpcClient(server.target, timeout=0.2) as client, pytest.raises(DeadlineExceededError, match="0.2 s"):
        client.predict(images[:1])
    assert server.behaviour.calls["predict"] == 1


def test_max_message_size_is_enforced_before_sending(server, images):
    with GrpcClient(server.target, max_send_message_bytes=10_000) as client, pytest.raises(ServerError) as caught:
        client.predict(images[:8])  # 8 images: about 25 kB
    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert server.behaviour.calls["predict"] == 0


def test_unreachable_server_is_unavailable_before_sending(images):
    with GrpcClient(f"127.0.0.1:{free_port()}", timeout=1, retry=RetryPolicy(max_attempts=1)) as client:
        with pytest.raises(UnavailableError) as caught:
            client.predict(images[:1])
        assert caught.value.request_sent is False
        assert not client.ready()


def test_invalid_input_is_rejected_before_sending(server):
    with GrpcClient(server.target) as client, pytest.raises(InvalidInputError, match="NaN"):
        client.predict(np.full((1, 28, 28), np.nan, np.float32))
    assert server.behaviour.calls["predict"] == 0


def test_round_robin_spreads_calls_over_all_servers(images):
    servers = [GrpcServer(Behaviour(), name=f"s{i}") for i in range(3)]
    try:
        addresses = [server.target for server in servers]
        with GrpcClient(addresses, load_balancing="round_robin") as client:
            client.wait_until_ready(timeout=10)
            for _ in range(60):
                client.predict(images[:1])
        per_server = [server.behaviour.calls["predict"] for server in servers]
        assert sum(per_server) == 60 and min(per_server) >= 10, per_server

        for server in servers:
            server.behaviour.calls.clear()
        with GrpcClient("ipv4:" + ",".join(addresses)) as client:  # gRPC's default, pick_first: one server
            for _ in range(30):
                client.predict(images[:1])
        per_server = [server.behaviour.calls["predict"] for server in servers]
        assert sorted(per_server) == [0, 0, 30], per_server
    finally:
        for server in servers:
            server.stop()


def test_dns_target_with_round_robin(server, images):
    with GrpcClient(f"dns:///localhost:{server.port}", load_balancing="round_robin") as client:
        assert client.predict(images[:1]).model_version == 1


def test_closed_client_refuses_calls(server, images):
    client = GrpcClient(server.target)
    client.close()
    client.close()
    with pytest.raises(ClientConfigError, match="closed"):
        client.predict(images[:1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": ""}, "target is empty"),
        ({"target": []}, "non-empty list"),
        ({"target": ["localhost:8500"]}, "not an IP address"),
        ({"target": ["127.0.0.1"]}, "has no port"),
        ({"target": ["127.0.0.1:1", "[::1]:2"]}, "mixes IPv4 and IPv6"),
        ({"load_balancing": "random"}, "load_balancing is 'random'"),
        ({"timeout": float("inf")}, "timeout is inf"),
        ({"readiness": "tcp"}, "readiness is 'tcp'"),
        ({"root_certificates": b"x"}, "tls=True"),
        ({"tls": True, "client_private_key": b"k"}, "expected both"),
        ({"tls": True, "root_certificates": "/nonexistent.pem"}, "could not be read"),
        ({"max_receive_message_bytes": 0}, "max_receive_message_bytes is 0"),
    ],
)
def test_bad_configuration_is_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(ClientConfigError, match=message.replace("[", r"\[")):
        GrpcClient(**kwargs)


def test_target_list_becomes_one_multi_address_target():
    with GrpcClient(["127.0.0.1:1", "127.0.0.2:2"]) as client:
        assert client.target == "ipv4:127.0.0.1:1,127.0.0.2:2"
    with GrpcClient(["[::1]:1"]) as client:
        assert client.target == "ipv6:[::1]:1"
