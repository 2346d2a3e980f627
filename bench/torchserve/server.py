"""TorchServe in a folder of its own: archive the export, start it on free ports, register models, stop it.

Everything TorchServe writes stays in the work folder: its configuration, logs (``LOG_LOCATION``), pid file
(``TMPDIR``, where the launcher keeps ``.model_server.pid``) and the workers' Unix sockets
(``java.io.tmpdir``, from ``TEMP``), so several instances (a bench beside a test run) never meet. Its five
listeners (inference, management, metrics, and the two gRPC ones) take free ports.

The launcher runs in the foreground through ``stack.processes.ManagedProcess`` (its own process group,
output in a log file); stopping it ends the Java frontend first, so the launcher reaps it, then whatever
is left of the tree (the Python workers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from mnist_client import contract
from stack.processes import ManagedProcess, StackError, free_port, tail

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
HANDLER = Path(__file__).with_name("mnist_handler.py")
JAVA_PACKAGE = "openjdk-17-jre-headless"
# Loading the torch runtime in each worker takes seconds, several on a busy machine.
READY_TIMEOUT_S = 180.0
_STOP_GRACE_S = 30.0


class TorchServeError(RuntimeError):
    """TorchServe refused a request of the management API (``status``: its HTTP status), or never became ready."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def java_executable() -> str | None:
    """The ``java`` TorchServe's launcher will run: ``$JAVA_HOME/bin/java`` if set, else the one on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def missing_requirements(need_wrk: bool = False) -> list[str]:
    """What to install before TorchServe (and wrk, when ``need_wrk``) can run here; empty when nothing."""
    missing = []
    if importlib.util.find_spec("ts") is None or importlib.util.find_spec("model_archiver") is None:
        missing.append(
            "TorchServe is not installed in this Python: run `make setup` "
            "(requirements/main.txt pins torchserve and torch-model-archiver)"
        )
    if java_executable() is None:
        missing.append(
            f"Java is not installed (TorchServe's frontend is a Java program): apt-get install -y {JAVA_PACKAGE}"
        )
    if need_wrk and shutil.which("wrk") is None:
        missing.append("wrk is not installed: apt-get install -y wrk")
    return missing


def torchserve_version() -> str:
    from importlib.metadata import version

    return version("torchserve")


def archive_model(version_dir: Path, store: Path, name: str = contract.MODEL_NAME) -> Path:
    """``<store>/<name>.mar``: ``model.pt`` (and ``model.json``) of ``version_dir`` with the MNIST handler,
    archived by torch-model-archiver with the repository's version number as the archive's version."""
    model_file = version_dir / contract.TORCHSCRIPT_FILENAME
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} does not exist; run `make train-torch` first")
    store.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name,
        "--version", version_dir.name, "--serialized-file", str(model_file), "--handler", str(HANDLER),
        "--export-path", str(store), "--force",
    ]  # fmt: skip
    metadata = version_dir / contract.METADATA_FILENAME
    if metadata.is_file():
        command += ["--extra-files", str(metadata)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    archive = store / f"{name}.mar"
    if done.returncode != 0 or not archive.is_file():
        raise RuntimeError(f"torch-model-archiver failed (status {done.returncode}): {done.stdout}{done.stderr}")
    return archive


class TorchServe:
    """One TorchServe instance: its URLs, its launcher's pid, and calls to its management API."""

    def __init__(self, work_dir: Path, store: Path, host: str = "127.0.0.1") -> None:
        self.work_dir = work_dir
        self.store = store
        self.host = host
        ports = {name: free_port(host) for name in ("inference", "management", "metrics", "grpc_in", "grpc_mgmt")}
        self.ports = ports
        self.inference_url = f"http://{host}:{ports['inference']}"
        self.management_url = f"http://{host}:{ports['management']}"
        self.config_file = work_dir / "config.properties"
        self.log_dir = work_dir / "logs"
        self.process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        if self.process is None or self.process.pid is None:
            raise RuntimeError("TorchServe is not started")
        return self.process.pid

    def write_config(self) -> None:
        """TorchServe's own defaults, but for the addresses; token auth off (the bench's wrk sends none) and
        the model API on (the bench registers its batching configurations through it)."""
        lines = [
            f"inference_address=http://{self.host}:{self.ports['inference']}",
            f"management_address=http://{self.host}:{self.ports['management']}",
            f"metrics_address=http://{self.host}:{self.ports['metrics']}",
            f"grpc_inference_port={self.ports['grpc_in']}",
            f"grpc_management_port={self.ports['grpc_mgmt']}",
            "disable_token_authorization=true",
            "enable_model_api=true",
        ]
        self.config_file.write_text("\n".join(lines) + "\n")

    def start(self, startup_models: Mapping[str, str], ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start with ``startup_models`` (name -> archive file in the store) registered at TorchServe's
        defaults, and wait until every worker of each is READY."""
        temp = self.work_dir / "tmp"
        for folder in (self.store, self.log_dir, temp):
            folder.mkdir(parents=True, exist_ok=True)
        self.write_config()
        argv = [
            sys.executable, "-m", "ts.model_server", "--foreground", "--ncs", "--ts-config", str(self.config_file),
            "--model-store", str(self.store),
        ]  # fmt: skip
        if startup_models:
            argv += ["--models", *(f"{name}={archive}" for name, archive in startup_models.items())]
        env = {
            "PYTHONPATH": str(REPO_ROOT),  # the handler imports the project's codec and model loader
            "TS_DECODE_INPUT_REQUEST": "false",  # bodies reach the handler as bytes (it decodes with orjson)
            "TMPDIR": str(temp),
            "TEMP": str(temp),
            "LOG_LOCATION": str(self.log_dir),
            "METRICS_LOCATION": str(self.log_dir),
        }
        self.process = ManagedProcess("TorchServe", argv, self.log_dir / "torchserve.log", env)
        self.process.start()
        deadline = time.monotonic() + ready_timeout_s
        self.process.wait_ready(self._pings, ready_timeout_s)
        for name in startup_models:
            self.wait_workers_ready(name, max(1.0, deadline - time.monotonic()))

    def _pings(self) -> bool:
        with urllib.request.urlopen(f"{self.inference_url}/ping", timeout=2) as response:
            return response.status == 200

    def describe(self, name: str) -> dict[str, Any]:
        """The management API's description of model ``name`` (workers, batch size, delay...)."""
        described = self._management("GET", f"/models/{name}")
        return described[0] if isinstance(described, list) else described

    def wait_workers_ready(self, name: str, timeout_s: float) -> dict[str, Any]:
        """Poll until all ``minWorkers`` workers of ``name`` are READY; return the description."""
        deadline = time.monotonic() + timeout_s
        described: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.process is not None and not self.process.running():
                raise StackError(f"TorchServe exited while loading {name!r}; see {self.log_dir}")
            with contextlib.suppress(TorchServeError, OSError):
                described = self.describe(name)
                workers = described.get("workers", [])
                if workers and len(workers) >= described.get("minWorkers", 1):
                    if all(worker.get("status") == "READY" for worker in workers):
                        return described
            time.sleep(0.2)
        raise TorchServeError(
            f"the workers of {name!r} were not READY within {timeout_s:.0f} s (last seen: {described.get('workers')});"
            f" see {self.log_dir}/model_log.log"
        )

    def register(
        self, name: str, archive: str, workers: int, batch_size: int, max_batch_delay_ms: int
    ) -> dict[str, Any]:
        """Register ``archive`` again as ``name`` with these settings; return its description once READY."""
        query = urllib.parse.urlencode({
            "url": archive, "model_name": name, "initial_workers": workers, "batch_size": batch_size,
            "max_batch_delay": max_batch_delay_ms, "synchronous": "true",
        })  # fmt: skip
        self._management("POST", f"/models?{query}")
        return self.wait_workers_ready(name, READY_TIMEOUT_S)

    def unregister(self, name: str, timeout_s: float = 60.0) -> None:
        """Unregister ``name``, retrying while TorchServe answers 500: right after a load its frontend can
        fail the DELETE with a ConcurrentModificationException (seen with 0.12) and succeed a moment later."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._management("DELETE", f"/models/{name}?synchronous=true")
                return
            except TorchServeError as error:
                if error.status != 500 or time.monotonic() > deadline:
                    raise
                log.info("TorchServe refused to unregister %s for now (%s); retrying", name, error)
            time.sleep(0.5)

    def _management(self, method: str, path: str) -> Any:
        request = urllib.request.Request(f"{self.management_url}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=READY_TIMEOUT_S) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            body = error.read().decode(errors="replace")
            raise TorchServeError(f"TorchServe {method} {path}: {error.code} {body}", error.code) from None

    def stop(self) -> None:
        """Java first (its launcher then exits and reaps it), then the launcher's group, then any straggler."""
        if self.process is None or not self.process.running():
            return
        launcher = psutil.Process(self.pid)
        tree = launcher.children(recursive=True)
        frontends = launcher.children()
        for process in frontends:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        psutil.wait_procs(frontends, timeout=_STOP_GRACE_S)
        status = self.process.stop(grace_s=_STOP_GRACE_S)
        _, alive = psutil.wait_procs(tree, timeout=_STOP_GRACE_S)
        for process in alive:
            log.warning("TorchServe's process %d outlived its frontend; killing it", process.pid)
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=_STOP_GRACE_S)
        if status not in (None, 0, -15, 143):
            log.warning("TorchServe exited with status %s (logs: %s)", status, self.log_dir)


@contextlib.contextmanager
def running_torchserve(
    work_dir: Path, store: Path, startup_models: Mapping[str, str], ready_timeout_s: float = READY_TIMEOUT_S
) -> Iterator[TorchServe]:
    """TorchServe up with ``startup_models`` for the block; stopped, with all its processes, after it."""
    server = TorchServe(work_dir, store)
    try:
        server.start(startup_models, ready_timeout_s)
        log.info("TorchServe ready at %s (management %s; logs %s)", server.inference_url, server.management_url,
                 server.log_dir)  # fmt: skip
        yield server
    except Exception:
        # The work folder usually goes with the caller's temporary folder: keep the end of the log in sight.
        log.error("TorchServe's log (%s) ends:\n%s", server.log_dir / "ts_log.log", tail(server.log_dir / "ts_log.log"))
        raise
    finally:
        server.stop()
