"""Helpers for tests of the PyTorch REST server under gunicorn (no tests here).

The server is started by the project's one launcher (``stack.servers.running_server``) with gunicorn
alone on a free port (no nginx in front), so that tests see gunicorn's own behaviour: its workers,
its access log, its TLS, its answer to SIGTERM.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import psutil
import requests
import torch
from prometheus_client.parser import text_string_to_metric_families

from mnist_client import contract
from stack.config import free_port_config
from stack.servers import Server, running_server
from training.model_torch import predict_numpy

PREDICT = f"/v1/models/{contract.MODEL_NAME}:predict"

# What the tests' gunicorn runs with unless a test says otherwise: two workers (metrics merged over
# workers, a worker killed while the other answers), fast model polling (version swaps), the CPU.
TEST_SETTINGS = {
    "MNIST_REST_WORKERS": "2",
    "MNIST_REST_POLL_SECONDS": "0.2",
    "MNIST_REST_DEVICE": "cpu",
}


class Gunicorn:
    """A running gunicorn (a ``stack.servers.Server``) with what tests ask of it: its URL and port, its
    log, its workers."""

    def __init__(self, server: Server) -> None:
        assert server.rest_url is not None
        self.server = server
        self.url = server.rest_url
        self.port = int(urlsplit(server.rest_url).port or 0)
        self.log_path = server.log_path

    def send_signal(self, signum: int) -> None:
        self.server.send_signal(signum)

    def wait(self, timeout_s: float) -> int:
        return self.server.wait(timeout_s)

    def running(self) -> bool:
        return self.server.running()

    def worker_pids(self) -> set[int]:
        master = self.server.pid
        assert master is not None
        return {child.pid for child in psutil.Process(master).children()}

    def wait_all_workers_ready(self, workers: int, timeout: float = 120.0) -> None:
        """/readyz answers once one worker is up; wait until ``workers`` workers have loaded the model."""

        def loaded() -> set[int]:
            return {int(s.labels["pid"]) for s in scrape(self.url) if s.name == "mnist_rest_model_version" and s.value}

        wait_until(lambda: len(loaded()) == workers and loaded() == self.worker_pids(), timeout)

    def log(self, tail: int | None = 4000) -> str:
        """The server's output: its last ``tail`` characters (enough for a failure message), or all of it."""
        text = self.log_path.read_text(errors="replace")
        return text if tail is None else text[-tail:]


@contextlib.contextmanager
def gunicorn(
    base_path: Path, folder: Path, *, ca_file: Path | None = None, **settings: str
) -> Iterator[Gunicorn]:
    """gunicorn serving ``base_path`` on a free port, ready for the block and stopped after; its log and
    scratch files under ``folder``. ``settings``: MNIST_REST_* over ``TEST_SETTINGS``; with
    MNIST_REST_TLS_CERT/KEY it serves HTTPS, verified with ``ca_file`` (default: the certificate)."""
    config = free_port_config(base_path.parent, folder, ready_timeout_s=120)
    env = {**TEST_SETTINGS, "MNIST_REST_MODEL_BASE_PATH": str(base_path), **settings}
    with running_server(config, "torch", env=env, proxy=False, ca_file=ca_file) as server:
        yield Gunicorn(server)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.1)


def in_process(base: Path, version: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the exported TorchScript of ``version`` answers in this process: (probabilities, classes)."""
    module = torch.jit.load(str(base / str(version) / contract.TORCHSCRIPT_FILENAME), map_location="cpu").eval()
    return predict_numpy(module, images)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def scrape(url: str) -> list[Any]:
    """Every sample of the server's /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def predict(url: str, images: np.ndarray, timeout: float = 30.0) -> requests.Response:
    return requests.post(f"{url}{PREDICT}", json={"instances": images.tolist()}, timeout=timeout)
