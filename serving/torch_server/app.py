"""The Flask app: TF Serving's REST API over TorchScript, plus probes, metrics and the OpenAPI document.

``create_app(overrides)`` reads the configuration, loads the model (in the
calling process: under gunicorn that is each worker, after the fork), starts
the version watcher and returns the WSGI app. Nothing is loaded at import time.

    gunicorn -c serving/torch_server/gunicorn_conf.py 'serving.torch_server.app:create_app()'
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import torch
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.exceptions import NotFound as RouteNotFound
from werkzeug.routing import BaseConverter

from mnist_client import contract
from serving.torch_server import codecs
from serving.torch_server.batching import MicroBatcher
from serving.torch_server.config import ConfigError, ServerConfig
from serving.torch_server.errors import ApiError, NotFound, Unauthorized
from serving.torch_server.metrics import ServerMetrics, endpoint_label, method_label
from serving.torch_server.model_store import ModelStore, VersionStatus, load_version, resolve_device
from serving.torch_server.predict import Predictor, parse_predict_path, parse_version, too_large_message

log = logging.getLogger(__name__)

OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
MODEL_VERSION_HEADER = "X-Model-Version"
_JSON = "application/json"


@dataclass
class ServerState:
    """What the views share; kept in ``app.extensions["mnist"]``."""

    config: ServerConfig
    store: ModelStore
    metrics: ServerMetrics
    batcher: MicroBatcher | None
    predictor: Predictor


class _ModelNameConverter(BaseConverter):
    # No ':' in a model name, so GET .../mnist:predict is a 405, not a status query for "mnist:predict".
    regex = r"[^/:]+"


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app: config (defaults < MNIST_REST_* env < overrides), model store, routes, metrics."""
    config = ServerConfig.load(overrides)
    _configure_logging(config.log_level)
    token = config.resolved_auth_token()
    # One intra-op thread per worker: workers are the parallelism (torch's default pools: ~30x slower).
    torch.set_num_threads(config.torch_threads)
    try:
        device = resolve_device(config.device)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"MNIST_REST_DEVICE={config.device!r}: {exc}") from None

    metrics = ServerMetrics()
    store: ModelStore

    def on_model_event(event: str, version: int) -> None:
        metrics.on_model_event(event, version)
        latest = store.latest()
        metrics.model_version.set(latest.version if latest else 0)

    loader = functools.partial(
        load_version, optimize=config.optimize_batches, optimized_min_batch=config.optimized_min_batch
    )
    store = ModelStore(config.model_base_path, device, config.keep_versions, loader=loader, listener=on_model_event)
    store.refresh()  # synchronously, so a worker with a model on disk is ready as soon as it boots
    if store.latest() is None:
        log.warning("no loadable version under %s yet; /readyz answers 503 until one appears", store.base_path)
    store.start_watching(config.poll_seconds)

    batcher = None
    if config.batching:
        batcher = MicroBatcher(config.batch_max_size, metrics.forward_batch_size.observe)
    predictor = Predictor(config, store, metrics, batcher)

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.url_map.converters["model"] = _ModelNameConverter
    app.url_map.strict_slashes = False
    state = ServerState(config, store, metrics, batcher, predictor)
    app.extensions["mnist"] = state
    _register_routes(app, state)
    _register_error_handlers(app)
    open_paths = frozenset(config.auth_open_paths)
    app.wsgi_app = _FrontDoor(app.wsgi_app, predictor, metrics, token, open_paths)  # type: ignore[method-assign]
    log.info(
        "REST server for model %r on %s (max batch %d, max body %d bytes, batching %s, auth %s)",
        config.model_name, device, config.max_batch, config.max_body_bytes,
        "on" if batcher else "off", "on" if token else "off",
    )  # fmt: skip
    return app


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:  # leave a host's logging (pytest, an embedding app) alone
        logging.basicConfig(format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving").setLevel(level.upper())


def _register_routes(app: Flask, state: ServerState) -> None:
    config, store, metrics, predictor = state.config, state.store, state.metrics, state.predictor
    openapi_document = OPENAPI_PATH.read_bytes()

    def predict(name: str, version: str | None = None) -> Response:
        # Under the front door (create_app's WSGI app) POSTs to this rule are answered by its
        # fast path; this view serves the Flask app mounted without it. Both run the Predictor.
        body, answered_by = predictor(request.environ, name, version)
        return Response(body, mimetype=_JSON, headers={MODEL_VERSION_HEADER: str(answered_by)})

    def model_status(name: str, version: str | None = None) -> Response:
        predictor.check_model(name)
        statuses = store.statuses()
        if version is not None:
            number = parse_version(version)
            statuses = [s for s in statuses if s.version == number]
            if not statuses:
                raise NotFound(f"version {number} of model {name!r} is unknown to this server")
        elif not statuses:
            raise NotFound(f"no version of model {name!r} has been found yet")
        return _json_response({"model_version_status": [_status_json(s) for s in statuses]})

    def metadata(name: str, version: str | None = None) -> Response:
        model = predictor.resolve(name, version)
        return _json_response(_metadata_json(name, model.version))

    def healthz() -> Response:
        return _json_response({"status": "alive"})

    def readyz() -> Response:
        latest = store.latest()
        if latest is None:
            return _json_response({"error": f"not ready: no version of model {config.model_name!r} is loaded"}, 503)
        return _json_response({"status": "ready", "model": config.model_name, "versions": store.loaded_versions()})

    def metrics_view() -> Response:
        text, content_type = metrics.render()
        return Response(text, content_type=content_type)

    def openapi() -> Response:
        return Response(openapi_document, mimetype="application/yaml")

    add = app.add_url_rule
    add("/v1/models/<model:name>:predict", "predict", predict, methods=["POST"])
    add("/v1/models/<model:name>/versions/<version>:predict", "predict_version", predict, methods=["POST"])
    add("/v1/models/<model:name>", "status", model_status, methods=["GET"])
    add("/v1/models/<model:name>/versions/<version>", "status_version", model_status, methods=["GET"])
    add("/v1/models/<model:name>/metadata", "metadata", metadata, methods=["GET"])
    add("/v1/models/<model:name>/versions/<version>/metadata", "metadata_version", metadata, methods=["GET"])
    add("/healthz", "healthz", healthz, methods=["GET"])
    add("/readyz", "readyz", readyz, methods=["GET"])
    add("/metrics", "metrics", metrics_view, methods=["GET"])
    add("/openapi.yaml", "openapi", openapi, methods=["GET"])


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _json_response({"error": exc.message}, exc.status, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        headers: dict[str, str] = {}
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = too_large_message(request.content_length, limit)
        elif isinstance(exc, MethodNotAllowed):
            allowed = sorted(exc.valid_methods or [])
            headers["Allow"] = ", ".join(allowed)
            message = f"method {request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}"
        elif isinstance(exc, RouteNotFound):
            message = f"no such endpoint: {request.method} {request.path}; the API is described at /openapi.yaml"
        else:
            message = f"{exc.name}: {exc.description}"
        return _json_response({"error": message}, exc.code or 500, headers)

    @app.errorhandler(Exception)
    def _internal_error(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _json_response({"error": "internal server error; the server log has the details"}, 500)


class _FrontDoor:
    """WSGI middleware in front of Flask: bearer token, metrics, and the predict fast path.

    Every request is counted (status, latency, in flight) here. ``POST .../<name>[/versions/<v>]:predict``
    is answered directly with the shared :class:`Predictor`, skipping Flask's per-request machinery
    (request context, URL adapter, response object, hooks): on this path that machinery cost about
    as much as decoding the image (docs/rest-server.md). Everything else goes to Flask.
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        predictor: Predictor,
        metrics: ServerMetrics,
        token: str | None,
        open_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.predictor = predictor
        self.metrics = metrics
        self.expected_auth = None if token is None else f"Bearer {token}".encode()
        self.open_paths = open_paths

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        started = time.perf_counter()
        path = environ.get("PATH_INFO", "")
        status = "500"

        def capture(status_line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal status
            status = status_line[:3]
            return start_response(status_line, headers, exc_info)

        self.metrics.in_flight.inc()
        try:
            if self.expected_auth is not None and path not in self.open_paths and not self._authorized(environ):
                return _error_response(capture, Unauthorized(
                    "missing or wrong bearer token; send the header 'Authorization: Bearer <token>'"
                ))  # fmt: skip
            if environ.get("REQUEST_METHOD") == "POST":
                target = parse_predict_path(path)
                if target is not None:
                    return self._predict(environ, capture, *target)
            return self.app(environ, capture)
        finally:
            self.metrics.in_flight.dec()
            method = method_label(environ.get("REQUEST_METHOD", ""))
            self.metrics.observe_request(endpoint_label(path), method, status, time.perf_counter() - started)

    def _predict(
        self, environ: dict[str, Any], start_response: Callable[..., Any], name: str, version: str | None
    ) -> list[bytes]:
        try:
            body, answered_by = self.predictor(environ, name, version)
        except ApiError as error:
            return _error_response(start_response, error)
        except Exception:  # a bug or a failing model: logged with its traceback, answered 500
            log.exception("unhandled error on POST %s", environ.get("PATH_INFO"))
            return _error_response(start_response, _INTERNAL_ERROR)
        headers = [
            ("Content-Type", _JSON),
            ("Content-Length", str(len(body))),
            (MODEL_VERSION_HEADER, str(answered_by)),
        ]
        start_response("200 OK", headers)
        return [body]

    def _authorized(self, environ: dict[str, Any]) -> bool:
        got = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        assert self.expected_auth is not None
        return hmac.compare_digest(got, self.expected_auth)


class _InternalError(ApiError):
    status = 500


_INTERNAL_ERROR = _InternalError("internal server error; the server log has the details")


def _error_response(start_response: Callable[..., Any], error: ApiError) -> list[bytes]:
    body = codecs.encode_json({"error": error.message})
    headers = [("Content-Type", _JSON), ("Content-Length", str(len(body))), *error.headers.items()]
    start_response(f"{error.status} {HTTPStatus(error.status).phrase}", headers)
    return [body]


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(codecs.encode_json(payload), status=status, mimetype=_JSON, headers=headers)


def _status_json(status: VersionStatus) -> dict[str, Any]:
    return {
        "version": str(status.version),
        "state": status.state,
        "status": {"error_code": status.error_code, "error_message": status.error_message},
    }


def _tensor_info(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "tensor_shape": {"dim": [{"size": str(size), "name": ""} for size in shape], "unknown_rank": False},
        "name": name,
    }


def _metadata_json(name: str, version: int) -> dict[str, Any]:
    """GetModelMetadata's answer in TF Serving's REST form, built from the contract."""
    signature = contract.signature()
    sections = {
        section: {
            tensor: _tensor_info(tensor, spec["dtype"], spec["shape"]) for tensor, spec in signature[section].items()
        }  # type: ignore[arg-type]
        for section in ("inputs", "outputs")
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {
            "signature_def": {
                "signature_def": {
                    contract.SIGNATURE_NAME: {**sections, "method_name": "tensorflow/serving/predict"},
                }
            }
        },
    }
