"""The predict endpoint's work, shared by the WSGI fast path and the Flask routes.

``Predictor(environ, name, version)`` resolves the model version, checks the
content type and size, reads and decodes the body, runs the model (directly or
through the micro-batcher) and encodes the answer. Every caller mistake is an
:class:`~serving.torch_server.errors.ApiError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from serving.torch_server import codecs
from serving.torch_server.batching import MicroBatcher, Prediction, Predicts, run_directly
from serving.torch_server.config import ServerConfig
from serving.torch_server.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from serving.torch_server.metrics import ServerMetrics
from serving.torch_server.model_store import LoadedModel, ModelStore

MODELS_PREFIX = "/v1/models/"
PREDICT_SUFFIX = ":predict"


def parse_predict_path(path: str) -> tuple[str, str | None] | None:
    """``/v1/models/<name>[/versions/<v>]:predict`` -> (name, version or None); None for any other path.

    Matches exactly what the Flask rules for predict match (a name without '/' or ':').
    """
    if not (path.startswith(MODELS_PREFIX) and path.endswith(PREDICT_SUFFIX)):
        return None
    rest = path[len(MODELS_PREFIX) : -len(PREDICT_SUFFIX)]
    parts = rest.split("/")
    if len(parts) == 1:
        name, version = parts[0], None
    elif len(parts) == 3 and parts[1] == "versions" and parts[2]:
        name, version = parts[0], parts[2]
    else:
        return None
    if not name or ":" in name:
        return None
    return name, version


def parse_version(raw: str) -> int:
    if not raw.isdigit() or int(raw) <= 0:
        raise NotFound(f"version {raw!r} does not exist; versions are positive integers")
    return int(raw)


def too_large_message(length: int | None, limit: int) -> str:
    got = f"{length} bytes" if length is not None else "more bytes"
    return (
        f"request body of {got} exceeds this server's limit of {limit} bytes; send smaller batches "
        f"(.npy is about 8 times smaller than JSON)"
    )


class Predictor:
    def __init__(
        self, config: ServerConfig, store: ModelStore, metrics: ServerMetrics, batcher: MicroBatcher | None
    ) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.batcher = batcher
        # Runs one pass when batching is off (a gevent worker sends large ones to a native thread).
        self.run_pass: Callable[[Predicts, np.ndarray], Prediction] = run_directly

    def resolve(self, name: str, version: str | None) -> LoadedModel:
        """The loaded model for ``name`` and an optional pinned ``version`` (404/503 otherwise)."""
        self.check_model(name)
        if version is None:
            model = self.store.latest()
            if model is None:
                raise ServiceUnavailable(f"no version of model {name!r} is loaded yet; retry when /readyz says ready")
            return model
        number = parse_version(version)
        model = self.store.get(number)
        if model is None:
            loaded = self.store.loaded_versions() or "none"
            raise NotFound(f"version {number} of model {name!r} is not loaded; loaded versions: {loaded}")
        return model

    def check_model(self, name: str) -> None:
        if name != self.config.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.config.model_name!r}")

    def __call__(self, environ: dict[str, Any], name: str, version: str | None) -> tuple[bytes, int]:
        """Answer one predict request: (JSON body, model version that answered)."""
        model = self.resolve(name, version)
        content_type = environ.get("CONTENT_TYPE")
        if codecs.media_type(content_type) not in codecs.ACCEPTED_CONTENT_TYPES:
            raise UnsupportedMediaType(
                f"unsupported Content-Type {content_type!r}; expected {codecs.JSON_CONTENT_TYPE} or "
                f"{codecs.NPY_CONTENT_TYPE}"
            )
        decoded = self._decode(environ, content_type)
        if self.batcher is not None:
            probabilities, classes = self.batcher.predict(model, decoded.images)
        else:
            self.metrics.forward_batch_size.observe(len(decoded.images))
            probabilities, classes = self.run_pass(model, decoded.images)
        self.metrics.batch_size.observe(len(decoded.images))
        return codecs.encode_predictions(probabilities, classes, decoded.columnar), model.version

    def _decode(self, environ: dict[str, Any], content_type: str | None) -> codecs.DecodedRequest:
        body = read_body(environ, self.config.max_body_bytes)
        return codecs.decode_request(body, content_type, self.config.max_batch)


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes, before reading when the length is known."""
    stream = environ["wsgi.input"]
    raw_length = environ.get("CONTENT_LENGTH")
    if raw_length:
        if not raw_length.isdigit():
            raise BadRequest(f"Content-Length {raw_length!r} is not a number of bytes")
        length = int(raw_length)
        if length > limit:
            raise PayloadTooLarge(too_large_message(length, limit))
        body = stream.read(length) if length else b""
        if len(body) < length:
            raise BadRequest(f"the body ended after {len(body)} of its {length} bytes (Content-Length)")
        return body
    if not environ.get("wsgi.input_terminated"):
        # No length and a server that does not end the stream itself: HTTP/1.1 says no body
        # (gunicorn always ends it, so chunked bodies arrive below).
        return b""
    body = stream.read(limit + 1)  # one byte past the limit tells a body that is too large
    if len(body) > limit:
        raise PayloadTooLarge(too_large_message(None, limit))
    return body
