"""The client package alone, as an application installs it: ``pip install ./clients`` into a fresh virtual
environment gives a working ``mnist-loadtest``, which load-tests a running stack without a data directory
(it downloads the MNIST test files, MD5-checked, from a local mirror named by ``MNIST_MIRRORS``).

pip installs with the machine's own configuration, the one ``make setup`` uses (PyPI or its mirror).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mnist_client.loadtest import load_report
from mnist_client.mnist_data import SPLITS
from mnist_mirror import serve_mirror
from stack.processes import free_port
from stack.servers import RunningStack, running_stack
from tests.local_stack import free_port_config

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUESTS = 30
MIN_ACCURACY = 0.8  # quick-trained fixture models; chance is 0.1

pytestmark = pytest.mark.slow


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing of this checkout or of the tests' MNIST settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("MNIST_")}  # fmt: skip
    return {**env, **extra}


@pytest.fixture(scope="module")
def venv_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bin/`` of a fresh virtual environment holding only ``pip install ./clients`` and what it pulls in."""
    root = tmp_path_factory.mktemp("client-venv")
    # Installed from a copy, so that the build's files never land in (or race over) the checkout.
    source = root / "clients"
    shutil.copytree(REPO_ROOT / "clients", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    bin_dir = root / "venv" / "bin"
    result = subprocess.run(
        [str(bin_dir / "pip"), "install", "--quiet", "--no-input", str(source)],
        cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, f"pip install ./clients failed:\n{result.stdout}\n{result.stderr}"
    return bin_dir


def test_installed_package_brings_its_libraries_and_nothing_heavy(venv_bin: Path) -> None:
    result = subprocess.run([str(venv_bin / "pip"), "list", "--format=freeze"], env=_clean_env(),
                            capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    installed = {line.split("==")[0].lower() for line in result.stdout.splitlines()}
    assert {"mnist-serving-client", "hdrhistogram", "tqdm", "numpy", "grpcio", "protobuf", "orjson"} <= installed
    assert not installed & {"torch", "tensorflow", "tensorflow-cpu", "tensorflow-serving-api"}


def test_loadtest_help_works_from_the_installed_package(venv_bin: Path, tmp_path: Path) -> None:
    for argv in (["--help"], ["run", "--help"]):
        result = subprocess.run([str(venv_bin / "mnist-loadtest"), *argv], cwd=tmp_path, env=_clean_env(),
                                capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: mnist-loadtest") and not result.stderr


@pytest.fixture(scope="module")
def stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """Both servers of the local stack on free ports, serving the quick-trained fixture models."""
    folder = tmp_path_factory.mktemp("stack")
    config = free_port_config(model_repo, folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNIST_REST_WORKERS", "1")
        with running_stack(config) as running:
            yield running


def test_installed_loadtest_runs_against_the_stack_without_a_data_dir(
    venv_bin: Path, stack: RunningStack, mnist_dir: Path, tmp_path: Path
) -> None:
    # The mirror holds the real test files; the cache starts empty and no data directory is set anywhere.
    www = tmp_path / "www" / "mnist"
    www.mkdir(parents=True)
    for name in SPLITS["test"]:
        (www / name).symlink_to(mnist_dir / name)
    cache = tmp_path / "cache"
    report_path = tmp_path / "report.json"
    with serve_mirror(www.parent) as (url, requests):
        result = subprocess.run(
            [str(venv_bin / "mnist-loadtest"), "run", "--rest", stack.config.rest_url,
             "--grpc", stack.config.grpc_target, "--requests", str(REQUESTS), "--warmup", "2",
             "--distinct-images", "200", "--no-progress", "--json", str(report_path)],
            cwd=tmp_path, env=_clean_env(MNIST_MIRRORS=f"{url}/mnist/", MNIST_CACHE_DIR=str(cache), HOME=str(tmp_path)),
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    # Downloaded once, the test split only, and kept MD5-verified in the cache.
    assert sorted(requests) == sorted(f"/mnist/{name}" for name in SPLITS["test"])
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(SPLITS["test"])
    for name in SPLITS["test"]:
        assert (cache / "mnist" / name).read_bytes() == (mnist_dir / name).read_bytes()
    report = load_report(report_path)
    assert report.targets == ["rest", "grpc"]
    for measurement in report.measurements:
        assert measurement.ok == REQUESTS and not measurement.errors, measurement.errors
    for target in report.targets:
        accuracy = report.accuracy(target)
        assert accuracy is not None and accuracy >= MIN_ACCURACY, (target, accuracy)


def test_installed_loadtest_offline_says_how_to_point_at_local_files(venv_bin: Path, tmp_path: Path) -> None:
    refused = f"http://127.0.0.1:{free_port()}/mnist/"  # nothing listens there: as good as offline
    result = subprocess.run(
        [str(venv_bin / "mnist-loadtest"), "run", "--rest", "http://127.0.0.1:9", "--requests", "1", "--no-progress"],
        cwd=tmp_path, env=_clean_env(MNIST_MIRRORS=refused, MNIST_CACHE_DIR=str(tmp_path / "cache"),
                                     HOME=str(tmp_path)),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr  # the run could not be used (docs/loadtest.md, exit codes)
    assert f"could not download {SPLITS['test'][0]} from any mirror" in result.stderr
    assert "--data-dir DIR" in result.stderr and "MNIST_DATA_DIR=DIR" in result.stderr


def test_installed_loadtest_ctrl_c_reports_what_was_measured(
    venv_bin: Path, stack: RunningStack, mnist_dir: Path, tmp_path: Path
) -> None:
    """The exit status that run --help documents for Ctrl-C: the measurement ends early, is reported, 130."""
    process = subprocess.Popen(
        [str(venv_bin / "mnist-loadtest"), "run", "--rest", stack.config.rest_url, "--duration", "240",
         "--warmup", "2", "--distinct-images", "100", "--data-dir", str(mnist_dir)],
        cwd=tmp_path, env=_clean_env(HOME=str(tmp_path)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        # Off a terminal the progress is a status line every 5 s: the first one means the measurement runs.
        deadline = time.monotonic() + 120
        while not any(re.match(r"\[1/1\] rest c=1: \d", line) for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "no progress line in 120 s:\n" + "".join(lines)
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)  # the table is small: stdout's pipe cannot fill up meanwhile
        out = process.stdout.read()  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    reader.join(timeout=10)
    assert process.returncode == 130, "".join(lines)
    assert any("interrupted: finishing the current measurement" in line for line in lines)
    # The table of what was measured before Ctrl-C: target rest at concurrency 1, some requests, no errors.
    assert re.search(r"^rest\s+1\s+[1-9]\d*\s+0\s", out, re.M), out

