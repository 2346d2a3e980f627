"""The scripts copied into the images, run for real without Docker.

The entrypoints run with fake ``tensorflow_model_server`` / ``mnist-loadtest`` commands that print
their arguments; the two healthcheck scripts probe small HTTP servers on free loopback ports.
"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from docker_files import REPO, env_of, stages
from mnist_client import contract
from stack.processes import free_port


@pytest.mark.parametrize("script", sorted((REPO / "docker").glob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_are_executable_bash_with_lf_endings(script: Path) -> None:
    data = script.read_bytes()
    assert b"\r\n" not in data
    assert data.startswith(b"#!/usr/bin/env bash\n")
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=10)


def _fake_command(directory: Path, name: str) -> None:
    """An executable ``name`` in ``directory`` that prints its arguments, one per line."""
    path = directory / name
    path.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    path.chmod(0o755)


def _tfserving_copied_files() -> set[str]:
    server = stages(REPO / "Dockerfile.tf")["server"]
    copied: set[str] = set()
    for instruction in server.instructions:
        if instruction.keyword == "COPY":
            *sources, destination = shlex.split(instruction.arguments)
            if destination.rstrip("/") == "/etc/tfserving":
                copied.update(f"/etc/tfserving/{Path(source).name}" for source in sources)
    return copied


def test_tfserving_entrypoint_runs_the_model_server_with_the_stack_config(tmp_path: Path) -> None:
    _fake_command(tmp_path, "tensorflow_model_server")
    variant_env = {name: env_of(REPO / "Dockerfile.tf", name)["TFS_BATCHING_PARAMETERS_FILE"]
                   for name in ("tfserving-gpu", "tfserving-cpu")}  # fmt: skip
    assert variant_env["tfserving-gpu"] != variant_env["tfserving-cpu"], "each variant batches its own way"
    env = {
        **os.environ,
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
        "TFS_GRPC_PORT": str(contract.TFS_GRPC_PORT),
        "TFS_REST_PORT": str(contract.TFS_REST_PORT),
        "TFS_BATCHING_PARAMETERS_FILE": variant_env["tfserving-cpu"],
    }
    script = REPO / "docker" / "tfserving-entrypoint.sh"
    result = subprocess.run(
        ["bash", str(script), "--file_system_poll_wait_seconds=30"],
        env=env, capture_output=True, text=True, timeout=20, check=True,
    )  # fmt: skip
    args = result.stdout.splitlines()
    assert f"--port={contract.TFS_GRPC_PORT}" in args
    assert f"--rest_api_port={contract.TFS_REST_PORT}" in args
    assert "--enable_batching=true" in args
    assert f"--batching_parameters_file={variant_env['tfserving-cpu']}" in args
    assert args[-1] == "--file_system_poll_wait_seconds=30", "extra arguments come last, so they win"
    # Every configuration file the server is pointed at is one the image carries.
    referenced = {a.partition("=")[2] for a in args if "=/etc/tfserving/" in a} | set(variant_env.values())
    assert referenced <= _tfserving_copied_files(), referenced - _tfserving_copied_files()
    for path in _tfserving_copied_files():
        assert (REPO / "serving" / "tfserving" / Path(path).name).is_file()


def test_tfserving_entrypoint_refuses_to_start_without_its_ports(tmp_path: Path) -> None:
    _fake_command(tmp_path, "tensorflow_model_server")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TFS_")}
    env["PATH"] = f"{tmp_path}{os.pathsep}{os.environ['PATH']}"
    script = REPO / "docker" / "tfserving-entrypoint.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode != 0 and "TFS_GRPC_PORT must be set" in result.stderr


def _loadtest_entrypoint(tmp_path: Path, reports: Path, as_nobody: bool) -> subprocess.CompletedProcess:
    _fake_command(tmp_path, "mnist-loadtest")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "LOADTEST_REPORTS_DIR": str(reports)}
    script = REPO / "docker" / "loadtest-entrypoint.sh"
    if as_nobody:
        # The checkout may sit where that user cannot enter (a clone in a 0700 home): run a copy.
        script = Path(shutil.copy(script, tmp_path / script.name))
        script.chmod(0o644)
    command = ["bash", str(script), "run", "--rest", "http://x:8080"]
    if as_nobody:
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=20, check=False)


def test_loadtest_entrypoint_passes_its_arguments_to_the_load_tester(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    result = _loadtest_entrypoint(tmp_path, reports, as_nobody=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["run", "--rest", "http://x:8080"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to switch user")
def test_loadtest_entrypoint_stops_at_once_when_reports_are_not_writable() -> None:
    # Outside pytest's private tmp tree, so the unprivileged user can reach the folder, the fake and the
    # entrypoint's copy.
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        base.chmod(0o755)
        reports = base / "reports"
        reports.mkdir(mode=0o755)  # root's, like the folder Docker creates for a missing ./reports
        result = _loadtest_entrypoint(base, reports, as_nobody=True)
    assert result.returncode == 2
    assert "cannot write reports" in result.stderr and "LOADTEST_USER" in result.stderr
    assert result.stdout == "", "the load tester must not run"


class _FakeServer:
    """An HTTP server on a free loopback port answering GET <path> with a fixed status and body."""

    def __init__(self, routes: dict[str, tuple[int, bytes]]) -> None:
        outer = routes

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                status, body = outer.get(self.path, (404, b'{"error": "not found"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


AVAILABLE = json.dumps(
    {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK"}}]}, indent=1
).encode()
LOADING = json.dumps({"model_version_status": [{"version": "1", "state": "LOADING"}]}, indent=1).encode()


def _tfs_probe(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TFS_REST_PORT": str(port), "TFS_MODEL_NAME": contract.MODEL_NAME}
    script = REPO / "docker" / "tfserving-healthcheck.sh"
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.parametrize(
    ("status", "body", "healthy"),
    [(200, AVAILABLE, True), (200, LOADING, False), (404, b'{"error": "Could not find any versions"}', False)],
    ids=["available", "loading", "no-version"],
)
def test_tfserving_healthcheck_script(status: int, body: bytes, healthy: bool) -> None:
    with _FakeServer({f"/v1/models/{contract.MODEL_NAME}": (status, body)}) as server:
        result = _tfs_probe(server.port)
    assert (result.returncode == 0) is healthy, result.stdout + result.stderr


def test_tfserving_healthcheck_script_when_nothing_listens() -> None:
    result = _tfs_probe(free_port())  # nothing listens there
    assert result.returncode == 1
    assert "nothing listens" in result.stderr


def _rest_probe(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_REST_PORT": str(port), "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    script = REPO / "docker" / "torch-rest-healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)], ids=["ready", "no-model"])
def test_torch_rest_healthcheck_script(status: int, healthy: bool) -> None:
    # A proxy in the environment must not catch the loopback probe (it points nowhere here).
    with _FakeServer({"/readyz": (status, b'{"status": "x"}')}) as server:
        result = _rest_probe(server.port)
    assert (result.returncode == 0) is healthy, result.stdout + result.stderr


def test_torch_rest_healthcheck_script_when_nothing_listens() -> None:
    result = _rest_probe(free_port())  # nothing listens there
    assert result.returncode == 1 and "failed" in result.stderr
