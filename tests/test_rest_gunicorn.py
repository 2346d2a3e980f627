"""The PyTorch REST server as deployed: gunicorn with serving/torch_server/gunicorn_conf.py on a free port.

Predictions against the in-process model, concurrent requests sharing forward passes in a gevent
worker (the CPU default), metrics merged over two workers, a
version swap and a broken version under concurrent requests with zero failures,
graceful SIGTERM with requests in flight, a killed worker replaced, HTTPS with a
bearer token.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from bench.rest_server import forward_passes
from mnist_client import contract
from serving.model_repository import publish_version
from stack.processes import StackError
from tests.rest_helpers import PREDICT, Gunicorn, gunicorn, in_process, npy, predict, scrape, wait_until

# e.g. 127.0.0.1 [29/Nov/2026:21:30:58 +0000] "POST /v1/models/mnist:predict HTTP/1.1" 200 303 2ms pid=<14903> "..."
ACCESS_LINE = re.compile(r'"POST /v1/models/mnist:predict HTTP/1\.1" 200 \d+ \d+ms pid=<(?P<pid>\d+)>')

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("rest-gunicorn") / "mnist"
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    return base


@pytest.fixture(scope="module")
def server(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with gunicorn(base, tmp_path_factory.mktemp("rest-gunicorn-run"), MNIST_REST_MAX_BODY_BYTES="1048576") as server:
        server.wait_all_workers_ready(2)
        yield server


@pytest.fixture(scope="module")
def images(test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_images[0][:64]


def publish_copy(base: Path, version: int) -> None:
    with publish_version(base, version) as (staging, _):
        shutil.copy(base / "1" / contract.TORCHSCRIPT_FILENAME, staging)


def test_predictions_equal_the_in_process_model(server, base, images, mnist_test):
    probabilities, classes = in_process(base, 1, images)
    row = predict(server.url, images)
    assert row.status_code == 200, row.text
    assert [p["classes"] for p in row.json()["predictions"]] == classes.tolist()
    np.testing.assert_allclose([p["probabilities"] for p in row.json()["predictions"]], probabilities, atol=1e-6)
    binary = requests.post(
        f"{server.url}{PREDICT}", data=npy(mnist_test.images[:64]), headers={"Content-Type": "application/x-npy"}
    )
    assert binary.status_code == 200, binary.text
    assert binary.json()["outputs"]["classes"] == classes.tolist()
    np.testing.assert_allclose(binary.json()["outputs"]["probabilities"], probabilities, atol=1e-6)


def test_concurrent_requests_share_forward_passes_in_a_gevent_worker(base, tmp_path, images):
    # One worker of the CPU default class. Bursts of 16 concurrent single-image requests, until one burst
    # ran in fewer than 16 passes: the request that ran a pass first let the event loop take in the
    # others already received (MicroBatcher.gather). Every answer is the in-process model's.
    probabilities, classes = in_process(base, 1, images[:16])
    with gunicorn(base, tmp_path, MNIST_REST_WORKERS="1") as server, ThreadPoolExecutor(16) as pool:
        assert "Using worker: gevent" in server.log(None)
        deadline = time.monotonic() + 60
        while True:
            images_before, passes_before = forward_passes(server.url)
            responses = list(pool.map(lambda i: predict(server.url, images[i : i + 1]), range(16)))
            for index, response in enumerate(responses):
                assert response.status_code == 200, response.text
                (answer,) = response.json()["predictions"]
                assert answer["classes"] == classes[index]
                np.testing.assert_allclose(answer["probabilities"], probabilities[index], atol=1e-6)
            images_after, passes_after = forward_passes(server.url)
            assert images_after - images_before == 16  # every image in exactly one pass
            if passes_after - passes_before < 16:
                break
            assert time.monotonic() < deadline, "60 s of concurrent bursts and no pass ever held two requests"


def test_metrics_are_merged_over_both_workers(server, images):
    before = sum(
        s.value
        for s in scrape(server.url)
        if s.name == "mnist_rest_requests_total" and s.labels["endpoint"] == "predict" and s.labels["status"] == "200"
    )
    sent = 40
    with ThreadPoolExecutor(4) as pool:  # a new connection per request: both workers get some
        responses = list(pool.map(lambda i: predict(server.url, images[i % 8 : i % 8 + 1]), range(sent)))
    assert all(r.status_code == 200 for r in responses)
    samples = scrape(server.url)
    after = sum(
        s.value
        for s in samples
        if s.name == "mnist_rest_requests_total" and s.labels["endpoint"] == "predict" and s.labels["status"] == "200"
    )
    assert after - before == sent
    versions = {int(s.labels["pid"]): s.value for s in samples if s.name == "mnist_rest_model_version"}
    assert set(versions) == server.worker_pids() and len(versions) == 2
    assert set(versions.values()) == {1.0}
    # The access log shows each request's latency and which worker answered it.
    access = [ACCESS_LINE.search(line) for line in server.log().splitlines()]
    answered_by = {int(match["pid"]) for match in access if match}
    assert answered_by == set(versions), "expected both workers to answer some requests"


def test_chunked_body_above_the_limit_is_413(server):
    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(1100):
            yield b" " * 1024
        yield b"]}"

    response = requests.post(f"{server.url}{PREDICT}", data=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def hammer(
    url: str, images: np.ndarray, stop: threading.Event, threads: int = 4
) -> tuple[Counter[str], list[str], list[threading.Thread]]:
    """Send single-image predicts from ``threads`` threads until ``stop``; count versions and failures."""
    versions: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def loop(offset: int) -> None:
        index = offset
        deadline = time.monotonic() + 60  # bounded even if stop is never set
        while not stop.is_set() and time.monotonic() < deadline:
            index = (index + 1) % len(images)
            try:
                response = predict(url, images[index : index + 1], timeout=10)
                with lock:
                    if response.status_code == 200:
                        versions[response.headers["X-Model-Version"]] += 1
                    else:
                        failures.append(f"{response.status_code} {response.text[:200]}")
            except requests.RequestException as exc:
                with lock:
                    failures.append(repr(exc))

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    return versions, failures, workers


def test_version_swap_and_broken_version_under_load_fail_no_request(server, base, images):
    stop = threading.Event()
    versions, failures, workers = hammer(server.url, images, stop)
    try:
        wait_until(lambda: sum(versions.values()) >= 20)
        publish_copy(base, 2)

        def all_workers_serve_2() -> bool:
            samples = scrape(server.url)
            return {s.value for s in samples if s.name == "mnist_rest_model_version"} == {2.0}

        wait_until(all_workers_serve_2)
        served_before_broken = versions["2"]
        with publish_version(base, 3) as (staging, _):
            (staging / contract.TORCHSCRIPT_FILENAME).write_bytes(b"\x00 truncated archive")

        def refusals() -> float:  # each worker polls on its own: wait until both have refused it
            return sum(
                s.value
                for s in scrape(server.url)
                if s.name == "mnist_rest_model_events_total" and s.labels["event"] == "refused"
            )

        wait_until(lambda: refusals() == 2)
        wait_until(lambda: versions["2"] >= served_before_broken + 20)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert failures == []
    assert versions["1"] > 0 and versions["2"] > 0 and "3" not in versions
    by_version = {s["version"]: s for s in status(server.url)}
    assert by_version["2"]["state"] == "AVAILABLE" and by_version["1"]["state"] == "END"
    assert by_version["3"]["state"] == "END" and by_version["3"]["status"]["error_message"]
    assert predict(server.url, images[:1]).headers["X-Model-Version"] == "2"


def status(url: str) -> list[dict[str, Any]]:
    return requests.get(f"{url}/v1/models/mnist", timeout=10).json()["model_version_status"]


def test_sigterm_finishes_requests_in_flight(base, tmp_path, mnist_test):
    with gunicorn(base, tmp_path, MNIST_REST_WORKERS="3", MNIST_REST_ACCESS_LOG="off") as server:
        server.wait_all_workers_ready(3)
        big = npy(np.tile(mnist_test.images[:64], (16, 1, 1)))  # 1024 images: a long forward pass on a CPU
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(
                    requests.post,
                    f"{server.url}{PREDICT}",
                    data=big,
                    headers={"Content-Type": "application/x-npy"},
                    timeout=120,
                )
                for _ in range(2)
            ]

            def both_in_flight() -> bool:  # the scrape itself is the third request in flight
                samples = scrape(server.url)
                return any(s.name == "mnist_rest_in_flight_requests" and s.value >= 3 for s in samples)

            wait_until(both_in_flight, timeout=60)
            server.send_signal(signal.SIGTERM)
            responses = [future.result() for future in futures]
        assert [r.status_code for r in responses] == [200, 200]
        assert all(len(r.json()["outputs"]["classes"]) == 1024 for r in responses)
        assert server.wait(60) == 0


def test_a_killed_worker_is_replaced(server, images):
    victim = min(server.worker_pids())
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(server.worker_pids()) == 2 and victim not in server.worker_pids(), timeout=60)

    def live_workers() -> set[int]:  # workers with a model loaded, from their gauges
        return {int(s.labels["pid"]) for s in scrape(server.url) if s.name == "mnist_rest_model_version"}

    # The dead worker's gauge goes at once (child_exit); the replacement's appears once it has loaded.
    assert victim not in live_workers()
    wait_until(lambda: live_workers() == server.worker_pids(), timeout=90)
    assert all(predict(server.url, images[:1]).status_code == 200 for _ in range(6))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "key.pem", "-out", "cert.pem", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        cwd=folder, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return {"cert": folder / "cert.pem", "key": folder / "key.pem"}


def test_https_with_bearer_token(base, tmp_path, tls_files, images):
    verify = str(tls_files["cert"])
    with gunicorn(
        base,
        tmp_path,
        MNIST_REST_WORKERS="1",
        MNIST_REST_TLS_CERT=verify,
        MNIST_REST_TLS_KEY=str(tls_files["key"]),
        MNIST_REST_AUTH_TOKEN="tls-test-token",
    ) as server:  # ready: its /readyz answered over HTTPS, open without the token
        assert server.url.startswith("https://")
        body = {"instances": images[:2].tolist()}
        denied = requests.post(f"{server.url}{PREDICT}", json=body, verify=verify, timeout=10)
        assert denied.status_code == 401 and denied.headers["WWW-Authenticate"].startswith("Bearer")
        allowed = requests.post(
            f"{server.url}{PREDICT}",
            json=body,
            headers={"Authorization": "Bearer tls-test-token"},
            verify=verify,
            timeout=10,
        )
        assert allowed.status_code == 200 and len(allowed.json()["predictions"]) == 2
        with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port
            requests.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0


def test_bad_settings_stop_the_server_at_start_with_a_clear_message(base, tmp_path):
    with pytest.raises(StackError, match="exited with status [1-9]") as caught:
        with gunicorn(base, tmp_path, MNIST_REST_MAX_BATCH="many"):
            pass
    assert "MNIST_REST_MAX_BATCH='many': expected an integer" in str(caught.value)
