"""The stand-in's gRPC server and its REST API: services, health, TLS, message limits and graceful stop.

Library entry for tests and benchmarks::

    from serving.tfs_standin.flags import ServerOptions
    from serving.tfs_standin.server import ModelServer

    options = ServerOptions(port=0, standin_host="127.0.0.1", model_name="mnist", model_base_path=path)
    with ModelServer(options) as server:        # start() returns the bound port
        server.wait_until_available(timeout=60)
        ...                                      # talk to f"127.0.0.1:{server.port}"
    # leaving the block is stop(): in-flight calls finish, new ones are refused

The health service (``grpc.health.v1.Health``) reports SERVING for ``""`` and
for both TF Serving services once every configured model has a version
AVAILABLE, NOT_SERVING before that and from the moment shutdown begins.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent import futures
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from serving.tfs_standin import config
from serving.tfs_standin.connection_limits import CONNECTION_DEFAULTS, RequestReadDeadline
from serving.tfs_standin.core import ServerCore
from serving.tfs_standin.flags import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    MAX_RECEIVE_MESSAGE_ARG,
    ServerOptions,
    parse_channel_arguments,
)
from serving.tfs_standin.predict import DirectRunner
from serving.tfs_standin.rest import RestApi, RestServer, default_rest_threads
from serving.tfs_standin.services import ModelService, PredictionService

log = logging.getLogger(__name__)

SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")


class ServerStartError(RuntimeError):
    """The server could not listen where it was asked to."""


def default_grpc_threads() -> int:
    """Handler threads when --grpc_max_threads is 0: enough for batches to form under load."""
    return max(16, 4 * (os.cpu_count() or 1))


def channel_arguments(options: ServerOptions) -> list[tuple[str, int | str]]:
    """The stand-in's defaults, overridden key by key by --grpc_channel_arguments."""
    merged: dict[str, int | str] = {
        MAX_RECEIVE_MESSAGE_ARG: DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        # Fail loudly if the port is taken, instead of sharing it with another server.
        "grpc.so_reuseport": 0,
        # Bounds on connections and streams against slow or idle clients (connection_limits.py).
        **CONNECTION_DEFAULTS,
    }
    merged.update(parse_channel_arguments(options.grpc_channel_arguments))
    return list(merged.items())


