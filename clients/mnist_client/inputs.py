"""Validation and conversion of images before they are sent.

The model takes float32 ``[N, 28, 28]`` with values in [0, 1] (raw pixel / 255; normalisation is inside
the model). Callers may pass that, uint8 pixels 0-255 (divided by 255 here, nothing more), or a single
``[28, 28]`` image. Everything is checked before any request is made, and each rejection says what was
got and what was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_client import contract
from mnist_client.errors import InvalidInputError

_EXPECTED = (
    f"a numpy array of shape [N, {contract.IMAGE_HEIGHT}, {contract.IMAGE_WIDTH}] (or one "
    f"[{contract.IMAGE_HEIGHT}, {contract.IMAGE_WIDTH}] image), float in "
    f"[{contract.INPUT_MIN:g}, {contract.INPUT_MAX:g}] or uint8 0-255"
)


def validate_images(images: Any) -> np.ndarray:
    """Check ``images`` and return them as a C-contiguous ``[N, 28, 28]`` array, uint8 or float32.

    uint8 input stays uint8 (the REST binary format sends it as is, 4 times smaller); float input becomes
    float32. Raises :class:`InvalidInputError` for anything the model cannot take.
    """
    array = _as_array(images)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise InvalidInputError(f"images have rank {array.ndim} (shape {list(array.shape)}); expected {_EXPECTED}")
    if array.shape[1:] != contract.IMAGE_SHAPE:
        raise InvalidInputError(
            f"images have shape {list(array.shape)}; expected [N, {contract.IMAGE_HEIGHT}, {contract.IMAGE_WIDTH}]"
        )
    if array.shape[0] == 0:
        raise InvalidInputError(f"images is an empty batch (shape {list(array.shape)}); expected at least one image")

    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype.kind != "f":  # numpy's floating types (not bool, integers, complex, objects)
        hint = (
            " (convert integer pixels with .astype(np.uint8) if they are 0-255)"
            if np.issubdtype(array.dtype, np.integer)
            else ""
        )
        raise InvalidInputError(f"images have dtype {array.dtype}; expected float32/float64 or uint8{hint}")

    array = np.ascontiguousarray(array, dtype=contract.INPUT_DTYPE)
    low, high = float(array.min()), float(array.max())
    if contract.INPUT_MIN <= low and high <= contract.INPUT_MAX:  # false for NaN and infinities too
        return array
    # Rejected: the slower checks below only find what to say.
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise InvalidInputError(f"images contain {bad} NaN or infinite value(s); expected finite values in [0, 1]")
    if low < contract.INPUT_MIN or high > contract.INPUT_MAX:
        hint = " (raw 0-255 pixels: pass them as uint8, or divide by 255)" if high > contract.INPUT_MAX else ""
        raise InvalidInputError(
            f"float images have values in [{low:g}, {high:g}]; expected values in "
            f"[{contract.INPUT_MIN:g}, {contract.INPUT_MAX:g}]{hint}"
        )
    return array


def to_model_input(images: Any) -> np.ndarray:
    """Validate ``images`` and return the model input: float32 ``[N, 28, 28]`` in [0, 1].

    uint8 pixels are divided by 255; float input is checked and cast to float32. Raises
    :class:`InvalidInputError` with what was got and what was expected.
    """
    array = validate_images(images)
    if array.dtype == np.uint8:
        return array.astype(contract.INPUT_DTYPE) / np.float32(contract.PIXEL_SCALE)
    return array


def _as_array(images: Any) -> np.ndarray:
    if isinstance(images, np.ndarray):
        return images
    if images is None or isinstance(images, (str, bytes, dict)):
        raise InvalidInputError(f"images is a {type(images).__name__}; expected {_EXPECTED}")
    try:
        array = np.asarray(images)
    except (ValueError, TypeError) as exc:  # ragged nested lists and the like
        raise InvalidInputError(f"images could not be read as an array ({exc}); expected {_EXPECTED}") from exc
    if array.dtype == object or array.dtype.kind in "USV":
        raise InvalidInputError(f"images is not numeric (numpy dtype {array.dtype}); expected {_EXPECTED}")
    return array
