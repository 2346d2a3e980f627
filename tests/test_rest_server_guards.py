"""The PyTorch REST server, as deployed (gunicorn, one worker), when things go wrong on its side or a
scanner walks its URL space:

- a model that raises inside ``forward`` is a 500 with ``{"error": ...}``, its traceback logged once, the
  request counted with status 500, and the same worker answers the next request;
- request metrics stay bounded: unknown paths and methods collapse into fixed labels, so requests to
  many random paths add no Prometheus series.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Dict  # noqa: UP035 - TorchScript reads the annotation

import numpy as np
import pytest
import requests
import torch

from mnist_client import contract
from tests.rest_helpers import PREDICT, Gunicorn, gunicorn, predict, scrape

pytestmark = pytest.mark.slow

FAILURE = "exploding test model: a white top-left pixel"
PYTHON_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.MULTILINE)
# The series a scan may touch: every endpoint label the server has, and the methods it names.
ENDPOINT_LABELS = {"predict", "status", "metadata", "healthz", "readyz", "metrics", "openapi", "other"}
METHOD_LABELS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
SCAN_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND", "PURGE", "BREW", "SEARCH")


class Exploding(torch.nn.Module):
    """The real model, except that an image whose top-left pixel is white makes ``forward`` raise.

    The server's load-time checks feed zeros and a ramp that starts at 0, so the version loads.
    """

    def __init__(self, model: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:  # noqa: UP006
        if bool(images[0, 0, 0] > 0.99):
            raise RuntimeError("exploding test model: a white top-left pixel")
        return self.model(images)


@pytest.fixture(scope="module")
def exploding_base(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("rest-guards") / contract.MODEL_NAME
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME / "1", base / "1")
    model_file = base / "1" / contract.TORCHSCRIPT_FILENAME
    scripted = torch.jit.script(Exploding(torch.jit.load(str(model_file), map_location="cpu").eval()))
    scripted.save(str(model_file))
    return base


@pytest.fixture(scope="module")
def server(exploding_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    with gunicorn(exploding_base, tmp_path_factory.mktemp("rest-guards-run"), MNIST_REST_WORKERS="1") as server:
        yield server


def requests_counted(url: str, **labels: str) -> float:
    return sum(s.value for s in scrape(url) if s.name == "mnist_rest_requests_total"
               and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_model_that_raises_is_a_500_logged_once_counted_and_the_worker_serves_on(
    server: Gunicorn, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    workers = server.worker_pids()
    failures_before = requests_counted(server.url, endpoint="predict", method="POST", status="500")
    white = np.ones((1, *contract.IMAGE_SHAPE), dtype=np.float32)

    failed = predict(server.url, white)
    assert failed.status_code == 500
    assert failed.headers["Content-Type"].startswith("application/json")
    assert set(failed.json()) == {"error"} and failed.json()["error"]
    assert FAILURE not in failed.text  # the details are for the log, not the caller

    images = test_images[0][:3]
    answered = predict(server.url, images)
    assert answered.status_code == 200, answered.text
    assert len(answered.json()["predictions"]) == 3
    assert server.worker_pids() == workers  # the same worker, not a replacement

    assert requests_counted(server.url, endpoint="predict", method="POST", status="500") == failures_before + 1
    log = server.log(tail=None)
    assert len(PYTHON_TRACEBACK.findall(log)) == 1, log[-4000:]
    assert log.count("unhandled error on POST " + PREDICT) == 1
    assert FAILURE in log


PATH_TEMPLATES = (
    "/{t}", "/v1/models/{t}", "/v1/models/{t}/versions/{n}", "/v1/models/{t}:predict", "/{t}:predict",
    "/metrics/{t}", "/wp-admin/{t}.php", "/v1/models/mnist/{t}", "/.{t}", "/healthz?{t}=1",
)


def _scan(url: str, rng: random.Random) -> None:
    """What a scanner sends: every path shape with fresh random parts, under every method (odd ones too)."""
    for template in PATH_TEMPLATES:
        for method in SCAN_METHODS:
            path = template.format(t=f"{rng.getrandbits(48):012x}", n=rng.randint(1, 10**6))
            try:
                requests.request(method, url + path, data=b"{}", timeout=30)
            except requests.ConnectionError:
                pass  # a method gunicorn itself refuses may close the connection; counted or not, never a label


def series(url: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for s in scrape(url) if s.name.startswith("mnist_rest_request")}


def test_random_paths_and_methods_add_no_metric_series(server: Gunicorn) -> None:
    rng = random.Random(18)
    _scan(server.url, rng)
    after_first_scan = series(server.url)
    _scan(server.url, rng)  # the same shapes and methods, new random paths: a raw-path label would mint series
    assert series(server.url) == after_first_scan
    counted = [s for s in scrape(server.url) if s.name == "mnist_rest_requests_total"]
    assert {s.labels["endpoint"] for s in counted} <= ENDPOINT_LABELS
    assert {s.labels["method"] for s in counted} <= METHOD_LABELS
    assert all(re.fullmatch(r"[1-5]\d\d", s.labels["status"]) for s in counted)
    assert requests_counted(server.url, endpoint="other") > 0  # the scan was counted, under "other"
