"""bench.rest_server end to end on the fixture model: both configurations measured in rounds, the
micro-batches they formed, and the targets computed from the medians. Short runs: this checks what
the benchmark measures and reports, not how fast anything is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import rest_server

pytestmark = [
    pytest.mark.skipif(shutil.which("wrk") is None, reason="bench.rest_server drives wrk: install wrk (Debian package wrk)"),
    pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                       reason="the REST server runs behind nginx: install nginx (Debian package nginx-light)"),
]  # fmt: skip


def test_rest_server_bench_measures_both_configurations_and_reports_the_targets(model_repo: Path, tmp_path: Path) -> None:
    result = rest_server.main([
        "--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--duration", "1", "--rounds", "2",
        "--variant", "threads2=MNIST_REST_THREADS=2",
    ])  # fmt: skip
    assert json.loads((tmp_path / "rest_server.json").read_text()) == json.loads(json.dumps(result))
    assert len(result["rounds"]) == 2 and set(result["summary"]) == {"before", "defaults", "threads2"}
    for round_ in result["rounds"]:
        for runs in round_.values():
            for run in runs.values():
                assert run["errors"] == 0 and run["requests"] > 0
        # One request at a time never waits for company: every forward pass holds one image.
        assert round_["defaults"]["c1"]["images_per_forward_pass"] == 1.0
        # Without micro-batching every pass holds one request's images, at any concurrency.
        assert round_["before"]["c16"]["images_per_forward_pass"] == 1.0
        assert round_["before"]["c1"]["images_per_forward_pass"] == 1.0

    summary = result["summary"]
    for name, figures in summary.items():
        values = [r[name]["c16"]["requests_per_second"] for r in result["rounds"]]
        assert figures["c16_requests_per_second"]["median"] == pytest.approx(sum(values) / 2, abs=0.01)

    targets = {t["name"]: t for t in result["targets"]}
    assert len(targets) == 5
    ratio = targets["REST c16 requests/s, defaults / before"]
    expected = summary["defaults"]["c16_requests_per_second"]["median"] / summary["before"]["c16_requests_per_second"]["median"]
    assert ratio["measured"] == pytest.approx(expected, abs=1e-3)
    assert ratio["pass"] == (ratio["measured"] >= 1.35)
    over = targets["REST c1 p50 above the serving path's in-process batch 1"]
    assert over["measured"] == pytest.approx(
        summary["defaults"]["c1_p50_ms"]["median"] - result["floor"]["batch_1"]["median_ms"], abs=1e-3
    )
    assert over["pass"] == (over["measured"] <= 0.3)
    out = (tmp_path / "rest_server.json").read_text()
    assert "MNIST_REST_WORKER_CLASS" in out  # the baseline's settings are recorded with the figures


def test_a_variant_must_name_rest_settings() -> None:
    parser = rest_server.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "x=THREADS=2"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "before=MNIST_REST_THREADS=2"])
    args = parser.parse_args(["--variant", "t8=MNIST_REST_THREADS=8,MNIST_REST_BATCHING=off"])
    assert args.variant == [("t8", {"MNIST_REST_THREADS": "8", "MNIST_REST_BATCHING": "off"})]
