"""The two frameworks compared end to end: training figures, model size, in-process latency.

Read from what the stack already produced: each exported version's ``model.json``
(accuracy, training time and throughput), its size on disk, and the in-process
inference benchmark (``bench/inprocess.py``), run as a subprocess so that this
process never imports torch or TensorFlow.
"""

from __future__ import annotations

import html
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from mnist_client import contract
from serving.model_repository import latest_version
from stack.config import REPO_ROOT, StackConfig

log = logging.getLogger(__name__)

FRAMEWORKS = (("pytorch", contract.TORCH_FRAMEWORK_DIR), ("tensorflow", contract.TF_FRAMEWORK_DIR))


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_inprocess_bench(config: StackConfig) -> dict[str, Any]:
    """The in-process latency floor of both models, measured side by side in one run."""
    out_dir = config.report_dir / "inprocess"
    # Fewer timed calls than the full benchmark: the demo wants the floor, not a long run.
    cmd = [
        sys.executable, "-m", "bench.inprocess", "--output-dir", str(out_dir), "--models-dir", str(config.models_dir),
        "--calls-1", "500", "--calls-64", "100", "--calls-256", "20",
    ]  # fmt: skip
    log.info("measuring in-process inference latency of both models")
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / "inprocess.json").read_text())


def collect(config: StackConfig, inprocess: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per framework with the figures the demo report shows."""
    rows = []
    for framework, folder in FRAMEWORKS:
        base = config.models_dir / folder / contract.MODEL_NAME
        version = latest_version(base)
        if version is None:
            raise FileNotFoundError(f"no exported version under {base}")
        version_dir = base / str(version)
        meta = json.loads((version_dir / contract.METADATA_FILENAME).read_text())
        row: dict[str, Any] = {
            "framework": framework,
            "framework_version": meta.get("framework_version"),
            "version": version,
            "test_accuracy": meta.get("test_accuracy"),
            "test_examples": meta.get("test_examples"),
            "epochs": meta.get("epochs"),
            "train_seconds": meta.get("train_seconds"),
            "train_images_per_second": meta.get("images_per_second"),
            "parameters": meta.get("parameters"),
            "size_mb": dir_size_bytes(version_dir) / 1e6,
        }
        floor = (inprocess or {}).get("results", {}).get(framework)
        if floor:
            row["latency_b1_p50_ms"] = floor["latency"]["1"]["median_ms"]
            row["latency_b64_p50_ms"] = floor["latency"]["64"]["median_ms"]
            row["inference_images_per_second_b256"] = floor["throughput"]["images_per_second"]
            row["inference_threads"] = floor.get("threads")
        rows.append(row)
    return rows


_COLUMNS = (
    ("framework", "framework", "{}"),
    ("version", "version", "{}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("epochs", "epochs", "{}"),
    ("train_seconds", "training s", "{:.0f}"),
    ("train_images_per_second", "training img/s", "{:.0f}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("latency_b1_p50_ms", "batch-1 p50 ms", "{:.3f}"),
    ("latency_b64_p50_ms", "batch-64 p50 ms", "{:.3f}"),
    ("inference_images_per_second_b256", "batch-256 img/s", "{:.0f}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    return ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in _COLUMNS]


def how_measured(rows: list[dict[str, Any]]) -> str:
    """How the latency columns were measured, per framework: the two calls differ, and a reader must know."""
    threads = {row["framework"]: row.get("inference_threads") or {} for row in rows}
    torch_threads = threads.get("pytorch", {}).get("intra_op", "?")
    tf_threads = threads.get("tensorflow", {})
    return (
        "Training figures come from each exported model's model.json. Latencies are the in-process floor "
        "(bench/inprocess.py), measured in the same run as the load test: PyTorch calls the TorchScript module "
        f"with {torch_threads} thread(s), as each gunicorn worker does; TensorFlow calls the SavedModel's "
        f"serving_default signature eagerly (intra-op threads: {tf_threads.get('intra_op', '?')}, inter-op: "
        f"{tf_threads.get('inter_op', '?')}). TF Serving and the stand-in run the same graph through a Session, "
        "which at batch 1 costs less than the eager call (bench.grpc_standin measures that path), so "
        "TensorFlow's batch-1 figure here overstates what its server spends on the model."
    )


def format_text(rows: list[dict[str, Any]]) -> str:
    headers = [title for _, title, _ in _COLUMNS]
    table = [headers] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table]
    return "\n".join([*lines, "", textwrap.fill(how_measured(rows), width=100)])


def format_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    return f"<p>{html.escape(how_measured(rows))}</p><table><tr>{head}</tr>{body}</table>"
