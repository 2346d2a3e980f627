"""What the GPU check reads from outside the servers: the device each one logged, the batches it formed,
and the GPU memory its processes hold.

- The PyTorch REST server: each worker logs the device it serves on when it starts; the forward passes
  it ran are the ``mnist_rest_forward_batch_size`` histogram of its Prometheus ``/metrics``, read
  before and after a load level (the difference is that level's passes).
- The stand-in: it logs whether batching is on when it starts, and how many requests went into how
  many batches when it stops; it serves no metrics, so the check starts it afresh for each level.
- GPU memory per process: ``nvidia-smi --query-compute-apps`` (the CUDA context included), where the
  driver's tool is installed.
"""

from __future__ import annotations

import http.client
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

MIB = 2**20
FORWARD_BATCH_METRIC = "mnist_rest_forward_batch_size"
# serving/torch_server/app.py, once per worker: "REST server for model 'mnist' on cuda (max batch ..., batching on, ..."
_REST_START = re.compile(r"REST server for model '[^']*' on (?P<device>\S+) \(.*?batching (?P<batching>on|off)")
# serving/tfs_standin/server.py at start, and batching.py at stop.
_STANDIN_START = re.compile(r"TF Serving stand-in listening on .*batching (?P<batching>on|off)")
_STANDIN_BATCHES = re.compile(r"batching: (?P<requests>\d+) requests in (?P<batches>\d+) batches")


# --- the PyTorch REST server ----------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerStart:
    device: str
    batching: bool


def rest_worker_starts(log_path: Path) -> list[WorkerStart]:
    """Each REST worker's start line in the server's log: the device it serves on, and batching on or off."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    return [WorkerStart(m["device"], m["batching"] == "on") for m in _REST_START.finditer(text)]


def fetch_metrics(rest_url: str, timeout_s: float = 10.0) -> str:
    """The server's ``/metrics`` text (http.client: a proxy in the environment must not answer for it)."""
    parts = urlsplit(rest_url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout_s)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise RuntimeError(f"GET {rest_url}/metrics answered {response.status}: {body[:200]}")
        return body
    finally:
        connection.close()


@dataclass(frozen=True)
class BatchHistogram:
    """Forward passes by size: ``cumulative[le]`` passes of at most ``le`` images, ``images`` in all."""

    cumulative: dict[float, float]
    passes: float
    images: float

    @classmethod
    def parse(cls, metrics_text: str, name: str = FORWARD_BATCH_METRIC) -> BatchHistogram:
        cumulative: dict[float, float] = {}
        passes = images = 0.0
        for family in text_string_to_metric_families(metrics_text):
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name == f"{name}_bucket":
                    le = float(sample.labels["le"])
                    cumulative[le] = cumulative.get(le, 0.0) + sample.value
                elif sample.name == f"{name}_count":
                    passes += sample.value
                elif sample.name == f"{name}_sum":
                    images += sample.value
        if not cumulative:
            raise ValueError(f"the metrics hold no {name} histogram")
        return cls(cumulative, passes, images)

    def minus(self, before: BatchHistogram) -> BatchHistogram:
        return BatchHistogram(
            {le: count - before.cumulative.get(le, 0.0) for le, count in self.cumulative.items()},
            self.passes - before.passes,
            self.images - before.images,
        )

    def by_size(self) -> dict[str, int]:
        """Passes per bucket, named by the sizes it holds ("1", "2", "3-4", "5-8", ...); empty buckets left out."""
        out: dict[str, int] = {}
        lower, below = 0.0, 0.0
        for le in sorted(self.cumulative):
            count = self.cumulative[le] - below
            below = self.cumulative[le]
            if count > 0:
                first = int(lower) + 1
                if le == float("inf"):
                    label = f"{first}+"
                else:
                    label = f"{first}" if first == int(le) else f"{first}-{int(le)}"
                out[label] = int(round(count))
            lower = le
        return out

    def summary(self) -> dict[str, object]:
        sizes = self.by_size()
        return {
            "forward_passes": int(round(self.passes)),
            "images": int(round(self.images)),
            "mean_images_per_pass": round(self.images / self.passes, 2) if self.passes else None,
            "passes_by_size": sizes,
            "largest_bucket": next(reversed(sizes), None),
        }


# --- the stand-in ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandinBatches:
    batching: bool | None  # as its start line says; None: no start line
    requests: int | None = None  # from its stop line (batching on only)
    batches: int | None = None

    def summary(self) -> dict[str, object]:
        mean = round(self.requests / self.batches, 2) if self.requests is not None and self.batches else None
        return {"batching": self.batching, "requests": self.requests, "batches": self.batches,
                "mean_requests_per_batch": mean}


def standin_batches(log_path: Path) -> StandinBatches:
    """What the stand-in's log says about batching, read after it stopped."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    start = _STANDIN_START.search(text)
    stop = _STANDIN_BATCHES.search(text)
    return StandinBatches(
        batching=None if start is None else start["batching"] == "on",
        requests=int(stop["requests"]) if stop else None,
        batches=int(stop["batches"]) if stop else None,
    )


# --- GPU memory per process -----------------------------------------------------------------------


def process_tree(pids: tuple[int, ...] | list[int]) -> list[int]:
    """``pids`` and all their descendants that are alive (gunicorn's workers are its master's children)."""
    found: list[int] = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            found += [pid] + [child.pid for child in process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def gpu_memory_by_pid() -> dict[int, float] | None:
    """MiB of GPU memory each process holds, per ``nvidia-smi``; None where the tool is missing or fails."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        result = subprocess.run(
            [tool, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed: %s", exc)
        return None
    if result.returncode != 0:
        log.warning("nvidia-smi exited with %d: %s", result.returncode, result.stderr.strip())
        return None
    memory: dict[int, float] = {}
    for line in result.stdout.splitlines():
        pid_text, _, used = line.partition(",")
        try:
            memory[int(pid_text)] = memory.get(int(pid_text), 0.0) + float(used)
        except ValueError:  # "[N/A]" where the driver hides it (some containers, MIG)
            continue
    return memory


def gpu_memory_of(pids: list[int]) -> dict[str, object]:
    """The GPU memory ``pids`` hold, per process and in all, as nvidia-smi reports it."""
    memory = gpu_memory_by_pid()
    if memory is None:
        return {"nvidia_smi": False}
    held = {str(pid): memory[pid] for pid in pids if pid in memory}
    return {"nvidia_smi": True, "by_pid_mib": held, "total_mib": sum(held.values()),
            "other_processes_on_gpu": len(set(memory) - set(pids))}
