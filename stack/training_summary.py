"""The two frameworks compared end to end: training figures, model size, in-process inference.

Read from what the stack already produced: each exported version's ``model.json``
(accuracy, training time and throughput) and its size on disk; and the in-process
inference benchmark (``bench/inprocess.py``: each model on its server's path, at equal
threads), run as a subprocess so that this process never imports torch or TensorFlow.
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

from bench.inprocess import format_table
from mnist_client import contract
from serving.model_repository import latest_version
from stack.config import REPO_ROOT, StackConfig

log = logging.getLogger(__name__)

FRAMEWORKS = (("pytorch", contract.TORCH_FRAMEWORK_DIR), ("tensorflow", contract.TF_FRAMEWORK_DIR))


def dir_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_inprocess_bench(config: StackConfig) -> dict[str, Any]:
    """Both models in process, each on its server's path, at one thread and at every core, in one run."""
    out_dir = config.report_dir / "inprocess"
    # Fewer timed calls than the full benchmark: the demo wants the floor, not a long run.
    cmd = [
        sys.executable, "-m", "bench.inprocess", "--output-dir", str(out_dir), "--models-dir", str(config.models_dir),
        "--calls-1", "500", "--calls-64", "100", "--calls-256", "20",
    ]  # fmt: skip
    log.info("measuring both models in process, on the paths their servers run")
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / "inprocess.json").read_text())


def collect(config: StackConfig) -> list[dict[str, Any]]:
    """One row per framework with its training figures (from each exported version's model.json)."""
    rows = []
    for framework, folder in FRAMEWORKS:
        base = config.models_dir / folder / contract.MODEL_NAME
        version = latest_version(base)
        if version is None:
            raise FileNotFoundError(f"no exported version under {base}")
        version_dir = base / str(version)
        meta = json.loads((version_dir / contract.METADATA_FILENAME).read_text())
        rows.append({
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
        })
    return rows


_COLUMNS = (
    ("framework", "framework", "{}"),
    ("version", "version", "{}"),
    ("test_accuracy", "test accuracy", "{:.4f}"),
    ("epochs", "epochs", "{}"),
    ("train_seconds", "training s", "{:.0f}"),
    ("train_images_per_second", "training img/s", "{:.0f}"),
    ("size_mb", "size MB", "{:.1f}"),
)


def _cells(row: dict[str, Any]) -> list[str]:
    return ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in _COLUMNS]


TRAINING_NOTE = "From each exported version's model.json; the folder size includes every file the export wrote."


def format_text(rows: list[dict[str, Any]]) -> str:
    headers = [title for _, title, _ in _COLUMNS]
    table = [headers] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table]
    return "\n".join([*lines, "", textwrap.fill(TRAINING_NOTE, width=100)])


def format_html(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in _COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows)
    return f"<p>{html.escape(TRAINING_NOTE)}</p><table><tr>{head}</tr>{body}</table>"


def format_inprocess_html(result: dict[str, Any]) -> str:
    """The in-process table (``bench.inprocess.format_table``) and what each path is, for the HTML report."""
    return f"<pre>{html.escape(format_table(result))}</pre>"
