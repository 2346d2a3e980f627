"""TF Serving's JSON tensors for the REST predict API: JSON values to arrays and outputs back to JSON.

The rules are those of TensorFlow Serving's ``util/json_tensor.cc``, on numpy arrays:

- the body is one JSON object; ``NaN``, ``Infinity`` and ``-Infinity`` are accepted as numbers;
  ``signature_name`` (optional) must be a string;
- row form ``{"instances": [...]}``: each element is one instance, either the value of the only
  input or an object with exactly one key per input; instances are stacked into a batch and must
  all have the same shape;
- column form ``{"inputs": value}`` (the only input) or ``{"inputs": {"<input>": value, ...}}``
  (every input; other keys are ignored);
- a value's shape comes from its first elements at each depth, and every list must then have that
  size and every number sit at the same depth; a number must fit the input's dtype: an integer
  type takes only integers in its range, float takes integers up to 2**24 - 1 and decimals within
  float's range (double: 2**53 - 1), bool takes true/false, string takes strings or
  ``{"b64": "<base64>"}``;
- the answer mirrors the request: row form ``{"predictions": [...]}`` (one value per instance for a
  single output, one object per instance with every output otherwise), column form
  ``{"outputs": value}`` or ``{"outputs": {"<output>": value, ...}}``; string outputs whose name
  ends in ``_bytes`` are written as ``{"b64": ...}``; NaN and infinities are written as ``NaN``,
  ``Infinity``, ``-Infinity``.

Error messages keep TF Serving's wording; JSON values quoted in them are written compactly and cut
at ``status.MAX_ECHO_CHARS`` characters. Regular numeric input takes a vectorised path (numpy and
orjson); anything it does not accept as is goes through the element-by-element check, which either
accepts it with the same result or says what is wrong where.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
import orjson
from tensorflow.core.framework import types_pb2

from serving.tfs_standin import status
from serving.tfs_standin.servable import TensorSpec

SIGNATURE_KEY = "signature_name"
INSTANCES_KEY = "instances"
INPUTS_KEY = "inputs"
PREDICTIONS_KEY = "predictions"
OUTPUTS_KEY = "outputs"
BASE64_KEY = "b64"
BYTES_SUFFIX = "_bytes"  # string outputs named so are written base64-encoded

# The largest integers a float type holds exactly (2**digits - 1): larger ones are refused as lossy.
_MAX_EXACT_INT = {types_pb2.DT_FLOAT: (1 << 24) - 1, types_pb2.DT_DOUBLE: (1 << 53) - 1}
_FLOAT_MAX = {types_pb2.DT_FLOAT: float(np.finfo(np.float32).max), types_pb2.DT_DOUBLE: float(np.finfo(np.float64).max)}
# Integer dtypes: (low, high) of the JSON integers each takes (TF Serving checks int32 range for the
# narrower ones too, then casts, as TensorFlow does with int_val).
_INT_RANGES = {
    types_pb2.DT_INT32: (-(1 << 31), (1 << 31) - 1),
    types_pb2.DT_INT16: (-(1 << 31), (1 << 31) - 1),
    types_pb2.DT_INT8: (-(1 << 31), (1 << 31) - 1),
    types_pb2.DT_UINT8: (-(1 << 31), (1 << 31) - 1),
    types_pb2.DT_INT64: (-(1 << 63), (1 << 63) - 1),
    types_pb2.DT_UINT32: (0, (1 << 32) - 1),
    types_pb2.DT_UINT64: (0, (1 << 64) - 1),
}
# TensorFlow's DataTypeString names, as TF Serving's messages use them.
_DTYPE_NAMES = {
    types_pb2.DT_FLOAT: "float", types_pb2.DT_DOUBLE: "double", types_pb2.DT_HALF: "half",
    types_pb2.DT_BFLOAT16: "bfloat16", types_pb2.DT_INT32: "int32", types_pb2.DT_INT16: "int16",
    types_pb2.DT_INT8: "int8", types_pb2.DT_UINT8: "uint8", types_pb2.DT_UINT16: "uint16",
    types_pb2.DT_INT64: "int64", types_pb2.DT_UINT32: "uint32", types_pb2.DT_UINT64: "uint64",
    types_pb2.DT_BOOL: "bool", types_pb2.DT_STRING: "string",
}
# The most dimensions an array may have (numpy's limit); deeper JSON lists are refused.
MAX_RANK = 64
# Output dtype kinds orjson writes straight from the array (float16 is widened to float32 first).
_NATIVE_OUTPUT_KINDS = "biuf"


class RequestFormat(enum.Enum):
    """How the request spelled its inputs, and so how the answer spells the outputs."""

    ROW = "row"  # "instances" -> "predictions"
    COLUMNAR = "columnar"  # "inputs" -> "outputs"


def dtype_name(dtype: int) -> str:
    if dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    name = types_pb2.DataType.Name(dtype) if dtype in types_pb2.DataType.values() else str(dtype)
    return name.removeprefix("DT_").lower()


def json_text(value: Any) -> str:
    """A JSON value as quoted in error messages: compact, cut at ``status.MAX_ECHO_CHARS``."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return status.clip(text)


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


