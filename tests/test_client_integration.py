"""The clients against the real servers, with models exported by the real training code.

- the PyTorch REST server under gunicorn (started by stack.servers, free port), plain and with HTTPS + bearer token;
- the TF Serving stand-in (gRPC, and its TF-Serving-style REST API when it has one), in process.

Predictions on real MNIST test images must be accurate and agree across the REST encodings.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mnist_client import contract
from mnist_client.errors import InvalidInputError, ServerError, UnavailableError
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import NPY_CONTENT_TYPE, RestClient
from mnist_client.retry import NO_RETRIES
from tests.rest_helpers import gunicorn

MIN_ACCURACY = 0.8  # the fixture models are quick-trained; chance is 0.1
IMAGES = 200

pytestmark = pytest.mark.slow


# The deployed server's settings for these tests: one worker, batches up to 256 images, no access log.
REST_SETTINGS = {"MNIST_REST_WORKERS": "1", "MNIST_REST_MAX_BATCH": "256", "MNIST_REST_ACCESS_LOG": "off"}


def torch_base(models_root: Path) -> Path:
    return models_root / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME


@pytest.fixture(scope="module")
def mnist_images(test_images) -> tuple[np.ndarray, np.ndarray]:
    images, labels = test_images
    uint8 = np.rint(images[:IMAGES] * contract.PIXEL_SCALE).astype(np.uint8)
    return uint8, labels[:IMAGES]


@pytest.fixture(scope="module")
def rest_server(model_repo, tmp_path_factory):
    with gunicorn(torch_base(model_repo), tmp_path_factory.mktemp("gunicorn"), **REST_SETTINGS) as server:
        yield server


# -- PyTorch REST server ----------------------------------------------------------------------------------


def test_rest_json_and_npy_predictions_are_accurate_and_identical(rest_server, mnist_images):
    images, labels = mnist_images
    with (
        RestClient(rest_server.url, binary=False) as json_client,
        RestClient(rest_server.url, binary=True) as npy_client,
    ):
        by_json = json_client.predict(images)
        by_npy = npy_client.predict(images)
        one = json_client.predict(images[0])
        floats = npy_client.predict(images[:8].astype(np.float32) / 255)
    assert by_json.model_version == by_npy.model_version == 1
    np.testing.assert_array_equal(by_json.classes, by_npy.classes)
    np.testing.assert_allclose(by_json.probabilities, by_npy.probabilities, atol=1e-6)
    np.testing.assert_allclose(by_json.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert float(np.mean(by_json.classes == labels)) >= MIN_ACCURACY
    assert one.classes[0] == by_json.classes[0]
    np.testing.assert_array_equal(floats.classes, by_json.classes[:8])


def test_rest_auto_uses_npy_for_large_batches_on_the_pytorch_server(rest_server, mnist_images):
    images, _ = mnist_images
    with RestClient(rest_server.url, binary="auto", binary_threshold=16) as client:
        assert client.prepare(images[:16]).content_type == NPY_CONTENT_TYPE
        assert client.prepare(images[:15]).content_type == "application/json"
        assert len(client.predict(images[:64])) == 64


def test_rest_metadata_status_and_readiness(rest_server):
    with RestClient(rest_server.url) as client:
        assert client.ready()
        metadata = client.metadata()
        assert metadata.matches_contract(), metadata.signature()
        statuses = client.model_status()
        assert [(s.version, s.state) for s in statuses] == [(1, "AVAILABLE")]


def test_rest_server_errors_carry_status_and_the_servers_message(rest_server, mnist_images):
    images, _ = mnist_images
    with RestClient(rest_server.url, model_version=42) as client, pytest.raises(ServerError) as caught:
        client.predict(images[:1])
    assert caught.value.status == 404 and caught.value.code == "NOT_FOUND" and caught.value.server_message
    with RestClient(rest_server.url, binary=True) as client, pytest.raises(ServerError) as caught:
        client.predict(np.zeros((257, 28, 28), np.uint8))  # MNIST_REST_MAX_BATCH=256
    assert 400 <= caught.value.status < 500 and "256" in caught.value.server_message
    with RestClient(rest_server.url) as client, pytest.raises(InvalidInputError):
        client.predict(np.full((1, 28, 28), 2.0))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("rest-tls")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    steps = [
        ("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test CA"),
        ("req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server"),
        (
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ),
    ]
    for step in steps:
        subprocess.run(["openssl", *step], cwd=d, check=True, capture_output=True, timeout=60)
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


def test_rest_https_and_bearer_token_against_the_real_server(model_repo, tls_files, mnist_images, tmp_path):
    images, _ = mnist_images
    with gunicorn(
        torch_base(model_repo),
        tmp_path,
        ca_file=tls_files["ca"],  # ready: its /readyz answered over HTTPS, verified with this CA
        **REST_SETTINGS,
        MNIST_REST_TLS_CERT=str(tls_files["cert"]),
        MNIST_REST_TLS_KEY=str(tls_files["key"]),
        MNIST_REST_AUTH_TOKEN="integration-token",
    ) as server:
        assert server.url.startswith("https://")
        with RestClient(server.url, ca_file=tls_files["ca"], token="integration-token") as client:
            assert client.predict(images[:4]).model_version == 1
            assert client.metadata().matches_contract()
        with RestClient(server.url, ca_file=tls_files["ca"]) as client:
            assert client.ready()  # /readyz is open to probes without the token
            with pytest.raises(ServerError) as caught:
                client.predict(images[:1])
        assert caught.value.status == 401 and "token" in caught.value.server_message


# -- TF Serving stand-in (gRPC) ---------------------------------------------------------------------------


def standin(model_repo: Path, **options):
    from serving.tfs_standin.flags import ServerOptions
    from serving.tfs_standin.server import ModelServer

    base = model_repo / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME
    return ModelServer(
        ServerOptions(
            port=0, standin_host="127.0.0.1", model_name=contract.MODEL_NAME, model_base_path=str(base), **options
        )
    )


@pytest.fixture(scope="module")
def grpc_server(model_repo):
    with standin(model_repo) as server:
        server.wait_until_available(timeout=120)
        yield server


def test_grpc_predictions_on_real_images_are_accurate(grpc_server, mnist_images):
    images, labels = mnist_images
    with GrpcClient(f"127.0.0.1:{grpc_server.port}") as client:
        batch = client.predict(images)
        singles = [client.predict(image) for image in images[:5]]
        as_float_val = GrpcClient(f"127.0.0.1:{grpc_server.port}", use_tensor_content=False)
        with as_float_val:
            same = as_float_val.predict(images[:16])
    assert batch.model_version == 1
    assert float(np.mean(batch.classes == labels)) >= MIN_ACCURACY
    np.testing.assert_allclose(batch.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert [s.classes[0] for s in singles] == batch.classes[:5].tolist()
    np.testing.assert_array_equal(same.classes, batch.classes[:16])


def test_grpc_predictions_agree_with_the_rest_server_mostly(grpc_server, rest_server, mnist_images):
    """Two frameworks, two quick-trained models: they should agree on most real test images."""
    images, _ = mnist_images
    with GrpcClient(f"127.0.0.1:{grpc_server.port}") as grpc_client, RestClient(rest_server.url) as rest_client:
        agreement = float(np.mean(grpc_client.predict(images).classes == rest_client.predict(images).classes))
    assert agreement >= MIN_ACCURACY


def test_grpc_metadata_status_readiness_and_errors(grpc_server, mnist_images):
    images, _ = mnist_images
    target = f"127.0.0.1:{grpc_server.port}"
    with GrpcClient(target) as client, GrpcClient(target, readiness="health") as health_client:
        assert client.ready() and health_client.ready()
        metadata = client.metadata()
        assert metadata.matches_contract(), metadata.signature()
        assert (metadata.name, metadata.version) == (contract.MODEL_NAME, 1)
        assert [(s.version, s.state, s.error_code) for s in client.model_status()] == [(1, "AVAILABLE", "OK")]
    with GrpcClient(target, model_version=42) as client:
        assert not client.ready()
        with pytest.raises(ServerError) as caught:
            client.predict(images[:1])
    assert caught.value.code == "NOT_FOUND" and caught.value.server_message
    with GrpcClient(target, model_name="nope") as client, pytest.raises(ServerError) as caught:
        client.metadata()
    assert caught.value.code == "NOT_FOUND"


def test_grpc_tls_and_tensor_content_answers_from_the_standin(model_repo, tls_files, mnist_images, tmp_path):
    images, labels = mnist_images
    ssl_config = tmp_path / "ssl.config"
    ssl_config.write_text(
        f"server_key: {json.dumps(tls_files['key'].read_text())}\n"
        f"server_cert: {json.dumps(tls_files['cert'].read_text())}\n"
    )
    with standin(model_repo, ssl_config_file=str(ssl_config), enable_serialization_as_tensor_content=True) as server:
        server.wait_until_available(timeout=120)
        target = f"127.0.0.1:{server.port}"
        with GrpcClient(target, tls=True, root_certificates=tls_files["ca"]) as client:
            prediction = client.predict(images)
            assert client.ready()
        assert float(np.mean(prediction.classes == labels)) >= MIN_ACCURACY
        with GrpcClient(target, retry=NO_RETRIES, timeout=5) as plaintext, pytest.raises(UnavailableError):
            plaintext.predict(images[:1])
