"""bench.grpc_standin: today's stand-in beside the new defaults, its summaries and its target verdict.

The summaries and the verdict are checked on figures written here by hand; one short end-to-end run on
the fixture model checks that the bench starts both stand-ins, measures every round and writes what it
prints. Nothing here asserts how fast anything is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import grpc_standin


def _round(p50: float, p999: float, rps: float) -> dict:
    return {"p50_ms": p50, "p99_ms": p50 * 2, "p99.9_ms": p999, "max_ms": p999 * 2, "requests_per_second": rps,
            "requests": 100, "errors": 0, "tail_ratio": round(p999 / p50, 3), "cpu_cores": {}}


def test_summary_is_the_median_and_spread_over_rounds() -> None:
    summary = grpc_standin.summarize([_round(10.0, 20.0, 900.0), _round(12.0, 48.0, 1000.0), _round(8.0, 24.0, 1100.0)])
    assert summary["rounds"] == 3
    assert summary["p50_ms"] == {"median": 10.0, "min": 8.0, "max": 12.0, "spread": 0.4}
    assert summary["requests_per_second"]["median"] == 1000.0
    assert summary["requests_per_second"]["spread"] == 0.2
    # The tail ratio is each round's own, then their median: 2.0, 4.0 and 3.0.
    assert summary["tail_ratio"]["median"] == 3.0


def _summaries(new_p50: float, new_p999: float, new_rps: float, today_rps: float) -> dict:
    return {
        "today": {"16": grpc_standin.summarize([_round(10.0, 70.0, today_rps)] * 3)},
        "new": {"16": grpc_standin.summarize([_round(new_p50, new_p999, new_rps)] * 3)},
    }


@pytest.mark.parametrize(
    ("new_p999", "new_rps", "tail_pass", "rps_pass"),
    [
        (30.0, 1000.0, True, True),  # 3.0x the p50, as many calls/s as today: the limits themselves pass
        (31.0, 1000.0, False, True),
        (20.0, 999.0, True, False),
        (45.0, 800.0, False, False),
    ],
)
def test_the_target_needs_the_tail_within_three_p50s_and_todays_requests_per_second(
    new_p999: float, new_rps: float, tail_pass: bool, rps_pass: bool
) -> None:
    verdict = grpc_standin.evaluate(_summaries(10.0, new_p999, new_rps, today_rps=1000.0))
    assert verdict["checks"]["tail_ratio"]["pass"] is tail_pass
    assert verdict["checks"]["throughput_vs_today"]["pass"] is rps_pass
    assert verdict["pass"] is (tail_pass and rps_pass)
    assert verdict["today_tail_ratio"] == 7.0
    assert "p99.9 at most 3 times its p50" in verdict["target"]
    tail, throughput = verdict["checks"]["tail_ratio"], verdict["checks"]["throughput_vs_today"]
    assert (tail["measured"], tail["limit"], tail["better"]) == (new_p999 / 10.0, 3.0, "lower")
    assert (throughput["measured"], throughput["limit"], throughput["better"]) == (new_rps / 1000.0, 1.0, "higher")


def test_today_stays_selectable_by_flag() -> None:
    args = grpc_standin.build_parser().parse_args([])
    assert args.baseline_flags == "--standin_tensorflow_thread_spinning=true"
    assert args.candidate_flags == "" and args.rounds >= 3 and 16 in args.concurrency


@pytest.mark.parametrize("argv", [["--concurrency", "1"], ["--rounds", "0"], ["--duration", "0"], ["--run-slots", "-1"]])
def test_bad_settings_are_refused_with_the_reason(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        grpc_standin.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--concurrency" in err or "--rounds" in err


def test_a_short_run_measures_both_configurations_in_every_round(model_repo: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    result = grpc_standin.main([
        "--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--rounds", "2", "--duration", "0.5",
        "--warmup", "5", "--concurrency", "16", "1", "--run-slots", "2",
    ])  # fmt: skip
    assert json.loads((tmp_path / "grpc_standin.json").read_text()) == json.loads(json.dumps(result))
    assert result["configurations"] == {
        "today": ["--standin_tensorflow_thread_spinning=true"],
        "new": [],
        "run_slots_2": ["--standin_model_run_slots=2"],
    }
    for label in result["configurations"]:
        for concurrency in ("16", "1"):
            rounds = result["rounds_measured"][label][concurrency]
            assert len(rounds) == 2 and all(r["errors"] == 0 and r["requests"] > 0 for r in rounds), (label, concurrency)
            assert result["summaries"][label][concurrency]["rounds"] == 2
    assert [t["name"] for t in result["targets"]] == [
        "gRPC stand-in at c=16: p99.9 over p50", "gRPC stand-in at c=16: requests/s over today's"]
    printed = capsys.readouterr().out
    assert "target: gRPC stand-in at c=16" in printed and ("-> PASS" in printed or "-> MISS" in printed)
    # Each stand-in was started by the launcher with its flags: their logs say which settings served.
    logs = {label: (tmp_path / "grpc_standin_logs" / label / "logs").rglob("*.log") for label in result["configurations"]}
    run_slots_log = "".join(p.read_text() for p in logs["run_slots_2"])
    assert "2 model runs at once, the others in arrival order" in run_slots_log
