"""Property-based fuzzing of the stand-in's request decoder (hypothesis, bounded examples).

Any TensorProto a client can send either decodes to exactly the array the
signature expects or is refused with INVALID_ARGUMENT; nothing else escapes.
"""

from __future__ import annotations

import grpc
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from mnist_client import contract
from serving.tfs_standin import status
from serving.tfs_standin.predict import decode_inputs, decode_tensor
from serving.tfs_standin.servable import Signature, TensorSpec

IMAGES = TensorSpec(contract.INPUT_NAME, "serving_default_images:0", types_pb2.DT_FLOAT, np.dtype(np.float32),
                    (None, contract.IMAGE_HEIGHT, contract.IMAGE_WIDTH))
SIGNATURE = Signature(contract.SIGNATURE_NAME, {contract.INPUT_NAME: IMAGES}, {}, (contract.INPUT_NAME,), ())
DTYPES = [types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE, types_pb2.DT_INT32, types_pb2.DT_UINT8, types_pb2.DT_INT64,
          types_pb2.DT_STRING, types_pb2.DT_HALF, types_pb2.DT_BOOL, 0, 9999]
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tensor_protos(draw: st.DrawFn) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=draw(st.sampled_from(DTYPES)))
    if draw(st.booleans()):  # mostly near-valid shapes, sometimes anything
        dims = [draw(st.integers(0, 3)), *draw(st.sampled_from([(28, 28), (28,), (784,), (28, 28, 1), (27, 28)]))]
    else:
        dims = draw(st.lists(st.integers(-2, 40), max_size=4))
    proto.tensor_shape.CopyFrom(tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims],
        unknown_rank=draw(st.booleans()) and draw(st.booleans()),
    ))
    how = draw(st.sampled_from(["content", "float_val", "int_val", "string_val", "empty"]))
    count = max(0, int(np.prod([max(d, 0) for d in dims])) if dims else 1)
    if how == "content":
        exact = count * 4
        proto.tensor_content = bytes(draw(st.sampled_from([exact, exact + 1, max(0, exact - 4), 3])))
    elif how == "float_val":
        proto.float_val.extend(draw(st.lists(st.floats(width=32, allow_nan=True), max_size=min(count + 2, 50))))
    elif how == "int_val":
        proto.int_val.extend(draw(st.lists(st.integers(-5, 300), max_size=10)))
    elif how == "string_val":
        proto.string_val.extend(draw(st.lists(st.binary(max_size=5), max_size=3)))
    return proto


@SETTINGS
@given(tensor_protos())
def test_decoder_returns_the_expected_array_or_invalid_argument(proto: tensor_pb2.TensorProto) -> None:
    try:
        array = decode_tensor(proto, IMAGES)
    except status.ServingError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        assert contract.INPUT_NAME in exc.message
        return
    assert array.dtype == np.float32
    assert array.ndim == 3 and array.shape[1:] == contract.IMAGE_SHAPE
    if proto.tensor_content or len(proto.float_val) == array.size:
        np.testing.assert_array_equal(array, tf.make_ndarray(proto))


@SETTINGS
@given(st.dictionaries(st.sampled_from([contract.INPUT_NAME, "x", "", "images "]), tensor_protos(), max_size=3))
def test_any_input_map_decodes_or_is_invalid_argument(inputs: dict[str, tensor_pb2.TensorProto]) -> None:
    try:
        arrays = decode_inputs(inputs, SIGNATURE)
    except status.ServingError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    assert list(inputs) == [contract.INPUT_NAME] and len(arrays) == 1
