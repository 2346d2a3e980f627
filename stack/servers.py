"""Start and stop the two servers of the local stack as child processes.

- the PyTorch REST server: gunicorn with ``serving/torch_server/gunicorn_conf.py`` on a loopback
  port, behind nginx (``python -m serving.torch_server.proxy``) on the public one, so that slow or
  idle clients never hold a gunicorn worker (docs/reliability.md)
- the TF Serving stand-in: ``python -m serving.tfs_standin`` with TF Serving's flags

The production stack runs the real ``tensorflow/serving`` image instead of the
stand-in (see docker-compose.yml); ports and model paths are the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mnist_client import contract
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from serving.model_repository import latest_version
from stack.config import REPO_ROOT, StackConfig
from serving.torch_server.config import ConfigError
from serving.torch_server.proxy import find_nginx
from stack.processes import ManagedProcess, StackError, ensure_port_free, free_port, tail

log = logging.getLogger(__name__)

GUNICORN_CONF = REPO_ROOT / "serving" / "torch_server" / "gunicorn_conf.py"


@dataclass
class RunningStack:
    config: StackConfig
    rest: ManagedProcess | ProxiedRestServer
    grpc: ManagedProcess


def check_models(config: StackConfig) -> None:
    """Raise StackError unless both frameworks have an exported version."""
    missing = [str(p) for p in (config.torch_base_path, config.tf_base_path) if latest_version(p) is None]
    if missing:
        raise StackError(
            "no exported model in " + " or ".join(missing) + "; run `make train` first "
            "(or point MNIST_MODELS_DIR at a models folder)"
        )


class ProxiedRestServer:
    """gunicorn and the nginx in front of it, started, watched and stopped as one server.

    It has ManagedProcess's interface; ``pid`` is gunicorn's master (whose workers answer).
    """

    def __init__(self, server: ManagedProcess, proxy: ManagedProcess) -> None:
        self.server = server
        self.proxy = proxy
        self.name = server.name
        self.log_path = server.log_path

    @property
    def pid(self) -> int | None:
        return self.server.pid

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


def rest_process(config: StackConfig) -> ProxiedRestServer:
    """gunicorn on a free loopback port, nginx on ``config.rest_port``; HTTPS (MNIST_REST_TLS_CERT and
    MNIST_REST_TLS_KEY in the environment) is served by nginx."""
    try:
        find_nginx()
    except ConfigError as exc:
        raise StackError(f"the PyTorch REST server runs behind nginx, but {exc}; `make setup` lists it") from None
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
    proxy_env = {
        "MNIST_PROXY_HOST": config.host,
        "MNIST_PROXY_PORT": str(config.rest_port),
        "MNIST_PROXY_UPSTREAM": f"127.0.0.1:{upstream_port}",
        "MNIST_PROXY_RUN_DIR": str(config.log_dir / "rest-proxy"),
        "MNIST_PROXY_TLS_CERT": os.environ.get("MNIST_REST_TLS_CERT", ""),
        "MNIST_PROXY_TLS_KEY": os.environ.get("MNIST_REST_TLS_KEY", ""),
        "PYTHONPATH": str(REPO_ROOT),
    }
    proxy_argv = [sys.executable, "-m", "serving.torch_server.proxy"]
    proxy = ManagedProcess("PyTorch REST server's nginx", proxy_argv, config.log_dir / "rest-proxy.log", proxy_env)
    return ProxiedRestServer(server, proxy)


def grpc_process(config: StackConfig) -> ManagedProcess:
    argv = [
        sys.executable, "-m", "serving.tfs_standin",
        f"--port={config.grpc_port}",
        f"--model_name={contract.MODEL_NAME}",
        f"--model_base_path={config.tf_base_path}",
    ]  # fmt: skip
    env = {"PYTHONPATH": str(REPO_ROOT)}
    return ManagedProcess("TF Serving gRPC stand-in", argv, config.log_dir / "tfs-standin.log", env)


def _rest_ready(config: StackConfig) -> bool:
    with RestClient(config.rest_url, timeout=2.0) as client:
        return client.ready()


def _grpc_ready(config: StackConfig) -> bool:
    with GrpcClient(config.grpc_target, timeout=2.0) as client:
        return client.ready()


@contextlib.contextmanager
def running_stack(config: StackConfig) -> Iterator[RunningStack]:
    """Both servers up and ready for the duration of the block; stopped cleanly after, on errors too."""
    check_models(config)
    ensure_port_free(config.host, config.rest_port, "PyTorch REST server")
    ensure_port_free(config.host, config.grpc_port, "TF Serving gRPC stand-in")
    rest, grpc = rest_process(config), grpc_process(config)
    try:
        rest.start()
        grpc.start()
        took = rest.wait_ready(lambda: _rest_ready(config), config.ready_timeout_s)
        log.info("PyTorch REST server ready at %s after %.1f s", config.rest_url, took)
        took = grpc.wait_ready(lambda: _grpc_ready(config), config.ready_timeout_s)
        log.info("TF Serving stand-in ready at %s after %.1f s", config.grpc_target, took)
        yield RunningStack(config, rest, grpc)
    finally:
        for proc in (rest, grpc):
            status = proc.stop()
            if status not in (None, 0):
                log.warning("%s exited with status %s (log: %s)", proc.name, status, proc.log_path)
