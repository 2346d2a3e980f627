"""Predict requests: decode and check the inputs, run the signature, encode the outputs.

Inputs are ``TensorProto``s, either packed (``tensor_content``, decoded with
``numpy.frombuffer`` without a copy) or in the typed value fields
(``float_val`` ...; fewer values than the shape holds repeat the last one, as
TensorFlow does). Each is checked against the signature's dtype and shape before
anything runs, and every mistake is an INVALID_ARGUMENT that says what was sent
and what the signature expects. Messages that TF Serving itself produces (unknown
input alias, input count, output filter) keep TF Serving's wording.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

from serving.tfs_standin import status
from serving.tfs_standin.run_slots import RunSlots
from serving.tfs_standin.servable import Servable, Signature, TensorSpec

DEFAULT_SIGNATURE_KEY = "serving_default"

# The TensorProto field that carries each dtype's values when tensor_content is empty.
_VALUE_FIELDS: dict[int, str] = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_INT16: "int_val",
    types_pb2.DT_INT8: "int_val",
    types_pb2.DT_UINT8: "int_val",
    types_pb2.DT_UINT16: "int_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_UINT32: "uint32_val",
    types_pb2.DT_UINT64: "uint64_val",
    types_pb2.DT_BOOL: "bool_val",
    types_pb2.DT_STRING: "string_val",
    types_pb2.DT_HALF: "half_val",
    types_pb2.DT_BFLOAT16: "half_val",
}
# Stored as 16-bit patterns inside int32 values.
_BIT_PATTERN_DTYPES = {types_pb2.DT_HALF, types_pb2.DT_BFLOAT16}
# Fewer typed values than the shape holds are repeated to fill it, so a message of a few bytes could
# claim a shape of terabytes; tensors filled that way are refused above this size (the default gRPC
# message limit: what a request spelling out every value could carry anyway).
MAX_FILLED_TENSOR_BYTES = 32 * 1024 * 1024


class Runner(Protocol):
    """Runs a signature of a servable: directly, or through the batch scheduler."""

    def run(
        self,
        servable: Servable,
        signature: Signature,
        inputs: list[np.ndarray],
        fetch: tuple[str, ...],
        deadline: float | None,
    ) -> list[np.ndarray]: ...


def timeout_ms(deadline: float | None, what: str) -> int | None:
    """Milliseconds left until ``deadline`` (``time.monotonic()``), or DEADLINE_EXCEEDED if none are."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise status.deadline_exceeded(f"the call's deadline passed before {what}")
    return max(1, int(left * 1000))


class DirectRunner:
    """One session run per request (server-side batching off).

    With ``slots`` (--standin_model_run_slots), at most that many runs go into TensorFlow at once and
    the others wait their turn in arrival order (run_slots.py); a call whose deadline passes while it
    waits gets DEADLINE_EXCEEDED. Without (the default), every caller's thread runs at once.
    """

    def __init__(self, slots: RunSlots | None = None) -> None:
        self.slots = slots

    def run(
        self,
        servable: Servable,
        signature: Signature,
        inputs: list[np.ndarray],
        fetch: tuple[str, ...],
        deadline: float | None,
    ) -> list[np.ndarray]:
        if self.slots is None:
            return servable.run(signature, inputs, fetch, timeout_ms(deadline, "the model ran"))
        if not self.slots.acquire(deadline):
            raise status.deadline_exceeded("the call's deadline passed while it waited for its turn to run the model")
        try:
            return servable.run(signature, inputs, fetch, timeout_ms(deadline, "the model ran"))
        finally:
            self.slots.release()


