"""The PyTorch REST server through Flask's test client: API shapes, bad input, auth, config, batching.

Real gunicorn runs are in tests/test_rest_gunicorn.py.
"""

from __future__ import annotations

import io
import json
import os
import runpy
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from mnist_client import contract
from serving.model_repository import publish_version
from serving.torch_server.app import MODEL_VERSION_HEADER, create_app
from serving.torch_server.config import ConfigError, ServerConfig
from training.model_torch import predict_numpy

PREDICT = "/v1/models/mnist:predict"
GUNICORN_CONF = Path(__file__).resolve().parents[1] / "serving" / "torch_server" / "gunicorn_conf.py"
MAX_BATCH = 64
MAX_BODY = 512 * 1024


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_base(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the quick-trained TorchScript versions (tests may add versions to it)."""
    base = tmp_path_factory.mktemp("rest-app") / "mnist"
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    return base


@pytest.fixture(scope="module")
def app(torch_base: Path) -> Iterator[Flask]:
    app = create_app(
        {"model_base_path": torch_base, "max_batch": MAX_BATCH, "max_body_bytes": MAX_BODY, "poll_seconds": 3600}
    )
    yield app
    app.extensions["mnist"].store.stop_watching()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def reference(
    torch_base: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, probabilities, classes) for 32 real test images, from the TorchScript file in-process."""
    images = test_images[0][:32]
    module = torch.jit.load(str(torch_base / "1" / contract.TORCHSCRIPT_FILENAME), map_location="cpu").eval()
    probabilities, classes = predict_numpy(module, images)
    return images, probabilities, classes


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """Just a .npy header, for bodies whose header lies about what follows."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def post_json(client: FlaskClient, payload: Any, path: str = PREDICT) -> Any:
    return client.post(path, data=json.dumps(payload), content_type="application/json")


def assert_error(response: Any, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    for fragment in fragments:
        assert fragment in body["error"], body["error"]
    return body["error"]


# -- predictions ----------------------------------------------------------------------------------


def test_row_form_predictions_equal_the_in_process_model(client, reference):
    images, probabilities, classes = reference
    response = post_json(client, {"instances": images.tolist()})
    assert response.status_code == 200
    assert response.headers[MODEL_VERSION_HEADER] == "1"
    predictions = response.get_json()["predictions"]
    assert [p["classes"] for p in predictions] == classes.tolist()
    np.testing.assert_allclose([p["probabilities"] for p in predictions], probabilities, rtol=1e-5, atol=1e-7)


def test_named_row_form_and_signature_name(client, reference):
    images, _, classes = reference
    payload = {"signature_name": "serving_default", "instances": [{"images": image} for image in images[:3].tolist()]}
    response = post_json(client, payload)
    assert response.status_code == 200
    assert [p["classes"] for p in response.get_json()["predictions"]] == classes[:3].tolist()


@pytest.mark.parametrize("named", [False, True], ids=["bare", "named"])
def test_column_form_answers_outputs(client, reference, named):
    images, probabilities, classes = reference
    inputs = {"images": images.tolist()} if named else images.tolist()
    response = post_json(client, {"inputs": inputs})
    assert response.status_code == 200
    outputs = response.get_json()["outputs"]
    assert outputs["classes"] == classes.tolist()
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npy_body_uint8_and_float32(client, reference, mnist_test, dtype):
    images, probabilities, classes = reference
    body = npy(mnist_test.images[:32] if dtype == "uint8" else images)
    response = client.post(PREDICT, data=body, content_type="application/x-npy")
    assert response.status_code == 200
    outputs = response.get_json()["outputs"]
    assert outputs["classes"] == classes.tolist()
    np.testing.assert_allclose(outputs["probabilities"], probabilities, rtol=1e-5, atol=1e-7)


def test_npy_big_endian_and_fortran_order_are_read_correctly(client, reference):
    images, _, classes = reference
    body = npy(np.asfortranarray(images[:4].astype(">f4")))
    response = client.post(PREDICT, data=body, content_type="application/x-npy")
    assert response.status_code == 200
    assert response.get_json()["outputs"]["classes"] == classes[:4].tolist()


def test_pinned_version_predicts(client, reference):
    images, _, classes = reference
    response = post_json(client, {"instances": images[:2].tolist()}, "/v1/models/mnist/versions/1:predict")
    assert response.status_code == 200 and response.headers[MODEL_VERSION_HEADER] == "1"
    assert [p["classes"] for p in response.get_json()["predictions"]] == classes[:2].tolist()


def test_flask_view_answers_like_the_fast_path(app, client, reference):
    # The front door answers POST .../mnist:predict itself; the Flask view behind the same rule
    # (for apps that mount the Flask app without the front door) must answer alike.
    data = json.dumps({"instances": reference[0][:4].tolist()})
    fast = client.post(PREDICT, data=data, content_type="application/json")
    with app.test_request_context(PREDICT, method="POST", data=data, content_type="application/json"):
        routed = app.view_functions["predict"]("mnist")
    assert routed.status_code == fast.status_code == 200
    assert routed.get_json() == fast.get_json()
    assert routed.headers[MODEL_VERSION_HEADER] == fast.headers[MODEL_VERSION_HEADER] == "1"


def test_missing_content_type_is_taken_as_json(client, reference):
    images = reference[0]
    response = client.post(PREDICT, data=json.dumps({"instances": images[:1].tolist()}))
    assert response.status_code == 200


# -- status, metadata, probes, metrics, OpenAPI -----------------------------------------------------


def test_model_status_in_tf_serving_format(client):
    expected = {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert client.get("/v1/models/mnist").get_json() == expected
    assert client.get("/v1/models/mnist/versions/1").get_json() == expected


def test_metadata_is_the_contract_signature(client):
    for path in ("/v1/models/mnist/metadata", "/v1/models/mnist/versions/1/metadata"):
        body = client.get(path).get_json()
        assert body["model_spec"] == {"name": "mnist", "signature_name": "", "version": "1"}
        signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert signature["method_name"] == "tensorflow/serving/predict"
        for section in ("inputs", "outputs"):
            got = {
                name: {"dtype": info["dtype"], "shape": [int(d["size"]) for d in info["tensor_shape"]["dim"]]}
                for name, info in signature[section].items()
            }
            assert got == contract.signature()[section]


def test_liveness_and_readiness(client):
    assert client.get("/healthz").get_json() == {"status": "alive"}
    assert client.get("/readyz").get_json() == {"status": "ready", "model": "mnist", "versions": [1]}


def scrape(client: FlaskClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics as {(sample name, labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def test_metrics_count_requests_status_latency_and_batch_size(torch_base, reference):
    app = create_app({"model_base_path": torch_base, "poll_seconds": 3600})
    client = app.test_client()
    try:
        post_json(client, {"instances": reference[0][:3].tolist()})
        post_json(client, {"instances": reference[0][:5].tolist()})
        post_json(client, {"instances": []})
        samples = scrape(client)
    finally:
        app.extensions["mnist"].store.stop_watching()

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("mnist_rest_requests_total", endpoint="predict", method="POST", status="200") == 2
    assert value("mnist_rest_requests_total", endpoint="predict", method="POST", status="400") == 1
    assert value("mnist_rest_request_duration_seconds_count", endpoint="predict") == 3
    assert value("mnist_rest_batch_size_count") == 2 and value("mnist_rest_batch_size_sum") == 8
    assert value("mnist_rest_batch_size_bucket", le="4.0") == 1
    assert value("mnist_rest_in_flight_requests") == 1  # the scrape itself
    assert value("mnist_rest_model_version") == 1
    assert value("mnist_rest_model_events_total", event="loaded") == 1


def test_openapi_document_is_served_and_covers_every_route(app, client):
    response = client.get("/openapi.yaml")
    assert response.status_code == 200 and response.mimetype == "application/yaml"
    document = yaml.safe_load(response.get_data())
    assert response.get_data() == (Path(__file__).parent.parent / "serving/torch_server/openapi.yaml").read_bytes()
    documented = {
        (path.replace("{model_name}", "<name>").replace("{version}", "<version>"), method.upper())
        for path, item in document["paths"].items()
        for method in item
    }
    served = {
        (rule.rule.replace("<model:name>", "<name>"), method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented


# -- every caller mistake: a 4xx with {"error": ...}, and the next good request still works ----------

IMAGE = [[0.5] * 28] * 28

BAD_JSON_BODIES = {
    "malformed_json": (b'{"instances": [[[0.1, 0.2', 400, "malformed JSON"),
    "not_utf8": (b'{"instances": "\xff"}', 400, "malformed JSON"),
    "top_level_array": (json.dumps([IMAGE]).encode(), 400, "expected a JSON object"),
    "wrong_top_level_key": (json.dumps({"images": [IMAGE]}).encode(), 400, "unexpected top-level keys ('images')"),
    "both_keys": (json.dumps({"instances": [IMAGE], "inputs": [IMAGE]}).encode(), 400, "both"),
    "no_keys": (b"{}", 400, "unexpected top-level keys (no keys)"),
    "unknown_signature": (json.dumps({"signature_name": "x", "instances": [IMAGE]}).encode(), 400, "signature_name"),
    "instances_not_a_list": (json.dumps({"instances": 3}).encode(), 400, "must be a list of images"),
    "rank_2_unbatched": (json.dumps({"instances": IMAGE}).encode(), 400, "shape [28, 28]"),
    "wrong_shape": (json.dumps({"instances": [[[0.5] * 27] * 28]}).encode(), 400, "expected [N, 28, 28]"),
    "flattened": (json.dumps({"instances": [[0.5] * 784]}).encode(), 400, "reshape each to 28 x 28"),
    "rank_4": (json.dumps({"instances": [[IMAGE]]}).encode(), 400, "shape [1, 1, 28, 28]"),
    "ragged_rows": (json.dumps({"instances": [[[0.5] * 28] * 27 + [[0.5] * 5]]}).encode(), 400, "has 5 entries"),
    "string_value": (json.dumps({"instances": [[["x"] * 28] * 28]}).encode(), 400, "a string at instances[0][0][0]"),
    "null_value": (json.dumps({"instances": [[[None] + [0.5] * 27] * 28]}).encode(), 400, "null at instances[0][0][0]"),
    "boolean_value": (
        json.dumps({"instances": [[[0.5] * 27 + [True]] + [[0.5] * 28] * 27]}).encode(),
        400,
        "a boolean at instances[0][0][27]",
    ),  # fmt: skip
    "nan_literal": (b'{"instances": [[[NaN, 0.5]]]}', 400, "NaN and Infinity are not valid JSON"),
    "infinity_literal": (b'{"instances": [[[Infinity]]]}', 400, "NaN and Infinity are not valid JSON"),
    "huge_number": (b'{"instances": [[[1e400]]]}', 400, "malformed JSON"),
    "raw_0_255_pixels": (json.dumps({"instances": [[[255] * 28] * 28]}).encode(), 400, "divide them by 255"),
    "negative_values": (json.dumps({"instances": [[[-0.5] * 28] * 28]}).encode(), 400, "expected pixel / 255"),
    "empty_batch": (json.dumps({"instances": []}).encode(), 400, "empty batch"),
    "empty_body": (b"", 400, "empty request body"),
    "batch_above_limit": (json.dumps({"instances": [IMAGE] * (MAX_BATCH + 1)}).encode(), 413, f"limit of {MAX_BATCH}"),
    "named_instance_wrong_key": (json.dumps({"instances": [{"pixels": IMAGE}]}).encode(), 400, "exactly one key"),
    "deep_nesting": (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "malformed JSON"),
}


@pytest.mark.parametrize("case", list(BAD_JSON_BODIES), ids=list(BAD_JSON_BODIES))
def test_bad_json_gets_a_clear_4xx(client, reference, case):
    body, status, fragment = BAD_JSON_BODIES[case]
    assert_error(client.post(PREDICT, data=body, content_type="application/json"), status, fragment)
    assert post_json(client, {"instances": reference[0][:1].tolist()}).status_code == 200


def test_body_above_the_size_limit_is_413(client):
    body = b'{"instances": [' + b" " * MAX_BODY + b"]}"
    assert_error(client.post(PREDICT, data=body, content_type="application/json"), 413, f"limit of {MAX_BODY} bytes")


def test_body_of_unknown_length_above_the_size_limit_is_413(client):
    # A chunked upload has no Content-Length; the server (gunicorn) marks the input as terminated
    # and the app must stop reading at the limit.
    body = b'{"instances": [' + b" " * MAX_BODY + b"]}"
    response = client.post(
        PREDICT,
        input_stream=io.BytesIO(body),
        content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert_error(response, 413, "exceeds this server's limit")


def test_wrong_content_type_is_415(client):
    response = client.post(PREDICT, data="instances=1", content_type="application/x-www-form-urlencoded")
    assert_error(response, 415, "application/json", "application/x-npy")


def test_unknown_model_is_404(client, reference):
    response = post_json(client, {"instances": reference[0][:1].tolist()}, "/v1/models/fashion:predict")
    assert_error(response, 404, "unknown model 'fashion'")
    assert_error(client.get("/v1/models/fashion"), 404, "unknown model")
    assert_error(client.get("/v1/models/fashion/metadata"), 404, "unknown model")


@pytest.mark.parametrize("version", ["7", "0", "abc", "-1"])
def test_unknown_version_is_404(client, reference, version):
    path = f"/v1/models/mnist/versions/{version}:predict"
    assert_error(post_json(client, {"instances": reference[0][:1].tolist()}, path), 404, "version")
    assert_error(client.get(f"/v1/models/mnist/versions/{version}"), 404, "version")
    assert_error(client.get(f"/v1/models/mnist/versions/{version}/metadata"), 404, "version")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", PREDICT, "POST"),
        ("PUT", PREDICT, "POST"),
        ("POST", "/v1/models/mnist", "GET"),
        ("DELETE", "/healthz", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(client, method, path, allowed):
    response = client.open(path, method=method)
    assert_error(response, 405, f"method {method} is not allowed", allowed)
    assert allowed in response.headers["Allow"]


def test_unknown_path_is_404(client):
    assert_error(client.get("/v2/models/mnist"), 404, "no such endpoint", "/openapi.yaml")


BAD_NPY = {
    "not_npy": (b"\x00\x01 definitely not numpy", 400, "lacks the \\x93NUMPY magic"),
    "truncated": (npy(np.zeros((2, 28, 28), np.uint8))[:-100], 400, "truncated or padded"),
    "float64": (npy(np.zeros((1, 28, 28), np.float64)), 400, ".npy dtype <f8: expected uint8"),
    "int32": (npy(np.zeros((1, 28, 28), np.int32)), 400, "expected uint8"),
    "wrong_shape": (npy(np.zeros((1, 28, 27), np.uint8)), 400, "expected [N, 28, 28]"),
    "unbatched": (npy(np.zeros((28, 28), np.uint8)), 400, "wrapped in a batch"),
    "empty_batch": (npy(np.zeros((0, 28, 28), np.uint8)), 400, "empty batch"),
    "nan": (npy(np.full((1, 28, 28), np.nan, np.float32)), 400, "NaN or infinite"),
    "inf": (npy(np.full((1, 28, 28), np.inf, np.float32)), 400, "NaN or infinite"),
    "float_0_255": (npy(np.full((1, 28, 28), 200.0, np.float32)), 400, "divide them by 255"),
    "batch_above_limit": (npy(np.zeros((MAX_BATCH + 1, 28, 28), np.uint8)), 413, f"limit of {MAX_BATCH}"),
    "pickled_objects": (npy_header("|O", (1, 28, 28)) + b"\x80\x04N.", 400, ".npy dtype |O: expected uint8"),
    "header_claims_a_huge_batch": (npy_header("|u1", (10**11, 28, 28)), 413, "exceeds this server's limit"),
    "header_claims_more_data": (npy_header("|u1", (2, 28, 28)) + bytes(784), 400, "truncated or padded"),
    "bad_header": (b"\x93NUMPY\x01\x00\x10\x00{not a dict}   \n", 400, "unreadable .npy header"),
}


@pytest.mark.parametrize("case", list(BAD_NPY), ids=list(BAD_NPY))
def test_bad_npy_gets_a_clear_4xx(client, reference, case):
    body, status, fragment = BAD_NPY[case]
    assert_error(client.post(PREDICT, data=body, content_type="application/x-npy"), status, fragment)
    assert client.post(PREDICT, data=npy(reference[0][:1]), content_type="application/x-npy").status_code == 200


# -- readiness before a model exists, version swap and a broken version -----------------------------


def test_not_ready_until_a_version_appears_then_serves_it(tmp_path, torch_base, reference):
    base = tmp_path / "mnist"
    app = create_app({"model_base_path": base, "poll_seconds": 0.05})
    client = app.test_client()
    try:
        assert_error(client.get("/readyz"), 503, "not ready")
        assert_error(post_json(client, {"instances": reference[0][:1].tolist()}), 503, "no version")
        assert_error(client.get("/v1/models/mnist"), 404, "no version")
        assert "mnist_rest_model_version 0.0" in client.get("/metrics").get_data(as_text=True)
        with publish_version(base, 3) as (staging, _):
            shutil.copy(torch_base / "1" / contract.TORCHSCRIPT_FILENAME, staging)
        wait_for(lambda: client.get("/readyz").status_code == 200)
        response = post_json(client, {"instances": reference[0][:2].tolist()})
        assert response.status_code == 200 and response.headers[MODEL_VERSION_HEADER] == "3"
    finally:
        app.extensions["mnist"].store.stop_watching()


def test_new_version_swaps_in_and_a_broken_one_is_refused(tmp_path, torch_base, reference):
    base = tmp_path / "mnist"
    shutil.copytree(torch_base, base)
    app = create_app({"model_base_path": base, "poll_seconds": 0.05})
    client = app.test_client()
    body = {"instances": reference[0][:2].tolist()}
    try:
        with publish_version(base, 2) as (staging, _):
            shutil.copy(torch_base / "1" / contract.TORCHSCRIPT_FILENAME, staging)
        wait_for(lambda: post_json(client, body).headers[MODEL_VERSION_HEADER] == "2")
        states = {s["version"]: s["state"] for s in client.get("/v1/models/mnist").get_json()["model_version_status"]}
        assert states == {"2": "AVAILABLE", "1": "END"}

        with publish_version(base, 3) as (staging, _):
            (staging / contract.TORCHSCRIPT_FILENAME).write_bytes(b"not a TorchScript archive")
        wait_for(lambda: "3" in status_versions(client))
        status = {s["version"]: s for s in client.get("/v1/models/mnist").get_json()["model_version_status"]}
        assert status["3"]["state"] == "END" and status["3"]["status"]["error_code"] != "OK"
        assert "cannot load" in status["3"]["status"]["error_message"]
        assert status["2"]["state"] == "AVAILABLE"
        response = post_json(client, body)
        assert response.status_code == 200 and response.headers[MODEL_VERSION_HEADER] == "2"
        assert client.get("/readyz").get_json()["versions"] == [2]
        assert 'mnist_rest_model_events_total{event="refused"} 1.0' in client.get("/metrics").get_data(as_text=True)
    finally:
        app.extensions["mnist"].store.stop_watching()


def status_versions(client: FlaskClient) -> set[str]:
    return {s["version"] for s in client.get("/v1/models/mnist").get_json()["model_version_status"]}


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


# -- bearer token --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_app(torch_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text("s3cret-token\n")
    app = create_app({"model_base_path": torch_base, "auth_token_file": token_file, "poll_seconds": 3600})
    yield app
    app.extensions["mnist"].store.stop_watching()


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong", "s3cret-token", "Basic czNjcmV0LXRva2Vu", "Bearer s3cret-tokenX"]
)
def test_token_required_on_the_api(token_app, reference, header):
    headers = {} if header is None else {"Authorization": header}
    client = token_app.test_client()
    for response in (
        client.post(PREDICT, json={"instances": reference[0][:1].tolist()}, headers=headers),
        client.get("/v1/models/mnist", headers=headers),
        client.get("/v1/models/mnist/metadata", headers=headers),
        client.get("/no/such/path", headers=headers),
    ):
        assert_error(response, 401, "bearer token")
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_accepted_and_probes_stay_open(token_app, reference):
    client = token_app.test_client()
    response = client.post(
        PREDICT, json={"instances": reference[0][:1].tolist()}, headers={"Authorization": "Bearer s3cret-token"}
    )
    assert response.status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.yaml"):
        assert client.get(path).status_code == 200, path
    assert 'status="401"' in client.get("/metrics").get_data(as_text=True)


# -- configuration -------------------------------------------------------------------------------


def test_config_precedence_defaults_env_overrides():
    env = {
        "MNIST_REST_MAX_BATCH": "8",
        "MNIST_REST_POLL_SECONDS": "2.5",
        "MNIST_REST_BATCHING": "on",
        "MNIST_REST_AUTH_OPEN_PATHS": "/healthz, /readyz",
        "MNIST_REST_MODEL_BASE_PATH": "/srv/models/mnist",
    }
    config = ServerConfig.load({"max_batch": 16}, environ=env)
    assert config.max_batch == 16  # override beats env
    assert config.poll_seconds == 2.5 and config.batching is True
    assert config.auth_open_paths == ("/healthz", "/readyz")
    assert config.model_base_path == Path("/srv/models/mnist")
    assert ServerConfig.load(environ={}).max_body_bytes == ServerConfig().max_body_bytes  # limits on by default


def test_gunicorn_default_workers_are_the_usable_cpus(monkeypatch, tmp_path):
    import mnist_client.cpus

    for name in [n for n in os.environ if n.startswith("MNIST_REST_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else the config file makes a temp folder
    # A container with 3 CPUs of quota on a bigger host: one worker per usable CPU, not per host CPU.
    monkeypatch.setattr(mnist_client.cpus, "usable_cpus", lambda: 3)
    assert runpy.run_path(str(GUNICORN_CONF))["workers"] == 3
    monkeypatch.setenv("MNIST_REST_WORKERS", "5")
    assert runpy.run_path(str(GUNICORN_CONF))["workers"] == 5


@pytest.fixture()
def clean_rest_env(monkeypatch, tmp_path):
    """No MNIST_REST_* settings; whatever the config file or a worker hook sets is removed after the test."""
    for name in {*(n for n in os.environ if n.startswith("MNIST_REST_")), "MNIST_REST_DEVICE", "MNIST_REST_BATCH_MAX_SIZE"}:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))


def test_cpu_defaults_are_gevent_workers_per_cpu_with_micro_batching(clean_rest_env, monkeypatch):
    import mnist_client.cpus

    monkeypatch.setattr(mnist_client.cpus, "usable_cpus", lambda: 3)
    monkeypatch.setenv("MNIST_REST_DEVICE", "cpu")
    conf = runpy.run_path(str(GUNICORN_CONF))
    assert (conf["workers"], conf["threads"], conf["worker_class"]) == (3, 1, "gevent")
    assert conf["worker_connections"] == 1000
    assert ServerConfig.load().batching is True and ServerConfig.load().batch_max_size == 32
    # MNIST_REST_THREADS alone still picks the threaded or the one-request-at-a-time setup.
    monkeypatch.setenv("MNIST_REST_THREADS", "8")
    assert runpy.run_path(str(GUNICORN_CONF))["worker_class"] == "gthread"
    monkeypatch.setenv("MNIST_REST_THREADS", "1")
    assert runpy.run_path(str(GUNICORN_CONF))["worker_class"] == "sync"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"MNIST_REST_WORKER_CLASS": "gevent", "MNIST_REST_THREADS": "8"}, "needs MNIST_REST_WORKER_CLASS=gthread"),
        ({"MNIST_REST_WORKER_CLASS": "sync", "MNIST_REST_THREADS": "4"}, "sync runs one thread"),
        ({"MNIST_REST_WORKER_CLASS": "eventlet"}, "expected one of gevent, gthread, sync"),
        ({"MNIST_REST_WORKER_CONNECTIONS": "0"}, "MNIST_REST_WORKER_CONNECTIONS"),
    ],
)
def test_worker_settings_that_cannot_work_are_refused(clean_rest_env, monkeypatch, settings, message):
    monkeypatch.setenv("MNIST_REST_DEVICE", "cpu")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        runpy.run_path(str(GUNICORN_CONF))


def test_gpu_defaults_are_one_worker_per_gpu_each_pinned_to_its_own(clean_rest_env, monkeypatch):
    import serving.torch_server.gpus

    monkeypatch.setattr(serving.torch_server.gpus, "visible_gpus", lambda device: 2)
    conf = runpy.run_path(str(GUNICORN_CONF))
    assert (conf["workers"], conf["threads"], conf["worker_class"]) == (2, 64, "gthread")
    assert ServerConfig.load().batch_max_size == 64 and ServerConfig.load().batching is True

    class Worker:
        pass

    class Master:
        WORKERS: dict[int, Worker] = {}

    master = Master()
    for pid in (101, 102, 103):
        worker = Worker()
        conf["pre_fork"](master, worker)
        master.WORKERS[pid] = worker
    assert [w.mnist_gpu for w in master.WORKERS.values()] == [0, 1, 0]
    del master.WORKERS[102]  # the worker on GPU 1 died: its replacement takes GPU 1 again
    replacement = Worker()
    conf["pre_fork"](master, replacement)
    assert replacement.mnist_gpu == 1
    conf["post_fork"](master, replacement)  # in the new worker, before the app reads its settings
    assert os.environ["MNIST_REST_DEVICE"] == "cuda:1"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MNIST_REST_MAX_BATCH": "lots"}, "MNIST_REST_MAX_BATCH='lots': expected an integer"),
        ({"MNIST_REST_MAX_BATCH": "0"}, "MNIST_REST_MAX_BATCH=0: expected an integer >= 1"),
        ({"MNIST_REST_DEVICE": "tpu"}, "MNIST_REST_DEVICE='tpu': expected one of auto, cpu, cuda"),
        ({"MNIST_REST_BATCHING": "maybe"}, "expected true/false"),
        ({"MNIST_REST_POLL_SECONDS": "-1"}, "MNIST_REST_POLL_SECONDS=-1.0"),
    ],
)
def test_bad_config_names_the_variable(env, fragment):
    with pytest.raises(ConfigError) as raised:
        ServerConfig.load(environ=env)
    assert fragment in str(raised.value)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown setting 'max_batches'"):
        ServerConfig.load({"max_batches": 3}, environ={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(torch_base):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        create_app({"model_base_path": torch_base, "device": "cuda"})


def test_env_selects_the_device(torch_base, monkeypatch):
    monkeypatch.setenv("MNIST_REST_DEVICE", "cpu")
    app = create_app({"model_base_path": torch_base, "poll_seconds": 3600})
    try:
        assert str(app.extensions["mnist"].store.latest().device) == "cpu"
    finally:
        app.extensions["mnist"].store.stop_watching()


# -- micro-batching ------------------------------------------------------------------------------


def test_micro_batching_answers_concurrent_requests_correctly(torch_base, reference):
    app = create_app(
        {"model_base_path": torch_base, "poll_seconds": 3600, "batching": True, "batch_max_size": 8}
    )
    images, probabilities, classes = reference
    results: dict[int, Any] = {}

    def call(index: int) -> None:
        response = app.test_client().post(PREDICT, json={"instances": images[index : index + 1].tolist()})
        results[index] = (response.status_code, response.get_json())

    try:
        threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(results) == list(range(16))
        for index, (status, body) in results.items():
            assert status == 200
            assert body["predictions"][0]["classes"] == classes[index]
            np.testing.assert_allclose(
                body["predictions"][0]["probabilities"], probabilities[index], rtol=1e-5, atol=1e-6
            )
        # A large request bypasses the queue and is still right.
        response = app.test_client().post(PREDICT, json={"instances": images[:10].tolist()})
        assert [p["classes"] for p in response.get_json()["predictions"]] == classes[:10].tolist()
        # How requests group into forward passes is tested deterministically in test_rest_model_store.py;
        # here, whatever the grouping, every image went through exactly one pass.
        text = app.test_client().get("/metrics").get_data(as_text=True)
        assert float(text.split("mnist_rest_forward_batch_size_sum ")[1].split()[0]) == 16 + 10
    finally:
        app.extensions["mnist"].store.stop_watching()
