"""The gRPC server around the services: health, graceful stop and SIGTERM, limits, deadlines, TLS, sockets."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_client import contract
from serving.tfs_standin.batching import QUEUE_FULL_MESSAGE
from serving.tfs_standin.flags import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES, ServerOptions
from serving.tfs_standin.server import ModelServer, ServerStartError, channel_arguments
from tests.standin_helpers import (
    Stubs,
    outputs,
    running,
    server_options,
    standin_process,
    stubs_for,
    tf_model_copy,  # noqa: F401 - fixture
    wait_for,
)

# A batch waits this long for company: it keeps calls in flight while the server stops under them (the tests
# wait for the calls to be queued, observed, before stopping; this only has to stay below the stop's grace).
SLOW_BATCH_SECONDS = 3.0
# Safety deadline for every wait below: far above anything a loaded machine needs.
SAFETY_S = 60
PROBE_IMAGES = 64


@pytest.fixture(scope="module")
def images(test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_images[0][:100]


@pytest.fixture
def slow_batching(tmp_path: Path) -> Path:
    path = tmp_path / "slow_batching.txt"
    path.write_text(f"max_batch_size {{ value: 64 }}\nbatch_timeout_micros {{ value: {int(SLOW_BATCH_SECONDS * 1e6)} }}\n"
                    "num_batch_threads { value: 1 }\n")
    return path


def first_refusal(stubs: Stubs, image: np.ndarray) -> grpc.RpcError:
    """Call until the server refuses: calls it still accepts (before the stop took hold) are answered.

    A call that crosses the server's GOAWAY on the wire is CANCELLED without running; the next one is
    refused. Any other error is returned as the refusal, for the caller's assertion to name.
    """
    deadline = time.monotonic() + SAFETY_S
    while time.monotonic() < deadline:
        try:
            stubs.predict(image, timeout=SAFETY_S)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                return exc
    raise AssertionError(f"the stopping server still accepted calls after {SAFETY_S} s")


def test_health_service_reports_serving_and_unknown_services(tf_model_copy: Path) -> None:  # noqa: F811
    with running(server_options(tf_model_copy)) as server, stubs_for(server) as stubs:
        health = health_pb2_grpc.HealthStub(stubs.channel)
        for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_stop_finishes_in_flight_calls_and_refuses_new_ones(
    tf_model_copy: Path, slow_batching: Path, images: np.ndarray  # noqa: F811
) -> None:
    options = server_options(tf_model_copy, enable_batching=True, batching_parameters_file=str(slow_batching))
    server = ModelServer(options)
    server.start()
    server.wait_until_available(timeout=60)
    stubs = Stubs(f"127.0.0.1:{server.port}")
    scheduler = server.core.batch_scheduler
    assert scheduler is not None
    try:
        with ThreadPoolExecutor(4) as pool:
            in_flight = [pool.submit(stubs.predict, images[i : i + 1], timeout=SAFETY_S) for i in range(4)]
            wait_for(lambda: scheduler.queued_tasks() == 4, timeout=SAFETY_S, what="four calls in the open batch")
            stopper = threading.Thread(target=server.stop, kwargs={"grace": SAFETY_S})
            stopper.start()
            refused = first_refusal(stubs, images[:1])
            answers = [future.result(timeout=SAFETY_S) for future in in_flight]
            stopper.join(SAFETY_S)
    finally:
        stubs.close()
        server.stop()
    assert [a.model_spec.version.value for a in answers] == [1, 1, 1, 1]
    assert refused.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_lets_an_in_flight_call_finish_and_exits_cleanly(
    tf_model_copy: Path, tmp_path: Path, images: np.ndarray  # noqa: F811
) -> None:
    # One batch per queue: a probe as large as a whole batch is refused as "queue is full" exactly when a
    # one-image call waits in the open batch, which is how this test sees, across processes, that the call
    # is in flight. A probe that finds the queue empty fills a batch of its own and is answered at once.
    # (64: the model's warm-up records hold up to 64 images, and warm-up runs through the batcher.)
    batching = tmp_path / "probe_batching.txt"
    batching.write_text(f"max_batch_size {{ value: {PROBE_IMAGES} }}\nbatch_timeout_micros {{ value: {int(SLOW_BATCH_SECONDS * 1e6)} }}\n"
                        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 1 }\n")
    flags = ("--enable_batching", f"--batching_parameters_file={batching}")
    with standin_process(tf_model_copy, tmp_path, *flags) as server:  # ready: the model is AVAILABLE
        assert server.grpc_target is not None
        stubs = Stubs(server.grpc_target)
        try:
            with ThreadPoolExecutor(1) as pool:
                in_flight = pool.submit(stubs.predict, images[:1], timeout=SAFETY_S)
                deadline = time.monotonic() + SAFETY_S
                while not _queue_is_full(stubs, images[:PROBE_IMAGES]):
                    if in_flight.done():  # answered before it was seen waiting, or refused behind a probe: again
                        in_flight = pool.submit(stubs.predict, images[:1], timeout=SAFETY_S)
                    assert time.monotonic() < deadline, "the call was never seen waiting in the batch"
                server.send_signal(signal.SIGTERM)
                answer = in_flight.result(timeout=SAFETY_S)
            exit_code = server.wait(SAFETY_S)
        finally:
            stubs.close()
    log = server.log_path.read_text(errors="replace")
    assert answer.model_spec.version.value == 1, log
    assert exit_code == 0, log
    assert "received SIGTERM" in log


def _queue_is_full(stubs: Stubs, probe: np.ndarray) -> bool:
    try:
        stubs.predict(probe, timeout=SAFETY_S)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE and QUEUE_FULL_MESSAGE in (exc.details() or ""):
            return True
        raise
    return False


def test_message_size_limit(tf_model_copy: Path, images: np.ndarray) -> None:  # noqa: F811
    image_bytes = images[0].nbytes
    limit = 20 * image_bytes
    options = server_options(tf_model_copy, grpc_channel_arguments=f"grpc.max_receive_message_length={limit}")
    with running(options) as server, stubs_for(server) as stubs:
        assert outputs(stubs.predict(images[:10]))[contract.CLASSES_NAME].shape == (10,)
        with pytest.raises(grpc.RpcError) as caught:
            stubs.predict(images[:40])
        assert outputs(stubs.predict(images[:1]))[contract.CLASSES_NAME].shape == (1,)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_default_message_limit_is_set_and_overridable() -> None:
    assert dict(channel_arguments(ServerOptions()))["grpc.max_receive_message_length"] == \
        DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
    custom = ServerOptions(grpc_channel_arguments="grpc.max_receive_message_length=1024,grpc.max_connection_age_ms=5")
    merged = dict(channel_arguments(custom))
    assert merged["grpc.max_receive_message_length"] == 1024
    assert merged["grpc.so_reuseport"] == 0
    assert merged["grpc.max_connection_age_ms"] == 5, "a given argument overrides the connection default"
    assert merged["grpc.max_concurrent_streams"] == 100, "the other connection defaults stay"


def test_the_call_deadline_is_respected(
    tf_model_copy: Path, tmp_path: Path, images: np.ndarray  # noqa: F811
) -> None:
    never = tmp_path / "never_batching.txt"  # a batch that would wait SAFETY_S for company
    never.write_text(f"max_batch_size {{ value: 64 }}\nbatch_timeout_micros {{ value: {SAFETY_S * 1_000_000} }}\n")
    # No warm-up: its records would go through the same batch and wait as long.
    options = server_options(tf_model_copy, enable_batching=True, batching_parameters_file=str(never),
                             enable_model_warmup=False)
    with running(options) as server, stubs_for(server) as stubs:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stubs.predict(images[:1], timeout=0.3)
        took = time.monotonic() - started
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < SAFETY_S  # ended by its deadline, not by the batch (a safety bound, not a speed)


def test_unix_socket(tf_model_copy: Path, tmp_path: Path, images: np.ndarray) -> None:  # noqa: F811
    socket_path = tmp_path / "tfs.sock"
    options = server_options(tf_model_copy, port=0, grpc_socket_path=str(socket_path))
    with running(options) as server:
        assert server.port == 0
        stubs = Stubs(f"unix:{socket_path}")
        try:
            assert outputs(stubs.predict(images[:2]))[contract.CLASSES_NAME].shape == (2,)
        finally:
            stubs.close()


def test_a_taken_port_is_a_clear_error(tf_model_copy: Path) -> None:  # noqa: F811
    with running(server_options(tf_model_copy)) as first:
        second = ModelServer(server_options(tf_model_copy, port=first.port))
        with pytest.raises(ServerStartError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            second.start()
        second.stop()


# --- TLS -------------------------------------------------------------------------------------------

EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("standin-certs")
    _openssl("req", "-x509", *EC_KEY, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=standin-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", *EC_KEY, "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    return {p.name: p.read_bytes() for p in d.iterdir() if p.suffix in (".pem", ".key")}


def _ssl_config(path: Path, certs: dict[str, bytes], client_verify: bool) -> Path:
    lines = [
        "server_key: " + _quoted(certs["server.key"]),
        "server_cert: " + _quoted(certs["server.pem"]),
        "custom_ca: " + _quoted(certs["ca.pem"]),
        f"client_verify: {'true' if client_verify else 'false'}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _quoted(pem: bytes) -> str:
    return '"' + pem.decode().replace("\n", "\\n") + '"'


@pytest.fixture
def tls_server(request: pytest.FixtureRequest, tf_model_copy: Path, tmp_path: Path,  # noqa: F811
               certs: dict[str, bytes]) -> Iterator[ModelServer]:
    config = _ssl_config(tmp_path / "ssl.config", certs, client_verify=request.param)
    with running(server_options(tf_model_copy, ssl_config_file=str(config))) as server:
        yield server


def _tls_stubs(server: ModelServer, certs: dict[str, bytes], with_client_cert: bool) -> Stubs:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs["ca.pem"],
        private_key=certs["client.key"] if with_client_cert else None,
        certificate_chain=certs["client.pem"] if with_client_cert else None,
    )
    return Stubs(f"localhost:{server.port}", credentials)


@pytest.mark.parametrize("tls_server", [False], indirect=True)
def test_tls_serves_secure_clients_only(tls_server: ModelServer, certs: dict[str, bytes],
                                        images: np.ndarray) -> None:
    secure = _tls_stubs(tls_server, certs, with_client_cert=False)
    plain = Stubs(f"127.0.0.1:{tls_server.port}")
    try:
        assert outputs(secure.predict(images[:2]))[contract.CLASSES_NAME].shape == (2,)
        with pytest.raises(grpc.RpcError) as caught:
            plain.predict(images[:1], timeout=5)
    finally:
        secure.close()
        plain.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_server", [True], indirect=True)
def test_mutual_tls_requires_a_client_certificate(tls_server: ModelServer, certs: dict[str, bytes],
                                                  images: np.ndarray) -> None:
    with_cert = _tls_stubs(tls_server, certs, with_client_cert=True)
    without_cert = _tls_stubs(tls_server, certs, with_client_cert=False)
    try:
        assert outputs(with_cert.predict(images[:2]))[contract.CLASSES_NAME].shape == (2,)
        with pytest.raises(grpc.RpcError) as caught:
            without_cert.predict(images[:1], timeout=5)
    finally:
        with_cert.close()
        without_cert.close()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
