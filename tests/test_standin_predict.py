"""The stand-in's PredictionService and ModelService through the official stubs: answers and errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
)

from mnist_client import contract
from tests.standin_helpers import (
    Stubs,
    expected_outputs,
    outputs,
    predict_request,
    running,
    server_options,
    stubs_for,
    standin_server,  # noqa: F401 - fixture
    standin_stubs,  # noqa: F401 - fixture
    tf_model_copy,  # noqa: F401 - fixture
)

IMAGE_BYTES = contract.IMAGE_HEIGHT * contract.IMAGE_WIDTH * 4


@pytest.fixture(scope="module")
def images(test_images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return test_images[0][:200]


def test_predictions_equal_the_in_process_savedmodel(
    stubs: Stubs, tf_model_copy: Path, images: np.ndarray  # noqa: F811
) -> None:
    want = expected_outputs(tf_model_copy / "1", images)
    batched = outputs(stubs.predict(images))
    singles = [outputs(stubs.predict(images[i : i + 1])) for i in range(8)]

    np.testing.assert_array_equal(batched[contract.CLASSES_NAME], want[contract.CLASSES_NAME])
    np.testing.assert_allclose(batched[contract.PROBABILITIES_NAME], want[contract.PROBABILITIES_NAME], atol=1e-5)
    assert batched[contract.PROBABILITIES_NAME].dtype == contract.PROBABILITIES_DTYPE
    assert batched[contract.CLASSES_NAME].dtype == contract.CLASSES_DTYPE
    for i, single in enumerate(singles):
        assert single[contract.CLASSES_NAME].tolist() == [want[contract.CLASSES_NAME][i]]
        np.testing.assert_allclose(single[contract.PROBABILITIES_NAME][0], want[contract.PROBABILITIES_NAME][i],
                                   atol=1e-5)


def test_response_names_the_version_and_signature_that_answered(stubs: Stubs, images: np.ndarray) -> None:
    response = stubs.predict(images[:1])
    assert response.model_spec.name == contract.MODEL_NAME
    assert response.model_spec.version.value == 1
    assert response.model_spec.signature_name == contract.SIGNATURE_NAME
    # TF Serving's default answer uses the typed value fields, not tensor_content.
    assert len(response.outputs[contract.PROBABILITIES_NAME].float_val) == contract.NUM_CLASSES
    assert not response.outputs[contract.PROBABILITIES_NAME].tensor_content


def test_explicit_version_signature_and_output_filter(stubs: Stubs, images: np.ndarray) -> None:
    response = stubs.predict(
        images[:3], version=1, signature_name=contract.SIGNATURE_NAME, output_filter=(contract.CLASSES_NAME,)
    )
    assert set(response.outputs) == {contract.CLASSES_NAME}
    assert tf.make_ndarray(response.outputs[contract.CLASSES_NAME]).shape == (3,)


def test_typed_value_fields_decode_like_tensor_content(stubs: Stubs, images: np.ndarray) -> None:
    request = predict_request(images[:2])
    tensor = request.inputs[contract.INPUT_NAME]
    tensor.ClearField("tensor_content")
    tensor.float_val.extend(images[:2].ravel().tolist())
    via_values = outputs(stubs.prediction.Predict(request, timeout=30))
    via_content = outputs(stubs.predict(images[:2]))
    np.testing.assert_array_equal(via_values[contract.CLASSES_NAME], via_content[contract.CLASSES_NAME])
    np.testing.assert_allclose(via_values[contract.PROBABILITIES_NAME], via_content[contract.PROBABILITIES_NAME])


def test_a_single_value_fills_the_shape_as_in_tensorflow(stubs: Stubs) -> None:
    request = predict_request(np.zeros((1, *contract.IMAGE_SHAPE), np.float32))
    request.inputs[contract.INPUT_NAME].CopyFrom(tf.make_tensor_proto(0.5, shape=[2, *contract.IMAGE_SHAPE]))
    assert len(request.inputs[contract.INPUT_NAME].float_val) == 1
    got = outputs(stubs.prediction.Predict(request, timeout=30))
    want = outputs(stubs.predict(np.full((2, *contract.IMAGE_SHAPE), 0.5, np.float32)))
    np.testing.assert_allclose(got[contract.PROBABILITIES_NAME], want[contract.PROBABILITIES_NAME])


def test_metadata_is_the_signature_def_map(stubs: Stubs) -> None:
    response = stubs.metadata()
    assert response.model_spec.name == contract.MODEL_NAME
    assert response.model_spec.version.value == 1
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    signature = signature_map.signature_def[contract.SIGNATURE_NAME]
    assert signature.method_name == "tensorflow/serving/predict"
    for side, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        for alias, spec in contract.signature()[side].items():
            assert types_pb2.DataType.Name(tensors[alias].dtype) == spec["dtype"]
            assert [d.size for d in tensors[alias].tensor_shape.dim] == spec["shape"]


def test_model_status_reports_the_available_version(stubs: Stubs) -> None:
    [only] = stubs.status()
    assert only.version == 1
    assert only.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert only.status.error_code == 0 and only.status.error_message == ""
    assert stubs.status(version=1)[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE


def _tensor(dtype: int, dims: list[int], content: bytes = b"") -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                            for d in dims]),
        tensor_content=content,
    )


def _with_input(tensor: tensor_pb2.TensorProto, name: str = contract.INPUT_NAME) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = contract.MODEL_NAME
    request.inputs[name].CopyFrom(tensor)
    return request


def _good(batch: int = 1) -> predict_pb2.PredictRequest:
    return predict_request(np.zeros((batch, *contract.IMAGE_SHAPE), np.float32))


def _edited(edit: Callable[[predict_pb2.PredictRequest], object]) -> predict_pb2.PredictRequest:
    request = _good()
    edit(request)
    return request


def _extra_input(request: predict_pb2.PredictRequest) -> None:
    request.inputs["extra"].CopyFrom(request.inputs[contract.INPUT_NAME])


def _too_many_values(request: predict_pb2.PredictRequest) -> None:
    tensor = request.inputs[contract.INPUT_NAME]
    tensor.ClearField("tensor_content")
    tensor.float_val.extend([0.0] * (IMAGE_BYTES // 4 + 1))


def _unknown_rank(request: predict_pb2.PredictRequest) -> None:
    request.inputs[contract.INPUT_NAME].tensor_shape.unknown_rank = True


BAD_PREDICTS: dict[str, tuple[Callable[[], predict_pb2.PredictRequest], grpc.StatusCode, tuple[str, ...]]] = {
    "unknown model": (lambda: _edited(lambda r: setattr(r.model_spec, "name", "fashion")),
                      grpc.StatusCode.NOT_FOUND, ("Latest(fashion)", "{mnist}")),
    "unknown version": (lambda: _edited(lambda r: setattr(r.model_spec.version, "value", 99)),
                        grpc.StatusCode.NOT_FOUND, ("Specific(mnist, 99)", "serves versions [1]")),
    "unknown version label": (lambda: _edited(lambda r: setattr(r.model_spec, "version_label", "canary")),
                              grpc.StatusCode.INVALID_ARGUMENT, ("Unrecognized servable version label: canary",)),
    "wrong input name": (lambda: _with_input(_good().inputs[contract.INPUT_NAME], "pixels"),
                         grpc.StatusCode.INVALID_ARGUMENT,
                         ("input tensor alias not found in signature: pixels", "{images}")),
    "extra input": (lambda: _edited(_extra_input), grpc.StatusCode.INVALID_ARGUMENT,
                    ("Sent extra: {extra}",)),
    "no inputs": (lambda: _edited(lambda r: r.ClearField("inputs")), grpc.StatusCode.INVALID_ARGUMENT,
                  ("Missing but required: {images}",)),
    "float64 input": (lambda: _with_input(tf.make_tensor_proto(np.zeros((1, 28, 28), np.float64))),
                      grpc.StatusCode.INVALID_ARGUMENT, ("dtype DT_DOUBLE", "expects DT_FLOAT")),
    "uint8 input": (lambda: _with_input(tf.make_tensor_proto(np.zeros((1, 28, 28), np.uint8))),
                    grpc.StatusCode.INVALID_ARGUMENT, ("dtype DT_UINT8", "expects DT_FLOAT")),
    "string input": (lambda: _with_input(tf.make_tensor_proto([b"x"])), grpc.StatusCode.INVALID_ARGUMENT,
                     ("dtype DT_STRING",)),
    "flat images": (lambda: _with_input(tf.make_tensor_proto(np.zeros((1, 784), np.float32))),
                    grpc.StatusCode.INVALID_ARGUMENT, ("shape [1,784]", "expects [-1,28,28]")),
    "no batch dimension": (lambda: _with_input(tf.make_tensor_proto(np.zeros((28, 28), np.float32))),
                           grpc.StatusCode.INVALID_ARGUMENT, ("shape [28,28]", "[-1,28,28]")),
    "channel dimension": (lambda: _with_input(tf.make_tensor_proto(np.zeros((1, 28, 28, 1), np.float32))),
                          grpc.StatusCode.INVALID_ARGUMENT, ("shape [1,28,28,1]",)),
    "negative dimension": (lambda: _with_input(_tensor(types_pb2.DT_FLOAT, [-1, 28, 28])),
                           grpc.StatusCode.INVALID_ARGUMENT, ("must not be negative",)),
    "unknown rank": (lambda: _edited(_unknown_rank), grpc.StatusCode.INVALID_ARGUMENT, ("unknown rank",)),
    "short tensor_content": (lambda: _with_input(_tensor(types_pb2.DT_FLOAT, [1, 28, 28], b"\0" * 100)),
                             grpc.StatusCode.INVALID_ARGUMENT, ("100 bytes", f"needs {IMAGE_BYTES}")),
    "tensor_content for two images, shape for one": (
        lambda: _with_input(_tensor(types_pb2.DT_FLOAT, [1, 28, 28], b"\0" * (2 * IMAGE_BYTES))),
        grpc.StatusCode.INVALID_ARGUMENT, (f"{2 * IMAGE_BYTES} bytes", f"needs {IMAGE_BYTES}")),
    "more values than the shape holds": (lambda: _edited(_too_many_values), grpc.StatusCode.INVALID_ARGUMENT,
                                         ("785 values in float_val", "holds 784")),
    "unknown signature": (lambda: _edited(lambda r: setattr(r.model_spec, "signature_name", "classify")),
                          grpc.StatusCode.FAILED_PRECONDITION, ('Serving signature key "classify" not found',)),
    "unknown output": (lambda: _edited(lambda r: r.output_filter.append("logits")),
                       grpc.StatusCode.INVALID_ARGUMENT,
                       ("output tensor alias not found in signature: logits", "{classes,probabilities}")),
    "duplicate output": (lambda: _edited(lambda r: r.output_filter.extend(["classes", "classes"])),
                         grpc.StatusCode.INVALID_ARGUMENT, ("duplicate output tensor alias: classes",)),
}


@pytest.mark.parametrize("case", list(BAD_PREDICTS))
def test_bad_predict_gets_tf_servings_code_and_says_what_was_expected(stubs: Stubs, case: str) -> None:
    build, code, fragments = BAD_PREDICTS[case]
    with pytest.raises(grpc.RpcError) as caught:
        stubs.prediction.Predict(build(), timeout=10)
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in caught.value.details()


def test_server_answers_correctly_after_every_bad_request(stubs: Stubs, images: np.ndarray) -> None:
    for build, _, _ in BAD_PREDICTS.values():
        with pytest.raises(grpc.RpcError):
            stubs.prediction.Predict(build(), timeout=10)
    assert outputs(stubs.predict(images[:4]))[contract.CLASSES_NAME].shape == (4,)


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"]),
         grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        (get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "mnist"}),
         grpc.StatusCode.INVALID_ARGUMENT, "at least one metadata_field"),
        (get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "mnist"}, metadata_field=["graph"]),
         grpc.StatusCode.INVALID_ARGUMENT, "Metadata field graph is not supported"),
        (get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "x"}, metadata_field=["signature_def"]),
         grpc.StatusCode.NOT_FOUND, "Latest(x)"),
    ],
)
def test_bad_metadata_requests(stubs: Stubs, request_: object, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.prediction.GetModelMetadata(request_, timeout=10)
    assert caught.value.code() == code
    assert fragment in caught.value.details()


@pytest.mark.parametrize(
    ("spec", "code", "fragment"),
    [
        (None, grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
        ({"name": "fashion"}, grpc.StatusCode.NOT_FOUND, "Could not find any versions of model fashion"),
        ({"name": "mnist", "version": {"value": 7}}, grpc.StatusCode.NOT_FOUND, "Could not find version 7"),
    ],
)
def test_bad_status_requests(stubs: Stubs, spec: dict | None, code: grpc.StatusCode, fragment: str) -> None:
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec) if spec else \
        get_model_status_pb2.GetModelStatusRequest()
    with pytest.raises(grpc.RpcError) as caught:
        stubs.model.GetModelStatus(request, timeout=10)
    assert caught.value.code() == code
    assert fragment in caught.value.details()


def test_unimplemented_methods_say_what_is_served(stubs: Stubs) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stubs.prediction.Classify(classification_pb2.ClassificationRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "Predict and GetModelMetadata" in caught.value.details()


def test_tensor_content_serialization_flag(tf_model_copy: Path, images: np.ndarray) -> None:  # noqa: F811
    with running(server_options(tf_model_copy, enable_serialization_as_tensor_content=True)) as server, \
            stubs_for(server) as stubs:
        response = stubs.predict(images[:5])
    probabilities = response.outputs[contract.PROBABILITIES_NAME]
    assert len(probabilities.tensor_content) == 5 * contract.NUM_CLASSES * 4
    assert not probabilities.float_val
    assert tf.make_ndarray(probabilities).shape == (5, contract.NUM_CLASSES)


LONG = "m" * 10_000


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (lambda r: setattr(r.model_spec, "name", LONG), grpc.StatusCode.NOT_FOUND),
        (lambda r: setattr(r.model_spec, "version_label", LONG), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: setattr(r.model_spec, "signature_name", LONG), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda r: r.output_filter.append(LONG), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda r: r.inputs[LONG].CopyFrom(r.inputs[contract.INPUT_NAME]), grpc.StatusCode.INVALID_ARGUMENT),
    ],
    ids=["model name", "version label", "signature name", "output filter", "input name"],
)
def test_huge_names_are_clipped_in_messages_so_the_status_arrives(
    stubs: Stubs, edit: Callable, code: grpc.StatusCode
) -> None:
    # Echoing 10,000 characters would push the status trailer past the client's 8 KiB metadata
    # limit, and the caller would see RESOURCE_EXHAUSTED instead of the real answer.
    with pytest.raises(grpc.RpcError) as caught:
        stubs.prediction.Predict(_edited(edit), timeout=10)
    assert caught.value.code() == code
    assert "mmm..." in caught.value.details()
    assert len(caught.value.details()) < 1000
