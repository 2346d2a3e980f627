"""REST client for TensorFlow Serving's REST API, spoken by the PyTorch server and by TF Serving itself.

``POST /v1/models/<name>[/versions/<n>]:predict`` with ``{"instances": [...]}`` (row form), or, for the
PyTorch server, a ``.npy`` body with ``Content-Type: application/x-npy`` (uint8 or float32 ``[N, 28, 28]``),
about 10 times smaller than JSON and far cheaper to encode and decode. ``GET /v1/models/<name>`` (status)
and ``.../metadata``. Readiness: ``GET /readyz`` where the server has it (PyTorch server), else the model
status (TF Serving).

Connections are pooled and kept alive (:mod:`mnist_client._http`, a lean HTTP/1.1 transport: a general
HTTP library cost more per single-image call than the server's own work), every call has a timeout,
transport errors are raised as :mod:`mnist_client.errors` by the transport and HTTP error statuses are
translated in :func:`error_from_response`. JSON is encoded and decoded with orjson. A client is
thread-safe; share one per process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import ssl
import urllib.parse
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson

from mnist_client import contract
from mnist_client._http import HttpTransport
from mnist_client._checks import check_model, positive_int, positive_seconds
from mnist_client._client_base import ClientBase
from mnist_client.errors import (
    ClientConfigError,
    DeadlineExceededError,
    MnistClientError,
    ProtocolError,
    ServerError,
    UnavailableError,
    code_for_http_status,
)
from mnist_client.inputs import validate_images
from mnist_client.prediction import ModelMetadata, ModelVersionStatus, Prediction, TensorSpec
from mnist_client.retry import RetryPolicy, call_with_retries, is_retryable_predict, is_retryable_probe

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
NPY_CONTENT_TYPE = "application/x-npy"
DEFAULT_TIMEOUT = 10.0  # seconds, per call (retries included)
DEFAULT_BINARY_THRESHOLD = 16  # images; from this batch size up, "auto" sends .npy where the server takes it
_MAX_ERROR_TEXT = 500  # characters of a non-JSON error body kept in the exception
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token

BinaryMode = Literal["auto"] | bool


@dataclass(frozen=True)
class PreparedPredict:
    """An encoded predict request, reusable for many calls (the load tester sends the same body repeatedly)."""

    path: str
    body: bytes
    content_type: str
    batch_size: int


class RestClient(ClientBase):
    """Client for the MNIST model over TensorFlow Serving's REST API.

    Args:
        base_url: ``http://host:port`` or ``https://host:port`` (a path prefix is kept, for proxies).
        model_name: served model name.
        model_version: pin a version (``/versions/<n>``); ``None`` serves the latest.
        timeout: seconds for each call, retries included; ``connect_timeout`` (default: the smaller of
            ``timeout`` and 5 s) bounds each TCP/TLS connect.
        binary: ``True`` always sends ``.npy`` bodies (PyTorch server only), ``False`` always JSON,
            ``"auto"`` sends ``.npy`` for batches of ``binary_threshold`` images or more when the server
            supports it (it has ``/readyz``, as the PyTorch server does; TF Serving does not).
        token: bearer token sent as ``Authorization: Bearer <token>``.
        ca_file: CA bundle to verify an ``https`` server (default: the system store).
        client_cert, client_key: PEM files for mutual TLS.
        insecure: ``https`` without verifying the server's certificate (testing only; warns).
        pool_maxsize: kept-alive connections per client (match the number of threads sharing it).
        retry: backoff policy for the retries in :mod:`mnist_client.retry`.
        headers: extra headers sent with every request.
    """

    def __init__(
        self,
        base_url: str = f"http://127.0.0.1:{contract.REST_PORT}",
        *,
        model_name: str = contract.MODEL_NAME,
        model_version: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float | None = None,
        binary: BinaryMode = "auto",
        binary_threshold: int = DEFAULT_BINARY_THRESHOLD,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        client_cert: str | os.PathLike[str] | None = None,
        client_key: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        pool_maxsize: int = 8,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(timeout)
        connect = (
            min(self._timeout, 5.0) if connect_timeout is None else positive_seconds("connect_timeout", connect_timeout)
        )
        if binary not in ("auto", True, False):
            raise ClientConfigError(f"binary is {binary!r}; expected True, False or 'auto'")
        positive_int("binary_threshold", binary_threshold)
        positive_int("pool_maxsize", pool_maxsize)
        check_model(model_name, model_version)
        if token is not None and (not isinstance(token, str) or not token or any(c in token for c in "\r\n")):
            raise ClientConfigError("token is empty or not a single-line string; expected the bearer token")
        _check_headers(headers)

        scheme, host, port, prefix = _parse_base_url(base_url)
        self.base_url = f"{scheme}://{_bracket(host)}:{port}{prefix}"
        self.model_name = model_name
        self.model_version = model_version
        self._binary = binary
        self._binary_threshold = binary_threshold
        self._retry = retry or RetryPolicy()
        self._connect_timeout = connect
        self._model_path = f"{prefix}/v1/models/{urllib.parse.quote(model_name, safe='')}" + (
            f"/versions/{model_version}" if model_version is not None else ""
        )
        self._prefix = prefix
        self._has_readyz: bool | None = None  # learnt on first use: PyTorch server (True) or TF Serving

        default_headers = {"Accept": JSON_CONTENT_TYPE, "User-Agent": "mnist-serving-client"}
        default_headers.update(headers or {})
        if token is not None:
            default_headers["Authorization"] = f"Bearer {token}"
        context: ssl.SSLContext | None = None
        if scheme == "https":
            for name, path in (("ca_file", ca_file), ("client_cert", client_cert), ("client_key", client_key)):
                if path is not None and not os.path.isfile(path):
                    raise ClientConfigError(f"{name} {os.fspath(path)!r} is not a readable file; expected a PEM file")
            if client_key is not None and client_cert is None:
                raise ClientConfigError("client_key was given without client_cert; expected both for mutual TLS")
            if insecure and ca_file is not None:
                raise ClientConfigError("insecure skips verifying the server, so ca_file would be ignored; give one")
            context = _tls_context(ca_file, client_cert, client_key, insecure)
        elif ca_file is not None or client_cert is not None or client_key is not None:
            raise ClientConfigError(
                f"TLS files were given but base_url {base_url!r} is http; expected an https:// URL"
            )
        self._transport = HttpTransport(
            host, port, default_headers=default_headers, maxsize=pool_maxsize, ssl_context=context
        )

    # -- predict -----------------------------------------------------------------------------------

    def prepare(self, images: Any, *, binary: BinaryMode | None = None) -> PreparedPredict:
        """Validate and encode ``images`` once; pass the result to :meth:`predict` any number of times."""
        array = validate_images(images)
        mode = self._binary if binary is None else binary
        if mode not in ("auto", True, False):
            raise ClientConfigError(f"binary is {mode!r}; expected True, False or 'auto'")
        use_npy = mode is True or (
            mode == "auto" and array.shape[0] >= self._binary_threshold and self._server_takes_npy()
        )
        if use_npy:
            body, content_type = _encode_npy(array), NPY_CONTENT_TYPE
        else:
            body, content_type = _encode_json(array), JSON_CONTENT_TYPE
        return PreparedPredict(f"{self._model_path}:predict", body, content_type, int(array.shape[0]))

    def predict(self, images: Any, *, timeout: float | None = None) -> Prediction:
        """Classify ``images`` (``[N, 28, 28]`` float in [0, 1] or uint8, or one ``[28, 28]`` image).

        ``images`` may also be a :class:`PreparedPredict` from :meth:`prepare`. Retried only when the
        request provably never reached the server (see :mod:`mnist_client.retry`).
        """
        prepared = images if isinstance(images, PreparedPredict) else self.prepare(images)
        headers = _CONTENT_TYPE_HEADERS[prepared.content_type]

        def attempt(remaining: float) -> Prediction:
            _, response_headers, data = self._request("POST", prepared.path, remaining, prepared.body, headers)
            return parse_prediction(data, prepared.batch_size, response_headers)

        return call_with_retries(
            attempt,
            policy=self._retry,
            timeout=self._call_timeout(timeout),
            retryable=is_retryable_predict,
            description=f"predict at {self.base_url}",
        )

    # -- model information -----------------------------------------------------------------------

    def metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        """The served signature (``GET /v1/models/<name>/metadata``)."""
        data = self._probe("GET", f"{self._model_path}/metadata", timeout)
        return _parse_metadata(data, self.model_name)

    def model_status(self, *, timeout: float | None = None) -> list[ModelVersionStatus]:
        """State of each version of the model (``GET /v1/models/<name>``)."""
        return _parse_model_status(self._probe("GET", self._model_path, timeout))

    def ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready to predict; never raises for an unreachable or unready server.

        Uses ``/readyz`` on servers that have it (the PyTorch server), else whether a version of the
        model (the pinned one, if any) is AVAILABLE (TF Serving).
        """
        try:
            return self._ready_once(self._call_timeout(timeout))
        except (UnavailableError, DeadlineExceededError, ServerError, ProtocolError) as error:
            logger.debug("%s not ready: %s", self.base_url, error)
            return False

    # -- lifecycle (close, with, wait_until_ready: ClientBase) ---------------------------------------

    def _release(self) -> None:
        self._transport.close()

    def __repr__(self) -> str:
        return f"RestClient({self.base_url!r}, model={self.model_name!r}, binary={self._binary!r})"

    # -- internals ---------------------------------------------------------------------------------

    def _ready_once(self, timeout: float) -> bool:
        if self._has_readyz is not False:
            status, _, _ = self._request("GET", f"{self._prefix}/readyz", timeout, ok_statuses=(404, 503))
            if status != 404:
                self._has_readyz = True
                return status == 200
            self._has_readyz = False
        statuses = _parse_model_status(self._json("GET", self._model_path, timeout))
        return any(s.available for s in statuses)

    def _server_takes_npy(self) -> bool:
        """The PyTorch server (it has /readyz) takes .npy bodies; TF Serving's REST API does not."""
        if self._has_readyz is None:
            try:
                status, _, _ = self._request(
                    "GET", f"{self._prefix}/readyz", min(self._timeout, 5.0), ok_statuses=(404, 503)
                )
                self._has_readyz = status != 404
            except MnistClientError as error:
                logger.debug("could not learn whether %s takes .npy bodies (%s); sending JSON", self.base_url, error)
                return False
        return self._has_readyz

    def _probe(self, method: str, path: str, timeout: float | None) -> Any:
        return call_with_retries(
            lambda remaining: self._json(method, path, remaining),
            policy=self._retry,
            timeout=self._call_timeout(timeout),
            retryable=is_retryable_probe,
            description=f"{method} {self.base_url}{path}",
        )

    def _json(self, method: str, path: str, timeout: float) -> Any:
        _, _, data = self._request(method, path, timeout)
        return _decode_json(data, f"{method} {path}")

    def _request(
        self,
        method: str,
        path: str,
        timeout: float,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> tuple[int, Any, bytes]:
        """One HTTP exchange; returns (status, headers, body) for 2xx and ``ok_statuses``, else raises."""
        if self._closed:
            raise ClientConfigError(f"{self!r} is closed; expected a call before close()")
        what = f"{method} {self.base_url}{path}"
        response = self._transport.request(
            method,
            path,
            body=body,
            headers=headers,
            timeout=timeout,
            connect_timeout=min(self._connect_timeout, timeout),
            what=what,
        )
        status = response.status
        if 200 <= status < 300 or status in ok_statuses:
            return status, response.headers, response.body
        raise error_from_response(status, response.body, what)


# -- configuration helpers used above ------------------------------------------------------------------

_CONTENT_TYPE_HEADERS = {ct: {"Content-Type": ct} for ct in (JSON_CONTENT_TYPE, NPY_CONTENT_TYPE)}


def _check_headers(headers: Any) -> None:
    if headers is None:
        return
    if not isinstance(headers, dict):
        raise ClientConfigError(f"headers is a {type(headers).__name__}; expected a dict of header names to values")
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ClientConfigError(f"header name {name!r} is not a valid HTTP header name")
        if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
            raise ClientConfigError(f"header {name!r} has value {value!r}; expected a single-line string")


def _tls_context(
    ca_file: str | os.PathLike[str] | None,
    client_cert: str | os.PathLike[str] | None,
    client_key: str | os.PathLike[str] | None,
    insecure: bool,
) -> ssl.SSLContext:
    """Verifies the server against ``ca_file`` (else the system store) and its host name, unless ``insecure``."""
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else os.fspath(ca_file))
        if client_cert is not None:
            context.load_cert_chain(
                os.fspath(client_cert), None if client_key is None else os.fspath(client_key)
            )
    except (ssl.SSLError, OSError) as error:
        raise ClientConfigError(f"TLS files could not be loaded ({error}); expected PEM files") from error
    if insecure:
        warnings.warn(
            "RestClient(insecure=True) does not verify the server's certificate: for testing only",
            stacklevel=3,
        )
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# -- the one place where HTTP statuses become client errors (transport errors: mnist_client._http) -----


