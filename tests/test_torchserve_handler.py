"""The TorchServe handler (bench/torchserve/mnist_handler.py) called as TorchServe's worker calls it: a batch
of requests with TorchServe's own Context and RequestProcessor. Bad input is answered per request with the
project's error JSON and status, without failing the other requests of its batch.

The handler through a real TorchServe is tested in test_torchserve_peer.py.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

ts_context = pytest.importorskip(
    "ts.context", reason="TorchServe is not installed in this Python: run `make setup` (requirements/main.txt)"
)

from bench.inprocess import load_torchscript  # noqa: E402
from bench.torchserve.mnist_handler import MnistHandler  # noqa: E402
from mnist_client import contract  # noqa: E402

JSON = "application/json"
# TorchServe records a request's payload under the parameter name "body", with that part's content type.
Request = tuple[Any, "str | None"]


def new_context(version_dir: Path, content_types: list[str | None]) -> Any:
    context = ts_context.Context(
        contract.MODEL_NAME, str(version_dir), {"model": {"modelVersion": version_dir.name}}, len(content_types),
        None, "0.12.0",
    )  # fmt: skip
    context.request_processor = [
        ts_context.RequestProcessor({"body": {"content-type": kind}} if kind else {}) for kind in content_types
    ]
    return context


@pytest.fixture(scope="module")
def version_dir(model_repo: Path) -> Path:
    return model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME / "1"


@pytest.fixture(scope="module")
def handler(version_dir: Path) -> MnistHandler:
    import torch

    threads = torch.get_num_threads()
    handler = MnistHandler()
    handler.initialize(new_context(version_dir, [None]))
    torch.set_num_threads(threads)  # initialize sets one thread for the worker; not for the rest of the suite
    return handler


def handle(handler: MnistHandler, version_dir: Path, requests: list[Request]) -> list[tuple[int, Any, str]]:
    """(HTTP status, decoded JSON answer, content type) per request of one batch."""
    context = new_context(version_dir, [kind for _, kind in requests])
    answers = handler.handle([{"body": payload} for payload, _ in requests], context)
    assert len(answers) == len(requests)
    return [
        (context.get_response_status(i)[0], json.loads(answer), context.get_response_content_type(i))
        for i, answer in enumerate(answers)
    ]


def json_request(images: np.ndarray) -> bytes:
    return json.dumps({"instances": images.tolist()}).encode()


def npy_request(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "message"),
    [
        (b'{"instances": [[[0.5', JSON, 400, "malformed JSON"),
        (b'{"instances": [[1, 2]]}', JSON, 400, "has shape [1, 2]; expected [N, 28, 28]"),
        (json.dumps({"instances": [[[255] * 28] * 28]}).encode(), JSON, 400, "divide them by 255"),
        (b'{"images": []}', JSON, 400, "unexpected top-level keys ('images')"),
        (b"", JSON, 400, "empty request body"),
        (b"hello", "text/plain", 415, "unsupported Content-Type 'text/plain'"),
        (npy_request(np.zeros((2, 28, 27), np.uint8)), "application/x-npy", 400, "has shape [2, 28, 27]"),
    ],
    ids=["malformed", "wrong-shape", "raw-pixels", "wrong-key", "empty", "text", "npy-shape"],
)
def test_bad_request_gets_its_status_and_the_servers_error_json(
    handler, version_dir, payload, content_type, status, message
) -> None:
    ((got_status, answer, kind),) = handle(handler, version_dir, [(payload, content_type)])
    assert got_status == status
    assert kind == JSON
    assert list(answer) == ["error"] and message in answer["error"]


def test_a_batch_over_the_servers_image_limit_is_refused_before_decoding(handler, version_dir) -> None:
    # A .npy header claiming 1,025 images, with no pixels behind it: refused on the header alone.
    header_only = npy_request(np.zeros((handler.max_batch + 1, 28, 28), np.uint8))[:128]
    ((status, answer, _),) = handle(handler, version_dir, [(header_only, "application/x-npy")])
    assert status == 413
    assert f"exceeds this server's limit of {handler.max_batch}" in answer["error"]


def test_good_requests_of_a_batch_are_answered_like_the_model_beside_a_bad_one(
    handler, version_dir, model_repo, test_images
) -> None:
    images = test_images[0][:6]
    predict, _ = load_torchscript(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME)
    want_probabilities, want_classes = predict(np.ascontiguousarray(images))

    answered = handle(handler, version_dir, [
        (json_request(images[0:1]), JSON),
        (b'{"instances": "seven"}', JSON),
        (json_request(images[1:3]), None),  # no Content-Type: JSON, as on the project's server
        (npy_request((images[3:6] * 255).round().astype(np.uint8)), "application/x-npy"),
    ])  # fmt: skip

    assert [status for status, _, _ in answered] == [200, 400, 200, 200]
    assert "instances must be a list of images" in answered[1][1]["error"]
    rows = answered[0][1]["predictions"] + answered[2][1]["predictions"]
    columns = answered[3][1]["outputs"]  # .npy bodies are answered in column form, as on the project's server
    classes = [row[contract.CLASSES_NAME] for row in rows] + columns[contract.CLASSES_NAME]
    probabilities = [row[contract.PROBABILITIES_NAME] for row in rows] + columns[contract.PROBABILITIES_NAME]
    assert classes == want_classes.tolist()
    np.testing.assert_allclose(probabilities, want_probabilities, atol=1e-5)


def test_a_body_torchserve_already_parsed_is_answered_as_its_bytes_would_be(
    handler, version_dir, test_images
) -> None:
    images = test_images[0][:2]
    body = json_request(images)
    from_bytes, from_parsed = handle(handler, version_dir, [(body, JSON), (orjson.loads(body), JSON)])
    assert from_bytes[0] == from_parsed[0] == 200
    assert from_parsed[1] == from_bytes[1]
    parsed_bad = handle(handler, version_dir, [(["not", "an", "object"], JSON)])
    assert parsed_bad[0][0] == 400 and "expected a JSON object, got an array" in parsed_bad[0][1]["error"]


def test_a_request_without_a_payload_is_refused(handler, version_dir) -> None:
    context = new_context(version_dir, [None])
    (answer,) = handler.handle([{}], context)
    assert context.get_response_status(0)[0] == 400
    assert "no body" in json.loads(answer)["error"]
