"""Request decoding and response encoding for the predict endpoint.

Requests arrive in TF Serving's JSON shapes or as a ``.npy`` body; both end as
one C-contiguous float32 array ``[N, 28, 28]`` in [0, 1] that satisfies the
model contract, or as a :class:`~serving.torch_server.errors.ApiError` saying
what was wrong and what was expected.

JSON forms accepted (TF Serving's REST API, one input named ``images``):

- row form ``{"instances": [image, ...]}`` or ``{"instances": [{"images": image}, ...]}``,
  answered ``{"predictions": [{"probabilities": [...], "classes": k}, ...]}``;
- column form ``{"inputs": [image, ...]}`` or ``{"inputs": {"images": [image, ...]}}``,
  answered ``{"outputs": {"probabilities": [[...], ...], "classes": [...]}}``;
- an optional ``"signature_name"`` that must be ``serving_default``.

``.npy`` bodies (``Content-Type: application/x-npy``) hold uint8 pixels 0-255 or
float32 values in [0, 1], shape ``[N, 28, 28]``; they are answered in column form.
"""

from __future__ import annotations

import io
import re
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from mnist_client import contract
from serving.torch_server.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

JSON_CONTENT_TYPE = "application/json"
NPY_CONTENT_TYPE = "application/x-npy"
ACCEPTED_CONTENT_TYPES = (JSON_CONTENT_TYPE, NPY_CONTENT_TYPE)

_EXPECTED_SHAPE = f"[N, {contract.IMAGE_HEIGHT}, {contract.IMAGE_WIDTH}]"
_EXPECTED_JSON = (
    f'{{"instances": [image, ...]}} or {{"inputs": [image, ...]}}, each image {contract.IMAGE_HEIGHT} rows of '
    f"{contract.IMAGE_WIDTH} numbers in [0, 1]"
)
_NPY_MAGIC = b"\x93NUMPY"
_NONFINITE_TOKEN = re.compile(rb"NaN|Infinity", re.IGNORECASE)
_BOOLEAN_TOKENS = (b"true", b"false")
_NUMERIC_KINDS = "fiu"
_ENCODE_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
# numpy parses a .npy header with ast.literal_eval. Before CPython 3.11.8 the AST builder kept its recursion
# counter per interpreter, not per thread (gh-106905), so two threads parsing at once could fail a valid
# request with "SystemError: AST constructor recursion depth mismatch". Debian bookworm's Python (the images)
# is 3.11.2, so header parses are serialised here; a parse takes microseconds.
_NPY_HEADER_LOCK = threading.Lock()


