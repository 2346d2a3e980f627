"""The page's predict request body, checked with an error that says what was wrong and what was expected."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mnist_client import contract

_EXPECTED = (
    f'{{"image": [...]}} with {contract.IMAGE_HEIGHT} rows of {contract.IMAGE_WIDTH} numbers in '
    f"[{contract.INPUT_MIN:g}, {contract.INPUT_MAX:g}]"
)


class BadImage(ValueError):
    """The request body is not one MNIST-shaped image; the message says why."""


def parse_image(payload: Any) -> np.ndarray:
    """``{"image": [[28 floats] x 28]}`` -> float32 ``[28, 28]`` in [0, 1]; :class:`BadImage` otherwise."""
    if not isinstance(payload, dict):
        raise BadImage(f"the body is a JSON {_json_type(payload)}; expected an object {_EXPECTED}")
    if "image" not in payload:
        raise BadImage(f"the body has keys {sorted(payload)}; expected {_EXPECTED}")
    rows = payload["image"]
    if not isinstance(rows, list) or len(rows) != contract.IMAGE_HEIGHT:
        got = f"a list of {len(rows)}" if isinstance(rows, list) else f"a JSON {_json_type(rows)}"
        raise BadImage(f'"image" is {got}; expected {_EXPECTED}')
    for y, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != contract.IMAGE_WIDTH:
            got = f"a list of {len(row)}" if isinstance(row, list) else f"a JSON {_json_type(row)}"
            raise BadImage(f'row {y} of "image" is {got}; expected {_EXPECTED}')
        for x, value in enumerate(row):
            # bool is an int in Python, but true/false is not a pixel
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BadImage(f'"image"[{y}][{x}] is a JSON {_json_type(value)}; expected a number in [0, 1]')
            if not math.isfinite(value) or not contract.INPUT_MIN <= value <= contract.INPUT_MAX:
                raise BadImage(
                    f'"image"[{y}][{x}] is {value!r}; expected values in '
                    f"[{contract.INPUT_MIN:g}, {contract.INPUT_MAX:g}] (raw pixel / {contract.PIXEL_SCALE:g})"
                )
    return np.asarray(rows, dtype=contract.INPUT_DTYPE)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
