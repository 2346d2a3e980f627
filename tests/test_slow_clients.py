"""Slow, stalled and idle clients must not delay anyone else: the stack as `make serve` starts it.

72 slow clients per server (24 of each kind: see bench/slow_clients.py) hold connections while one
other client times ordinary calls. Each test fails if any ordinary call fails, or if their p99
rises more than 100 ms above the p99 measured in the same test without the slow clients. Without
the defences (bare gunicorn sync workers; the stand-in without its read deadline and slow-call
slots) every ordinary call timed out under this load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.slow_clients import Timings, grpc_round, rest_round, slow_grpc_clients, slow_rest_clients
from serving.torch_server.config import ConfigError
from serving.torch_server.proxy import find_nginx
from stack.config import StackConfig
from stack.processes import free_port
from stack.servers import RunningStack, running_stack

try:
    find_nginx()
    _NO_NGINX = ""
except ConfigError as exc:
    _NO_NGINX = f"{exc} (.ci/run installs it)"
pytestmark = pytest.mark.skipif(bool(_NO_NGINX), reason=_NO_NGINX)

PER_KIND = 24  # slow clients of each of the three kinds: 72 per server
CALLS = 40  # ordinary calls of each kind per round
ALLOWED_RISE_MS = 100.0


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    folder = tmp_path_factory.mktemp("slow-clients-stack")
    config = StackConfig(
        host="127.0.0.1", rest_port=free_port(), grpc_port=free_port(), models_dir=model_repo,
        log_dir=folder / "logs", report_dir=folder / "reports", ready_timeout_s=180,
        # Every other port the stack opens (the stand-in's REST API, the web page) on a free one too.
        **{name: free_port() for name in ("tfs_rest_port", "web_port") if name in StackConfig.__dataclass_fields__},
    )  # fmt: skip
    with running_stack(config) as running:
        yield running


def _pooled(rounds: list[list[Timings]]) -> dict[str, Timings]:
    pooled: dict[str, Timings] = {}
    for timings in rounds:
        for timing in timings:
            into = pooled.setdefault(timing.name, Timings(timing.name))
            into.latencies_ms += timing.latencies_ms
            into.failures += timing.failures
    return pooled


def _assert_unharmed(without: dict[str, Timings], with_slow: dict[str, Timings]) -> None:
    for name, base in without.items():
        loaded = with_slow[name]
        assert not base.failures, f"{name} failed without slow clients: {base.failures[:3]}"
        assert not loaded.failures, f"{name} failed while slow clients held connections: {loaded.failures[:3]}"
        assert loaded.percentile(99) <= base.percentile(99) + ALLOWED_RISE_MS, (
            f"{name}: p99 {loaded.percentile(99):.1f} ms with slow clients, {base.percentile(99):.1f} ms without"
        )


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
    _assert_unharmed(_pooled(without), _pooled(with_slow))


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
    _assert_unharmed(_pooled(without), _pooled(with_slow))
