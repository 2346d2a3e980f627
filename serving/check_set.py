"""The check set: test images and the exported model's own answers, stored beside a version.

Training writes ``check_set.npz`` into every version it publishes: the test images it evaluated
(uint8, as MNIST stores them) and the probabilities and classes that the exported file gave for
them. A server that runs the version in another form (frozen, optimised for inference, in chunks,
on another device) runs the check set through that form when it loads the version and serves the
form only if it gives the same classes and probabilities within ``CHECK_ATOL``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_client import contract

CHECK_SET_FILENAME = "check_set.npz"
# A serving form must reproduce the export's probabilities this closely (the export's own bar).
CHECK_ATOL = 1e-5


class CheckSetError(ValueError):
    """``check_set.npz`` exists but does not hold what it must."""


@dataclass(frozen=True)
class CheckSet:
    pixels: np.ndarray  # uint8 [N, 28, 28]
    probabilities: np.ndarray  # float32 [N, 10]
    classes: np.ndarray  # int64 [N]

    @property
    def images(self) -> np.ndarray:
        """The images as clients send them: float32 in [0, 1]."""
        return pixels_to_images(self.pixels)

    def __len__(self) -> int:
        return len(self.pixels)


def pixels_to_images(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(contract.INPUT_DTYPE) / np.float32(contract.PIXEL_SCALE)


def write_check_set(folder: Path, pixels: np.ndarray, probabilities: np.ndarray, classes: np.ndarray) -> Path:
    """Store the check set in ``folder`` (a version being published); returns the file."""
    check = CheckSet(np.asarray(pixels), np.asarray(probabilities), np.asarray(classes))
    _validate(check, "the check set to write")
    path = Path(folder) / CHECK_SET_FILENAME
    np.savez_compressed(path, pixels=check.pixels, probabilities=check.probabilities, classes=check.classes)
    return path


def read_check_set(folder: Path) -> CheckSet | None:
    """The version's check set, None when it has none (exports from before it existed)."""
    path = Path(folder) / CHECK_SET_FILENAME
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            check = CheckSet(data["pixels"], data["probabilities"], data["classes"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckSetError(f"{path} is not a readable check set: {exc}") from exc
    _validate(check, str(path))
    return check


def disagreement(check: CheckSet, probabilities: np.ndarray, classes: np.ndarray, rows: int | None = None) -> str | None:
    """Why answers for the first ``rows`` images (default all) differ from the export's; None if they agree."""
    rows = len(check) if rows is None else rows
    want_classes, want_probabilities = check.classes[:rows], check.probabilities[:rows]
    if probabilities.shape != want_probabilities.shape or classes.shape != want_classes.shape:
        return f"answers of shape {list(probabilities.shape)}, expected {list(want_probabilities.shape)}"
    differing = int(np.sum(classes != want_classes))
    if differing:
        return f"a different class for {differing} of {rows} check images"
    worst = float(np.max(np.abs(probabilities - want_probabilities))) if rows else 0.0
    if worst > CHECK_ATOL:
        return f"probabilities differ by up to {worst:.2e} (at most {CHECK_ATOL:.0e} allowed)"
    return None


def _validate(check: CheckSet, where: str) -> None:
    n = len(check.pixels)
    problems = []
    if check.pixels.dtype != np.uint8 or check.pixels.shape[1:] != contract.IMAGE_SHAPE:
        problems.append(f"pixels {check.pixels.dtype} {list(check.pixels.shape)}, expected uint8 [N, 28, 28]")
    if check.probabilities.dtype != contract.PROBABILITIES_DTYPE or check.probabilities.shape != (n, contract.NUM_CLASSES):
        problems.append(f"probabilities {check.probabilities.dtype} {list(check.probabilities.shape)}, "
                        f"expected float32 [{n}, {contract.NUM_CLASSES}]")  # fmt: skip
    if check.classes.dtype != contract.CLASSES_DTYPE or check.classes.shape != (n,):
        problems.append(f"classes {check.classes.dtype} {list(check.classes.shape)}, expected int64 [{n}]")
    if n == 0:
        problems.append("no images")
    if problems:
        raise CheckSetError(f"{where}: " + "; ".join(problems))
