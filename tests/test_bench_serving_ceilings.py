"""The serving benchmarks' model-only ceilings and their wrk durations (bench.rest_server end to end:
tests/test_bench_rest_server.py; bench.grpc_standin: tests/test_bench_grpc_standin.py).

Short runs: these check that the benchmark measures and reports what it says, not how fast anything is.
"""

from __future__ import annotations

import pytest

from bench import loadtester_vs_wrk, rest_server
from bench.inprocess import model_only_ceiling


def cores_over_cpu_seconds(cpus: int, model_ms: float, caller_us: float) -> float:
    """The ceiling worked out independently of bench.inprocess: calls/s = cores / CPU seconds per call."""
    return cpus / (model_ms / 1e3 + caller_us / 1e6)


def test_ceiling_is_the_cores_over_model_and_caller_cost() -> None:
    # 0.8 ms of model + 0.2 ms of wrk per request on 2 cores: at most 2,000 requests/s.
    assert model_only_ceiling(2, 0.8, 200.0) == 2000.0
    # A cheaper load generator raises the bound; more cores raise it in proportion.
    assert model_only_ceiling(4, 0.8, 200.0) == 4000.0
    assert model_only_ceiling(2, 0.8, 0.0) == 2500.0
    assert model_only_ceiling(2, 0.75, 250.0) == 2000.0
    assert model_only_ceiling(1, 0.5, 500.0) == 1000.0


@pytest.mark.parametrize("bench_main", [rest_server.main, loadtester_vs_wrk.main])
@pytest.mark.parametrize("duration", ["0.5", "0", "-2", "three"])
def test_wrk_benches_refuse_a_duration_wrk_cannot_take(bench_main, duration, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        bench_main(["--duration", duration])
    assert exited.value.code == 2
    assert "--duration" in (err := capsys.readouterr().err) and "expected a whole number of seconds >= 1" in err


def test_wrk_benches_take_whole_seconds_written_as_floats() -> None:
    assert rest_server.build_parser().parse_args(["--duration", "2.0"]).duration == 2
