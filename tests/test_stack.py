"""The local stack end to end: both servers as real processes on free ports, the client package,
a short load test, the demo's report, and the clear errors of `make serve` / `make demo`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mnist_client.cpus import usable_cpus
from mnist_client.grpc_client import GrpcClient
from mnist_client.loadtest import LoadTestConfig, parse_target, run
from mnist_client.rest import RestClient
from serving.model_repository import latest_version
from stack.config import REPO_ROOT, StackConfig
from stack.demo import train_missing
from stack.processes import StackError, ensure_port_free, stop_process
from stack.servers import running_stack
from tests.local_stack import free_port_config


def _config(models: Path, tmp_path: Path) -> StackConfig:
    return free_port_config(models, tmp_path)


def _env(config: StackConfig) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "MNIST_REST_PORT": str(config.rest_port),
        "MNIST_GRPC_PORT": str(config.grpc_port),
        "MNIST_MODELS_DIR": str(config.models_dir),
        "MNIST_LOG_DIR": str(config.log_dir),
        "MNIST_REPORT_DIR": str(config.report_dir),
        "MNIST_READY_TIMEOUT": str(config.ready_timeout_s),
        "MNIST_WEB_PORT": str(config.web_port),
        "MNIST_TFS_REST_PORT": str(config.tfs_rest_port),
    }


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_running_stack_serves_both_frameworks_and_stops_cleanly(model_repo, mnist_test, tmp_path):
    config = _config(model_repo, tmp_path)
    images, labels = mnist_test.images[:200], mnist_test.labels[:200]
    with running_stack(config) as stack:
        with RestClient(config.rest_url) as rest, GrpcClient(config.grpc_target) as grpc:
            by_rest, by_grpc = rest.predict(images), grpc.predict(images)
        assert np.mean(by_rest.classes == labels) > 0.8
        assert np.mean(by_grpc.classes == labels) > 0.8
        report = run(
            LoadTestConfig(
                targets=(
                    parse_target(f"rest={config.rest_url}", "rest"),
                    parse_target(f"grpc={config.grpc_target}", "grpc"),
                ),
                concurrency=(2,),
                requests=100,
                warmup_requests=5,
            )
        )
        for target in ("rest", "grpc"):
            measured = report.measurement(target, 2)
            assert measured.requests == 100 and not measured.errors
            assert report.accuracy(target) > 0.8
        procs = (stack.rest, stack.grpc)
    assert all(not p.running() for p in procs)
    assert not _port_open(config.rest_port) and not _port_open(config.grpc_port)


@pytest.mark.timeout(1200)  # trains nothing, but fits, measures three paths at two thread counts and serves
def test_demo_writes_reports_with_three_targets_rounds_inprocess_and_power_fit(model_repo, tmp_path):
    config = _config(model_repo, tmp_path)
    cmd = [sys.executable, "-m", "stack.demo", "--duration", "0.5", "--concurrency", "1,2", "--repeats", "2"]
    result = subprocess.run(cmd, env=_env(config), cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((config.report_dir / "demo.json").read_text())
    # Three targets, each named for what answered: the stand-in is never called TF Serving.
    targets = ["torch-rest", "tf-standin-rest", "tf-standin-grpc"]
    assert [(m["target"], m["point"]) for m in data["results"]] == [(t, p) for p in (1.0, 2.0) for t in targets]
    assert not any("tfserving" in m["target"] or "tf-serving" in m["target"] for m in data["results"])
    for m in data["results"]:
        assert len(m["rounds"]) == 2 and m["errors"] == 0 and m["accuracy"] > 0.8
        assert set(m["round_stats"]) == {"p50_ms", "p99_ms", "throughput_rps"}
        # Each round says who used the CPU; the server's share is known because the demo passed its pid.
        assert all(r["cpu"]["server"] is not None for r in m["rounds"])
    assert [row["point"] for row in data["framework_and_protocol"]] == [1.0, 2.0]
    frameworks = {row["framework"]: row for row in data["training_comparison"]}
    assert set(frameworks) == {"pytorch", "tensorflow"}
    assert all(row["test_accuracy"] > 0.8 and row["size_mb"] > 0 for row in frameworks.values())
    # In process: both frameworks at one thread and at every usable core, on their servers' paths.
    inprocess = data["inprocess"]
    assert set(inprocess["results"]) == {f"threads_{n}" for n in {1, usable_cpus()}}
    for measured in inprocess["results"].values():
        assert measured["pytorch"]["accuracy"] > 0.8 and measured["tensorflow"]["accuracy"] > 0.8
        assert measured["tflite"]["agreement_with_saved_model"] >= 0.999
    assert "LoadedModel.predict" in inprocess["paths"]["pytorch"]
    assert "Session" in inprocess["paths"]["tensorflow"]
    fits = {fit["framework"]: fit for fit in data["power_fit"]["fits"]}
    assert set(fits) == {"pytorch", "tensorflow"}
    assert all(abs(fit["exponent"] - data["power_fit"]["config"]["exponent"]) < 0.05 for fit in fits.values())
    page = (config.report_dir / "demo.html").read_text()
    for heading in ("power function", "In-process inference", "what answered", "Training"):
        assert heading in page
    assert "not TensorFlow Serving" in page and "not TensorFlow Serving" in result.stdout
    assert "framework (REST against REST)" in result.stdout and "protocol (same server)" in result.stdout
    assert (config.report_dir / "demo.csv").read_text().count("\n") == 7  # header + 3 targets x 2 points
    for port in (config.rest_port, config.grpc_port, config.tfs_rest_port):
        assert not _port_open(port)


def test_demo_trains_both_missing_models_at_once_with_prefixed_progress(tmp_path, capfd):
    config = _config(tmp_path / "models", tmp_path)
    train_args = ["--quick", "--log-dir", str(tmp_path / "runs")]
    train_missing(config, train_args)

    assert latest_version(config.torch_base_path) == 1 and latest_version(config.tf_base_path) == 1
    lines = capfd.readouterr().out.splitlines()
    torch_lines = [line for line in lines if line.startswith("[pytorch] ")]
    tf_lines = [line for line in lines if line.startswith("[tensorflow] ")]
    # Both ran, each pinned to half of the cores (at least one thread).
    threads = max(1, usable_cpus() // 2)
    assert any(f"{threads} threads" in line for line in torch_lines), torch_lines[-5:]
    assert any(f"CPU threads {threads}" in line for line in tf_lines), tf_lines[-5:]
    assert any("done in" in line for line in torch_lines) and any("summary:" in line for line in tf_lines)

    # Exported models are reused, not trained again.
    train_missing(config, train_args)
    assert latest_version(config.torch_base_path) == 1 and latest_version(config.tf_base_path) == 1


def test_demo_training_failure_names_each_failed_framework(tmp_path):
    config = _config(tmp_path / "models", tmp_path)
    with pytest.raises(StackError) as info:
        train_missing(config, ["--quick", "--data-dir", str(tmp_path / "no-mnist-here")])
    message = str(info.value)
    assert "pytorch training exited with status" in message and "tensorflow training exited with status" in message
    assert latest_version(config.torch_base_path) is None and latest_version(config.tf_base_path) is None


def test_sigterm_during_demo_training_stops_both_trainers(tmp_path):
    import psutil

    config = _config(tmp_path / "models", tmp_path)
    cmd = [sys.executable, "-m", "stack.demo", "--train-args", f"--log-dir {tmp_path / 'runs'}"]
    proc = subprocess.Popen(cmd, env=_env(config), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        trainers: list[psutil.Process] = []
        deadline = time.monotonic() + 120
        while len(trainers) < 2:  # both trainers started (full training: they would run for minutes)
            assert proc.poll() is None and time.monotonic() < deadline, "the demo did not start both trainers"
            trainers = psutil.Process(proc.pid).children()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output
    gone, alive = psutil.wait_procs(trainers, timeout=10)
    assert not alive, f"trainers left running: {alive}"
    assert latest_version(config.torch_base_path) is None and latest_version(config.tf_base_path) is None


def test_serve_runs_until_sigterm(model_repo, tmp_path):
    config = _config(model_repo, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stack.serve"], env=_env(config), cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        with RestClient(config.rest_url, timeout=2) as rest, GrpcClient(config.grpc_target, timeout=2) as grpc:
            while not (rest.ready() and grpc.ready()):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "make serve did not become ready"
                time.sleep(0.5)
            assert rest.predict(np.zeros((28, 28), np.uint8)).classes.shape == (1,)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "both servers and the web page stopped" in output
    assert not _port_open(config.rest_port) and not _port_open(config.grpc_port)


def test_serve_explains_an_empty_models_folder(tmp_path):
    config = _config(tmp_path / "no-models", tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "stack.serve"], env=_env(config), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no exported model" in result.stderr and "make train" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_port_is_named(model_repo, tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} .* already in use.*PyTorch REST server"):
            ensure_port_free("127.0.0.1", port, "PyTorch REST server")
        config = _config(model_repo, tmp_path)
        config = StackConfig(**{**config.__dict__, "rest_port": port})
        with pytest.raises(StackError, match="already in use"):
            with running_stack(config):
                pass


def test_a_server_that_never_gets_ready_reports_its_log(model_repo, tmp_path):
    # A models folder whose TF version is not a SavedModel: the stand-in never becomes ready.
    broken = tmp_path / "models"
    (broken / "tf" / "mnist" / "1").mkdir(parents=True)
    (broken / "tf" / "mnist" / "1" / "saved_model.pb").write_bytes(b"not a saved model")
    os.symlink(model_repo / "torch", broken / "torch")
    config = StackConfig(**{**_config(broken, tmp_path).__dict__, "ready_timeout_s": 60})
    with pytest.raises(StackError, match=r"TF Serving stand-in .*(did not become ready|exited)") as info:
        with running_stack(config):
            pass
    assert "last lines of" in str(info.value)


def test_bad_port_variable_is_explained(monkeypatch):
    monkeypatch.setenv("MNIST_REST_PORT", "eighty")
    with pytest.raises(ValueError, match="MNIST_REST_PORT='eighty': expected an integer"):
        StackConfig.from_env()


def _child(code: str, **popen: object) -> tuple[subprocess.Popen[bytes], bytes]:
    """A Python child that prints ``ready ...`` once its signal handlers are set; returns it and that line."""
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, **popen)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith(b"ready"), line
    return process, line


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie may linger where pid 1 does not reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_stop_process_terminates_then_kills_only_what_ignores_sigterm():
    polite, _ = _child("import time; print('ready', flush=True); time.sleep(60)")
    assert stop_process(polite, grace_s=10) == -signal.SIGTERM

    stubborn, _ = _child(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    assert stop_process(stubborn, grace_s=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 10

    assert stop_process(stubborn) == -signal.SIGKILL  # already gone: just its status again, no signal


def test_stop_process_group_reaches_grandchildren():
    # A child in its own session with a grandchild, as gunicorn's master has workers.
    parent, line = _child(
        "import subprocess, sys;"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print('ready', g.pid, flush=True); g.wait()",
        start_new_session=True,
    )
    grandchild = int(line.split()[1])
    assert _alive(grandchild)
    stop_process(parent, grace_s=10, group=True)
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
