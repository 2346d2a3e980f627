"""Conversion between numpy arrays and the TensorProto wire message (no TensorFlow needed)."""

from __future__ import annotations

import math
from typing import Final

import numpy as np

from mnist_client.errors import ProtocolError
from mnist_client.protos import tensor_pb2

# DataType -> (little-endian numpy dtype, TensorProto value-list field).
_DTYPES: Final[dict[int, tuple[np.dtype, str]]] = {
    tensor_pb2.DT_FLOAT: (np.dtype("<f4"), "float_val"),
    tensor_pb2.DT_DOUBLE: (np.dtype("<f8"), "double_val"),
    tensor_pb2.DT_INT32: (np.dtype("<i4"), "int_val"),
    tensor_pb2.DT_UINT8: (np.dtype("u1"), "int_val"),
    tensor_pb2.DT_INT16: (np.dtype("<i2"), "int_val"),
    tensor_pb2.DT_INT8: (np.dtype("i1"), "int_val"),
    tensor_pb2.DT_UINT16: (np.dtype("<u2"), "int_val"),
    tensor_pb2.DT_INT64: (np.dtype("<i8"), "int64_val"),
    tensor_pb2.DT_UINT32: (np.dtype("<u4"), "uint32_val"),
    tensor_pb2.DT_UINT64: (np.dtype("<u8"), "uint64_val"),
    tensor_pb2.DT_BOOL: (np.dtype("?"), "bool_val"),
}
_NUMPY_TO_DTYPE: Final[dict[np.dtype, int]] = {np_dtype: dt for dt, (np_dtype, _) in _DTYPES.items()}


def dtype_name(dtype: int) -> str:
    """``"DT_FLOAT"`` for ``DT_FLOAT`` etc.; the number for values this package does not know."""
    try:
        return tensor_pb2.DataType.Name(dtype)
    except ValueError:
        return f"DataType({dtype})"


def make_tensor_proto(array: np.ndarray, *, use_tensor_content: bool = True) -> tensor_pb2.TensorProto:
    """A TensorProto holding ``array`` (numeric dtypes of the table above).

    ``use_tensor_content`` packs the raw little-endian bytes (fast, TF Serving's preferred form);
    otherwise the values go into the typed list (``float_val``, ``int64_val``...).
    """
    array = np.asarray(array)
    key = array.dtype.newbyteorder("<")  # the wire is little-endian; equal to the native dtype on x86/ARM
    if key not in _NUMPY_TO_DTYPE:
        raise TypeError(
            f"arrays of dtype {array.dtype} have no TensorProto mapping here; expected one of "
            f"{sorted(str(d) for d in _NUMPY_TO_DTYPE)}"
        )
    dtype = _NUMPY_TO_DTYPE[key]
    tensor = tensor_pb2.TensorProto(dtype=dtype)
    tensor.tensor_shape.dim.extend(tensor_pb2.TensorShapeProto.Dim(size=size) for size in array.shape)
    little_endian = np.ascontiguousarray(array, dtype=key)
    if use_tensor_content:
        tensor.tensor_content = little_endian.tobytes()
    else:
        getattr(tensor, _DTYPES[dtype][1]).extend(little_endian.ravel().tolist())
    return tensor


def make_ndarray(tensor: tensor_pb2.TensorProto, name: str = "tensor") -> np.ndarray:
    """The numpy array a TensorProto holds, from ``tensor_content`` or its typed value list.

    Follows TensorFlow's rules: an empty value list means zeros, a shorter one is padded with its last
    value. Raises :class:`ProtocolError` for unsupported dtypes or content of the wrong size.
    """
    if tensor.dtype not in _DTYPES:
        raise ProtocolError(f"output {name!r} has dtype {dtype_name(tensor.dtype)}; expected a numeric tensor")
    np_dtype, field = _DTYPES[tensor.dtype]
    if tensor.tensor_shape.unknown_rank:
        raise ProtocolError(f"output {name!r} has unknown rank; expected a concrete shape")
    shape = tuple(dim.size for dim in tensor.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise ProtocolError(f"output {name!r} has shape {list(shape)}; expected non-negative sizes")
    count = math.prod(shape)  # Python ints: np.prod costs microseconds, which add up per call
    native = np_dtype.newbyteorder("=")
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count * np_dtype.itemsize:
            raise ProtocolError(
                f"output {name!r} has {len(tensor.tensor_content)} content bytes; expected "
                f"{count * np_dtype.itemsize} for {dtype_name(tensor.dtype)} {list(shape)}"
            )
        return np.frombuffer(tensor.tensor_content, dtype=np_dtype).reshape(shape).astype(native)
    values = getattr(tensor, field)
    if len(values) == count:
        return np.fromiter(values, dtype=native, count=count).reshape(shape)
    if len(values) > count:
        raise ProtocolError(f"output {name!r} has {len(values)} values; expected at most {count} for {list(shape)}")
    if not values:
        return np.zeros(shape, dtype=native)
    padded = np.empty(count, dtype=native)
    padded[: len(values)] = values
    padded[len(values) :] = values[-1]
    return padded.reshape(shape)
