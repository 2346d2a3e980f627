"""bench.client_cost: each client's single-image predict beside the load tester's engine, on real servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import client_cost

pytestmark = pytest.mark.slow


def test_both_pairs_and_both_inputs_are_measured_in_rounds(
    model_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = client_cost.main(["--models-dir", str(model_repo), "--output-dir", str(tmp_path),
                               "--rounds", "2", "--calls", "5", "--warmup", "2"])
    assert json.loads((tmp_path / "client_cost.json").read_text()) == result
    assert set(result["pairs"]) == {"torch-rest", "tf-standin-grpc"}
    for data in result["pairs"].values():
        assert set(data["inputs"]) == {"uint8", "float32"}
        for row in data["inputs"].values():
            assert len(row["engine_round_p50s_ms"]) == len(row["client_round_p50s_ms"]) == 2
            assert row["engine_p50_ms"] > 0 and row["client_p50_ms"] > 0
            assert row["verdict"] == ("PASS" if row["client_minus_engine_ms"] <= 0.3 else "MISS")
    targets = result["targets"]  # make bench's table of every benchmark's targets
    assert len(targets) == 4 and {t["better"] for t in targets} == {"lower"} and {t["limit"] for t in targets} == {0.3}
    assert {t["name"].split(" ")[0] for t in targets} == {"RestClient", "GrpcClient"}
    table = capsys.readouterr().out
    assert "torch-rest (RestClient)" in table and "tf-standin-grpc (GrpcClient)" in table
    assert "TF Serving stand-in" in table  # named for what answered


def test_a_failing_engine_round_is_an_error_not_a_figure() -> None:
    class FailingEngine:
        def run(self, pacer, slots, first_payload, sink, *, record_lag):
            pacer.take(0)
            sink.error("unavailable", "UNAVAILABLE", "POST http://x: could not connect")
            sink.flush(0)
            return 0

    with pytest.raises(RuntimeError, match="engine's calls failed .1 of 3.*could not connect"):
        client_cost.engine_round(FailingEngine(), 3)  # type: ignore[arg-type]
