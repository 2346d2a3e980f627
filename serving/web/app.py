"""The web page's backend: static files, and a small JSON API over the stack's model servers.

``create_app(overrides)`` reads the configuration (defaults < ``MNIST_WEB_*`` env < overrides), makes one
client per serving target and returns the WSGI app. Nothing connects or loads at import time; the
MNIST test images are read on the first "random test image".

    python -m serving.web                                   (gunicorn, settings from MNIST_WEB_*)
    gunicorn -b 0.0.0.0:8000 'serving.web.app:create_app()'

API (openapi.yaml beside this file): ``POST /api/predict``, ``GET /api/targets``,
``GET /api/random-test-image``, ``GET /api/report/latest``, ``GET /reports/<file>``, ``GET /healthz``.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, json, request, send_from_directory
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge
from werkzeug.exceptions import NotFound as RouteNotFound

from serving.web.config import WebConfig
from serving.web.images import BadImage, parse_image
from serving.web.reports import NoReport, latest_report
from serving.web.targets import Target
from serving.web.mnist_samples import MnistTestImages, MnistUnavailable

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
OPENAPI_PATH = Path(__file__).with_name("openapi.yaml")
# Files of the reports folder the page links to; nothing else there is served.
_REPORT_SUFFIXES = (".html", ".json", ".csv")


@dataclass
class WebState:
    """What the views share; kept in ``app.extensions["mnist_web"]``."""

    config: WebConfig
    targets: list[Target]
    test_images: MnistTestImages


def create_app(overrides: dict[str, Any] | None = None) -> Flask:
    """Build the app: config, one client per target, routes and JSON error handlers."""
    config = WebConfig.load(overrides)
    _configure_logging(config.log_level)
    targets = [Target(spec, config.timeout_s) for spec in config.targets()]
    state = WebState(config, targets, MnistTestImages(config.data_dir))

    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep each entry in the documented order
    app.extensions["mnist_web"] = state
    _register_routes(app, state)
    _register_error_handlers(app)
    atexit.register(_close_all, targets)  # the clients' connections and gRPC channels, at worker exit
    log.info(
        "web page backend: targets %s; reports from %s",
        ", ".join(f"{t.spec.name} ({t.spec.address})" for t in targets) or "none", config.reports_dir,
    )  # fmt: skip
    return app


def _close_all(targets: list[Target]) -> None:
    for target in targets:
        target.close()


def _configure_logging(level: str) -> None:
    if not logging.getLogger().handlers:  # leave a host's logging (pytest, gunicorn's) alone
        logging.basicConfig(format="%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving.web").setLevel(level.upper())


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    response = Response(json.dumps({"error": message}), status=status, mimetype="application/json")
    response.headers.update(headers or {})
    return response


def _register_routes(app: Flask, state: WebState) -> None:
    openapi_document = OPENAPI_PATH.read_bytes()

    def index() -> Response:
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)

    def predict() -> Response:
        if not request.is_json:
            return _error(
                f"Content-Type is {request.content_type or 'missing'}; expected application/json with "
                '{"image": [28 rows of 28 numbers in [0, 1]]}',
                415,
            )
        payload = request.get_json(silent=True)
        if payload is None:
            return _error('the body is not valid JSON; expected {"image": [28 rows of 28 numbers in [0, 1]]}', 400)
        try:
            image = parse_image(payload)
        except BadImage as exc:
            return _error(str(exc), 400)
        return Response(
            json.dumps({"results": [target.predict(image) for target in state.targets]}), mimetype="application/json"
        )

    def targets() -> dict[str, Any]:
        return {"targets": [target.status() for target in state.targets]}

    def random_test_image() -> Any:
        try:
            return state.test_images.pick()
        except MnistUnavailable as exc:
            return _error(str(exc), 503)

    def report_latest() -> Any:
        try:
            return latest_report(state.config.reports_dir)
        except NoReport as exc:
            return _error(str(exc), 404)

    def report_file(name: str) -> Response:
        if not name.endswith(_REPORT_SUFFIXES) or "/" in name:
            return _error(f"{name!r} is not a report file; expected a .html, .json or .csv file name", 404)
        return send_from_directory(state.config.reports_dir, name, max_age=0)

    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    def openapi() -> Response:
        return Response(openapi_document, mimetype="application/yaml")

    add = app.add_url_rule
    add("/", "index", index, methods=["GET"])
    add("/api/predict", "predict", predict, methods=["POST"])
    add("/api/targets", "targets", targets, methods=["GET"])
    add("/api/random-test-image", "random_test_image", random_test_image, methods=["GET"])
    add("/api/report/latest", "report_latest", report_latest, methods=["GET"])
    add("/reports/<path:name>", "report_file", report_file, methods=["GET"])
    add("/healthz", "healthz", healthz, methods=["GET"])
    add("/openapi.yaml", "openapi", openapi, methods=["GET"])


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        headers: dict[str, str] = {}
        if isinstance(exc, RequestEntityTooLarge):
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"the body has {request.content_length} bytes; expected at most {limit} (one 28x28 image)"
        elif isinstance(exc, MethodNotAllowed):
            allowed = sorted(exc.valid_methods or [])
            headers["Allow"] = ", ".join(allowed)
            message = f"method {request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}"
        elif isinstance(exc, RouteNotFound):
            message = f"no such page or endpoint: {request.method} {request.path}; the API is at /openapi.yaml"
        else:
            message = f"{exc.name}: {exc.description}"
        return _error(message, exc.code or 500, headers)

    @app.errorhandler(Exception)
    def _internal_error(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error("internal server error; the server log has the details", 500)
