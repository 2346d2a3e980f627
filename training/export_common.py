"""Framework-neutral parts of exporting: the load-back check and model metadata."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import numpy as np

from mnist_client import contract

# Exported models must reproduce the in-memory model's probabilities this closely.
EXPORT_ATOL = 1e-5


def verify_export(
    ref_probs: np.ndarray,
    ref_classes: np.ndarray,
    got_probs: np.ndarray,
    got_classes: np.ndarray,
    atol: float = EXPORT_ATOL,
) -> None:
    """Raise ``RuntimeError`` if an exported model disagrees with the in-memory one."""
    if not np.array_equal(ref_classes, got_classes):
        diff = int(np.sum(ref_classes != got_classes))
        raise RuntimeError(f"exported model predicts a different class for {diff} of {len(ref_classes)} images")
    worst = float(np.max(np.abs(ref_probs - got_probs))) if len(ref_probs) else 0.0
    if worst > atol:
        raise RuntimeError(f"exported model probabilities differ by up to {worst:.2e}, expected at most {atol:.0e}")


def base_metadata(
    *,
    version: int,
    framework: str,
    framework_version: str,
    model_format: str,
    parameters: int,
    test_accuracy: float,
    test_examples: int,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The self-description written beside an exported model (``model.json``)."""
    return {
        "model_name": contract.MODEL_NAME,
        "version": version,
        "framework": framework,
        "framework_version": framework_version,
        "format": model_format,
        "signature": contract.signature(),
        "normalization": {"mean": contract.NORMALIZE_MEAN, "std": contract.NORMALIZE_STD},
        "parameters": int(parameters),
        "test_accuracy": float(test_accuracy),
        "test_examples": int(test_examples),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
