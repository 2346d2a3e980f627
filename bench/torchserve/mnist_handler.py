"""TorchServe handler for the MNIST TorchScript export, speaking the project's REST server's JSON.

A request body is TF Serving's REST JSON as the project's server takes it (``{"instances": [...]}`` answered
``{"predictions": [...]}``, ``{"inputs": ...}`` answered ``{"outputs": ...}``) or a ``.npy`` body. The
handler decodes and encodes with the project's own codec (``serving.torch_server.codecs``) and loads the
model with the project's own loader (``serving.torch_server.model_store.load_version``: contract check,
warm-up, the inference-optimised copy from the measured crossover), so that the comparison measures the
serving framework, not a different model path or JSON library.

TorchServe hands ``handle`` one list of requests per batch (one request unless the model is registered
with ``batch_size`` > 1). Every valid request's images go through one forward pass together; a request
that cannot be decoded is answered alone with its HTTP status and ``{"error": "..."}`` while the others
in its batch are answered normally.

Deployment: the project root must be importable in TorchServe's workers (``PYTHONPATH``), and TorchServe
should pass bodies through undecoded (``TS_DECODE_INPUT_REQUEST=false``); with TorchServe's default, the
worker parses JSON with Python's ``json`` first and the handler re-encodes the parsed document, which gives
the same answers at a higher cost.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import orjson

try:
    import torch

    from serving.torch_server import codecs
    from serving.torch_server.config import ServerConfig
    from serving.torch_server.errors import ApiError, BadRequest
    from serving.torch_server.model_store import LoadedModel, load_version
except ImportError as exc:  # TorchServe would report a confusing "no module ts.torch_handler.mnist_handler"
    raise RuntimeError(
        f"the MNIST TorchServe handler needs the project's root on PYTHONPATH in TorchServe's environment ({exc})"
    ) from exc

log = logging.getLogger(__name__)

# The names TorchServe gives a request's payload: "body" for a raw POST, "data" for a form field.
_PAYLOAD_NAMES = ("body", "data")


class MnistHandler:
    """TorchServe's custom service: ``initialize(context)`` once per worker, then ``handle(data, context)``."""

    def __init__(self) -> None:
        self.model: LoadedModel | None = None
        # The project's server refuses larger requests by default; so does this handler.
        self.max_batch = ServerConfig().max_batch

    def initialize(self, context: Any) -> None:
        """Load ``model.pt`` from the extracted archive on one torch thread (one worker per core)."""
        torch.set_num_threads(1)
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        device = torch.device("cpu")
        if gpu_id is not None and torch.cuda.is_available():
            device = torch.device(f"cuda:{gpu_id}")
        version = _archive_version(context.manifest)
        self.model = load_version(Path(properties["model_dir"]), version, device)
        log.info("MNIST handler: version %d on %s, one torch thread", version, device)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """One answer per request of the batch, in order; valid requests share one forward pass."""
        if self.model is None:
            raise RuntimeError("handle() called before initialize()")
        answers: list[bytes] = [b""] * len(data)
        decoded: list[tuple[int, codecs.DecodedRequest]] = []
        for index, request in enumerate(data):
            try:
                decoded.append((index, self.decode(request, _content_type(context, index))))
            except ApiError as error:
                context.set_response_status(error.status, "", index)
                answers[index] = codecs.encode_json({"error": error.message})
            context.set_response_content_type(index, codecs.JSON_CONTENT_TYPE)
        if decoded:
            images = [request.images for _, request in decoded]
            batch = images[0] if len(images) == 1 else np.concatenate(images)
            probabilities, classes = self.model.predict(batch)
            start = 0
            for index, request in decoded:
                end = start + len(request.images)
                answers[index] = codecs.encode_predictions(
                    probabilities[start:end], classes[start:end], request.columnar
                )
                start = end
        return answers

    def decode(self, request: dict[str, Any], content_type: str | None) -> codecs.DecodedRequest:
        """A request's payload -> validated images, or an ApiError saying what was wrong."""
        payload = next((request[name] for name in _PAYLOAD_NAMES if name in request), None)
        if payload is None:
            raise BadRequest('empty request: no body; expected JSON: {"instances": [image, ...]}')
        if isinstance(payload, (bytes, bytearray)):
            return codecs.decode_request(bytes(payload), content_type, self.max_batch)
        if isinstance(payload, str):
            return codecs.decode_request(payload.encode(), content_type, self.max_batch)
        # TorchServe's worker already parsed the JSON body (TS_DECODE_INPUT_REQUEST left at its default).
        return codecs.decode_json(orjson.dumps(payload), self.max_batch)


def _content_type(context: Any, index: int) -> str | None:
    """The Content-Type TorchServe recorded for the request's payload (None: JSON, TF Serving's default)."""
    for name in _PAYLOAD_NAMES:
        headers = context.get_request_header(index, name)
        if isinstance(headers, dict) and headers.get("content-type"):
            return str(headers["content-type"])
    return None


def _archive_version(manifest: dict[str, Any] | None) -> int:
    """The archive's ``--version`` when it is a positive integer (the repository's version), else 1."""
    raw = str(((manifest or {}).get("model") or {}).get("modelVersion", "1"))
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1
