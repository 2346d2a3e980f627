"""The load tester against the real servers: the PyTorch REST server under gunicorn and the TF Serving
stand-in, both serving the quick-trained fixture models (tests/conftest.py ``model_repo``)."""

from __future__ import annotations

import io

import pytest

from mnist_client import contract
from mnist_client.loadtest import LoadTestConfig, load_report, parse_target, run
from mnist_client.loadtest.cli import EXIT_OK, main
from tests.rest_helpers import gunicorn

MIN_ACCURACY = 0.8  # quick-trained fixture models; chance is 0.1
DISTINCT = 200

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rest_url(model_repo, tmp_path_factory):
    """The PyTorch REST server as deployed: gunicorn with its config file, one sync worker."""
    base = model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME
    with gunicorn(base, tmp_path_factory.mktemp("gunicorn"), MNIST_REST_WORKERS="1",
                  MNIST_REST_ACCESS_LOG="off") as server:
        yield server.url


@pytest.fixture(scope="module")
def grpc_target(model_repo):
    from serving.tfs_standin.flags import ServerOptions
    from serving.tfs_standin.server import ModelServer

    base = model_repo / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME
    with ModelServer(ServerOptions(port=0, standin_host="127.0.0.1", model_name=contract.MODEL_NAME,
                                   model_base_path=str(base))) as server:
        server.wait_until_available(timeout=120)
        yield f"127.0.0.1:{server.port}"


def test_both_real_servers_side_by_side(rest_url, grpc_target, tmp_path):
    out = io.StringIO()
    code = main(["run", "--rest", f"torch={rest_url}", "--grpc", f"tfserving={grpc_target}",
                 "--concurrency", "1,4", "--requests", "100", "--warmup", "5", "--distinct-images", str(DISTINCT),
                 "--no-progress", "--json", str(tmp_path / "result.json"), "--html", str(tmp_path / "report.html"),
                 "--max-error-rate", "0", "--min-accuracy", str(MIN_ACCURACY), "--min-agreement", "0.6"], out=out)
    assert code == EXIT_OK, out.getvalue()
    report = load_report(tmp_path / "result.json")
    assert [(m.target, m.point) for m in report.measurements] == [
        ("torch", 1.0), ("tfserving", 1.0), ("torch", 4.0), ("tfserving", 4.0)]
    for m in report.measurements:
        assert m.ok == 100 and not m.errors and m.latency.count == 100
        assert m.accuracy >= MIN_ACCURACY
    (pair,) = report.agreements()
    # Each sweep point carries on through the images where the previous one stopped: 2 x 100 requests of one
    # image each cover all 200 distinct images, for both servers.
    assert pair.images == DISTINCT
    assert "tfserving" in (tmp_path / "report.html").read_text()


def test_real_rest_server_npy_batches_in_an_open_loop(rest_url):
    config = LoadTestConfig(targets=(parse_target(rest_url, "rest"),), mode="open", rates=(40.0,), requests=40,
                            rest_format="npy", images_per_request=8, distinct_images=DISTINCT, warmup_requests=2)
    (m,) = run(config).measurements
    assert m.ok == 40 and not m.errors
    assert m.images == 320 and m.accuracy >= MIN_ACCURACY
    assert m.scheduled == 40 and m.send_lag.count == 40
