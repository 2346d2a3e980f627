"""Slow, stalled and idle clients must not delay anyone else: the stack as `make serve` starts it
(the PyTorch REST server and the stand-in's REST API each behind nginx, the stand-in's gRPC with its
own deadlines), and the PyTorch REST server as its container starts it (python -m serving.torch_server.front).

72 slow clients per server (24 of each kind: see bench/slow_clients.py) hold connections while one
other client times ordinary calls. Each test fails if any ordinary call fails, or if their p99
rises more than 100 ms above the p99 measured in the same test without the slow clients. Without
the defences (bare gunicorn sync workers; the stand-in without its read deadline and slow-call
slots) every ordinary call timed out under this load.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.slow_clients import (
    HEALTH_PATHS, check_server, grpc_round, harm, pool_rounds, rest_round, slow_grpc_clients, slow_rest_clients,
)
from mnist_client import contract
from serving.torch_server.config import ConfigError
from serving.torch_server.proxy import find_nginx
from stack.config import REPO_ROOT, free_port_config
from stack.processes import ManagedProcess, free_port
from stack.servers import RunningStack, Server, running_stack

try:
    find_nginx()
    _NO_NGINX = ""
except ConfigError as exc:
    _NO_NGINX = f"{exc} (.ci/run installs it)"
pytestmark = pytest.mark.skipif(bool(_NO_NGINX), reason=_NO_NGINX)

PER_KIND = 24  # slow clients of each of the three kinds: 72 per server
CALLS = 40  # ordinary calls of each kind per round


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("slow-clients-stack")
    config = free_port_config(model_repo, folder)
    with running_stack(config) as running:
        yield running


def test_slow_http_clients_do_not_delay_ordinary_requests(stack: RunningStack) -> None:
    url = stack.config.rest_url
    rest_round(url, 5)  # warm: first calls pay connection and model warm-up
    without, with_slow = [], []
    for _ in range(2):  # interleaved: without, with, without, with
        without.append(rest_round(url, CALLS))
        with slow_rest_clients(url, PER_KIND) as slow:
            assert slow.stats.opened == 3 * PER_KIND, slow.stats
            with_slow.append(rest_round(url, CALLS))
            assert slow.stats.refused == 0, slow.stats
    problems = harm(pool_rounds(without), pool_rounds(with_slow))
    assert not problems, problems


def test_slow_grpc_clients_do_not_delay_ordinary_calls(stack: RunningStack) -> None:
    target = stack.config.grpc_target
    grpc_round(target, 5)
    without, with_slow = [], []
    for _ in range(2):
        without.append(grpc_round(target, CALLS))
        with slow_grpc_clients(target, PER_KIND) as (streams, prefaces):
            assert streams.stats.opened == 2 * PER_KIND and prefaces.stats.opened == PER_KIND
            with_slow.append(grpc_round(target, CALLS))
            assert streams.stats.refused == 0, "the stalled calls fit in the slow-call slots"
    problems = harm(pool_rounds(without), pool_rounds(with_slow))
    assert not problems, problems


def test_slow_http_clients_do_not_delay_the_standins_rest_api(stack: RunningStack) -> None:
    """The stand-in's REST API is behind nginx too (its cheroot threads read a request head with no deadline)."""
    url = stack.config.tfs_rest_url
    problems = check_server(lambda: rest_round(url, CALLS, HEALTH_PATHS["tfserving"]),
                            lambda: slow_rest_clients(url, PER_KIND), rounds=2)
    assert not problems, problems


def test_the_rest_container_command_holds_up_and_stops_cleanly(model_repo: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {
        "MNIST_REST_HOST": "127.0.0.1", "MNIST_REST_PORT": str(port), "MNIST_REST_UPSTREAM_PORT": str(free_port()),
        "MNIST_REST_WORKERS": "2", "MNIST_REST_DEVICE": "cpu", "MNIST_PROXY_RUN_DIR": str(tmp_path / "nginx"),
        "MNIST_REST_MODEL_BASE_PATH": str(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME),
        "PYTHONPATH": str(REPO_ROOT),
    }  # fmt: skip
    # The container's own entry point (it starts gunicorn and nginx itself), watched as a launcher's Server.
    url = f"http://127.0.0.1:{port}"
    front = Server(ManagedProcess("REST container command", [sys.executable, "-m", "serving.torch_server.front"],
                                  tmp_path / "front.log", env), None, rest_url=url)
    front.start()
    try:
        front.wait_ready(timeout_s=180)
        problems = check_server(lambda: rest_round(url, CALLS), lambda: slow_rest_clients(url, PER_KIND))
        assert not problems, problems
    finally:
        status = front.stop()
    assert status == 0, (tmp_path / "front.log").read_text(errors="replace")[-3000:]
