"""A corpus of malformed REST requests against the PyTorch server as deployed (gunicorn, 2 workers).

Each request gets its exact 4xx and a ``{"error": ...}`` saying what was wrong and
what was expected; after the whole corpus the same two workers (no crash, no
replacement) still answer a good request with the in-process model's predictions.
tests/test_rest_app.py covers each decoder branch through Flask's test client; this
file sends the bytes over real sockets through gunicorn's HTTP parser and the
server's front door, including requests ``requests`` itself would never produce.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

from mnist_client import contract
from tests.rest_helpers import PREDICT, Gunicorn, gunicorn, in_process, npy

pytestmark = pytest.mark.slow

MAX_BATCH = 32  # above 28, so an unbatched image is refused for its shape, not its batch size
MAX_BODY_BYTES = 256 * 1024
ZERO_IMAGE = [[0.0] * contract.IMAGE_WIDTH for _ in range(contract.IMAGE_HEIGHT)]


def _json(document: object) -> bytes:
    return json.dumps(document).encode()


def _images(count: int, value: float = 0.0) -> list:
    return [[[value] * contract.IMAGE_WIDTH for _ in range(contract.IMAGE_HEIGHT)] for _ in range(count)]


def _with_pixel(value: object) -> bytes:
    image = _images(1)
    image[0][3][5] = value
    return _json({"instances": image})


def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _pickled_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    """One malformed request and what the server must answer."""

    status: int
    fragments: tuple[str, ...]
    body: bytes = b""
    method: str = "POST"
    path: str = PREDICT
    content_type: str | None = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


NPY = "application/x-npy"
CASES: dict[str, Case] = {
    # --- broken JSON ------------------------------------------------------------------------
    "unterminated JSON": Case(400, ("malformed JSON", 'expected {"instances"'), b'{"instances": ['),
    "truncated mid-number": Case(400, ("malformed JSON",), b'{"instances": [[[0.1'),
    "trailing garbage": Case(400, ("malformed JSON",), _json({"instances": _images(1)}) + b" }"),
    "single quotes": Case(400, ("malformed JSON",), b"{'instances': []}"),
    "invalid UTF-8": Case(400, ("malformed JSON",), b'{"instances": "\xff\xfe"}'),
    "nesting 5000 deep": Case(400, ("malformed JSON",), b"[" * 5000 + b"]" * 5000),
    "nesting 100 deep inside instances": Case(
        400, ("instances is not a regular array", "expected 28"), b'{"instances": ' + b"[" * 100 + b"]" * 100 + b"}"
    ),
    "NaN token": Case(400, ("malformed JSON", "NaN and Infinity are not valid JSON"), _with_pixel(0.5).replace(
        b"0.5", b"NaN")),
    "Infinity token": Case(400, ("NaN and Infinity are not valid JSON",), _with_pixel(0.5).replace(
        b"0.5", b"-Infinity")),
    "number beyond float range": Case(400, ("malformed JSON",), _with_pixel(0.5).replace(b"0.5", b"1e400")),
    "huge integer": Case(400, ("expected pixel / 255, in [0, 1]",), _with_pixel(10**30)),
    # --- wrong document shape ---------------------------------------------------------------
    "top-level array": Case(400, ("expected a JSON object, got an array",), _json([ZERO_IMAGE])),
    "top-level string": Case(400, ("expected a JSON object",), _json("instances")),
    "top-level null": Case(400, ("expected a JSON object",), b"null"),
    "empty object": Case(400, ("unexpected top-level keys", 'expected {"instances"'), b"{}"),
    "unknown key": Case(400, ("unexpected top-level keys ('images')",), _json({"images": [ZERO_IMAGE]})),
    "both instances and inputs": Case(400, ('both "instances" and "inputs"', "exactly one"),
                                      _json({"instances": [ZERO_IMAGE], "inputs": [ZERO_IMAGE]})),
    "instances null": Case(400, ("instances must be a list of images", "got null"), _json({"instances": None})),
    "instances string": Case(400, ("instances must be a list of images",), _json({"instances": "0" * 784})),
    "instances number": Case(400, ("instances must be a list of images",), _json({"instances": 7})),
    "empty batch": Case(400, ("empty batch", "at least one"), _json({"instances": []})),
    "empty body": Case(400, ("empty request body", "expected JSON"), b""),
    # --- wrong ranks and sizes --------------------------------------------------------------
    "unbatched image": Case(400, ("shape [28, 28]", "must still be wrapped in a batch"),
                            _json({"instances": ZERO_IMAGE})),
    "flattened image": Case(400, ("shape [1, 784]", "expected [N, 28, 28]"), _json({"instances": [[0.0] * 784]})),
    "channel dimension": Case(400, ("expected [N, 28, 28]",),
                              _json({"instances": [[[[0.0]] * 28 for _ in range(28)]]})),
    "27 columns": Case(400, ("shape [1, 28, 27]", "expected [N, 28, 28]"),
                       _json({"instances": [[[0.0] * 27 for _ in range(28)]]})),
    "ragged rows": Case(400, ("not a regular array", "entries, expected 28"),
                        _json({"instances": [[[0.0] * 28] * 27 + [[0.0] * 3]]})),
    # --- wrong value types ------------------------------------------------------------------
    "string pixel": Case(400, ("non-numeric values", "a string at instances[0][3][5]", "expected numbers"),
                         _with_pixel("0.5")),
    "null pixel": Case(400, ("non-numeric values", "null at instances[0][3][5]"), _with_pixel(None)),
    "boolean pixel": Case(400, ("non-numeric values", "instances[0][3][5]"), _with_pixel(True)),
    "object pixel": Case(400, ("instances",), _with_pixel({"v": 1})),
    "raw 0-255 pixels": Case(400, ("has values from 255 to 255", "expected pixel / 255", "divide them by 255"),
                             _json({"instances": _images(1, 255)})),
    "negative values": Case(400, ("has values from -1 to -1", "expected pixel / 255, in [0, 1]"),
                            _json({"instances": _images(1, -1.0)})),
    "named rows with the wrong key": Case(400, ("instances[0]", "exactly one key 'images'"),
                                          _json({"instances": [{"pixels": ZERO_IMAGE}]})),
    "named inputs with the wrong key": Case(400, ("inputs has keys ['pixels']", "exactly one input named 'images'"),
                                            _json({"inputs": {"pixels": [ZERO_IMAGE]}})),
    "unknown signature_name": Case(400, ("unknown signature_name 'classify'", "only 'serving_default'"),
                                   _json({"signature_name": "classify", "instances": [ZERO_IMAGE]})),
    "numeric signature_name": Case(400, ("unknown signature_name 7",),
                                   _json({"signature_name": 7, "instances": [ZERO_IMAGE]})),
    # --- limits -----------------------------------------------------------------------------
    "batch above MAX_BATCH": Case(413, (f"batch of {MAX_BATCH + 1} images", f"limit of {MAX_BATCH}"),
                                  _json({"instances": _images(MAX_BATCH + 1)})),
    "body above MAX_BODY_BYTES": Case(413, (f"exceeds this server's limit of {MAX_BODY_BYTES} bytes",),
                                      b" " * (MAX_BODY_BYTES + 1)),
    # --- .npy bodies ------------------------------------------------------------------------
    "npy: not a .npy file": Case(400, ("not a .npy file", "\\x93NUMPY magic"), b"0" * 784, content_type=NPY),
    "npy: empty body": Case(400, ("not a .npy file",), b"", content_type=NPY),
    "npy: truncated data": Case(400, ("truncated or padded",), npy(np.zeros((4, 28, 28), np.uint8))[:-100],
                                content_type=NPY),
    "npy: truncated header": Case(400, ("unreadable .npy header",), npy(np.zeros((1, 28, 28), np.uint8))[:40],
                                  content_type=NPY),
    "npy: float64": Case(400, (".npy dtype <f8", "expected uint8 (pixels 0-255) or float32"),
                         npy(np.zeros((1, 28, 28), np.float64)), content_type=NPY),
    "npy: int32": Case(400, (".npy dtype <i4",), npy(np.zeros((1, 28, 28), np.int32)), content_type=NPY),
    "npy: pickled objects": Case(400, (".npy dtype |O",), _pickled_npy(), content_type=NPY),
    "npy: flattened": Case(400, ("shape [1, 784]", "expected [N, 28, 28]"), npy(np.zeros((1, 784), np.uint8)),
                           content_type=NPY),
    "npy: header claims 10^12 images": Case(413, ("batch of 1000000000000 images", f"limit of {MAX_BATCH}"),
                                            _npy_header("|u1", (10**12, 28, 28)) + b"\0" * 784, content_type=NPY),
    "npy: NaN": Case(400, ("NaN or infinite", "finite numbers in [0, 1]"),
                     npy(np.full((1, 28, 28), np.nan, np.float32)), content_type=NPY),
    "npy: float 0-255": Case(400, ("has values from 255 to 255", "raw 0-255 pixels"),
                             npy(np.full((1, 28, 28), 255, np.float32)),
                             content_type=NPY),
    "npy: empty batch": Case(400, ("empty batch",), npy(np.zeros((0, 28, 28), np.uint8)), content_type=NPY),
    "npy: batch above MAX_BATCH": Case(413, (f"limit of {MAX_BATCH}",),
                                       npy(np.zeros((MAX_BATCH + 1, 28, 28), np.uint8)), content_type=NPY),
    # --- content types ----------------------------------------------------------------------
    "text/plain": Case(415, ("unsupported Content-Type 'text/plain'", "expected application/json"),
                       _json({"instances": [ZERO_IMAGE]}), content_type="text/plain"),
    "form-urlencoded (curl -d)": Case(415, ("application/x-www-form-urlencoded",), b"instances=1",
                                      content_type="application/x-www-form-urlencoded"),
    "multipart": Case(415, ("multipart/form-data",), b"--b\r\n\r\n--b--\r\n",
                      content_type="multipart/form-data; boundary=b"),
    "XML": Case(415, ("application/xml",), b"<instances/>", content_type="application/xml"),
    # --- models, versions, paths, methods ---------------------------------------------------
    "unknown model": Case(404, ("'fashion'",), _json({"instances": [ZERO_IMAGE]}),
                          path="/v1/models/fashion:predict"),
    "unknown version": Case(404, ("version 7 of model 'mnist' is not loaded", "loaded versions: [1]"),
                            _json({"instances": [ZERO_IMAGE]}), path="/v1/models/mnist/versions/7:predict"),
    "non-numeric version": Case(404, ("'abc'",), _json({"instances": [ZERO_IMAGE]}),
                                path="/v1/models/mnist/versions/abc:predict"),
    "negative version": Case(404, ("-1",), _json({"instances": [ZERO_IMAGE]}),
                             path="/v1/models/mnist/versions/-1:predict"),
    "21-digit version": Case(404, ("99999999999999999999",), _json({"instances": [ZERO_IMAGE]}),
                             path="/v1/models/mnist/versions/99999999999999999999:predict"),
    "status of an unknown version": Case(404, ("version 9 of model 'mnist' is unknown",), method="GET",
                                         path="/v1/models/mnist/versions/9", content_type=None),
    "metadata of an unknown model": Case(404, ("'fashion'",), method="GET", path="/v1/models/fashion/metadata",
                                         content_type=None),
    "unknown path": Case(404, ("no such endpoint: GET /v2/models/mnist", "/openapi.yaml"), method="GET",
                         path="/v2/models/mnist", content_type=None),
    "GET on predict": Case(405, ("method GET is not allowed on /v1/models/mnist:predict", "allowed:"),
                           method="GET", content_type=None),
    "PUT on predict": Case(405, ("method PUT is not allowed",), _json({"instances": [ZERO_IMAGE]}), method="PUT"),
    "DELETE a model": Case(405, ("method DELETE is not allowed on /v1/models/mnist",), method="DELETE",
                           path="/v1/models/mnist", content_type=None),
    "POST to healthz": Case(405, ("method POST is not allowed on /healthz",), b"{}", path="/healthz"),
}


@pytest.fixture(scope="module")
def base(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    base = tmp_path_factory.mktemp("reliability-rest") / contract.MODEL_NAME
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    return base


@pytest.fixture(scope="module")
def server(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with gunicorn(base, tmp_path_factory.mktemp("reliability-rest-run"), MNIST_REST_MAX_BATCH=str(MAX_BATCH),
                  MNIST_REST_MAX_BODY_BYTES=str(MAX_BODY_BYTES), MNIST_REST_ACCESS_LOG="off") as server:
        yield server


def send(url: str, case: Case) -> requests.Response:
    headers = dict(case.headers)
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    return requests.request(case.method, f"{url}{case.path}", data=case.body or None, headers=headers, timeout=30)


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_gets_its_4xx_and_says_why(server: Gunicorn, name: str) -> None:
    case = CASES[name]
    response = send(server.url, case)
    assert response.status_code == case.status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    message = response.json()["error"]
    for fragment in case.fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if case.status == 405:
        assert response.headers["Allow"]


def raw_exchange(port: int, request: bytes, half_close: bool = True) -> bytes:
    """Send raw bytes (what no HTTP library would) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