# --- the request -------------------------------------------------------------------------------


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; INVALID_ARGUMENT with the parser's complaint otherwise."""
    if not body.strip():
        raise status.invalid_argument("JSON Parse error: The document is empty")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        # The standard parser also takes NaN, Infinity and -Infinity (so does TF Serving's), and
        # explains what orjson refused.
        try:
            document = json.loads(body)
        except json.JSONDecodeError as exc:
            raise status.invalid_argument(f"JSON Parse error: {exc.msg} at offset: {exc.pos}") from None
        except UnicodeDecodeError as exc:
            raise status.invalid_argument(f"JSON Parse error: Invalid encoding in string. at offset: {exc.start}") from None
        except RecursionError:
            raise status.invalid_argument("JSON Parse error: the document is nested too deeply") from None
        except ValueError as exc:  # e.g. an integer literal of thousands of digits
            raise status.invalid_argument(f"JSON Parse error: {exc}") from None
    if not isinstance(document, dict):
        raise status.invalid_argument(f"JSON Value: {json_text(document)} Is not object")
    return document


def signature_name(document: Mapping[str, Any]) -> str:
    """The request's ``signature_name`` ("" when absent: the default signature)."""
    name = document.get(SIGNATURE_KEY, "")
    if not isinstance(name, str):
        raise status.invalid_argument(
            f"JSON Value: {json_text(document)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return name


def decode_inputs(
    document: Mapping[str, Any],
    specs: Mapping[str, TensorSpec],
    signature: str = "",
    body_has_booleans: bool = True,
) -> tuple[dict[str, np.ndarray], RequestFormat]:
    """The request's input arrays by alias (dtypes from ``specs``, the inputs of ``signature``) and its format.

    ``body_has_booleans``: whether the raw body spells ``true`` or ``false`` anywhere. numpy reads
    ``[true, 0.5]`` as ``[1.0, 0.5]``, so numbers take the vectorised path only when it does not.
    """
    if not specs:
        raise status.invalid_argument(f"Failed to get input map for signature: {status.clip(signature) or 'DEFAULT'}")
    has_instances, has_inputs = INSTANCES_KEY in document, INPUTS_KEY in document
    if has_instances and has_inputs:
        raise status.invalid_argument(
            f"JSON Value: {json_text(document)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if has_instances:
        instances = document[INSTANCES_KEY]
        if not isinstance(instances, list):
            raise status.invalid_argument(
                f"JSON Value: {json_text(document)} Excepting 'instances' to be an list/array"
            )
        if not instances:
            raise status.invalid_argument(f"JSON Value: {json_text(document)} No values in 'instances' array")
        return _rows(instances, specs, body_has_booleans), RequestFormat.ROW
    if has_inputs:
        return _columns(document[INPUTS_KEY], specs, body_has_booleans), RequestFormat.COLUMNAR
    raise status.invalid_argument("Missing 'inputs' or 'instances' key")


def _is_base64_object(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(BASE64_KEY), str)


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_base64_object(value)


def _columns(value: Any, specs: Mapping[str, TensorSpec], booleans: bool) -> dict[str, np.ndarray]:
    if not _is_named_object(value):
        if len(specs) > 1:
            raise status.invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple input tensors required as "
                "per tensorinfo_map"
            )
        (alias, spec), = specs.items()
        return {alias: _to_array(value, spec.dtype, booleans)}
    arrays = {}
    for alias in sorted(specs):
        if alias not in value:
            raise status.invalid_argument(f"Missing named input: {status.clip(alias)} in 'inputs' object.")
        arrays[alias] = _to_array(value[alias], specs[alias].dtype, booleans)
    return arrays


def _rows(instances: list[Any], specs: Mapping[str, TensorSpec], booleans: bool) -> dict[str, np.ndarray]:
    first = instances[0]
    if not isinstance(first, dict) and len(specs) > 1:
        raise status.invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple input tensors required as per "
            "tensorinfo_map"
        )
    named = _is_named_object(first)
    columns: dict[str, list[Any]] | None = None
    if not named:
        columns = {next(iter(specs)): instances}
    elif all(_is_named_object(e) and e.keys() == specs.keys() for e in instances):
        columns = {alias: [e[alias] for e in instances] for alias in specs}
    if columns is not None:
        # Every instance has the expected layout: try stacking each input's instances at once.
        arrays = {alias: _fast_array(column, specs[alias].dtype, booleans) for alias, column in columns.items()}
        if all(a is not None for a in arrays.values()):
            return arrays  # type: ignore[return-value]
    return _rows_checked(instances, specs, named)