@dataclass(frozen=True)
class DecodedRequest:
    """A validated batch: ``images`` float32 ``[N, 28, 28]`` in [0, 1]; ``columnar`` picks the answer form."""

    images: np.ndarray
    columnar: bool


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``; missing -> JSON (TF Serving's default)."""
    if not content_type:
        return JSON_CONTENT_TYPE
    return content_type.split(";", 1)[0].strip().lower()


def decode_request(body: bytes, content_type: str | None, max_batch: int) -> DecodedRequest:
    """Decode a predict body by its content type; raise an ApiError for anything the model cannot take."""
    kind = media_type(content_type)
    if kind == JSON_CONTENT_TYPE:
        return decode_json(body, max_batch)
    if kind == NPY_CONTENT_TYPE:
        return DecodedRequest(decode_npy(body, max_batch), columnar=True)
    raise UnsupportedMediaType(
        f"unsupported Content-Type {content_type!r}; expected {JSON_CONTENT_TYPE} (TF Serving's JSON) "
        f"or {NPY_CONTENT_TYPE} (a .npy file of uint8 or float32 {_EXPECTED_SHAPE})"
    )


def decode_json(body: bytes, max_batch: int) -> DecodedRequest:
    if not body:
        raise BadRequest(f"empty request body; expected JSON: {_EXPECTED_JSON}")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        hint = ""
        if _NONFINITE_TOKEN.search(body):
            hint = " (NaN and Infinity are not valid JSON, and values must be finite numbers in [0, 1])"
        raise BadRequest(f"malformed JSON: {exc}{hint}; expected {_EXPECTED_JSON}") from None
    if not isinstance(document, dict):
        raise BadRequest(f"expected a JSON object, got {_json_type(document)}; expected {_EXPECTED_JSON}")

    signature = document.get("signature_name", contract.SIGNATURE_NAME)
    if signature != contract.SIGNATURE_NAME:
        raise BadRequest(f"unknown signature_name {signature!r}; this model has only {contract.SIGNATURE_NAME!r}")
    keys = sorted(k for k in document if k != "signature_name")
    if keys == ["instances"]:
        data, columnar, where = _row_images(document["instances"]), False, "instances"
    elif keys == ["inputs"]:
        data, columnar, where = _column_images(document["inputs"]), True, "inputs"
    elif "instances" in keys and "inputs" in keys:
        raise BadRequest('both "instances" and "inputs" given; send exactly one of them')
    else:
        got = ", ".join(repr(k) for k in keys) or "no keys"
        raise BadRequest(f"unexpected top-level keys ({got}); expected {_EXPECTED_JSON}")
    return DecodedRequest(_to_images(data, where, max_batch, body), columnar)


def decode_npy(body: bytes, max_batch: int) -> np.ndarray:
    """A ``.npy`` body -> float32 ``[N, 28, 28]``; the header is checked before any allocation."""
    expected = f"a .npy file (numpy.save) of uint8 or float32 {_EXPECTED_SHAPE}"
    if not body.startswith(_NPY_MAGIC):
        raise BadRequest(f"body is not a .npy file (it lacks the \\x93NUMPY magic); expected {expected}")
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            with _NPY_HEADER_LOCK:
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            with _NPY_HEADER_LOCK:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}; numpy.save writes 1.0")
    except ValueError as exc:
        raise BadRequest(f"unreadable .npy header: {exc}; expected {expected}") from None
    if dtype.hasobject or (dtype.kind, dtype.itemsize) not in (("u", 1), ("f", 4)):
        raise BadRequest(f".npy dtype {dtype.str}: expected uint8 (pixels 0-255) or float32 (values in [0, 1])")
    _check_shape(tuple(shape), "the .npy array", max_batch)
    offset = stream.tell()
    count = int(np.prod(shape))
    need = count * dtype.itemsize
    if len(body) - offset != need:
        raise BadRequest(
            f".npy data is {len(body) - offset} bytes but the header's shape {tuple(shape)} of {dtype.str} needs "
            f"{need}; the body is truncated or padded"
        )
    flat = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    array = flat.reshape(shape, order="F" if fortran_order else "C")
    if dtype.kind == "u":
        # Exactly the contract's conversion (pixel / 255 in float32), as the client does it.
        return np.ascontiguousarray(array, dtype=np.float32) / np.float32(contract.PIXEL_SCALE)
    _check_range(array, "the .npy array")
    # A copy: native byte order, C order, and writable (torch.from_numpy wants writable memory).
    return np.array(array, dtype=np.float32, order="C", copy=True)


def encode_predictions(probabilities: np.ndarray, classes: np.ndarray, columnar: bool) -> bytes:
    """The TF Serving answer: row form ``predictions`` or column form ``outputs``, as JSON bytes."""
    if columnar:
        payload: dict[str, Any] = {
            "outputs": {contract.PROBABILITIES_NAME: probabilities, contract.CLASSES_NAME: classes}
        }
    else:
        payload = {
            "predictions": [
                {contract.PROBABILITIES_NAME: row, contract.CLASSES_NAME: label}
                for row, label in zip(probabilities, classes.tolist(), strict=True)
            ]
        }
    return orjson.dumps(payload, option=_ENCODE_OPTIONS)


def encode_json(payload: Any) -> bytes:
    return orjson.dumps(payload, option=_ENCODE_OPTIONS)


def _row_images(instances: Any) -> Any:
    """Row form: a list of images, or of ``{"images": image}`` objects (TF Serving's named row form)."""
    if isinstance(instances, list) and instances and isinstance(instances[0], dict):
        images = []
        for index, instance in enumerate(instances):
            if not isinstance(instance, dict) or list(instance) != [contract.INPUT_NAME]:
                got = sorted(instance) if isinstance(instance, dict) else _json_type(instance)
                raise BadRequest(
                    f"instances[{index}] is {got}; in the named row form every instance must be an object with "
                    f"exactly one key {contract.INPUT_NAME!r}"
                )
            images.append(instance[contract.INPUT_NAME])
        return images
    return instances


