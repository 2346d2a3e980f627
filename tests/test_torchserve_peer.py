"""TorchServe as the project's peer: the handler through a real TorchServe on free ports, and
bench.torchserve_peer end to end (short mode) and where its tools are missing.

The tests that start TorchServe skip, saying what to install, where Java or TorchServe is missing (the
bench also needs wrk); .ci/run installs them. They check answers and what the bench reports, never speed.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from bench import run_all, torchserve_peer
from bench.inprocess import load_torchscript
from bench.rest_server import PREDICT_PATH, json_body
from bench.torchserve.server import archive_model, missing_requirements, running_torchserve
from mnist_client import contract

JSON_HEADERS = {"Content-Type": "application/json"}


def skip_unless_installed(need_wrk: bool) -> None:
    missing = missing_requirements(need_wrk=need_wrk)
    if missing:
        pytest.skip("; ".join(missing))


def torch_base(model_repo: Path) -> Path:
    return model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME


def post(url: str, body: bytes) -> requests.Response:
    return requests.post(url, data=body, headers=JSON_HEADERS, timeout=60)


def answers(url: str, images: np.ndarray, concurrency: int = 1) -> list[dict]:
    """One single-image request per image (``concurrency`` at a time); the one prediction of each answer."""

    def one(image: np.ndarray) -> dict:
        response = post(url, json_body(image[np.newaxis]))
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        return prediction

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, images))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchserve_with_the_handler_answers_like_the_model_and_the_project_server(
    model_repo: Path, test_images, tmp_path: Path
) -> None:
    skip_unless_installed(need_wrk=False)
    images = np.ascontiguousarray(test_images[0][:24])
    predict, version_dir = load_torchscript(torch_base(model_repo))
    want_probabilities, want_classes = predict(images)
    archive = archive_model(version_dir, tmp_path / "store")
    raw_pixels = json.dumps({"instances": [[[255] * 28] * 28]}).encode()
    bad_bodies = [b'{"instances": [[1, 2]]}', b'{"instances": [[[0.5', raw_pixels]

    with (
        running_torchserve(tmp_path / "torchserve", tmp_path / "store", {contract.MODEL_NAME: archive.name}) as ts,
        torchserve_peer.project_rest_server(model_repo, tmp_path / "project") as project,
    ):
        # TorchServe's own batching: up to 4 requests per forward pass, formed from 8 concurrent callers.
        ts.register("mnist_batched", archive.name, workers=1, batch_size=4, max_batch_delay_ms=50)
        launcher = psutil.Process(ts.pid)
        tree = launcher.children(recursive=True)
        assert any("java" in p.name() for p in tree)

        from_torchserve = answers(f"{ts.inference_url}/predictions/{contract.MODEL_NAME}", images)
        from_batched = answers(f"{ts.inference_url}/predictions/mnist_batched", images, concurrency=8)
        from_project = answers(f"{project.url}{PREDICT_PATH}", images)
        # The same JSON body, refused with the same status and message by both servers.
        ts_predict = f"{ts.inference_url}/predictions/{contract.MODEL_NAME}"
        project_predict = f"{project.url}{PREDICT_PATH}"
        refusals = [(post(ts_predict, body), post(project_predict, body)) for body in bad_bodies]

    for label, got in (("torchserve", from_torchserve), ("batched", from_batched), ("project", from_project)):
        assert [p[contract.CLASSES_NAME] for p in got] == want_classes.tolist(), label
        np.testing.assert_allclose(
            [p[contract.PROBABILITIES_NAME] for p in got], want_probabilities, atol=1e-5, err_msg=label
        )
    assert [p[contract.CLASSES_NAME] for p in from_torchserve] == [p[contract.CLASSES_NAME] for p in from_project]
    for from_ts, from_mine in refusals:
        assert from_ts.status_code == from_mine.status_code == 400
        assert from_ts.json() == from_mine.json() and "error" in from_ts.json()
    # Stopped with its whole tree: the launcher, the Java frontend and every Python worker.
    assert not [p.pid for p in (launcher, *tree) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_short_mode_runs_end_to_end_and_writes_its_json(model_repo: Path, tmp_path: Path) -> None:
    skip_unless_installed(need_wrk=True)
    result = torchserve_peer.main(["--models-dir", str(model_repo), "--output-dir", str(tmp_path), "--short"])
    assert json.loads((tmp_path / "torchserve_peer.json").read_text()) == json.loads(json.dumps(result))

    servers = result["servers"]
    assert set(servers) == {"project_rest", "torchserve_default", "torchserve_best"}
    assert servers["torchserve_default"]["batch_size"] == 1  # TorchServe's default: no batching
    sweep = result["sweep"]
    assert [(p["batch_size"], p["max_batch_delay_ms"]) for p in sweep["points"]] == [(4, 2), (8, 2)]
    fastest = max(sweep["points"], key=lambda p: p["c16"]["requests_per_second"])
    assert sweep["chosen"]["model_name"] == fastest["model_name"]
    assert servers["torchserve_best"]["batch_size"] == fastest["batch_size"]
    summary = result["summary"]
    rps_ratio = summary["project_rest"]["c16_requests_per_second"]["median"] / summary["torchserve_best"][
        "c16_requests_per_second"]["median"]  # fmt: skip
    (rps_target, p50_target) = result["targets"]
    assert rps_target["measured"] == pytest.approx(rps_ratio, abs=1e-3) and rps_target["pass"] == (rps_ratio >= 1.5)
    assert p50_target["better"] == "lower" and p50_target["limit"] == 0.5
    assert all(p["workers"] == result["machine"]["cpus"] for p in sweep["points"])

    assert len(result["rounds"]) == 3
    for measured in result["rounds"]:
        assert list(measured) == ["project_rest", "torchserve_default", "torchserve_best"]  # interleaved A B C
        for runs in measured.values():
            for run in runs.values():
                assert run["errors"] == 0 and run["requests"] > 0
    for label, figures in result["summary"].items():
        p50 = figures["c1_p50_ms"]
        assert p50["values"] == [r[label]["c1"]["p50_ms"] for r in result["rounds"]]
        assert p50["min"] <= p50["median"] <= p50["max"]
    for peer, ratio in result["ratios_project_over"].items():
        rps = result["summary"]["project_rest"]["c16_requests_per_second"]["median"]
        assert ratio["c16_requests_per_second"] == pytest.approx(
            rps / result["summary"][peer]["c16_requests_per_second"]["median"], rel=1e-2
        )


def test_bench_skips_saying_what_to_install_where_java_and_wrk_are_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    result = torchserve_peer.main(["--models-dir", str(tmp_path), "--output-dir", str(tmp_path)])
    skipped = " ".join(result["skipped"])
    assert "apt-get install -y openjdk-17-jre-headless" in skipped and "apt-get install -y wrk" in skipped
    assert json.loads((tmp_path / "torchserve_peer.json").read_text()) == result


def test_make_bench_records_the_peer_as_skipped_and_succeeds_without_its_tools(
    model_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    summary = run_all.main(
        ["--only", "torchserve_peer", "--models-dir", str(model_repo), "--output-dir", str(tmp_path)]
    )
    assert summary["benchmarks"]["torchserve_peer"]["status"] == "skipped"
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_bench_refuses_fewer_than_three_rounds(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        torchserve_peer.main(["--rounds", "2"])
    assert exited.value.code == 2
    assert "at least 3" in capsys.readouterr().err