def _rows_checked(instances: list[Any], specs: Mapping[str, TensorSpec], named: bool) -> dict[str, np.ndarray]:
    """Row form element by element, with TF Serving's checks and messages."""
    values: dict[str, list[Any]] = {alias: [] for alias in specs}
    shapes: dict[str, tuple[int, ...]] = {}
    names = set(specs)

    def add(item: Any, alias: str, index: int, key_text: str) -> None:
        try:
            if alias not in specs:
                raise status.invalid_argument(f"JSON object: does not have named input: {status.clip(alias)}")
            shape = _dense_shape(item)
            flat = _collect(item, shape, _converter(specs[alias].dtype))
            if alias not in shapes:
                shapes[alias] = shape
            elif len(flat) != _size(shapes[alias]):
                raise status.invalid_argument(f"Expecting tensor size: {_size(shapes[alias])} but got: {len(flat)}")
            elif shape != shapes[alias]:
                raise status.invalid_argument(
                    f"Expecting shape {_shape_text(shapes[alias])} but got: {_shape_text(shape)}"
                )
        except status.ServingError as exc:
            raise status.invalid_argument(
                f"Failed to process element: {index}{key_text} of 'instances' list. Error: {exc.code.name}: "
                f"{exc.message}"
            ) from None
        values[alias].extend(flat)

    for index, element in enumerate(instances):
        if named:
            if not _is_named_object(element):
                raise status.invalid_argument(f"Expecting object but got list at item {index} of input list")
            for alias, item in element.items():
                add(item, alias, index, f" key: {status.clip(alias)}")
            if element.keys() != names:
                raise status.invalid_argument(
                    f"Failed to process element: {index} of 'instances' list. JSON object: {json_text(element)} "
                    f"keys must be equal to: {','.join(sorted(names))}"
                )
        else:
            if _is_named_object(element):
                raise status.invalid_argument(f"Expecting value/list but got object at item {index} of input list")
            add(element, next(iter(specs)), index, "")
    return {
        alias: _build(values[alias], (len(instances), *shapes[alias]), specs[alias].dtype) for alias in specs
    }


def _to_array(value: Any, dtype: int, booleans: bool) -> np.ndarray:
    """One column-form value as an array of ``dtype``."""
    array = _fast_array(value, dtype, booleans)
    if array is not None:
        return array
    shape = _dense_shape(value)
    return _build(_collect(value, shape, _converter(dtype)), shape, dtype)


def _fast_array(value: Any, dtype: int, booleans: bool) -> np.ndarray | None:
    """``value`` as an array when numpy reads it as a regular array that ``dtype`` takes as is; else None.

    None never means the value is wrong, only that the element-by-element check must decide.
    ``booleans``: the body may hold true/false among numbers (numpy would read them as 1 and 0).
    """
    if dtype == types_pb2.DT_BOOL:
        booleans = False  # numpy only makes a bool array of booleans alone
    elif dtype not in _MAX_EXACT_INT and dtype not in _INT_RANGES:
        return None
    if booleans:
        return None
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged, or numbers numpy cannot hold
        return None
    kind = array.dtype.kind
    if dtype == types_pb2.DT_BOOL:
        return array if kind == "b" else None
    if kind not in "iuf" or array.size == 0:
        return None
    if dtype in _MAX_EXACT_INT:
        # Integers beyond the exact range are lossy, and in a float array an integer cannot be told
        # from a decimal: values that large (and NaN) are left to the element-by-element check.
        largest = np.max(np.abs(array)) if kind == "f" else max(abs(int(array.min())), abs(int(array.max())))
        if not largest <= _MAX_EXACT_INT[dtype]:
            return None
        return array.astype(np.float32 if dtype == types_pb2.DT_FLOAT else np.float64)
    if kind == "f":
        return None  # a decimal where an integer is expected
    low, high = _INT_RANGES[dtype]
    if int(array.min()) < low or int(array.max()) > high:
        return None
    return array.astype(_numpy_dtype(dtype))