def _shape_text(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def check_shape(dims: Sequence[int], spec: TensorSpec, where: str = "the signature") -> None:
    """INVALID_ARGUMENT unless ``dims`` fits the signature's shape for ``spec`` (None: any size)."""
    expected = spec.shape
    if expected is None:
        return
    fits = len(dims) == len(expected) and all(want is None or got == want for got, want in zip(dims, expected))
    if not fits:
        raise status.invalid_argument(
            f"input '{spec.alias}' has shape {_shape_text(dims)}, but {where} expects {spec.shape_text()} (-1: any size)"
        )


def decode_tensor(proto: tensor_pb2.TensorProto, spec: TensorSpec, where: str = "the signature") -> np.ndarray:
    """The ndarray in ``proto``, checked against ``spec``; INVALID_ARGUMENT if it does not fit.

    ``where`` names the signature in error messages ("signature serving_default of model ...").
    """
    alias = spec.alias
    if proto.dtype != spec.dtype:
        got = types_pb2.DataType.Name(proto.dtype) if proto.dtype in types_pb2.DataType.values() else proto.dtype
        raise status.invalid_argument(
            f"input '{alias}' has dtype {got}, but {where} expects {spec.dtype_name}"
        )
    shape_proto = proto.tensor_shape
    if shape_proto.unknown_rank:
        raise status.invalid_argument(f"input '{alias}' has an unknown rank; {where} expects shape {spec.shape_text()}")
    dims = tuple(d.size for d in shape_proto.dim)
    check_shape(dims, spec, where)
    if dims and min(dims) < 0:
        raise status.invalid_argument(f"input '{alias}' has shape {_shape_text(dims)}; sizes must not be negative")
    count = math.prod(dims)
    content = proto.tensor_content
    if content:
        if spec.dtype == types_pb2.DT_STRING:
            raise status.invalid_argument(f"input '{alias}' is DT_STRING, whose values go in string_val, "
                                          "not tensor_content")
        itemsize = spec.np_dtype.itemsize
        if len(content) != count * itemsize:
            raise status.invalid_argument(
                f"input '{alias}' has {len(content)} bytes of tensor_content, but shape {_shape_text(dims)} of "
                f"{spec.dtype_name} needs {count * itemsize} ({count} values of {itemsize} bytes)"
            )
        return np.frombuffer(content, dtype=spec.np_dtype).reshape(dims)
    return _decode_values(proto, spec, dims, count)


def _decode_values(proto: tensor_pb2.TensorProto, spec: TensorSpec, dims: tuple[int, ...], count: int) -> np.ndarray:
    field = _VALUE_FIELDS.get(spec.dtype)
    if field is None:
        raise status.invalid_argument(f"input '{spec.alias}' has dtype {spec.dtype_name}, which the stand-in "
                                      "can only take as tensor_content")
    values = getattr(proto, field)
    given = len(values)
    if given > count:
        raise status.invalid_argument(
            f"input '{spec.alias}' has {given} values in {field}, but shape {_shape_text(dims)} holds {count}"
        )
    if given < count and count * spec.np_dtype.itemsize > MAX_FILLED_TENSOR_BYTES:
        raise status.invalid_argument(
            f"input '{spec.alias}' has shape {_shape_text(dims)} ({count} values) but only {given} values in "
            f"{field}; the stand-in fills at most {MAX_FILLED_TENSOR_BYTES} bytes by repeating values: send every "
            "value, e.g. in tensor_content"
        )
    if spec.dtype == types_pb2.DT_STRING:
        flat = np.empty(count, dtype=object)
        flat[:given] = list(values)
    elif spec.dtype in _BIT_PATTERN_DTYPES:
        flat = np.zeros(count, dtype=np.uint16)
        flat[:given] = np.asarray(values, dtype=np.uint16)
        flat = flat.view(spec.np_dtype)
    else:
        flat = np.zeros(count, dtype=spec.np_dtype)
        flat[:given] = np.asarray(values, dtype=spec.np_dtype)
    if 0 < given < count:
        flat[given:] = flat[given - 1]  # TensorFlow repeats the last value to fill the shape
    return flat.reshape(dims)


def decode_inputs(request_inputs: Mapping[str, tensor_pb2.TensorProto], signature: Signature) -> list[np.ndarray]:
    """The request's inputs as arrays in ``signature.input_order``."""
    check_input_names(request_inputs, signature)
    where = signature.where
    return [decode_tensor(request_inputs[alias], signature.inputs[alias], where) for alias in signature.input_order]


def check_input_names(names: Collection[str], signature: Signature) -> None:
    """INVALID_ARGUMENT unless ``names`` are exactly the signature's inputs (TF Serving's messages)."""
    expected = signature.input_order
    if len(names) != len(expected):
        sent, wanted = {status.clip(a) for a in names}, set(expected)
        raise status.invalid_argument(
            f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sorted(sent))}}}) "
            f"!= len({{{','.join(sorted(wanted))}}}). Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
            f"Missing but required: {{{','.join(sorted(wanted - sent))}}}."
        )
    unknown = sorted(status.clip(a) for a in set(names) - set(expected))
    if unknown:
        raise status.invalid_argument(
            f"input tensor alias not found in signature: {', '.join(unknown)}. Inputs expected to be in the "
            f"set {{{','.join(expected)}}}."
        )


