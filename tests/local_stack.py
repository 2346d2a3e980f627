"""The local stack's settings for tests: every port it opens on a free one, logs and reports in a folder."""

from __future__ import annotations

from pathlib import Path

from stack.config import StackConfig
from stack.processes import free_port


def free_port_config(models_dir: Path, folder: Path, ready_timeout_s: float = 180) -> StackConfig:
    """``make serve``'s settings with free ports, so tests run beside each other and beside a real stack."""
    return StackConfig(
        host="127.0.0.1",
        rest_port=free_port(),
        grpc_port=free_port(),
        tfs_rest_port=free_port(),
        web_port=free_port(),
        models_dir=models_dir,
        log_dir=folder / "logs",
        report_dir=folder / "reports",
        ready_timeout_s=ready_timeout_s,
    )
