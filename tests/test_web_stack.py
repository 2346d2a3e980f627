"""The web page with the real servers: the local stack (``running_stack``: gunicorn, the stand-in and
``python -m serving.web``) on free ports, models quick-trained by the real training code.

- its API over HTTP: every target ready and answering, real MNIST digits classified;
- a target down (the Flask test client with one target on a port where nothing listens);
- in headless Chromium: a stroke drawn with pointer events, and "random test image", each followed
  by every target's class and bars; the layout at phone and desktop widths, and screenshots (saved
  into ``$MNIST_WEB_SCREENSHOTS`` when set: ``MNIST_WEB_SCREENSHOTS=docs`` refreshes docs/web*.png).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests

from mnist_client import contract
from mnist_client.loadtest.cli import main as loadtest_main
from serving.web.app import create_app
from stack.processes import free_port
from stack.servers import running_stack
from tests.local_stack import free_port_config
from web_browser import DESKTOP, PHONE, require_chromium, start_chromium

pytestmark = pytest.mark.slow

MIN_ACCURACY = 0.8  # quick-trained fixture models; chance is 0.1
WAIT_S = 60  # generous deadline for the page to show an answer on a busy machine


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-stack")
    config = free_port_config(model_repo, root)
    with running_stack(config) as running:
        yield running


def test_the_stacks_page_lists_every_target_ready(stack):
    config = stack.config
    response = requests.get(f"{config.web_url}/api/targets", timeout=30)
    assert response.status_code == 200
    assert response.json()["targets"] == [
        {"target": "torch-rest", "framework": "pytorch", "protocol": "rest", "address": config.rest_url,
         "ready": True},
        {"target": "tf-standin-rest", "framework": "tensorflow", "protocol": "rest",
         "address": config.tfs_rest_url, "ready": True},
        {"target": "tf-standin-grpc", "framework": "tensorflow", "protocol": "grpc", "address": config.grpc_target,
         "ready": True},
    ]  # fmt: skip
    page = requests.get(f"{config.web_url}/", timeout=30)
    assert page.status_code == 200 and "/static/app.js" in page.text


def test_the_stacks_page_classifies_real_digits_with_both_frameworks(stack, mnist_test):
    url = f"{stack.config.web_url}/api/predict"
    count = 30
    classes: dict[str, list[int]] = {}
    with requests.Session() as session:
        for index in range(count):
            image = (mnist_test.images[index].astype(np.float32) / 255.0).tolist()
            response = session.post(url, json={"image": image}, timeout=30)
            assert response.status_code == 200, response.text
            for entry in response.json()["results"]:
                assert "error" not in entry, entry
                assert len(entry["probabilities"]) == contract.NUM_CLASSES
                assert abs(sum(entry["probabilities"]) - 1.0) < 1e-4
                assert entry["class"] == int(np.argmax(entry["probabilities"]))
                assert entry["latency_ms"] > 0
                classes.setdefault(entry["target"], []).append(entry["class"])
    labels = mnist_test.labels[:count]
    assert set(classes) == {"torch-rest", "tf-standin-rest", "tf-standin-grpc"}
    for target, predicted in classes.items():
        assert np.mean(np.asarray(predicted) == labels) >= MIN_ACCURACY, target


def test_a_real_target_down_is_reported_while_the_real_servers_answer(stack, mnist_test, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    client = create_app({
        "pytorch_rest": stack.config.rest_url,
        "tensorflow_rest": f"tf-rest-down={dead}",
        "tensorflow_grpc": stack.config.grpc_target,
        "reports_dir": tmp_path,
    }).test_client()  # fmt: skip
    image = (mnist_test.images[0].astype(np.float32) / 255.0).tolist()
    results = {e["target"]: e for e in client.post("/api/predict", json={"image": image}).get_json()["results"]}
    assert "could not connect" in results["tf-rest-down"]["error"]
    assert "class" not in results["tf-rest-down"]
    assert results["pytorch-rest"]["class"] == results["tensorflow-grpc"]["class"] == int(mnist_test.labels[0])
    ready = {t["target"]: t["ready"] for t in client.get("/api/targets").get_json()["targets"]}
    assert ready == {"pytorch-rest": True, "tf-rest-down": False, "tensorflow-grpc": True}


# -- in a real browser ---------------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path):
    require_chromium()
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_answers(driver, expected_targets: int) -> list[dict]:
    """Poll the page until every target's card shows a class and ten bars; return what the cards show."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = """
        return Array.from(document.querySelectorAll('#results .target')).map((card) => ({
            target: card.dataset.target,
            cls: card.querySelector('.class') ? card.querySelector('.class').textContent : null,
            bars: Array.from(card.querySelectorAll('.bar')).map((bar) => parseFloat(bar.style.height)),
            error: card.querySelector('.error') ? card.querySelector('.error').textContent : null,
        }));
    """

    def answered(d):
        cards = d.execute_script(script)
        done = len(cards) == expected_targets and all(c["cls"] is not None and len(c["bars"]) == 10 for c in cards)
        return cards if done else False

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(answered)


def preview_pixels(driver) -> np.ndarray:
    """The 28x28 input the page shows beside the canvas, read back from the preview canvas."""
    values = driver.execute_script("""
        const c = document.getElementById('preview');
        return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 0));
    """)
    return np.asarray(values, dtype=np.uint8).reshape(contract.IMAGE_SHAPE)


def draw_seven(driver) -> None:
    """A '7' drawn with real pointer events (W3C actions: pointerdown, pointermove..., pointerup)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.interaction import POINTER_PEN
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    canvas = driver.find_element("id", "canvas")
    actions = ActionBuilder(driver, mouse=PointerInput(POINTER_PEN, "pen"), duration=40)
    pen = actions.pointer_action
    stroke = [(-70, -90), (-20, -90), (30, -90), (70, -90), (50, -40), (30, 10), (10, 60), (0, 100)]
    pen.move_to(canvas, *stroke[0]).pointer_down()
    for x, y in stroke[1:]:
        pen.move_to(canvas, x, y)
    pen.pointer_up()
    actions.perform()


