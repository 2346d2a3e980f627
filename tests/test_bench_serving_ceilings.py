"""The serving benchmarks' model-only ceilings, their wrk durations, and bench.grpc_standin and
bench.rest_server (where wrk is installed) end to end on the fixture model.

Short runs: these check that the benchmark measures and reports what it says, not how fast anything is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import grpc_standin, loadtester_vs_wrk, rest_server
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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_grpc_standin_bench_reports_floors_configurations_and_ceiling(model_repo: Path, tmp_path: Path) -> None:
    result = grpc_standin.main([
        "--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--duration", "0.5",
        "--concurrency", "1", "16", "--client-processes", "1", "--no-batching-sweep",
    ])  # fmt: skip
    assert json.loads((tmp_path / "grpc_standin.json").read_text()) == result

    floor = result["in_process"]
    assert floor["batch_1_median_ms"] > 0 and floor["batch_1_one_thread_median_ms"] > 0
    assert set(result["configurations"]) == {"batching_off", "default_pools"}
    assert result["configurations"]["default_pools"]["command"].count("--tensorflow_intra_op_parallelism") == 0
    for label, config in result["configurations"].items():
        for measured in (*config["single_image"].values(), config["batch_256"]):
            assert measured["errors"] == 0 and measured["calls"] > 0, label
            assert measured["client_cpu_us_per_call"] > 0
        c16 = config["single_image"]["16"]
        ceiling = result["targets"][label]["calls_per_second_at_concurrency_16_model_ceiling"]
        assert ceiling == pytest.approx(
            cores_over_cpu_seconds(result["cpus"], floor["batch_1_one_thread_median_ms"], c16["client_cpu_us_per_call"]),
            abs=0.05,
        )


@pytest.mark.skipif(shutil.which("wrk") is None, reason="bench.rest_server drives wrk (Debian package wrk)")
def test_rest_server_bench_reports_floor_healthz_and_ceiling(model_repo: Path, tmp_path: Path) -> None:
    result = rest_server.main([
        "--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--duration", "1", "--no-batching-sweep",
    ])  # fmt: skip
    assert json.loads((tmp_path / "rest_server.json").read_text()) == json.loads(json.dumps(result))

    for run in (*result["single_image_json"].values(), result["healthz_c1"], *result["batch_256"].values()):
        assert run["errors"] == 0 and run["requests"] > 0
    floor_ms = result["floor"]["latency"]["1"]["median_ms"]
    healthz = result["healthz_c1"]
    assert healthz["p50_plus_model_ms"] == pytest.approx(healthz["p50_ms"] + floor_ms, abs=1e-3)
    c16 = result["single_image_json"]["16"]
    assert result["targets"]["rps_c16_model_ceiling"] == pytest.approx(
        cores_over_cpu_seconds(result["machine"]["cpus"], floor_ms, c16["wrk_cpu_us_per_request"]), abs=0.05
    )