def error_from_response(status: int, data: bytes, what: str) -> MnistClientError:
    """The client error for an HTTP error answer: status and the server's ``{"error": ...}`` message.

    ``what`` names the call in the message (``"POST http://host:8080/v1/models/mnist:predict"``).
    Public so that other callers of the same API (the load tester) report errors alike.
    """
    server_message = _server_message(data)
    code = code_for_http_status(status)
    message = f"{what}: HTTP {status} {code}: {server_message}"
    if code == "UNAVAILABLE":
        return UnavailableError(message, code=code, status=status, server_message=server_message)
    if code == "DEADLINE_EXCEEDED":
        return DeadlineExceededError(message, code=code, status=status, server_message=server_message)
    return ServerError(message, code=code, status=status, server_message=server_message)


def _server_message(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    try:
        decoded = json.loads(text)
    except ValueError:
        return text[:_MAX_ERROR_TEXT] or "(empty body)"
    if isinstance(decoded, dict) and "error" in decoded:
        return str(decoded["error"])
    return text[:_MAX_ERROR_TEXT]


# -- encoding and decoding -------------------------------------------------------------------------


def _encode_json(images: np.ndarray) -> bytes:
    """Row form, one instance per image, from validated ``[N, 28, 28]`` uint8 or float32 images.

    The float32 model input goes out as float64 (each value exact), whose shortest decimal form orjson
    writes: the server recovers the same float32 values. The numbers are those ``json.dumps`` of
    ``tolist()`` writes (the very same bytes for uint8 input; an exponent may read ``1e-7`` for
    ``1e-07``), in about a 15th of the time.
    """
    if images.dtype == np.uint8:
        values = _UINT8_AS_INPUT[images]  # pixel / 255 in float32, as to_model_input computes it
    else:
        values = images.astype(np.float64)
    return orjson.dumps({"instances": values}, option=orjson.OPT_SERIALIZE_NUMPY)


# Every uint8 pixel's model input value (float32 pixel / 255), held as float64 for _encode_json.
_UINT8_AS_INPUT = (np.arange(256, dtype=contract.INPUT_DTYPE) / np.float32(contract.PIXEL_SCALE)).astype(np.float64)


def _encode_npy(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, images, allow_pickle=False)
    return buffer.getvalue()


def _decode_json(data: bytes, what: str) -> Any:
    try:
        return orjson.loads(data)
    except ValueError:
        pass
    try:  # what orjson refuses and Python's json takes (NaN, Infinity), as the client always accepted
        return json.loads(data)
    except ValueError as error:
        raise ProtocolError(f"{what}: the server answered with invalid JSON ({error}): {data[:200]!r}") from error


def parse_prediction(data: bytes, batch_size: int, headers: Any) -> Prediction:
    """A predict answer body (row or column form) -> :class:`Prediction`; ProtocolError if malformed.

    ``headers`` (or None) supply the model version when the server sends one.
    """
    decoded = _decode_json(data, "predict")
    if not isinstance(decoded, dict):
        raise ProtocolError(f"predict answer is a JSON {type(decoded).__name__}; expected an object")
    try:
        if "predictions" in decoded:  # row form: [{"probabilities": [...], "classes": k}, ...]
            rows = decoded["predictions"]
            probabilities = np.asarray([row[contract.PROBABILITIES_NAME] for row in rows], dtype=np.float32)
            classes = np.asarray([row[contract.CLASSES_NAME] for row in rows], dtype=np.int64)
        elif "outputs" in decoded:  # column form: {"probabilities": [[...]], "classes": [...]}
            outputs = decoded["outputs"]
            probabilities = np.asarray(outputs[contract.PROBABILITIES_NAME], dtype=np.float32)
            classes = np.asarray(outputs[contract.CLASSES_NAME], dtype=np.int64)
        else:
            raise ProtocolError(f"predict answer has keys {sorted(decoded)}; expected 'predictions' or 'outputs'")
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError(
            f"predict answer lacks well-formed {contract.PROBABILITIES_NAME!r}/{contract.CLASSES_NAME!r} ({error})"
        ) from error
    _check_prediction_shapes(probabilities, classes, batch_size)
    return Prediction(classes=classes, probabilities=probabilities, model_version=_model_version(decoded, headers))


def _model_version(decoded: dict[str, Any], headers: Any) -> int | None:
    # TF Serving's REST predict answer carries no version; servers that add one use "model_version"
    # in the body or an X-Model-Version header.
    value = decoded.get("model_version")
    if value is None and headers is not None:
        value = headers.get("X-Model-Version")
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _check_prediction_shapes(probabilities: np.ndarray, classes: np.ndarray, batch_size: int) -> None:
    expected = (batch_size, contract.NUM_CLASSES)
    if probabilities.shape != expected or classes.shape != (batch_size,):
        raise ProtocolError(
            f"predict answer has probabilities {list(probabilities.shape)} and classes {list(classes.shape)}; "
            f"expected {list(expected)} and [{batch_size}]"
        )


def _parse_metadata(data: Any, model_name: str) -> ModelMetadata:
    try:
        spec = data.get("model_spec", {})
        signatures = data["metadata"]["signature_def"]["signature_def"]
        signature_name = spec.get("signature_name") or contract.SIGNATURE_NAME
        if signature_name not in signatures:
            signature_name = contract.SIGNATURE_NAME
        signature = signatures[signature_name]
        version = spec.get("version")
        return ModelMetadata(
            name=spec.get("name", model_name),
            version=None if version in (None, "") else int(version),
            signature_name=signature_name,
            inputs={name: _tensor_spec(info) for name, info in signature.get("inputs", {}).items()},
            outputs={name: _tensor_spec(info) for name, info in signature.get("outputs", {}).items()},
            method_name=signature.get("method_name", ""),
            raw=data,
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ProtocolError(
            f"metadata answer is not TF Serving's shape ({type(error).__name__}: {error}); expected "
            "{'model_spec': {...}, 'metadata': {'signature_def': {'signature_def': {...}}}}"
        ) from error


def _tensor_spec(info: dict[str, Any]) -> TensorSpec:
    shape_info = info.get("tensor_shape", {})
    if shape_info.get("unknown_rank"):
        shape = None
    else:
        shape = tuple(int(dim.get("size", -1)) for dim in shape_info.get("dim", []))
    return TensorSpec(dtype=str(info.get("dtype", "DT_INVALID")), shape=shape)


def _parse_model_status(data: Any) -> list[ModelVersionStatus]:
    try:
        return [
            ModelVersionStatus(
                version=int(entry["version"]),
                state=str(entry.get("state", "UNKNOWN")),
                error_code=str(entry.get("status", {}).get("error_code", "OK")),
                error_message=str(entry.get("status", {}).get("error_message", "")),
            )
            for entry in data["model_version_status"]
        ]
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProtocolError(
            f"model status answer is not TF Serving's shape ({type(error).__name__}: {error}); expected "
            "{'model_version_status': [{'version': ..., 'state': ...}]}"
        ) from error


def _parse_base_url(base_url: Any) -> tuple[str, str, int, str]:
    if not isinstance(base_url, str):
        raise ClientConfigError(f"base_url is {base_url!r}; expected a URL such as 'http://127.0.0.1:8080'")
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ClientConfigError(f"base_url is {base_url!r}; expected http://host[:port] or https://host[:port]")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ClientConfigError(f"base_url {base_url!r} has credentials, a query or a fragment; expected none")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise ClientConfigError(f"base_url {base_url!r} has an invalid port ({error})") from error
    # A path prefix (a proxy's) goes on the request line: non-ASCII characters and spaces percent-encoded.
    return parts.scheme, parts.hostname, port, urllib.parse.quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["PreparedPredict", "RestClient"]