RAW_CASES: dict[str, tuple[bytes, bytes]] = {
    # request bytes -> expected start of the status line (gunicorn's HTTP parser answers these)
    "garbage request line": (b"HELLO\r\n\r\n", b"HTTP/1.1 400"),
    "request line above 4094 bytes": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 414"),
    "header above 8190 bytes": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
                                b"HTTP/1.1 431"),
    "non-numeric Content-Length": (b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
                                   b"HTTP/1.1 400"),
}


@pytest.mark.parametrize("name", list(RAW_CASES))
def test_malformed_http_is_refused_by_the_parser(server: Gunicorn, name: str) -> None:
    request, status_line = RAW_CASES[name]
    assert raw_exchange(server.port, request).startswith(status_line)


def test_body_shorter_than_its_content_length_is_refused(server: Gunicorn) -> None:
    body = _json({"instances": [ZERO_IMAGE]})
    head = (f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    answer = raw_exchange(server.port, head + body[: len(body) // 2])
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b'{"error":"the body ended after ' in answer


def test_after_the_corpus_the_same_workers_answer_correctly(server: Gunicorn, base: Path,
                                                            test_images: tuple[np.ndarray, np.ndarray]) -> None:
    workers = server.worker_pids()
    assert len(workers) == 2
    for case in CASES.values():
        assert 400 <= send(server.url, case).status_code < 500
    for request, _ in RAW_CASES.values():
        raw_exchange(server.port, request)
    images = test_images[0][:MAX_BATCH]
    probabilities, classes = in_process(base, 1, images)
    for _ in range(4):  # sync workers close each connection: several requests reach both workers
        response = requests.post(f"{server.url}{PREDICT}", json={"instances": images.tolist()}, timeout=30)
        assert response.status_code == 200, response.text
        assert [p["classes"] for p in response.json()["predictions"]] == classes.tolist()
        np.testing.assert_allclose([p["probabilities"] for p in response.json()["predictions"]], probabilities,
                                   atol=1e-6)
    assert server.worker_pids() == workers, "a worker died and was replaced during the corpus"
    assert server.running()
    whole_log = server.log(tail=None)  # all of it: an early traceback must not scroll out of view
    assert "Traceback" not in whole_log and "unhandled error" not in whole_log
