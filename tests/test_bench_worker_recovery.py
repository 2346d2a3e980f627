"""bench.worker_recovery end to end on the fixture model: one round, short; it checks what the bench reports,
not how fast anything recovers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import worker_recovery

pytestmark = pytest.mark.slow


def test_one_round_reports_each_figure_with_its_spread(model_repo: Path, tmp_path: Path) -> None:
    result = worker_recovery.main(["--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--rounds", "1",
                                   "--threads", "2"])
    assert json.loads((tmp_path / "worker_recovery.json").read_text()) == result
    (round_,) = result["rounds"]
    assert round_["failed"] <= 1  # a sync worker holds one request when it is killed
    assert 0 < round_["first_success_s"] <= round_["all_workers_s"]
    for name in worker_recovery.FIGURES:
        summary = result["summary"][name]
        assert summary["median"] == summary["min"] == summary["max"] == round_[name] and summary["spread"] == 0


def test_one_worker_cannot_survive_a_kill(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        worker_recovery.main(["--workers", "1"])
    assert exited.value.code == 2
    assert "--workers >= 2 (one must survive the kill)" in capsys.readouterr().err