class ModelServer:
    """The TF Serving stand-in; ``start()`` returns the bound TCP port, ``stop()`` drains it."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        models = config.load_model_configs(options)
        batching = None
        if options.enable_batching:
            batching = (
                config.load_batching_options(options.batching_parameters_file)
                if options.batching_parameters_file
                else config.BatchingOptions()
            )
        self._tls = config.load_tls_options(options.ssl_config_file) if options.ssl_config_file else None
        self.health = health.HealthServicer()
        self._stopping = False
        self.core = ServerCore(options, models, batching, on_change=self._update_health)
        self._server: grpc.Server | None = None
        self._port = 0
        self._rest: RestServer | None = None
        self._config_poller: threading.Thread | None = None
        self._stop_polling = threading.Event()
        self._update_health()

    # --- lifecycle ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (0 before start, or when serving on a UNIX socket only)."""
        return self._port

    @property
    def rest_port(self) -> int:
        """The bound REST API port (0 before start, or with --rest_api_port=0: REST off)."""
        return self._rest.port if self._rest is not None else 0

    def start(self) -> int:
        options = self.options
        threads = options.grpc_max_threads or default_grpc_threads()
        # A call holds a pool thread while its request arrives: the slow-call slots keep the handler
        # threads for ordinary calls, and past the pool's size a call is refused at once.
        pool_size = threads + options.standin_slow_call_slots
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="grpc"),
            interceptors=[RequestReadDeadline(options.standin_request_read_timeout_seconds)],
            options=channel_arguments(options),
            maximum_concurrent_rpcs=pool_size,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.core, options.enable_serialization_as_tensor_content), server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(self.core), server)
        if options.enable_grpc_healthcheck_service:
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if options.port or not options.grpc_socket_path:
            self._port = self._listen(server, f"{options.standin_host}:{options.port}")
        if options.grpc_socket_path:
            self._listen(server, f"unix:{os.path.abspath(options.grpc_socket_path)}")
        if options.rest_api_port:
            self._start_rest()
        server.start()
        self._server = server
        self.core.start()
        self._start_config_polling()
        log.info("TF Serving stand-in listening on %s:%d%s (gRPC%s, %d handler threads, batching %s)%s",
                 options.standin_host, self._port,
                 f" and unix:{options.grpc_socket_path}" if options.grpc_socket_path else "",
                 " over TLS" if self._tls else "", threads, self._batching_text(),
                 f"; REST API on {options.standin_host}:{self.rest_port} ({self._rest.threads} threads)"
                 if self._rest is not None else "")
        return self._port

    def _batching_text(self) -> str:
        runner = self.core.runner
        if not isinstance(runner, DirectRunner):
            return "on"
        if runner.slots is None:
            return "off"
        return f"off, {runner.slots.slots} model runs at once, the others in arrival order"

    def _start_rest(self) -> None:
        options = self.options
        app = RestApi(self.core, options.rest_api_timeout_in_ms, options.standin_rest_max_body_bytes)
        rest = RestServer(app, options.standin_host, options.rest_api_port,
                          options.rest_api_num_threads or default_rest_threads())
        try:
            rest.start()
        except OSError as exc:
            address = f"{options.standin_host}:{options.rest_api_port}"
            raise ServerStartError(f"cannot listen on {address} for the REST API: {exc} "
                                   "(is another server using it?)") from exc
        self._rest = rest

    def _listen(self, server: grpc.Server, address: str) -> int:
        try:
            if self._tls is None:
                port = server.add_insecure_port(address)
            else:
                credentials = grpc.ssl_server_credentials(
                    [(self._tls.server_key, self._tls.server_cert)],
                    root_certificates=self._tls.custom_ca,
                    require_client_auth=self._tls.client_verify,
                )
                port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ServerStartError(f"cannot listen on {address}: {exc} (is another server using it?)") from exc
        if port == 0 and not address.startswith("unix:"):
            raise ServerStartError(f"cannot listen on {address} (is another server using it?)")
        return port

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight calls finish (up to ``grace`` s), then unload everything."""
        if self._stopping:
            return
        self._stopping = True
        grace = self.options.standin_shutdown_grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        self._stop_polling.set()
        if self._server is not None or self._rest is not None:
            log.info("stopping: refusing new calls, giving in-flight calls up to %.1f s", grace)
        # gRPC drains in the background while REST drains here: both within the one grace period.
        grpc_stopped = self._server.stop(grace) if self._server is not None else None
        if self._rest is not None:
            self._rest.stop(grace)
        if grpc_stopped is not None:
            grpc_stopped.wait()
        self.core.stop()
        log.info("stopped")

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or ``timeout`` s pass); True if it stopped."""
        return self._server is None or self._server.wait_for_termination(timeout)

    def wait_until_available(self, timeout: float = 60.0) -> None:
        """Block until every configured model has a version AVAILABLE; TimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not self.core.all_available():
            if time.monotonic() > deadline:
                states = {m: [s.state_name for s in self.core.manager(m).statuses()] for m in self.core.model_names}
                raise TimeoutError(f"models not available after {timeout:.0f} s: {states}")
            time.sleep(0.02)

    def __enter__(self) -> ModelServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- health and config polling -----------------------------------------------------

    def _update_health(self) -> None:
        if self._stopping:
            return
        ready = self.core.all_available()
        serving = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", *SERVICE_NAMES):
            self.health.set(service, serving)

    def _start_config_polling(self) -> None:
        seconds = self.options.model_config_file_poll_wait_seconds
        if not self.options.model_config_file or seconds <= 0:
            return
        self._config_poller = threading.Thread(target=self._poll_config, args=(seconds,), name="config-poller",
                                               daemon=True)
        self._config_poller.start()

    def _poll_config(self, seconds: int) -> None:
        while not self._stop_polling.wait(seconds):
            try:
                models = config.load_model_configs(self.options)
            except config.ConfigError as exc:
                log.error("keeping the current models: %s", exc)
                continue
            self.core.reload(models)
