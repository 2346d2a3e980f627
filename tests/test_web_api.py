"""The web page's backend through Flask's test client, with TF-Serving-shaped oracle servers as targets.

The oracle servers (tests/loadtest_servers.py) know the MNIST test labels, so a real test image must come
back as its label with a one-hot probability row; a target on a port where nothing listens must come
back as an entry with "error" while the others still answer. Bad inputs get a 4xx naming the problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from mnist_client import contract
from mnist_client.loadtest.cli import main as loadtest_main
from serving.web.app import create_app
from serving.web.config import ConfigError, WebConfig
from stack.processes import free_port
from tests.loadtest_servers import GrpcServer, Oracle, RestServer

@pytest.fixture(scope="module")
def oracle(mnist_test) -> Oracle:
    return Oracle(mnist_test.images, mnist_test.labels)


@pytest.fixture(scope="module")
def servers(oracle):
    with RestServer(oracle) as torch_rest, RestServer(oracle) as tf_rest, GrpcServer(oracle) as tf_grpc:
        yield torch_rest, tf_rest, tf_grpc


def make_app(servers, mnist_dir, tmp_path, **overrides):
    torch_rest, tf_rest, tf_grpc = servers
    settings = {
        "pytorch_rest": f"torch-oracle={torch_rest.url}",
        "tensorflow_rest": f"tf-oracle-rest={tf_rest.url}",
        "tensorflow_grpc": f"tf-oracle-grpc={tf_grpc.target}",
        "data_dir": mnist_dir,
        "reports_dir": tmp_path / "reports",
        "timeout_s": 10.0,
        **overrides,
    }
    return create_app(settings)


@pytest.fixture
def client(servers, mnist_dir, tmp_path):
    return make_app(servers, mnist_dir, tmp_path).test_client()


def image_body(image: np.ndarray) -> dict:
    return {"image": (image.astype(np.float32) / 255.0).tolist()}


def assert_error(response, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    message = response.get_json()["error"]
    for fragment in fragments:
        assert fragment in message, message


# -- predictions ---------------------------------------------------------------------------------------


def test_predict_answers_from_every_target_in_order(client, mnist_test):
    for index in (0, 1, 2):
        response = client.post("/api/predict", json=image_body(mnist_test.images[index]))
        assert response.status_code == 200
        results = response.get_json()["results"]
        assert [(r["target"], r["framework"], r["protocol"]) for r in results] == [
            ("torch-oracle", "pytorch", "rest"),
            ("tf-oracle-rest", "tensorflow", "rest"),
            ("tf-oracle-grpc", "tensorflow", "grpc"),
        ]
        label = int(mnist_test.labels[index])
        for entry in results:
            assert "error" not in entry
            assert entry["class"] == label
            expected = [1.0 if digit == label else 0.0 for digit in range(contract.NUM_CLASSES)]
            assert entry["probabilities"] == expected
            assert entry["latency_ms"] > 0


def test_a_target_that_is_down_carries_an_error_and_the_others_still_answer(servers, mnist_dir, tmp_path, mnist_test):
    dead = f"http://127.0.0.1:{free_port()}"
    client = make_app(servers, mnist_dir, tmp_path, tensorflow_rest=f"nobody={dead}").test_client()
    response = client.post("/api/predict", json=image_body(mnist_test.images[0]))
    assert response.status_code == 200
    by_name = {entry["target"]: entry for entry in response.get_json()["results"]}
    assert set(by_name["nobody"]) == {"target", "framework", "protocol", "error"}
    assert "could not connect" in by_name["nobody"]["error"] and dead in by_name["nobody"]["error"]
    for name in ("torch-oracle", "tf-oracle-grpc"):
        assert by_name[name]["class"] == int(mnist_test.labels[0])

    targets = {t["target"]: t for t in client.get("/api/targets").get_json()["targets"]}
    assert targets["nobody"] == {
        "target": "nobody", "framework": "tensorflow", "protocol": "rest", "address": dead, "ready": False,
    }  # fmt: skip
    assert targets["torch-oracle"]["ready"] is True  # the oracle answers /readyz


def test_a_disabled_target_is_left_out(servers, mnist_dir, tmp_path, mnist_test):
    client = make_app(servers, mnist_dir, tmp_path, tensorflow_rest="off").test_client()
    results = client.post("/api/predict", json=image_body(mnist_test.images[0])).get_json()["results"]
    assert [r["target"] for r in results] == ["torch-oracle", "tf-oracle-grpc"]
    assert [t["target"] for t in client.get("/api/targets").get_json()["targets"]] == ["torch-oracle", "tf-oracle-grpc"]


def test_random_test_image_is_a_real_mnist_test_image_with_its_label(client, mnist_test):
    seen = set()
    for _ in range(5):
        response = client.get("/api/random-test-image")
        assert response.status_code == 200
        body = response.get_json()
        index = body["index"]
        seen.add(index)
        assert body["label"] == int(mnist_test.labels[index])
        image = np.asarray(body["image"], dtype=np.float32)
        assert image.shape == contract.IMAGE_SHAPE
        np.testing.assert_array_equal(np.rint(image * 255.0).astype(np.uint8), mnist_test.images[index])
    assert len(seen) > 1  # five draws from 10,000 images


def test_random_test_image_without_data_says_where_to_put_it(servers, tmp_path):
    client = make_app(servers, tmp_path / "empty", tmp_path).test_client()
    assert_error(client.get("/api/random-test-image"), 503, "MNIST_WEB_DATA_DIR", "t10k-images-idx3-ubyte.gz")


# -- bad inputs ---------------------------------------------------------------------------------------------


def test_wrong_shapes_are_rejected_naming_the_shape(client):
    row = [0.0] * contract.IMAGE_WIDTH
    assert_error(client.post("/api/predict", json={"image": [row] * 27}), 400, "a list of 27", "28 rows of 28")
    bad_row = [row] * 27 + [[0.0] * 29]
    assert_error(client.post("/api/predict", json={"image": bad_row}), 400, "row 27", "a list of 29")
    assert_error(client.post("/api/predict", json={"image": [[row] * 28]}), 400, "a list of 1")
    assert_error(client.post("/api/predict", json={"image": 0.5}), 400, "a JSON number")
    assert_error(client.post("/api/predict", json={"images": [row] * 28}), 400, "keys ['images']")
    assert_error(client.post("/api/predict", json=[[row] * 28]), 400, "a JSON array", "expected an object")


def test_values_outside_zero_one_and_non_numbers_are_rejected(client):
    def with_value(value):
        image = [[0.0] * contract.IMAGE_WIDTH for _ in range(contract.IMAGE_HEIGHT)]
        image[3][5] = value
        return {"image": image}

    assert_error(client.post("/api/predict", json=with_value(255)), 400, '"image"[3][5] is 255', "[0, 1]")
    assert_error(client.post("/api/predict", json=with_value(-0.01)), 400, "is -0.01")
    assert_error(client.post("/api/predict", json=with_value("0.5")), 400, "a JSON string")
    assert_error(client.post("/api/predict", json=with_value(True)), 400, "a JSON boolean")
    assert_error(client.post("/api/predict", json=with_value(None)), 400, "a JSON null")
    nan_body = json.dumps(with_value(0.0)).replace("0.0", "NaN", 1)  # Python's json reads NaN
    response = client.post("/api/predict", data=nan_body, content_type="application/json")
    assert_error(response, 400, "is nan")


def test_not_json_and_wrong_content_type_are_rejected(client):
    assert_error(client.post("/api/predict", data="{not json", content_type="application/json"), 400, "not valid JSON")
    response = client.post("/api/predict", data="x", content_type="text/plain")
    assert_error(response, 415, "text/plain", "application/json")
    assert_error(client.post("/api/predict"), 415, "missing")


def test_too_large_bodies_are_rejected_with_the_limit(client):
    huge = json.dumps({"image": [[0.123456789] * 28] * 28, "padding": "x" * 300_000})
    assert_error(client.post("/api/predict", data=huge, content_type="application/json"), 413, str(256 * 1024))


def test_unknown_paths_and_methods_answer_json(client):
    assert_error(client.get("/api/nothing"), 404, "GET /api/nothing", "/openapi.yaml")
    response = client.get("/api/predict")
    assert_error(response, 405, "POST")
    assert response.headers["Allow"] == "OPTIONS, POST"
    assert_error(client.get("/reports/secret.txt"), 404, "not a report file")


# -- the page, the report view, the API document ----------------------------------------------------------


def test_page_and_static_files_are_served_without_external_references(client):
    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        assert client.get(asset).status_code == 200
    for name in ("index.html", "app.js", "style.css"):
        text = (Path(__file__).parents[1] / "serving/web/static" / name).read_text()
        assert "http://" not in text and "https://" not in text, name  # works offline: no CDN


def test_latest_report_has_the_html_reports_charts_and_links_it(client, tmp_path, mnist_dir, oracle):
    assert_error(client.get("/api/report/latest"), 404, "make demo")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "bench.json").write_text('{"not": "a load-test result"}')
    with RestServer(oracle) as rest:
        code = loadtest_main(["run", "--rest", f"torch={rest.url}", "--concurrency", "1,2", "--requests", "20",
                              "--warmup", "2", "--distinct-images", "50", "--no-progress",
                              "--json", str(reports / "run.json"), "--html", str(reports / "run.html")])  # fmt: skip
    assert code == 0
    os.utime(reports / "bench.json")  # newer, but not a result file: skipped
    body = client.get("/api/report/latest").get_json()
    assert body["file"] == "run.json" and body["html"] == "run.html"
    rows = [(m["target"], m["point"], m["requests"]) for m in body["measurements"]]
    assert rows == [("torch", 1, 20), ("torch", 2, 20)]
    assert set(body["measurements"][0]["latency_ms"]) == {"p50", "p90", "p99", "p99.9", "max"}
    assert body["measurements"][0]["accuracy"] == 1.0
    html = (reports / "run.html").read_text()
    titles = ["Latency by percentile", "Throughput", "p99 latency"]
    assert len(body["charts"]) == len(titles)
    for svg, title in zip(body["charts"], titles):
        assert svg.startswith("<svg") and f'aria-label="{title}"' in svg
        assert svg in html  # the very charts of the full HTML report
    full = client.get("/reports/run.html")
    assert full.status_code == 200 and full.get_data(as_text=True) == html
    assert client.get("/reports/../conftest.py").status_code == 404


def test_openapi_document_covers_every_route(client):
    app = client.application
    response = client.get("/openapi.yaml")
    assert response.status_code == 200 and response.mimetype == "application/yaml"
    document = yaml.safe_load(response.get_data())
    documented = {(path.replace("{name}", "<path:name>"), method.upper()) for path, item in document["paths"].items()
                  for method in item}  # fmt: skip
    served = {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert served == documented
    image = document["components"]["schemas"]["Image"]
    assert image["minItems"] == image["maxItems"] == contract.IMAGE_HEIGHT
    assert image["items"]["minItems"] == image["items"]["maxItems"] == contract.IMAGE_WIDTH


# -- settings -----------------------------------------------------------------------------------------------


def test_settings_come_from_defaults_then_environment_then_overrides():
    defaults = WebConfig.load(environ={})
    assert defaults.port == 8000
    assert [(t.name, t.framework, t.protocol, t.address) for t in defaults.targets()] == [
        ("pytorch-rest", "pytorch", "rest", "http://127.0.0.1:8080"),
        ("tensorflow-rest", "tensorflow", "rest", "http://127.0.0.1:8501"),
        ("tensorflow-grpc", "tensorflow", "grpc", "127.0.0.1:8500"),
    ]
    environ = {"MNIST_WEB_PORT": "9000", "MNIST_WEB_TENSORFLOW_GRPC": "tfs:8500", "MNIST_WEB_TIMEOUT_S": "0.5",
               "MNIST_WEB_PYTORCH_REST": "http://torch:8080"}  # fmt: skip
    config = WebConfig.load({"port": 9100}, environ=environ)
    assert config.port == 9100 and config.timeout_s == 0.5
    assert [(t.name, t.address) for t in config.targets()] == [
        ("pytorch-rest", "http://torch:8080"),
        ("tensorflow-rest", "http://127.0.0.1:8501"),
        ("tensorflow-grpc", "tfs:8500"),
    ]


@pytest.mark.parametrize(
    ("environ", "fragments"),
    [
        ({"MNIST_WEB_PORT": "eighty"}, ("MNIST_WEB_PORT='eighty'", "an integer")),
        ({"MNIST_WEB_PORT": "70000"}, ("MNIST_WEB_PORT=70000", "port number")),
        ({"MNIST_WEB_TIMEOUT_S": "0"}, ("MNIST_WEB_TIMEOUT_S=0.0", "> 0")),
        ({"MNIST_WEB_PYTORCH_REST": "torch:8080"}, ("MNIST_WEB_PYTORCH_REST='torch:8080'", "http://HOST:PORT")),
        ({"MNIST_WEB_TENSORFLOW_GRPC": "grpc://tfs:8500"}, ("MNIST_WEB_TENSORFLOW_GRPC", "HOST:PORT")),
        ({"MNIST_WEB_TENSORFLOW_REST": "same=http://a:1", "MNIST_WEB_PYTORCH_REST": "same=http://b:2"}, ("repeat",)),
        ({"MNIST_WEB_LOG_LEVEL": "loud"}, ("MNIST_WEB_LOG_LEVEL='loud'", "DEBUG")),
    ],
)
def test_bad_settings_name_the_variable_and_what_was_expected(environ, fragments):
    with pytest.raises(ConfigError) as caught:
        WebConfig.load(environ=environ)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_unknown_override_is_refused():
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        WebConfig.load({"prot": 1}, environ={})