def _column_images(inputs: Any) -> Any:
    """Column form: the batch itself, or ``{"images": batch}``."""
    if isinstance(inputs, dict):
        if list(inputs) != [contract.INPUT_NAME]:
            raise BadRequest(
                f"inputs has keys {sorted(inputs)}; expected exactly one input named {contract.INPUT_NAME!r}"
            )
        return inputs[contract.INPUT_NAME]
    return inputs


def _to_images(data: Any, where: str, max_batch: int, body: bytes) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where} must be a list of images {_EXPECTED_SHAPE}, got {_json_type(data)}")
    if not data:
        raise BadRequest(f"empty batch: {where} holds no image; expected at least one {_EXPECTED_SHAPE[3:]} image")
    if len(data) > max_batch:
        raise PayloadTooLarge(f"batch of {len(data)} images exceeds this server's limit of {max_batch} per request")
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        # Ragged nesting (rows of different lengths, an image next to a number, too deep).
        raise BadRequest(f"{where} is not a regular array of numbers: {_describe_irregular(data, where)}") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise BadRequest(f"{where} holds non-numeric values: {_first_non_number(data, where)}; expected numbers")
    # numpy turns [true, 0.5] into [1.0, 0.5]; JSON booleans are never pixels. The scan
    # only runs when the body spells a boolean somewhere, so the fast path stays fast.
    if any(token in body for token in _BOOLEAN_TOKENS):
        found = _first_non_number(data, where)
        if found:
            raise BadRequest(f"{where} holds non-numeric values: {found}; expected numbers")
    _check_shape(array.shape, where, max_batch)
    _check_range(array, where)
    return array.astype(np.float32)


def _check_shape(shape: tuple[int, ...], where: str, max_batch: int) -> None:
    if len(shape) != 3 or shape[1:] != contract.IMAGE_SHAPE:
        hint = ""
        if shape == contract.IMAGE_SHAPE:
            hint = " (a single image must still be wrapped in a batch: [image])"
        elif len(shape) == 2 and shape[1] == contract.IMAGE_HEIGHT * contract.IMAGE_WIDTH:
            hint = " (flattened images: reshape each to 28 x 28)"
        raise BadRequest(f"{where} has shape {list(shape)}; expected {_EXPECTED_SHAPE}{hint}")
    if shape[0] == 0:
        raise BadRequest(f"empty batch: {where} holds no image; expected at least one image")
    if shape[0] > max_batch:
        raise PayloadTooLarge(f"batch of {shape[0]} images exceeds this server's limit of {max_batch} per request")


def _check_range(array: np.ndarray, where: str) -> None:
    low, high = array.min(), array.max()
    if low >= contract.INPUT_MIN and high <= contract.INPUT_MAX:  # False for NaN as well
        return
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BadRequest(f"{where} holds NaN or infinite values; expected finite numbers in [0, 1]")
    hint = ""
    if low >= 0 and 1 < high <= contract.PIXEL_SCALE:
        hint = "; this looks like raw 0-255 pixels: divide them by 255 (or send uint8 as .npy)"
    raise BadRequest(f"{where} has values from {low:g} to {high:g}; expected pixel / 255, in [0, 1]{hint}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _first_non_number(data: Any, where: str) -> str:
    """Where the first value that is not a JSON number sits, e.g. 'a string at instances[0][3][5]'; '' if none."""
    stack: list[tuple[Any, str]] = [(data, where)]
    while stack:
        value, path = stack.pop()
        if isinstance(value, list):
            stack.extend((value[i], f"{path}[{i}]") for i in range(len(value) - 1, -1, -1))
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{_json_type(value)} at {path}"
    return ""


def _describe_irregular(data: Any, where: str) -> str:
    """Explain ragged input: the first list whose length or nesting differs from its siblings'."""
    expected = (None, contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH)
    level: list[tuple[Any, str]] = [(data, where)]
    for depth in range(len(expected)):
        children: list[tuple[Any, str]] = []
        for value, path in level:
            if not isinstance(value, list):
                return f"{path} is {_json_type(value)}, expected an array (depth {depth} of {_EXPECTED_SHAPE})"
            want = expected[depth]
            if want is not None and len(value) != want:
                return f"{path} has {len(value)} entries, expected {want}"
            children.extend((child, f"{path}[{i}]") for i, child in enumerate(value))
        level = children
    for value, path in level:
        if isinstance(value, list):
            return f"{path} is an array, expected a number (too deeply nested for {_EXPECTED_SHAPE})"
    return f"nested lists of different lengths; expected {_EXPECTED_SHAPE}"
