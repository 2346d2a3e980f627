"""Faults under steady load: SIGTERM to either server, a gunicorn worker SIGKILLed.

Gaps these fill next to the existing tests (which they do not repeat):

- tests/test_rest_gunicorn.py sends SIGTERM with two requests in flight and kills a worker with no
  traffic; here SIGTERM and SIGKILL land under continuous traffic from several client threads, and the
  errors are counted (logged as ``FIGURES ...`` lines; run with ``-o log_cli=true --log-cli-level=INFO``
  to see them). How fast a killed worker's traffic and replacement come back is measured by
  ``python -m bench.worker_recovery``, not asserted here.
- tests/test_standin_server.py sends SIGTERM with a call seen waiting in a batch; here the stand-in process
  gets it under continuous calls from eight threads.
- A new version and a corrupt one published under load, with zero failed requests, are already tested
  for both servers: tests/test_rest_gunicorn.py::test_version_swap_and_broken_version_under_load_fail_no_request
  and tests/test_standin_versions.py (the same ``Load``, four threads).

"Accepted" is judged by the server: gunicorn's access log lists every request a worker took. A request
still waiting in the kernel's listen backlog when the workers stop is reset at the connection level
without having run (safe to retry); a stopping gRPC server answers UNAVAILABLE to calls it will not run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from call_load import Load
from mnist_client import contract
from tests.rest_helpers import PREDICT, Gunicorn, gunicorn, scrape
from tests.standin_helpers import Stubs, standin_process, tf_base_path, wait_for

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

CLIENT_THREADS = 4
ACCESS_200 = re.compile(r'"POST /v1/models/mnist:predict HTTP/1\.1" 200 ')
ACCESS_OTHER = re.compile(r'"POST /v1/models/mnist:predict HTTP/1\.1" (?!200 )\d{3} ')


def rest_call(url: str, body: dict) -> Callable[[], str]:
    def call() -> str:
        try:
            response = requests.post(f"{url}{PREDICT}", json=body, timeout=20)
        except requests.Timeout:
            return "timeout"
        except requests.exceptions.ChunkedEncodingError:
            return "cut"  # the answer had started when the connection broke: a request that ran and was lost
        except requests.ConnectionError as exc:
            return "refused" if "refused" in str(exc).lower() else "reset"
        return "ok" if response.status_code == 200 else str(response.status_code)

    return call


@pytest.fixture(scope="module")
def torch_base(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("faults-rest") / contract.MODEL_NAME
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    return base


@pytest.fixture(scope="module")
def body(test_images: tuple[np.ndarray, np.ndarray]) -> dict:
    return {"instances": test_images[0][:4].tolist()}


@pytest.fixture(name="gunicorn")
def gunicorn_server(torch_base: Path, tmp_path: Path) -> Iterator[Gunicorn]:
    with gunicorn(torch_base, tmp_path) as server:
        yield server


def test_sigterm_to_gunicorn_under_load_loses_no_accepted_request(gunicorn: Gunicorn, body: dict) -> None:
    with Load(rest_call(gunicorn.url, body), threads=CLIENT_THREADS) as load:
        wait_for(lambda: load.count() >= 40, what="40 answered requests before the signal")
        signalled = time.monotonic()
        gunicorn.send_signal(signal.SIGTERM)
        exit_code = gunicorn.wait(60)
        exited = time.monotonic()
        wait_for(lambda: load.count(None, after=exited) >= CLIENT_THREADS, what="calls to meet the closed port")
    server_log = gunicorn.log_path.read_text(errors="replace")
    answered = load.count()
    dropped = [o for o in load.outcomes if o.result in ("reset", "timeout")]
    log.info("FIGURES gunicorn SIGTERM under %d threads: %d answered 200, %d logged 200 by the workers, "
             "%d reset in the backlog, %d refused after the port closed", CLIENT_THREADS, answered,
             len(ACCESS_200.findall(server_log)), len(dropped), load.count("refused"))
    assert exit_code == 0, server_log[-3000:]
    assert {o.result for o in load.outcomes} <= {"ok", "refused", "reset"}
    assert not ACCESS_OTHER.search(server_log), "a worker answered a predict with an error"
    # Every request a worker accepted was answered, and the client got that answer.
    assert len(ACCESS_200.findall(server_log)) == answered
    assert any(o.started < signalled < o.ended and o.result == "ok" for o in load.outcomes), \
        "no request was in flight at the signal; the test proved nothing"
    # Only requests queued in the backlog (never run) can be reset: at most one per client thread.
    assert len(dropped) <= CLIENT_THREADS and all(o.ended >= signalled for o in dropped)


_WORKER_SETTINGS = {
    "gevent": {},  # the CPU default: greenlets on one event loop, micro-batching
    "gthread": {"MNIST_REST_THREADS": "8"},  # request threads, micro-batching
    "sync": {"MNIST_REST_THREADS": "1"},  # one request at a time
}


@pytest.fixture(name="workers_of_a_kind", params=list(_WORKER_SETTINGS))
def workers_of_a_kind_server(request: pytest.FixtureRequest, torch_base: Path, tmp_path: Path) -> Iterator[Gunicorn]:
    """Two workers of each class gunicorn_conf.py allows."""
    settings = _WORKER_SETTINGS[request.param]
    with gunicorn(torch_base, tmp_path, **settings) as server:
        server.kind = request.param  # type: ignore[attr-defined]
        yield server


def test_killed_worker_under_load_is_replaced_with_bounded_errors(workers_of_a_kind: Gunicorn, body: dict) -> None:
    gunicorn = workers_of_a_kind

    def live_workers() -> set[int]:  # workers with a model loaded, from their gauges
        return {int(s.labels["pid"]) for s in scrape(gunicorn.url) if s.name == "mnist_rest_model_version"}

    pids = gunicorn.worker_pids()
    assert len(pids) == 2
    wait_for(lambda: live_workers() == pids, timeout=60, what="both workers to load the model")
    with Load(rest_call(gunicorn.url, body), threads=CLIENT_THREADS) as load:
        wait_for(lambda: load.count() >= 40, what="40 answered requests before the kill")
        victim = min(pids)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: load.count(after=killed) >= 1, timeout=30, what="a success after the kill")
        first_success = min(o.ended for o in load.outcomes if o.result == "ok" and o.started >= killed) - killed

        def replaced() -> bool:
            current = gunicorn.worker_pids()
            return len(current) == 2 and victim not in current and live_workers() == current

        wait_for(replaced, timeout=90, what="the replacement worker to load the model")
        all_workers = time.monotonic() - killed
        served_since = load.count()
        wait_for(lambda: load.count() >= served_since + 20, what="traffic after recovery")
    errors = [o for o in load.outcomes if o.result != "ok"]
    log.info("FIGURES gunicorn worker SIGKILL under %d threads: %d failed requests (%s), first success %.3f s "
             "after the kill, every worker answering again after %.2f s, %d requests answered in all",
             CLIENT_THREADS, len(errors), sorted({o.result for o in errors}), first_success, all_workers,
             load.count())
    # Only the requests the killed worker held can be lost: one for a sync worker; for a gevent or
    # gthread worker every request it held, at most one per client thread. How soon traffic and the replacement come
    # back is a figure (bench.worker_recovery), bounded here only by the waits' safety deadlines above.
    assert len(errors) <= (1 if gunicorn.kind == "sync" else CLIENT_THREADS), errors  # type: ignore[attr-defined]
    replacement = (gunicorn.worker_pids() - pids).pop()
    assert replacement in live_workers()


def test_sigterm_to_the_standin_under_load_loses_no_accepted_call(
    model_repo: Path, tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    base = tmp_path / contract.MODEL_NAME
    shutil.copytree(tf_base_path(model_repo) / "1", base / "1")
    batching = tmp_path / "batching.txt"  # calls wait up to 100 ms for company: always some in flight
    batching.write_text("max_batch_size { value: 64 }\nbatch_timeout_micros { value: 100000 }\n"
                        "num_batch_threads { value: 2 }\n")
    image = test_images[0][:1]

    def call() -> str:
        try:
            stubs.predict(image, timeout=20)
        except grpc.RpcError as exc:
            return exc.code().name
        return "ok"

    threads = 2 * CLIENT_THREADS
    with standin_process(base, tmp_path, "--enable_batching", f"--batching_parameters_file={batching}") as server:
        assert server.grpc_target is not None
        stubs = Stubs(server.grpc_target)
        try:
            with Load(call, threads=threads) as load:
                wait_for(lambda: load.count() >= 40, what="40 answered calls before the signal")
                signalled = time.monotonic()
                server.send_signal(signal.SIGTERM)
                exit_code = server.wait(60)
                exited = time.monotonic()
                wait_for(lambda: load.count(None, after=exited) >= threads, what="calls to meet the closed port")
        finally:
            stubs.close()
    output = server.log_path.read_text(errors="replace")
    in_flight_answered = sum(1 for o in load.outcomes if o.started < signalled < o.ended and o.result == "ok")
    refused_before = [o for o in load.outcomes if o.result != "ok" and o.started < signalled]
    log.info("FIGURES stand-in SIGTERM under %d threads: %d calls answered, %d of them in flight at the signal, "
             "%d started before the signal and refused UNAVAILABLE, outcomes %s", threads, load.count(),
             in_flight_answered, len(refused_before), sorted({o.result for o in load.outcomes}))
    assert exit_code == 0, output[-3000:]
    assert {o.result for o in load.outcomes} <= {"ok", "UNAVAILABLE"}, output[-3000:]
    assert in_flight_answered >= 1, "no call was in flight at the signal; the test proved nothing"
    # UNAVAILABLE from a stopping server means "not run": only a call racing the signal gets one.
    assert len(refused_before) <= threads
