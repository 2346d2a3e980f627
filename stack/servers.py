"""Start and stop the two servers of the local stack as child processes.

- the PyTorch REST server: gunicorn with ``serving/torch_server/gunicorn_conf.py``
- the TF Serving stand-in: ``python -m serving.tfs_standin`` with TF Serving's flags

The production stack runs the real ``tensorflow/serving`` image instead of the
stand-in (see docker-compose.yml); ports and model paths are the same.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from mnist_client import contract
from mnist_client.grpc_client import GrpcClient
from mnist_client.rest import RestClient
from serving.model_repository import latest_version
from stack.config import REPO_ROOT, StackConfig
from stack.processes import ManagedProcess, StackError, ensure_port_free

log = logging.getLogger(__name__)

GUNICORN_CONF = REPO_ROOT / "serving" / "torch_server" / "gunicorn_conf.py"


@dataclass
class RunningStack:
    config: StackConfig
    rest: ManagedProcess
    grpc: ManagedProcess


def check_models(config: StackConfig) -> None:
    """Raise StackError unless both frameworks have an exported version."""
    missing = [str(p) for p in (config.torch_base_path, config.tf_base_path) if latest_version(p) is None]
    if missing:
        raise StackError(
            "no exported model in " + " or ".join(missing) + "; run `make train` first "
            "(or point MNIST_MODELS_DIR at a models folder)"
        )


def rest_process(config: StackConfig) -> ManagedProcess:
    argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.torch_server.app:create_app()"]
    env = {
        "MNIST_REST_HOST": config.host,
        "MNIST_REST_PORT": str(config.rest_port),
        "MNIST_REST_MODEL_BASE_PATH": str(config.torch_base_path),
        "PYTHONPATH": str(REPO_ROOT),
    }
    return ManagedProcess("PyTorch REST server", argv, config.log_dir / "rest-server.log", env)


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
