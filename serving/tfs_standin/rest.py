"""TF Serving's REST API on ``--rest_api_port``: predict, model status and model metadata.

The routes are TF Serving's (``http_rest_api_handler.cc``), matched case-insensitively as it does::

    POST /v1/models/<name>[/versions/<n> | /labels/<label>]:predict     row or column form
    GET  /v1/models/<name>[/versions/<n> | /labels/<label>]             GetModelStatus as JSON
    GET  /v1/models/<name>[/versions/<n> | /labels/<label>]/metadata    GetModelMetadata (signature_def)

``:classify`` and ``:regress`` answer 501, as the stand-in's gRPC Classify and Regress do. Every
answer is JSON; an error is ``{"error": "<message>"}`` with the HTTP status TF Serving maps from the
error's code (``HTTP_STATUS``): 400 for INVALID_ARGUMENT and FAILED_PRECONDITION, 404 for NOT_FOUND,
503 for UNAVAILABLE, 504 for DEADLINE_EXCEEDED, 500 for anything unexpected (logged with its traceback;
the server keeps serving). Other ``/v1/`` paths and methods are ``Malformed request`` (400), paths
outside ``/v1/`` are 404, and a body over ``--standin_rest_max_body_bytes`` is 413.

A prediction resolves its version and runs exactly as a gRPC Predict does: ``ServerCore.servable_for``,
then ``ServerCore.runner`` (one session run, or the batch scheduler that gRPC calls share), with
``--rest_api_timeout_in_ms`` as the deadline. Only the JSON <-> array step (json_tensor.py) is REST's.

The HTTP server is cheroot: a pool of ``--rest_api_num_threads`` worker threads (TF Serving's REST
executor), HTTP/1.1 keep-alive with idle connections parked in a selector rather than holding a
thread, and a stop that closes the listening socket and gives requests in flight a grace period.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import grpc
import orjson
from cheroot import wsgi
from google.protobuf import json_format, message
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2

from mnist_client.cpus import usable_cpus
from serving.tfs_standin import json_tensor, predict, status
from serving.tfs_standin.core import ServerCore
from serving.tfs_standin.services import SIGNATURE_DEF_FIELD, model_metadata, model_status

log = logging.getLogger(__name__)

SERVER_NAME = "TF Serving stand-in"
JSON_CONTENT_TYPE = "application/json"
# Seconds a kept-alive connection may stay idle, and a read or write may stall, before it is closed.
KEEPALIVE_TIMEOUT_S = 60

# TF Serving's mapping from error code to HTTP status (http_server.cc, ToHTTPStatusCode).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# TF Serving's routes: everything under /v1/ is its handler's; inside it, these two.
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE | re.DOTALL)
_PREDICT_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)", re.IGNORECASE
)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?", re.IGNORECASE
)
_INT64_MAX = (1 << 63) - 1
_BOOLEAN_TOKENS = (b"true", b"false")
_UNSERVED_METHODS = ("classify", "regress")


def default_rest_threads() -> int:
    """Worker threads when --rest_api_num_threads is 0: TF Serving's default, four per usable CPU."""
    return 4 * usable_cpus()


class PayloadTooLarge(Exception):
    """The request body exceeds the configured limit (answered 413)."""


class RestApi:
    """The WSGI application: TF Serving's REST API over the server's core (see the module docstring)."""

    def __init__(self, core: ServerCore, timeout_ms: int, max_body_bytes: int) -> None:
        self._core = core
        self._timeout_s = timeout_ms / 1000 if timeout_ms > 0 else None
        self._max_body_bytes = max_body_bytes

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        path, encoded = _request_path(environ)
        if not _API_PATH.fullmatch(path):
            return _reply(start_response, 404, _error_body(
                f"no such endpoint: {method} {status.clip(path)}; TF Serving's REST API is under "
                "/v1/models/<name>"
            ))  # fmt: skip
        try:
            body = self._read_body(environ)
            answer = self.handle(method, path, body, encoded)
        except status.ServingError as exc:
            code = HTTP_STATUS.get(exc.code, 500)
            log.debug("%s %s: %d %s: %s", method, path, code, exc.code.name, exc.message)
            return _reply(start_response, code, _error_body(status.clip(exc.message, status.MAX_MESSAGE_CHARS)))
        except PayloadTooLarge as exc:
            return _reply(start_response, 413, _error_body(str(exc)))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the server down
            log.exception("%s %s failed unexpectedly", method, path)
            return _reply(start_response, 500, _error_body(status.clip(
                f"{method} {path} failed: {type(exc).__name__}: {exc}", status.MAX_MESSAGE_CHARS
            )))  # fmt: skip
        return _reply(start_response, 200, answer)

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        limit = self._max_body_bytes
        length_text = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        if length_text:
            try:
                length = int(length_text)
            except ValueError:
                raise status.invalid_argument(f"Content-Length {status.clip(length_text)!r} is not a number") from None
            if length > limit:
                raise PayloadTooLarge(
                    f"request body of {length} bytes exceeds this server's limit of {limit} bytes "
                    "(--standin_rest_max_body_bytes)"
                )
            return stream.read(length) if length > 0 else b""
        # No Content-Length: a chunked body, read up to one byte past the limit.
        chunks, size = [], 0
        while size <= limit:
            chunk = stream.read(min(1 << 16, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"request body exceeds this server's limit of {limit} bytes (--standin_rest_max_body_bytes)"
            )
        return b"".join(chunks)

    def handle(self, method: str, path: str, body: bytes, encoded: bool = False) -> bytes:
        """The JSON answer to one request, or the ServingError to answer instead.

        ``encoded``: the path is as sent (percent-encoding intact), so model names and labels are
        decoded after matching, as TF Serving does; otherwise it is already decoded.
        """
        malformed = status.invalid_argument(f"Malformed request: {method} {status.clip(path)}")
        if method == "POST":
            match = _PREDICT_PATH.fullmatch(path)
            if match is None:
                raise malformed
            name, version_text, label, verb = match.groups()
            spec = _model_spec(name, version_text, label, encoded)
            if verb == "predict":
                return self._predict(spec, body)
            if verb in _UNSERVED_METHODS:
                raise status.ServingError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{verb} is not implemented by the TF Serving stand-in; it serves predict",
                )
            raise malformed  # TF Serving compares the method name case-sensitively
        if method == "GET":
            match = _STATUS_PATH.fullmatch(path)
            if match is None:
                raise malformed
            name, version_text, label, subresource = match.groups()
            if not name:
                raise status.invalid_argument("Missing model name in request.")
            spec = _model_spec(name, version_text, label, encoded)
            if subresource == "metadata":
                return _metadata_json(model_metadata(self._core, spec))
            return _message_json(model_status(self._core, spec), preserve_names=False)
        raise malformed

    def _predict(self, spec: model_pb2.ModelSpec, body: bytes) -> bytes:
        # The same steps as the gRPC Predict (services.PredictionService, predict.predict): resolve the
        # version, check the inputs against its signature, run through the shared runner.
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        document = json_tensor.parse_body(body)
        signature_key = json_tensor.signature_name(document) or predict.DEFAULT_SIGNATURE_KEY
        servable = self._core.servable_for(spec)
        signature = servable.signatures.get(signature_key)
        if signature is None:
            raise status.invalid_argument(
                f'Serving signature name: "{status.clip(signature_key)}" not found in signature def'
            )
        booleans = any(token in body for token in _BOOLEAN_TOKENS)
        arrays, request_format = json_tensor.decode_inputs(document, signature.inputs, signature_key, booleans)
        inputs = predict.check_arrays(arrays, signature)
        fetch = signature.output_order
        outputs = self._core.runner.run(servable, signature, inputs, fetch, deadline)
        return json_tensor.encode_outputs(dict(zip(fetch, outputs)), request_format)