def check_arrays(arrays: Mapping[str, np.ndarray], signature: Signature) -> list[np.ndarray]:
    """Decoded inputs (REST's JSON tensors) checked as ``decode_inputs`` checks protos, in feed order."""
    check_input_names(arrays, signature)
    ordered = []
    for alias in signature.input_order:
        array = arrays[alias]
        check_shape(array.shape, signature.inputs[alias], signature.where)
        ordered.append(array)
    return ordered


def output_aliases(output_filter: Sequence[str], signature: Signature) -> tuple[str, ...]:
    """The outputs to fetch: the filter, checked, or all of the signature's outputs."""
    if not output_filter:
        return signature.output_order
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in signature.outputs:
            raise status.invalid_argument(
                f"output tensor alias not found in signature: {status.clip(alias)} Outputs expected to be in the set "
                f"{{{','.join(signature.output_order)}}}."
            )
        if alias in seen:
            raise status.invalid_argument(f"duplicate output tensor alias: {status.clip(alias)}")
        seen.add(alias)
    return tuple(output_filter)


def encode_tensor(array: np.ndarray, dtype: int, out: tensor_pb2.TensorProto, as_content: bool) -> None:
    """Write ``array`` into ``out``: packed bytes, or the typed value field as TF Serving does by default."""
    out.dtype = dtype
    dim = out.tensor_shape.dim
    for size in array.shape:
        dim.add().size = size
    if as_content and dtype != types_pb2.DT_STRING:
        out.tensor_content = np.ascontiguousarray(array).tobytes()
    elif dtype in _BIT_PATTERN_DTYPES:
        out.half_val.extend(array.ravel().view(np.uint16).tolist())
    else:
        getattr(out, _VALUE_FIELDS[dtype]).extend(array.ravel().tolist())


def predict(
    request: predict_pb2.PredictRequest,
    servable: Servable,
    runner: Runner,
    deadline: float | None,
    tensor_content: bool,
) -> predict_pb2.PredictResponse:
    """Answer ``request`` with ``servable`` (the version the model spec resolved to)."""
    spec = request.model_spec
    signature_name = spec.signature_name or DEFAULT_SIGNATURE_KEY
    signature = servable.signature(signature_name)
    inputs = decode_inputs(request.inputs, signature)
    fetch = output_aliases(request.output_filter, signature)
    outputs = runner.run(servable, signature, inputs, fetch, deadline)

    response = predict_pb2.PredictResponse()
    out_spec = response.model_spec
    out_spec.name = servable.name
    out_spec.version.value = servable.version
    out_spec.signature_name = signature_name
    response_outputs = response.outputs
    for alias, array in zip(fetch, outputs):
        encode_tensor(array, signature.outputs[alias].dtype, response_outputs[alias], tensor_content)
    return response
