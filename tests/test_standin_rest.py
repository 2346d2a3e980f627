"""The stand-in's REST API (--rest_api_port): TF Serving's routes, JSON forms, statuses and errors.

Real stand-ins on free ports, called over HTTP with ``requests`` and with the project's RestClient;
predictions are checked against the SavedModel run in this process (eager TensorFlow) and against
the same stand-in's gRPC answer.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from mnist_client import contract
from mnist_client.loadtest import load_report
from mnist_client.loadtest.cli import EXIT_OK, main
from mnist_client.rest import RestClient
from serving.tfs_standin.flags import ServerOptions
from serving.tfs_standin.server import ModelServer, ServerStartError
from stack.processes import free_port
from tests.standin_helpers import (
    copy_version,
    expected_outputs,
    outputs,
    running,
    server_options,
    standin_process,
    stubs_for,
    tf_base_path,
    wait_for,
)
MAX_BODY = 1 << 20  # the module server's --standin_rest_max_body_bytes
PREDICT = f"/v1/models/{contract.MODEL_NAME}:predict"


def rest_options(base_path: Path, **overrides: object) -> ServerOptions:
    return server_options(base_path, rest_api_port=free_port(), **overrides)


def url(server: ModelServer, path: str) -> str:
    return f"http://127.0.0.1:{server.rest_port}{path}"


@pytest.fixture(scope="module")
def images(test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_images[0][:8]


@pytest.fixture(scope="module")
def model_dir(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private base path with a copy of the fixture's TF version 1."""
    base = tmp_path_factory.mktemp("standin_rest") / contract.MODEL_NAME
    shutil.copytree(tf_base_path(model_repo) / "1", base / "1")
    return base


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ModelServer]:
    with running(rest_options(model_dir, standin_rest_max_body_bytes=MAX_BODY)) as started:
        yield started


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def oracle(model_dir: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    return expected_outputs(model_dir / "1", images)


def post(http: requests.Session, server: ModelServer, payload: object, path: str = PREDICT) -> requests.Response:
    return http.post(url(server, path), data=json.dumps(payload), timeout=30)


def assert_matches_oracle(probabilities: np.ndarray, classes: np.ndarray, oracle: dict[str, np.ndarray]) -> None:
    np.testing.assert_allclose(probabilities, oracle[contract.PROBABILITIES_NAME], atol=1e-5)
    np.testing.assert_array_equal(classes, oracle[contract.CLASSES_NAME])


# --- predict ------------------------------------------------------------------------------------


def test_row_form_answers_one_object_per_instance(
    server: ModelServer, http: requests.Session, images: np.ndarray, oracle: dict[str, np.ndarray]
) -> None:
    answer = post(http, server, {"instances": images.tolist()})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    predictions = answer.json()["predictions"]
    assert len(predictions) == len(images)
    assert all(set(p) == {contract.PROBABILITIES_NAME, contract.CLASSES_NAME} for p in predictions)
    assert all(isinstance(p[contract.CLASSES_NAME], int) for p in predictions)
    assert_matches_oracle(
        np.array([p[contract.PROBABILITIES_NAME] for p in predictions], dtype=np.float32),
        np.array([p[contract.CLASSES_NAME] for p in predictions]),
        oracle,
    )


@pytest.mark.parametrize("named", [False, True], ids=["plain", "named"])
def test_column_form_answers_one_list_per_output(
    server: ModelServer, http: requests.Session, images: np.ndarray, oracle: dict[str, np.ndarray], named: bool
) -> None:
    inputs = {contract.INPUT_NAME: images.tolist()} if named else images.tolist()
    answer = post(http, server, {"inputs": inputs, "signature_name": contract.SIGNATURE_NAME})
    assert answer.status_code == 200, answer.text
    outputs_json = answer.json()["outputs"]
    assert set(outputs_json) == {contract.PROBABILITIES_NAME, contract.CLASSES_NAME}
    assert_matches_oracle(
        np.array(outputs_json[contract.PROBABILITIES_NAME], dtype=np.float32),
        np.array(outputs_json[contract.CLASSES_NAME]),
        oracle,
    )


def test_named_row_form_and_version_paths(
    server: ModelServer, http: requests.Session, images: np.ndarray, oracle: dict[str, np.ndarray]
) -> None:
    payload = {"instances": [{contract.INPUT_NAME: image} for image in images[:2].tolist()]}
    for path in (PREDICT, f"/v1/models/{contract.MODEL_NAME}/versions/1:predict", f"/V1/MODELS/{contract.MODEL_NAME}:predict"):
        answer = post(http, server, payload, path)
        assert answer.status_code == 200, (path, answer.text)
        classes = [p[contract.CLASSES_NAME] for p in answer.json()["predictions"]]
        assert classes == oracle[contract.CLASSES_NAME][:2].tolist(), path


def test_rest_and_grpc_answer_the_same_input_identically(
    server: ModelServer, http: requests.Session, images: np.ndarray
) -> None:
    with stubs_for(server) as stubs:
        by_grpc = outputs(stubs.predict(images))
    by_rest = post(http, server, {"inputs": images.tolist()}).json()["outputs"]
    # Floats are written in the shortest form that reads back as the same float32: equal, not close.
    np.testing.assert_array_equal(
        np.array(by_rest[contract.PROBABILITIES_NAME], dtype=np.float32), by_grpc[contract.PROBABILITIES_NAME]
    )
    np.testing.assert_array_equal(np.array(by_rest[contract.CLASSES_NAME]), by_grpc[contract.CLASSES_NAME])


def test_concurrent_requests_on_kept_alive_connections(
    server: ModelServer, images: np.ndarray, oracle: dict[str, np.ndarray]
) -> None:
    body = json.dumps({"instances": images[:1].tolist()})
    expected = int(oracle[contract.CLASSES_NAME][0])

    def calls(_: int) -> list[int]:
        with requests.Session() as session:  # one connection per thread, reused for every call
            return [
                session.post(url(server, PREDICT), data=body, timeout=30).json()["predictions"][0][
                    contract.CLASSES_NAME
                ]
                for _ in range(10)
            ]

    with ThreadPoolExecutor(12) as pool:
        answers = [c for batch in pool.map(calls, range(12)) for c in batch]
    assert answers == [expected] * 120


# --- status and metadata ------------------------------------------------------------------------


def test_model_status_is_tf_servings_json(server: ModelServer, http: requests.Session) -> None:
    expected = {
        "model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    for path in (f"/v1/models/{contract.MODEL_NAME}", f"/v1/models/{contract.MODEL_NAME}/versions/1"):
        answer = http.get(url(server, path), timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json() == expected, path


def test_metadata_is_tf_servings_json(server: ModelServer, http: requests.Session) -> None:
    for path in (f"/v1/models/{contract.MODEL_NAME}/metadata", f"/v1/models/{contract.MODEL_NAME}/versions/1/metadata"):
        answer = http.get(url(server, path), timeout=10)
        assert answer.status_code == 200, answer.text
        document = answer.json()
        assert document["model_spec"] == {"name": contract.MODEL_NAME, "version": "1", "signature_name": ""}
        signature = document["metadata"]["signature_def"]["signature_def"][contract.SIGNATURE_NAME]
        assert signature["method_name"] == "tensorflow/serving/predict"
        got = {
            section: {
                alias: (info["dtype"], [int(d["size"]) for d in info["tensor_shape"]["dim"]])
                for alias, info in signature[section].items()
            }
            for section in ("inputs", "outputs")
        }
        assert got == {
            section: {alias: (spec["dtype"], spec["shape"]) for alias, spec in contract.signature()[section].items()}
            for section in ("inputs", "outputs")
        }


# --- errors -------------------------------------------------------------------------------------

IMAGE = np.zeros(contract.IMAGE_SHAPE).tolist()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "fragment"),
    [
        ("POST", PREDICT, b"", 400, "JSON Parse error: The document is empty"),
        ("POST", PREDICT, b'{"instances": [1,', 400, "JSON Parse error: "),
        ("POST", PREDICT, b"[1, 2]", 400, "JSON Value: [1,2] Is not object"),
        ("POST", PREDICT, b'{"images": []}', 400, "Missing 'inputs' or 'instances' key"),
        ("POST", PREDICT, b'{"instances": []}', 400, "No values in 'instances' array"),
        ("POST", PREDICT, json.dumps({"instances": [IMAGE], "inputs": [IMAGE]}).encode(), 400,
         "expecting only one of 'inputs' or 'instances' keys to exist"),
        ("POST", PREDICT, json.dumps({"instances": [[0.0] * 784]}).encode(), 400,
         "input 'images' has shape [1,784], but signature serving_default of model mnist version 1 expects "
         "[-1,28,28]"),
        ("POST", PREDICT, json.dumps({"instances": [IMAGE, IMAGE[:27]]}).encode(), 400,
         "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 784 "
         "but got: 756"),
        ("POST", PREDICT, json.dumps({"inputs": [[["x"] * 28] * 28]}).encode(), 400,
         'JSON Value: "x" Type: String is not of expected type: float'),
        ("POST", PREDICT, json.dumps({"inputs": [[[True] * 28] * 28]}).encode(), 400,
         "JSON Value: true Type: True is not of expected type: float"),
        ("POST", PREDICT, json.dumps({"inputs": [[[1e39] * 28] * 28]}).encode(), 400,
         "Cannot convert JSON value: 1e+39 to float without loss of precision."),
        ("POST", PREDICT, b'{"inputs": ' + b"[" * 70 + b"0" + b"]" * 70 + b"}", 400,
         "a value is nested 70 lists deep; a tensor has at most 64 dimensions"),
        ("POST", PREDICT, json.dumps({"inputs": {"pixels": [IMAGE]}}).encode(), 400,
         "Missing named input: images in 'inputs' object."),
        ("POST", PREDICT, json.dumps({"signature_name": "nope", "instances": [IMAGE]}).encode(), 400,
         'Serving signature name: "nope" not found in signature def'),
        ("POST", PREDICT, json.dumps({"signature_name": 7, "instances": [IMAGE]}).encode(), 400,
         "'signature_name' key must be a string value."),
        ("POST", "/v1/models/nope:predict", json.dumps({"instances": [IMAGE]}).encode(), 404,
         "Servable not found for request: Latest(nope)"),
        ("POST", f"/v1/models/{contract.MODEL_NAME}/versions/9:predict", json.dumps({"instances": [IMAGE]}).encode(),
         404, "Servable not found for request: Specific(mnist, 9)"),
        ("POST", f"/v1/models/{contract.MODEL_NAME}/versions/99999999999999999999:predict", b"{}", 400,
         "Failed to convert version: 99999999999999999999 to numeric."),
        ("POST", f"/v1/models/{contract.MODEL_NAME}/labels/stable:predict", json.dumps({"instances": [IMAGE]}).encode(),
         400, "Unrecognized servable version label: stable"),
        ("POST", f"/v1/models/{contract.MODEL_NAME}:classify", b"{}", 501, "classify is not implemented"),
        ("POST", f"/v1/models/{contract.MODEL_NAME}:PREDICT", b"{}", 400, "Malformed request: POST"),
        ("GET", "/v1/models/nope", b"", 404, "Could not find any versions of model nope"),
        ("GET", f"/v1/models/{contract.MODEL_NAME}/versions/3", b"", 404, "Could not find version 3 of model mnist"),
        ("GET", "/v1/models/nope/metadata", b"", 404, "Servable not found for request: Latest(nope)"),
        ("GET", "/v1/models", b"", 400, "Missing model name in request."),
        ("GET", PREDICT, b"", 400, f"Malformed request: GET {PREDICT}"),
        ("PUT", f"/v1/models/{contract.MODEL_NAME}", b"{}", 400, f"Malformed request: PUT /v1/models/{contract.MODEL_NAME}"),
        ("GET", "/readyz", b"", 404, "no such endpoint: GET /readyz"),
    ],
)
def test_errors_are_tf_servings_status_and_json(
    server: ModelServer, http: requests.Session, method: str, path: str, body: bytes, status: int, fragment: str
) -> None:
    answer = http.request(method, url(server, path), data=body, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    document = answer.json()
    assert list(document) == ["error"]
    assert fragment in document["error"]


def test_bodies_over_the_limit_are_413_and_the_server_serves_on(
    server: ModelServer, http: requests.Session, images: np.ndarray
) -> None:
    too_large = b" " * (MAX_BODY + 1)
    answer = http.post(url(server, PREDICT), data=too_large, timeout=30)
    assert answer.status_code == 413
    assert answer.json()["error"] == (
        f"request body of {MAX_BODY + 1} bytes exceeds this server's limit of {MAX_BODY} bytes "
        "(--standin_rest_max_body_bytes)"
    )
    chunked = http.post(url(server, PREDICT), data=iter([too_large[: MAX_BODY // 2]] * 3), timeout=30)
    assert chunked.status_code == 413
    assert f"limit of {MAX_BODY} bytes" in chunked.json()["error"]
    # A chunked body under the limit is read whole.
    body = json.dumps({"instances": images[:1].tolist()}).encode()
    small = http.post(url(server, PREDICT), data=iter([body[:100], body[100:]]), timeout=30)
    assert small.status_code == 200, small.text


# --- the project's client and load tester -------------------------------------------------------


def test_rest_client_works_against_the_standin(
    server: ModelServer, images: np.ndarray, oracle: dict[str, np.ndarray]
) -> None:
    with RestClient(f"http://127.0.0.1:{server.rest_port}", timeout=30) as client:
        assert client.ready()
        prediction = client.predict(images)
        assert_matches_oracle(prediction.probabilities, prediction.classes, oracle)
        assert [(s.version, s.state) for s in client.model_status()] == [(1, "AVAILABLE")]
        metadata = client.metadata()
        assert (metadata.version, metadata.signature_name) == (1, contract.SIGNATURE_NAME)
        assert set(metadata.inputs) == {contract.INPUT_NAME}
    with RestClient(f"http://127.0.0.1:{server.rest_port}", model_version=1, binary=False) as pinned:
        np.testing.assert_array_equal(pinned.predict(images[:3]).classes, oracle[contract.CLASSES_NAME][:3])


def test_load_tester_targets_the_rest_api(server: ModelServer, tmp_path: Path, mnist_dir: Path) -> None:
    out = io.StringIO()
    code = main(["run", "--rest", f"tf-standin-rest=http://127.0.0.1:{server.rest_port}",
                 "--grpc", f"tf-standin-grpc=127.0.0.1:{server.port}", "--requests", "30", "--warmup", "2",
                 "--data-dir", str(mnist_dir), "--no-progress", "--json", str(tmp_path / "result.json"),
                 "--max-error-rate", "0", "--min-agreement", "1"], out=out)
    assert code == EXIT_OK, out.getvalue()
    report = load_report(tmp_path / "result.json")
    assert [(m.target, m.ok) for m in report.measurements] == [("tf-standin-rest", 30), ("tf-standin-grpc", 30)]
    (pair,) = report.agreements()  # the same images, classified alike over REST and over gRPC
    assert pair.images > 0 and pair.agree == pair.images


# --- the shared serving path: versions, batching, deadlines, stop ---------------------------------


def test_a_version_added_while_serving_is_picked_up_over_rest(
    model_repo: Path, tmp_path: Path, images: np.ndarray
) -> None:
    base = tmp_path / contract.MODEL_NAME
    shutil.copytree(tf_base_path(model_repo) / "1", base / "1")
    with running(rest_options(base)) as server, requests.Session() as http:
        copy_version(base, 1, 2)

        def serves_only_version_2() -> bool:
            statuses = http.get(url(server, f"/v1/models/{contract.MODEL_NAME}"), timeout=10).json()
            states = {s["version"]: s["state"] for s in statuses["model_version_status"]}
            return states.get("2") == "AVAILABLE" and states.get("1") == "END"

        wait_for(serves_only_version_2, timeout=60, what="version 2 to replace version 1")
        metadata = http.get(url(server, f"/v1/models/{contract.MODEL_NAME}/metadata"), timeout=10).json()
        assert metadata["model_spec"]["version"] == "2"
        payload = {"instances": images[:2].tolist()}
        assert post(http, server, payload, f"/v1/models/{contract.MODEL_NAME}/versions/2:predict").status_code == 200
        gone = post(http, server, payload, f"/v1/models/{contract.MODEL_NAME}/versions/1:predict")
        assert gone.status_code == 404
        assert "Servable not found for request: Specific(mnist, 1)" in gone.json()["error"]


def _batching_file(tmp_path: Path, max_batch_size: int, timeout_s: float) -> Path:
    path = tmp_path / f"batching_{max_batch_size}_{timeout_s}.txt"
    path.write_text(f"max_batch_size {{ value: {max_batch_size} }}\n"
                    f"batch_timeout_micros {{ value: {int(timeout_s * 1e6)} }}\nnum_batch_threads {{ value: 1 }}\n")
    return path


def test_rest_and_grpc_requests_share_one_batch(model_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    # A batch of 2 that would wait 60 s for its second request: it runs at once only if the REST
    # request and the gRPC one join the same batch scheduler. (The model's warm-up records hold up
    # to 64 images, more than such a batch takes: warm-up is off here.)
    options = rest_options(model_dir, enable_batching=True, enable_model_warmup=False,
                           batching_parameters_file=str(_batching_file(tmp_path, 2, 60)))
    with running(options) as server, stubs_for(server) as stubs, requests.Session() as http:
        scheduler = server.core.batch_scheduler
        assert scheduler is not None
        before_tasks, before_batches = scheduler.tasks_run, scheduler.batches_run
        with ThreadPoolExecutor(2) as pool:
            rest_call = pool.submit(post, http, server, {"instances": images[:1].tolist()})
            grpc_call = pool.submit(stubs.predict, images[1:2])
            rest_answer, grpc_answer = rest_call.result(timeout=50), grpc_call.result(timeout=50)
        assert rest_answer.status_code == 200, rest_answer.text
        assert outputs(grpc_answer)[contract.CLASSES_NAME].shape == (1,)
        assert (scheduler.tasks_run, scheduler.batches_run) == (before_tasks + 2, before_batches + 1)


def test_rest_api_timeout_is_the_deadline_of_a_rest_request(
    model_dir: Path, tmp_path: Path, images: np.ndarray
) -> None:
    # A lone request waits 60 s for company in the batch queue; REST gives it 300 ms.
    options = rest_options(model_dir, enable_batching=True, rest_api_timeout_in_ms=300, enable_model_warmup=False,
                           batching_parameters_file=str(_batching_file(tmp_path, 2, 60)))
    with running(options) as server, requests.Session() as http:
        late = post(http, server, {"instances": images[:1].tolist()})
    assert late.status_code == 504, late.text
    assert late.json() == {"error": "the call's deadline passed while it waited in the batch queue"}


def test_stop_finishes_in_flight_rest_requests_then_closes_the_port(
    model_dir: Path, tmp_path: Path, images: np.ndarray
) -> None:
    options = rest_options(model_dir, enable_batching=True,
                           batching_parameters_file=str(_batching_file(tmp_path, 64, 1.5)))
    server = ModelServer(options)
    server.start()
    try:
        server.wait_until_available(timeout=60)
        port = server.rest_port
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(post, requests.Session(), server, {"instances": images[i : i + 1].tolist()})
                         for i in range(3)]
            wait_for(lambda: server.core.batch_scheduler.queued_tasks() == 3, timeout=30,  # type: ignore[union-attr]
                     what="three REST requests waiting in the batch")
            server.stop(grace=10)
            answers = [future.result(timeout=30) for future in in_flight]
    finally:
        server.stop(grace=1)
    assert [a.status_code for a in answers] == [200, 200, 200]
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/v1/models/{contract.MODEL_NAME}", timeout=5)


def test_a_taken_rest_port_fails_the_start(model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        options = server_options(model_dir, rest_api_port=taken.getsockname()[1])
        server = ModelServer(options)
        with pytest.raises(ServerStartError, match="for the REST API"):
            server.start()
        server.stop(grace=0)


def test_sigterm_stops_grpc_and_rest_cleanly(model_dir: Path, tmp_path: Path) -> None:
    with standin_process(model_dir, tmp_path, rest_api=True) as server:  # ready: gRPC and REST answer
        assert server.rest_url is not None
        rest_port = urlsplit(server.rest_url).port
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    log = server.log_path.read_text(errors="replace")
    assert exit_code == 0, log
    assert f"REST API on 127.0.0.1:{rest_port}" in log
    assert "received SIGTERM" in log and log.rstrip().endswith("stopped"), log


def test_rest_stays_off_with_port_0(model_dir: Path) -> None:
    with running(server_options(model_dir)) as server:
        assert server.rest_port == 0


def test_rest_api_num_threads_sizes_the_worker_pool(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="serving.tfs_standin.server")
    with running(rest_options(model_dir, rest_api_num_threads=3)) as server:
        answer = requests.get(url(server, f"/v1/models/{contract.MODEL_NAME}"), timeout=10)
        assert answer.status_code == 200
        assert answer.headers["Server"] == "TF Serving stand-in"
        assert f"REST API on 127.0.0.1:{server.rest_port} (3 threads)" in caplog.text


# --- TF Serving's JSON rules on other dtypes and a single-output signature ------------------------


@pytest.fixture(scope="module")
def toy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    """A small SavedModel written here: int32, float, string and bool inputs, one- and three-output signatures."""
    import tensorflow as tf

    class Toy(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int32, name="ids"),
                                      tf.TensorSpec([None], tf.float32, name="scale")])
        def scaled(self, ids: tf.Tensor, scale: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"scaled": tf.cast(ids, tf.float32) * scale[:, None]}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text"),
                                      tf.TensorSpec([None], tf.bool, name="flag")])
        def echo(self, text: tf.Tensor, flag: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"echo_bytes": text, "length": tf.cast(tf.strings.length(text), tf.int64), "negated": ~flag}

    toy = Toy()
    base = tmp_path_factory.mktemp("toy") / "toy"
    tf.saved_model.save(toy, str(base / "1"), signatures={"serving_default": toy.scaled, "echo": toy.echo})
    options = ServerOptions(port=0, standin_host="127.0.0.1", rest_api_port=free_port(), model_name="toy",
                            model_base_path=str(base), file_system_poll_wait_seconds=1)
    with running(options) as server:
        yield server


TOY = "/v1/models/toy:predict"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        # One output: row form answers plain values, column form the value itself.
        ({"instances": [{"ids": [1, 2], "scale": 0.5}, {"ids": [3, 4], "scale": 2}]},
         {"predictions": [[0.5, 1.0], [6.0, 8.0]]}),
        ({"inputs": {"ids": [[1, 2]], "scale": [1.5], "ignored": 1}}, {"outputs": [[1.5, 3.0]]}),
        # Strings as text or base64; outputs named *_bytes come back base64-encoded.
        ({"signature_name": "echo", "instances": [{"text": "ab", "flag": True}, {"text": {"b64": "eHl6"}, "flag": False}]},
         {"predictions": [{"echo_bytes": {"b64": "YWI="}, "length": 2, "negated": False},
                          {"echo_bytes": {"b64": "eHl6"}, "length": 3, "negated": True}]}),
        ({"signature_name": "echo", "inputs": {"text": ["héllo"], "flag": [True]}},
         {"outputs": {"echo_bytes": [{"b64": "aMOpbGxv"}], "length": [6], "negated": [False]}}),
    ],
    ids=["row-one-output", "column-one-output", "row-strings", "column-strings"],
)
def test_json_forms_for_other_dtypes(toy_server: ModelServer, payload: dict, expected: dict) -> None:
    answer = requests.post(url(toy_server, TOY), data=json.dumps(payload), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json() == expected


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"instances": [[1, 2]]}, "instances is a plain list, but expecting list of objects as multiple input "
                                  "tensors required as per tensorinfo_map"),
        ({"inputs": [[1, 2]]}, "inputs is a plain value/list, but expecting an object as multiple input tensors"),
        ({"instances": [{"ids": [1.5, 2], "scale": 1}]},
         "Failed to process element: 0 key: ids of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: 1.5 "
         "Type: Number is not of expected type: int32"),
        ({"instances": [{"ids": [1, 2]}]}, "keys must be equal to: ids,scale"),
        ({"instances": [{"ids": [1, 2], "scale": 1}, [1, 2]]}, "Expecting object but got list at item 1 of input list"),
        ({"inputs": {"ids": [[2147483648, 0]], "scale": [1]}},
         "JSON Value: 2147483648 Type: Number is not of expected type: int32"),
        ({"signature_name": "echo", "inputs": {"text": [1], "flag": [True]}},
         "JSON Value: 1 Type: Number is not of expected type: string"),
        ({"signature_name": "echo", "inputs": {"text": [{"b64": "%%%"}], "flag": [True]}}, "Unable to base64 decode"),
        ({"signature_name": "echo", "inputs": {"text": ["a"], "flag": [1]}},
         "JSON Value: 1 Type: Number is not of expected type: bool"),
    ],
)
def test_json_type_errors_for_other_dtypes(toy_server: ModelServer, payload: dict, fragment: str) -> None:
    answer = requests.post(url(toy_server, TOY), data=json.dumps(payload), timeout=30)
    assert answer.status_code == 400, answer.text
    assert fragment in answer.json()["error"]


def test_nan_and_infinity_are_accepted_and_written_back(toy_server: ModelServer) -> None:
    body = b'{"inputs": {"ids": [[1, 2]], "scale": [NaN]}}'
    answer = requests.post(url(toy_server, TOY), data=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.content.replace(b" ", b"") == b'{"outputs":[[NaN,NaN]]}'
    body = b'{"inputs": {"ids": [[1, -2]], "scale": [Infinity]}}'
    assert json.loads(requests.post(url(toy_server, TOY), data=body, timeout=30).content) == {
        "outputs": [[float("inf"), float("-inf")]]
    }
