"""Start and stop the two servers of the local stack as child processes.

- the PyTorch REST server: gunicorn with ``serving/torch_server/gunicorn_conf.py`` on a loopback
  port, behind nginx (``python -m serving.torch_server.proxy``) on the public one, so that slow or
  idle clients never hold a gunicorn worker (docs/reliability.md)
- the TF Serving stand-in: ``python -m serving.tfs_standin`` with TF Serving's flags
- the draw-a-digit web page: ``python -m serving.web`` (docs/web.md), asking both servers

The production stack runs the real ``tensorflow/serving`` image instead of the
stand-in (see docker-compose.yml); ports and model paths are the same.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from mnist_client import contract
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from serving.model_repository import latest_version
from serving.torch_server.config import ConfigError
from serving.torch_server.proxy import find_nginx
from stack.config import REPO_ROOT, StackConfig
from stack.processes import ManagedProcess, StackError, ensure_port_free, free_port, tail

log = logging.getLogger(__name__)

GUNICORN_CONF = REPO_ROOT / "serving" / "torch_server" / "gunicorn_conf.py"


@dataclass
class RunningStack:
    config: StackConfig
    rest: ProxiedRestServer
    grpc: ProxiedRestServer
    web: ManagedProcess


def check_models(config: StackConfig) -> None:
    """Raise StackError unless both frameworks have an exported version."""
    missing = [str(p) for p in (config.torch_base_path, config.tf_base_path) if latest_version(p) is None]
    if missing:
        raise StackError(
            "no exported model in " + " or ".join(missing) + "; run `make train` first "
            "(or point MNIST_MODELS_DIR at a models folder)"
        )


class ProxiedRestServer:
    """A server and the nginx in front of its HTTP port, started, watched and stopped as one server:
    gunicorn for the PyTorch REST server, the stand-in for TF Serving's REST API.

    It has ManagedProcess's interface; ``pid`` is the server's (gunicorn's master, whose workers answer).
    """

    def __init__(self, server: ManagedProcess, proxy: ManagedProcess) -> None:
        self.server = server
        self.proxy = proxy
        self.name = server.name
        self.log_path = server.log_path

    @property
    def pid(self) -> int | None:
        return self.server.pid

    @property
    def pids(self) -> tuple[int, ...]:
        """The server's and nginx's: together, with their children, the whole server."""
        return self.server.pids + self.proxy.pids

    def start(self) -> None:
        self.server.start()
        self.proxy.start()

    def running(self) -> bool:
        return self.server.running() and self.proxy.running()

    def wait_ready(self, probe: Callable[[], bool], timeout_s: float) -> float:
        # An nginx that exited (a taken port, a bad setting) ends the wait at once, then is reported.
        took = self.server.wait_ready(lambda: not self.proxy.running() or probe(), timeout_s)
        if not self.proxy.running():
            raise StackError(f"{self.proxy.name} exited before the server became ready; last lines of "
                             f"{self.proxy.log_path}:\n{tail(self.proxy.log_path)}")
        return took

    def stop(self, grace_s: float = 30.0) -> int | None:
        proxy_status = self.proxy.stop(grace_s)
        status = self.server.stop(grace_s)
        return status if status not in (None, 0) else proxy_status


def _require_nginx(what: str) -> None:
    try:
        find_nginx()
    except ConfigError as exc:
        raise StackError(f"{what} runs behind nginx, but {exc}; `make setup` lists it") from None


def rest_process(config: StackConfig) -> ProxiedRestServer:
    """gunicorn on a free loopback port, nginx on ``config.rest_port``; HTTPS (MNIST_REST_TLS_CERT and
    MNIST_REST_TLS_KEY in the environment) is served by nginx."""
    _require_nginx("the PyTorch REST server")
    upstream_port = free_port("127.0.0.1")
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.torch_server.app:create_app()"]
    env = {
        "MNIST_REST_HOST": "127.0.0.1",
        "MNIST_REST_PORT": str(upstream_port),
        "MNIST_REST_MODEL_BASE_PATH": str(config.torch_base_path),
        "MNIST_REST_TLS_CERT": "",
        "MNIST_REST_TLS_KEY": "",
        "PYTHONPATH": str(REPO_ROOT),
    }
    server = ManagedProcess("PyTorch REST server", argv, config.log_dir / "rest-server.log", env)
    tls = {"MNIST_PROXY_TLS_CERT": os.environ.get("MNIST_REST_TLS_CERT", ""),
           "MNIST_PROXY_TLS_KEY": os.environ.get("MNIST_REST_TLS_KEY", "")}
    return ProxiedRestServer(server, _nginx(config, "rest-proxy", config.rest_port, upstream_port, tls))


def _nginx(config: StackConfig, name: str, port: int, upstream_port: int, extra: dict[str, str]) -> ManagedProcess:
    """nginx (serving.torch_server.proxy) on ``config.host:port`` in front of ``127.0.0.1:upstream_port``."""
    env = {
        "MNIST_PROXY_HOST": config.host,
        "MNIST_PROXY_PORT": str(port),
        "MNIST_PROXY_UPSTREAM": f"127.0.0.1:{upstream_port}",
        "MNIST_PROXY_RUN_DIR": str(config.log_dir / name),
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    }
    argv = [sys.executable, "-m", "serving.torch_server.proxy"]
    return ManagedProcess(f"nginx ({name})", argv, config.log_dir / f"{name}.log", env)


def grpc_process(config: StackConfig) -> ProxiedRestServer:
    """The TF Serving stand-in: gRPC on ``config.grpc_port``; its REST API on a free loopback port
    behind nginx on ``config.tfs_rest_port``, so that slow HTTP clients cannot hold its request
    threads (its gRPC side has its own deadlines and bounds: serving/tfs_standin/connection_limits.py)."""
    _require_nginx("the TF Serving stand-in's REST API")
    upstream_port = free_port("127.0.0.1")
    argv = [
        sys.executable, "-m", "serving.tfs_standin",
        f"--port={config.grpc_port}",
        f"--rest_api_port={upstream_port}",
        f"--standin_host={config.host}",  # MNIST_HOST, as for the other servers (127.0.0.1 by default)
        f"--model_name={contract.MODEL_NAME}",
        f"--model_base_path={config.tf_base_path}",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(REPO_ROOT)}
    server = ManagedProcess("TF Serving stand-in", argv, config.log_dir / "tfs-standin.log", env)
    return ProxiedRestServer(server, _nginx(config, "tfs-rest-proxy", config.tfs_rest_port, upstream_port, {}))


def web_process(config: StackConfig, tfs_rest_url: str | None = None) -> ManagedProcess:
    """The web page, asking the PyTorch REST server and the stand-in; its TF REST target only when
    ``tfs_rest_url`` is given (the stand-in's REST API), else that target is left out."""
    env = {
        "MNIST_WEB_HOST": config.host,
        "MNIST_WEB_PORT": str(config.web_port),
        # Named as make demo's load test names them: the stand-in for what it is, never TF Serving.
        "MNIST_WEB_PYTORCH_REST": f"torch-rest={config.rest_url}",
        "MNIST_WEB_TENSORFLOW_REST": f"tf-standin-rest={tfs_rest_url}" if tfs_rest_url else "off",
        "MNIST_WEB_TENSORFLOW_GRPC": f"tf-standin-grpc={config.grpc_target}",
        "MNIST_WEB_REPORTS_DIR": str(config.report_dir),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return ManagedProcess("web page", [sys.executable, "-m", "serving.web"], config.log_dir / "web.log", env)


def _web_ready(config: StackConfig) -> bool:
    # http.client, not urllib: a proxy set in the environment must not answer for a local probe.
    connection = http.client.HTTPConnection(config.host, config.web_port, timeout=2.0)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    finally:
        connection.close()


def _rest_ready(config: StackConfig) -> bool:
    with RestClient(config.rest_url, timeout=2.0) as client:
        return client.ready()


def _tfs_rest_ready(config: StackConfig) -> bool:
    with RestClient(config.tfs_rest_url, timeout=2.0) as client:
        return client.ready()


def _grpc_ready(config: StackConfig) -> bool:
    with GrpcClient(config.grpc_target, timeout=2.0) as client:
        return client.ready()


@contextlib.contextmanager
def running_server(config: StackConfig, which: Literal["torch", "tf"]) -> Iterator[ProxiedRestServer]:
    """One server of the stack alone, ready for the block and stopped after: the PyTorch REST server
    (``torch``) or the TF Serving stand-in with its gRPC and REST APIs (``tf``). Benchmarks use it to
    measure a server with nothing else of the stack running."""
    check_models(config)
    if which == "torch":
        ensure_port_free(config.host, config.rest_port, "PyTorch REST server")
        server = rest_process(config)
        probes: tuple[Callable[[StackConfig], bool], ...] = (_rest_ready,)
    else:
        ensure_port_free(config.host, config.grpc_port, "TF Serving gRPC stand-in")
        ensure_port_free(config.host, config.tfs_rest_port, "TF Serving stand-in's REST API")
        server = grpc_process(config)
        probes = (_grpc_ready, _tfs_rest_ready)
    try:
        server.start()
        took = server.wait_ready(lambda: all(probe(config) for probe in probes), config.ready_timeout_s)
        log.info("%s ready after %.1f s", server.name, took)
        yield server
    finally:
        status = server.stop()
        if status not in (None, 0):
            log.warning("%s exited with status %s (log: %s)", server.name, status, server.log_path)


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[RunningStack]:
    """Both servers and the web page up and ready for the block; stopped cleanly after, on errors too."""
    check_models(config)
    ensure_port_free(config.host, config.rest_port, "PyTorch REST server")
    ensure_port_free(config.host, config.grpc_port, "TF Serving gRPC stand-in")
    ensure_port_free(config.host, config.tfs_rest_port, "TF Serving stand-in's REST API")
    ensure_port_free(config.host, config.web_port, "web page")
    rest, grpc, web = rest_process(config), grpc_process(config), web_process(config, config.tfs_rest_url)
    try:
        rest.start()
        grpc.start()
        web.start()
        took = rest.wait_ready(lambda: _rest_ready(config), config.ready_timeout_s)
        log.info("PyTorch REST server ready at %s after %.1f s", config.rest_url, took)
        took = grpc.wait_ready(lambda: _grpc_ready(config) and _tfs_rest_ready(config), config.ready_timeout_s)
        log.info("TF Serving stand-in ready at %s (gRPC) and %s (REST) after %.1f s", config.grpc_target,
                 config.tfs_rest_url, took)
        web.wait_ready(lambda: _web_ready(config), config.ready_timeout_s)
        log.info("web page: open %s/ in a browser (draw a digit; the load-test report at %s/#report)",
                 config.web_url, config.web_url)  # fmt: skip
        yield RunningStack(config, rest, grpc, web)
    finally:
        for proc in (rest, grpc, web):
            status = proc.stop()
            if status not in (None, 0):
                log.warning("%s exited with status %s (log: %s)", proc.name, status, proc.log_path)
