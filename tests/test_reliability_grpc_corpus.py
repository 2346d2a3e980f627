"""A corpus of malformed gRPC calls against the TF Serving stand-in, through the official stubs.

tests/test_standin_predict.py already sends one bad call per decoder rule (wrong
input names, float64/uint8/string inputs, flat images, negative dimensions, short
tensor_content, unknown signature or output, ...). This corpus adds what an
attacker or a broken client sends on top: shapes claiming petabytes from a few
bytes, unknown dtype numbers, absurd ranks, oversize messages, bytes that are not
a PredictRequest at all, unknown methods. Each call gets its status code and a
message saying what was wrong; the server then still answers a good call
exactly as the SavedModel does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2

from mnist_client import contract
from serving.tfs_standin.flags import DEFAULT_MAX_RECEIVE_MESSAGE_BYTES
from serving.tfs_standin.predict import MAX_FILLED_TENSOR_BYTES
from tests.standin_helpers import (
    Stubs,
    expected_outputs,
    outputs,
    standin_server,  # noqa: F401 - fixture
    standin_stubs,  # noqa: F401 - fixture
    tf_model_copy,  # noqa: F401 - fixture
)

IMAGE_BYTES = contract.IMAGE_HEIGHT * contract.IMAGE_WIDTH * 4
PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"


def _tensor(dtype: int, dims: list[int], content: bytes = b"", **values: list) -> tensor_pb2.TensorProto:
    tensor = tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                            for d in dims]),
        tensor_content=content,
    )
    for field, items in values.items():
        getattr(tensor, field).extend(items)
    return tensor


GOOD_TENSOR = _tensor(types_pb2.DT_FLOAT, [1, 28, 28], b"\0" * IMAGE_BYTES)


def _request(tensor: tensor_pb2.TensorProto = GOOD_TENSOR, name: str = contract.MODEL_NAME,
             alias: str = contract.INPUT_NAME, **spec: object) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs[alias].CopyFrom(tensor)
    return request


def _filled(dims: list[int], values: int) -> predict_pb2.PredictRequest:
    """A tiny message whose shape would take terabytes once its few values are repeated to fill it."""
    return _request(_tensor(types_pb2.DT_FLOAT, dims, float_val=[0.5] * values))


FILL_REFUSED = ("only", "fills at most", f"{MAX_FILLED_TENSOR_BYTES} bytes", "send every value")
EXPECTS = "expects [-1,28,28]"
Call = Callable[[Stubs], object]


def _predict(request: predict_pb2.PredictRequest) -> Call:
    return lambda stubs: stubs.prediction.Predict(request, timeout=20)


def _raw(method: str, payload: bytes) -> Call:
    return lambda stubs: stubs.channel.unary_unary(method)(payload, timeout=20)


def _metadata(version: int) -> Call:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = contract.MODEL_NAME
    request.model_spec.version.value = version
    return lambda stubs: stubs.prediction.GetModelMetadata(request, timeout=20)


def _oversize() -> Call:
    images = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES // IMAGE_BYTES + 10
    return _predict(_request(_tensor(types_pb2.DT_FLOAT, [images, 28, 28], b"\0" * (images * IMAGE_BYTES))))


CASES: dict[str, tuple[Call, grpc.StatusCode, tuple[str, ...]]] = {
    # --- which model --------------------------------------------------------------------
    "empty model name": (_predict(_request(name="")), grpc.StatusCode.NOT_FOUND,
                         ("Servable not found for request: Latest()", "serves models {mnist}")),
    "no model_spec": (_predict(predict_pb2.PredictRequest(inputs={contract.INPUT_NAME: GOOD_TENSOR})),
                      grpc.StatusCode.NOT_FOUND, ("Latest()", "{mnist}")),
    "negative version": (_predict(_request(version=-1)), grpc.StatusCode.NOT_FOUND,
                         ("Specific(mnist, -1)", "serves versions [1]")),
    "10,000-character model name": (_predict(_request(name="m" * 10_000)), grpc.StatusCode.NOT_FOUND,
                                    ("Servable not found", "{mnist}")),
    "metadata of an unknown version": (_metadata(42), grpc.StatusCode.NOT_FOUND, ("Specific(mnist, 42)",)),
    "signature name with a trailing space": (_predict(_request(signature_name="serving_default ")),
                                             grpc.StatusCode.FAILED_PRECONDITION,
                                             ('"serving_default " not found', "has: serving_default")),
    "non-ASCII signature name": (_predict(_request(signature_name="распознать")),
                                 grpc.StatusCode.FAILED_PRECONDITION,
                                 ("not found", "has: serving_default")),
    "empty output alias": (_predict((lambda r: (r.output_filter.append(""), r)[1])(_request())),
                           grpc.StatusCode.INVALID_ARGUMENT,
                           ("output tensor alias not found", "{classes,probabilities}")),
    "input under an empty alias": (_predict(_request(alias="")), grpc.StatusCode.INVALID_ARGUMENT,
                                   ("input tensor alias not found in signature", "{images}")),
    # --- dtypes -------------------------------------------------------------------------
    "DT_INVALID": (_predict(_request(_tensor(types_pb2.DT_INVALID, [1, 28, 28], b"\0" * IMAGE_BYTES))),
                   grpc.StatusCode.INVALID_ARGUMENT, ("dtype DT_INVALID", "expects DT_FLOAT")),
    "dtype number 999": (_predict(_request(_tensor(999, [1, 28, 28], b"\0" * IMAGE_BYTES))),
                         grpc.StatusCode.INVALID_ARGUMENT, ("dtype 999", "expects DT_FLOAT")),
    "DT_HALF": (_predict(_request(_tensor(types_pb2.DT_HALF, [1, 28, 28], half_val=[0] * 784))),
                grpc.StatusCode.INVALID_ARGUMENT, ("dtype DT_HALF", "expects DT_FLOAT")),
    "DT_INT64": (_predict(_request(_tensor(types_pb2.DT_INT64, [1, 28, 28], int64_val=[0] * 784))),
                 grpc.StatusCode.INVALID_ARGUMENT, ("dtype DT_INT64", "expects DT_FLOAT")),
    # --- shapes -------------------------------------------------------------------------
    "scalar": (_predict(_request(_tensor(types_pb2.DT_FLOAT, [], float_val=[0.0]))),
               grpc.StatusCode.INVALID_ARGUMENT, ("shape []", EXPECTS)),
    "rank 100": (_predict(_request(_tensor(types_pb2.DT_FLOAT, [1] * 100, float_val=[0.0]))),
                 grpc.StatusCode.INVALID_ARGUMENT, ("shape [1,1,1,", EXPECTS)),
    "29 columns": (_predict(_request(_tensor(types_pb2.DT_FLOAT, [1, 28, 29], b"\0" * (28 * 29 * 4)))),
                   grpc.StatusCode.INVALID_ARGUMENT, ("shape [1,28,29]", EXPECTS)),
    "2^40 images and no values": (_predict(_filled([2**40, 28, 28], 0)), grpc.StatusCode.INVALID_ARGUMENT,
                                  ("shape [1099511627776,28,28]", *FILL_REFUSED)),
    "2^40 images from one value": (_predict(_filled([2**40, 28, 28], 1)), grpc.StatusCode.INVALID_ARGUMENT,
                                   FILL_REFUSED),
    "2^62 images from one value": (_predict(_filled([2**62, 28, 28], 1)), grpc.StatusCode.INVALID_ARGUMENT,
                                   FILL_REFUSED),
    "2 million images (6 GB) from one value": (_predict(_filled([2_000_000, 28, 28], 1)),
                                               grpc.StatusCode.INVALID_ARGUMENT, FILL_REFUSED),
    # --- tensor_content lengths ---------------------------------------------------------
    "tensor_content one byte short": (
        _predict(_request(_tensor(types_pb2.DT_FLOAT, [1, 28, 28], b"\0" * (IMAGE_BYTES - 1)))),
        grpc.StatusCode.INVALID_ARGUMENT, (f"{IMAGE_BYTES - 1} bytes of tensor_content", f"needs {IMAGE_BYTES}")),
    "tensor_content for an empty batch": (
        _predict(_request(_tensor(types_pb2.DT_FLOAT, [0, 28, 28], b"\0" * IMAGE_BYTES))),
        grpc.StatusCode.INVALID_ARGUMENT, (f"{IMAGE_BYTES} bytes", "needs 0")),
    "tensor_content for 2^40 images": (
        _predict(_request(_tensor(types_pb2.DT_FLOAT, [2**40, 28, 28], b"\0" * IMAGE_BYTES))),
        grpc.StatusCode.INVALID_ARGUMENT, (f"{IMAGE_BYTES} bytes of tensor_content", "needs")),
    # --- not a PredictRequest at all ----------------------------------------------------
    "message above the 32 MiB limit": (_oversize(), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       ("larger than max", str(DEFAULT_MAX_RECEIVE_MESSAGE_BYTES))),
    "garbage bytes": (_raw(PREDICT_METHOD, b"\xff\xff\xff\xff"), grpc.StatusCode.INTERNAL,
                      ("Exception deserializing request",)),
    "truncated PredictRequest": (_raw(PREDICT_METHOD, _request().SerializeToString()[:-10]), grpc.StatusCode.INTERNAL,
                                 ("Exception deserializing request",)),
    "unknown method": (_raw("/tensorflow.serving.PredictionService/Explain", b""), grpc.StatusCode.UNIMPLEMENTED,
                       ("Method not found",)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_call_gets_its_status_and_says_why(stubs: Stubs, name: str) -> None:
    call, code, fragments = CASES[name]
    with pytest.raises(grpc.RpcError) as caught:
        call(stubs)
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details(), f"{fragment!r} not in {caught.value.details()!r}"


def test_after_the_corpus_a_good_call_is_answered_exactly(stubs: Stubs, tf_model_copy: Path,  # noqa: F811
                                                         test_images: tuple[np.ndarray, np.ndarray]) -> None:
    for call, code, _ in CASES.values():
        with pytest.raises(grpc.RpcError) as caught:
            call(stubs)
        assert caught.value.code() == code
    images = test_images[0][:16]
    answer = outputs(stubs.predict(images))
    expected = expected_outputs(tf_model_copy / "1", images)
    np.testing.assert_array_equal(answer[contract.CLASSES_NAME], expected[contract.CLASSES_NAME])
    np.testing.assert_allclose(answer[contract.PROBABILITIES_NAME], expected[contract.PROBABILITIES_NAME], atol=1e-6)
    assert tf.make_ndarray(stubs.predict(images[:1]).outputs[contract.CLASSES_NAME]).shape == (1,)
