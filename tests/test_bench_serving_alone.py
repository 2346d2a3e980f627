"""bench.serving_alone: each server alone, the demo's targets and settings, set beside a demo report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import serving_alone

pytestmark = pytest.mark.slow


def test_each_server_alone_gives_the_three_targets_medians(model_repo: Path, tmp_path: Path) -> None:
    result = serving_alone.main(["--models-dir", str(model_repo), "--output-dir", str(tmp_path),
                                 "--concurrency", "1", "2", "--duration", "0.3", "--repeats", "2"])
    assert json.loads((tmp_path / "serving_alone.json").read_text()) == result
    assert set(result["alone"]) == {"torch-rest", "tf-standin-rest", "tf-standin-grpc"}
    for points in result["alone"].values():
        assert set(points) == {"1", "2"}
        for figures in points.values():
            assert figures["rounds"] == 2 and figures["p50_ms"] > 0 and figures["throughput_rps"] > 0
    assert result["settings"]["repeats"] == 2 and "against_demo" not in result


def test_against_demo_divides_the_demos_medians_by_the_alone_ones() -> None:
    alone = {"torch-rest": {"1": {"p50_ms": 1.0, "throughput_rps": 1000.0}},
             "tf-standin-grpc": {"16": {"p50_ms": 8.0, "throughput_rps": 1600.0}}}
    demo = {"torch-rest": {"1": {"p50_ms": 1.5, "throughput_rps": 700.0}},
            "tf-standin-grpc": {"16": {"p50_ms": 9.0, "throughput_rps": 1500.0}, "1": {"p50_ms": 1.0}}}
    assert serving_alone.against_demo(alone, demo) == [
        {"target": "torch-rest", "point": "1", "demo_over_alone_p50": 1.5, "demo_over_alone_rps": 0.7,
         "within_limit": False},
        {"target": "tf-standin-grpc", "point": "16", "demo_over_alone_p50": 1.125, "demo_over_alone_rps": 0.938,
         "within_limit": True},
    ]
