"""Settings of the local stack, from environment variables; defaults from mnist_client.contract (docs/design.md)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mnist_client import contract
from stack.processes import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None
    if not 0 <= value <= 65535:
        raise ValueError(f"{name}={value}: expected a port number between 0 and 65535")
    return value


@dataclass(frozen=True)
class StackConfig:
    host: str
    rest_port: int
    grpc_port: int
    models_dir: Path
    log_dir: Path
    report_dir: Path
    ready_timeout_s: float
    tfs_rest_port: int = contract.TFS_REST_PORT  # the stand-in's TF Serving REST API
    web_port: int = contract.WEB_PORT  # the draw-a-digit page (serving.web)

    @property
    def torch_base_path(self) -> Path:
        return self.models_dir / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME

    @property
    def tf_base_path(self) -> Path:
        return self.models_dir / contract.TF_FRAMEWORK_DIR / contract.MODEL_NAME

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def tfs_rest_url(self) -> str:
        return f"http://{self.host}:{self.tfs_rest_port}"

    @property
    def web_url(self) -> str:
        return f"http://{self.host}:{self.web_port}"

    @classmethod
    def from_env(cls) -> "StackConfig":
        """``MNIST_HOST``, ``MNIST_REST_PORT``, ``MNIST_GRPC_PORT``, ``MNIST_TFS_REST_PORT``, ``MNIST_MODELS_DIR``,
        ``MNIST_LOG_DIR``, ``MNIST_REPORT_DIR``, ``MNIST_READY_TIMEOUT``, ``MNIST_WEB_PORT``."""
        return cls(
            host=os.environ.get("MNIST_HOST", "127.0.0.1"),
            rest_port=_int_env("MNIST_REST_PORT", contract.REST_PORT),
            grpc_port=_int_env("MNIST_GRPC_PORT", contract.TFS_GRPC_PORT),
            models_dir=Path(os.environ.get("MNIST_MODELS_DIR", REPO_ROOT / "models")).resolve(),
            log_dir=Path(os.environ.get("MNIST_LOG_DIR", REPO_ROOT / "logs")).resolve(),
            report_dir=Path(os.environ.get("MNIST_REPORT_DIR", REPO_ROOT / "reports")).resolve(),
            ready_timeout_s=float(os.environ.get("MNIST_READY_TIMEOUT", "120")),
            tfs_rest_port=_int_env("MNIST_TFS_REST_PORT", contract.TFS_REST_PORT),
            web_port=_int_env("MNIST_WEB_PORT", contract.WEB_PORT),
        )


def free_port_config(models_dir: Path, folder: Path, ready_timeout_s: float = 180) -> StackConfig:
    """``make serve``'s settings on 127.0.0.1 with every port a free one, logs and reports under ``folder``:
    for tests and benchmarks that run beside each other and beside a real stack. Set ``tfs_rest_port=0``
    (``dataclasses.replace``) for a stand-in with no REST API."""
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