def screenshot(driver, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 0
    keep = os.environ.get("MNIST_WEB_SCREENSHOTS")
    if keep:
        shutil.copy(path, Path(keep) / name)
    return path


def test_drawing_a_digit_shows_every_targets_class_and_bars(stack, browser, tmp_path):
    browser.get(f"{stack.config.web_url}/")
    assert preview_pixels(browser).max() == 0  # nothing drawn yet
    draw_seven(browser)
    cards = wait_for_answers(browser, expected_targets=3)
    assert {c["target"] for c in cards} == {"torch-rest", "tf-standin-rest", "tf-standin-grpc"}
    for card in cards:
        assert card["error"] is None
        assert card["cls"] in [str(d) for d in range(10)]
        assert abs(sum(card["bars"]) - 100.0) < 1.0  # bar heights are the probabilities, in percent
        assert max(card["bars"]) == card["bars"][int(card["cls"])]  # the tallest bar is the class shown
    # The input beside the canvas: MNIST-like, the ink inside the central 20x20 box.
    pixels = preview_pixels(browser)
    ys, xs = np.nonzero(pixels)
    assert max(ys.max() - ys.min(), xs.max() - xs.min()) + 1 <= 20
    rows, cols = np.indices(pixels.shape)
    mass = pixels.astype(float).sum()
    centre = ((rows * pixels).sum() / mass, (cols * pixels).sum() / mass)
    assert abs(centre[0] - 13.5) <= 1.0 and abs(centre[1] - 13.5) <= 1.0  # pixel centres: 14.0 - 0.5
    screenshot(browser, "web.png", tmp_path)


def test_random_test_image_shows_its_label_and_every_targets_answer(stack, browser, mnist_test):
    browser.get(f"{stack.config.web_url}/")
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element("id", "random").click()

    label = WebDriverWait(browser, WAIT_S, poll_frequency=0.2).until(
        lambda d: d.find_element("id", "label").is_displayed() and d.find_element("id", "label").text
    )
    index = int(label.split("#")[1].split(",")[0])
    assert label.endswith(f"label {int(mnist_test.labels[index])}")
    np.testing.assert_array_equal(preview_pixels(browser), mnist_test.images[index])  # the image itself, 28x28
    cards = wait_for_answers(browser, expected_targets=3)
    for card in cards:
        assert card["error"] is None and card["cls"] in [str(d) for d in range(10)]


def test_the_page_fits_a_phone_and_a_desktop_without_sideways_scrolling(stack, browser, tmp_path):
    for width, height in (PHONE, DESKTOP):
        browser.set_window_size(width, height)
        browser.get(f"{stack.config.web_url}/")
        browser.find_element("id", "random").click()
        wait_for_answers(browser, expected_targets=3)
        inner, scroll = browser.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]"
        )
        assert scroll <= inner, f"{width}px wide: the page is {scroll}px wide"
        canvas = browser.find_element("id", "canvas").rect
        assert canvas["x"] >= 0 and canvas["x"] + canvas["width"] <= inner
        if (width, height) == PHONE:
            screenshot(browser, "web-phone.png", tmp_path)


def test_the_report_view_says_how_to_make_a_report_then_shows_the_latest(stack, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    config = stack.config
    browser.get(f"{config.web_url}/#report")
    status = browser.find_element("id", "report-status")
    WebDriverWait(browser, WAIT_S, poll_frequency=0.2).until(lambda d: "make demo" in status.text)

    reports = config.report_dir
    code = loadtest_main(["run", "--rest", f"torch-rest={config.rest_url}",
                          "--grpc", f"tf-standin-grpc={config.grpc_target}",
                          "--concurrency", "1", "--requests", "20", "--warmup", "2", "--no-progress",
                          "--json", str(reports / "demo.json"), "--html", str(reports / "demo.html")])  # fmt: skip
    assert code == 0
    browser.refresh()
    WebDriverWait(browser, WAIT_S, poll_frequency=0.2).until(
        lambda d: d.find_elements("css selector", "#report-charts svg")
    )
    rows = browser.find_elements("css selector", "#report-table tr")
    assert [r.find_elements("tag name", "td")[0].text for r in rows[1:]] == ["torch-rest", "tf-standin-grpc"]
    titles = [svg.get_attribute("aria-label") for svg in browser.find_elements("css selector", "#report-charts svg")]
    assert titles == ["Latency by percentile"]  # one sweep point: the HTML report's one chart
    link = browser.find_element("id", "report-link")
    assert link.get_attribute("href") == f"{config.web_url}/reports/demo.html"
    full = requests.get(link.get_attribute("href"), timeout=30)
    assert full.status_code == 200 and full.text == (reports / "demo.html").read_text()