def _request_path(environ: dict[str, Any]) -> tuple[str, bool]:
    """The request's path and whether it is still percent-encoded (the raw request URI, when the server gives it)."""
    raw = environ.get("REQUEST_URI")
    if raw:
        return urllib.parse.urlsplit(raw).path, True
    return environ.get("PATH_INFO", ""), False


def _model_spec(name: str, version_text: str | None, label: str | None, encoded: bool) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name) if encoded else name)
    if version_text:
        version = int(version_text)
        if version > _INT64_MAX:
            raise status.invalid_argument(f"Failed to convert version: {status.clip(version_text)} to numeric.")
        spec.version.value = version
    if label:
        spec.version_label = urllib.parse.unquote(label) if encoded else label
    return spec


def _message_json(proto: message.Message, preserve_names: bool) -> bytes:
    """A protobuf answer as TF Serving writes it: every field, int64 as strings, enums by name."""
    return json_format.MessageToJson(
        proto, preserving_proto_field_name=preserve_names, always_print_fields_with_no_presence=True, indent=1
    ).encode()


def _metadata_json(response: get_model_metadata_pb2.GetModelMetadataResponse) -> bytes:
    """GetModelMetadata as TF Serving's REST API writes it: the signature map unpacked from its Any."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_map)
    options = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True, "indent": 1}
    spec_json = json_format.MessageToJson(response.model_spec, **options)
    signatures_json = json_format.MessageToJson(signature_map, **options)
    return f'{{\n"model_spec": {spec_json},\n"metadata": {{"{SIGNATURE_DEF_FIELD}": {signatures_json}}}\n}}\n'.encode()


def _error_body(message_text: str) -> bytes:
    return orjson.dumps({"error": message_text})


def _reply(start_response: Callable[..., Any], code: int, body: bytes) -> list[bytes]:
    phrase = "Client Closed Request" if code == 499 else HTTPStatus(code).phrase
    start_response(
        f"{code} {phrase}", [("Content-Type", JSON_CONTENT_TYPE), ("Content-Length", str(len(body)))]
    )
    return [body]


class RestServer:
    """cheroot serving a RestApi on ``host:port``; ``start()`` returns the bound port, ``stop()`` drains."""

    def __init__(self, app: RestApi, host: str, port: int, threads: int) -> None:
        self.threads = threads
        self._server = wsgi.Server(
            (host, port),
            app,
            numthreads=threads,
            server_name=SERVER_NAME,
            request_queue_size=socket.SOMAXCONN,
            timeout=KEEPALIVE_TIMEOUT_S,
        )
        self._server.error_log = self._error_log  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self) -> int:
        """Bind and serve in a background thread; OSError if the address is taken."""
        self._server.prepare()
        self.port = int(self._server.bind_addr[1])
        self._thread = threading.Thread(target=self._server.serve, name="rest-connections", daemon=True)
        self._thread.start()
        return self.port

    def stop(self, grace: float) -> None:
        """Close the listening socket and idle connections; requests in flight get ``grace`` s to finish."""
        if self._thread is None:
            return
        self._server.shutdown_timeout = grace
        self._server.stop()
        self._thread.join(grace + 5)
        self._thread = None

    @staticmethod
    def _error_log(msg: str = "", level: int = logging.INFO, traceback: bool = False) -> None:
        log.log(level, "HTTP server: %s", msg, exc_info=traceback)