def _numpy_dtype(dtype: int) -> np.dtype:
    return {
        types_pb2.DT_FLOAT: np.dtype(np.float32), types_pb2.DT_DOUBLE: np.dtype(np.float64),
        types_pb2.DT_INT32: np.dtype(np.int32), types_pb2.DT_INT16: np.dtype(np.int16),
        types_pb2.DT_INT8: np.dtype(np.int8), types_pb2.DT_UINT8: np.dtype(np.uint8),
        types_pb2.DT_INT64: np.dtype(np.int64), types_pb2.DT_UINT32: np.dtype(np.uint32),
        types_pb2.DT_UINT64: np.dtype(np.uint64), types_pb2.DT_BOOL: np.dtype(bool),
        types_pb2.DT_STRING: np.dtype(object),
    }[dtype]


def _dense_shape(value: Any) -> tuple[int, ...]:
    """The shape a JSON value claims: the length of the first list at each depth."""
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        if not value:
            break
        value = value[0]
    if len(dims) > MAX_RANK:
        raise status.invalid_argument(
            f"a value is nested {len(dims)} lists deep; a tensor has at most {MAX_RANK} dimensions"
        )
    return tuple(dims)


def _size(shape: tuple[int, ...]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _collect(value: Any, shape: tuple[int, ...], convert: Callable[[Any], Any]) -> list[Any]:
    """Every leaf of ``value`` in order, converted; INVALID_ARGUMENT where it departs from ``shape``."""
    rank = len(shape)
    flat: list[Any] = []
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if not isinstance(item, list):
            if level != rank:
                raise status.invalid_argument(
                    f"JSON Value: {json_text(item)} found at incorrect level: {level + 1} in the JSON DOM. "
                    f"Expected at level: {rank}"
                )
            flat.append(convert(item))
            continue
        if level >= rank:
            raise status.invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(item) != shape[level]:
            raise status.invalid_argument(
                f"Encountered list at unexpected size: {len(item)} at level: {level} expected size: {shape[level]}"
            )
        stack.extend((child, level + 1) for child in reversed(item))
    return flat


def _type_error(value: Any, dtype: int) -> status.ServingError:
    return status.invalid_argument(
        f"JSON Value: {json_text(value)} Type: {_json_type(value)} is not of expected type: {dtype_name(dtype)}"
    )


def _converter(dtype: int) -> Callable[[Any], Any]:
    """A function that checks one JSON leaf against ``dtype`` and returns the Python value to store."""
    if dtype in _MAX_EXACT_INT:
        exact, largest, target = _MAX_EXACT_INT[dtype], _FLOAT_MAX[dtype], dtype_name(dtype)

        def to_float(value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _type_error(value, dtype)
            # Integers beyond 64 bits are doubles to TF Serving's parser; the rest must be exact.
            if isinstance(value, int) and -(1 << 63) <= value < (1 << 64):
                lossy = abs(value) > exact
            else:
                try:
                    number = float(value)
                    lossy = abs(number) > largest and np.isfinite(number)
                except OverflowError:
                    lossy = True
            if lossy:
                raise status.invalid_argument(
                    f"Cannot convert JSON value: {json_text(value)} to {target} without loss of precision."
                )
            return float(value)

        return to_float
    if dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]

        def to_int(value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise _type_error(value, dtype)
            return value

        return to_int
    if dtype == types_pb2.DT_BOOL:

        def to_bool(value: Any) -> bool:
            if not isinstance(value, bool):
                raise _type_error(value, dtype)
            return value

        return to_bool
    if dtype == types_pb2.DT_STRING:

        def to_bytes(value: Any) -> bytes:
            if isinstance(value, str):
                return value.encode("utf-8", "surrogatepass")
            if not isinstance(value, dict):
                raise _type_error(value, dtype)
            if not _is_base64_object(value):
                raise status.invalid_argument(f"JSON Value: {json_text(value)} not formatted correctly for base64 data")
            try:
                return base64.b64decode(value[BASE64_KEY], validate=True)
            except (binascii.Error, ValueError):
                raise status.invalid_argument("Unable to base64 decode") from None

        return to_bytes

    def unsupported(value: Any) -> Any:
        raise _unimplemented(value, dtype)

    return unsupported


def _unimplemented(value: Any, dtype: int) -> status.ServingError:
    return status.ServingError(
        grpc.StatusCode.UNIMPLEMENTED, f"Conversion of JSON Value: {json_text(value)} to type: {dtype_name(dtype)}"
    )


def _build(flat: list[Any], shape: tuple[int, ...], dtype: int) -> np.ndarray:
    if dtype == types_pb2.DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    if dtype in _INT_RANGES and dtype not in (types_pb2.DT_INT64, types_pb2.DT_UINT64):
        # Checked against int32 (uint32) range; narrower types wrap, as TensorFlow casts int_val.
        wide = np.uint64 if dtype == types_pb2.DT_UINT32 else np.int64
        return np.array(flat, dtype=wide).astype(_numpy_dtype(dtype)).reshape(shape)
    if dtype in _MAX_EXACT_INT or dtype in _INT_RANGES or dtype == types_pb2.DT_BOOL:
        return np.array(flat, dtype=_numpy_dtype(dtype)).reshape(shape)
    raise _unimplemented([], dtype)  # the values of other dtypes fail one by one; this is an empty one


# --- the answer --------------------------------------------------------------------------------


def encode_outputs(outputs: Mapping[str, np.ndarray], request_format: RequestFormat) -> bytes:
    """The predict answer for ``outputs`` (alias -> array) in the request's format, as JSON bytes."""
    if not outputs:
        raise status.invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    # orjson writes NaN and infinities as null; TF Serving writes the NaN and Infinity tokens, and so
    # does the standard encoder, which then writes the whole answer.
    non_finite = any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in outputs.values())
    values = {name: _writable(name, outputs[name], non_finite) for name in names}
    if request_format is RequestFormat.COLUMNAR:
        payload: dict[str, Any] = {OUTPUTS_KEY: values if len(names) > 1 else values[names[0]]}
    else:
        batch = -1
        for name in names:
            array = outputs[name]
            if array.ndim == 0:
                raise status.invalid_argument(f"Tensor name: {name} has no shape information ")
            if batch >= 0 and array.shape[0] != batch:
                raise status.invalid_argument(
                    f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: {batch}"
                )
            batch = array.shape[0]
        if len(names) == 1:
            rows: Any = values[names[0]]
        else:
            rows = [{name: values[name][i] for name in names} for i in range(batch)]
        payload = {PREDICTIONS_KEY: rows}
    if non_finite:
        return json.dumps(payload, separators=(",", ":"), allow_nan=True).encode()
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def _writable(name: str, array: np.ndarray, as_python: bool) -> Any:
    """``array`` as the encoder takes it: the array itself (orjson), or nested lists of Python values."""
    if array.dtype == np.float16:
        array = array.astype(np.float32)  # TF Serving writes half values as floats
    kind = array.dtype.kind
    if kind in _NATIVE_OUTPUT_KINDS:
        if not as_python:
            return array[()] if array.ndim == 0 else array  # orjson writes numpy scalars, not 0-d arrays
        if kind == "f":
            # The shortest decimal that reads back as the same value of the array's type (as orjson writes).
            return _nest([float(str(v)) for v in array.ravel()], array.shape)
        return array.tolist()
    if array.dtype == object:  # DT_STRING: bytes
        as_base64 = name.endswith(BYTES_SUFFIX)
        flat = [
            {BASE64_KEY: base64.b64encode(v).decode("ascii")} if as_base64 else v.decode("utf-8", "replace")
            for v in array.ravel()
        ]
        return _nest(flat, array.shape)
    raise status.invalid_argument(f"Failed to write JSON value for tensor type: {array.dtype.name}")


def _nest(flat: list[Any], shape: tuple[int, ...]) -> Any:
    """A flat list as nested lists of ``shape`` (a scalar for shape ())."""
    if not shape:
        return flat[0]
    holder = np.empty(len(flat), dtype=object)
    holder[:] = flat
    return holder.reshape(shape).tolist()
