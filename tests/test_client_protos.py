"""The client's own protobuf messages (package mnist_client.tfs) are byte-compatible with TF Serving's.

Messages are built on both sides and compared byte for byte (deterministic serialization), parsed across
(ours -> official and official -> ours), checked field by field against the official descriptors, and used
in one process together with TensorFlow and tensorflow-serving-api (no descriptor clash).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mnist_client import contract
from mnist_client.grpc_client import GrpcClient, _parse_metadata
from mnist_client.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    health_pb2,
    model_pb2,
    predict_pb2,
    tensor_pb2,
)
from mnist_client.tensors import make_ndarray, make_tensor_proto

tf = pytest.importorskip("tensorflow")
from tensorflow.core.framework import tensor_pb2 as tf_tensor_pb2  # noqa: E402
from tensorflow.core.framework import tensor_shape_pb2 as tf_tensor_shape_pb2  # noqa: E402
from tensorflow.core.framework import types_pb2 as tf_types_pb2  # noqa: E402
from tensorflow.core.protobuf import error_codes_pb2 as tf_error_codes_pb2  # noqa: E402
from tensorflow.core.protobuf import meta_graph_pb2 as tf_meta_graph_pb2  # noqa: E402
from tensorflow_serving.apis import get_model_metadata_pb2 as tfs_metadata_pb2  # noqa: E402
from tensorflow_serving.apis import get_model_status_pb2 as tfs_status_pb2  # noqa: E402
from tensorflow_serving.apis import model_pb2 as tfs_model_pb2  # noqa: E402
from tensorflow_serving.apis import predict_pb2 as tfs_predict_pb2  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Our message -> the official one it must match on the wire.
PAIRS = [
    (tensor_pb2.TensorShapeProto, tf_tensor_shape_pb2.TensorShapeProto),
    (tensor_pb2.TensorProto, tf_tensor_pb2.TensorProto),
    (model_pb2.ModelSpec, tfs_model_pb2.ModelSpec),
    (predict_pb2.PredictRequest, tfs_predict_pb2.PredictRequest),
    (predict_pb2.PredictResponse, tfs_predict_pb2.PredictResponse),
    (get_model_metadata_pb2.TensorInfo, tf_meta_graph_pb2.TensorInfo),
    (get_model_metadata_pb2.SignatureDef, tf_meta_graph_pb2.SignatureDef),
    (get_model_metadata_pb2.SignatureDefMap, tfs_metadata_pb2.SignatureDefMap),
    (get_model_metadata_pb2.GetModelMetadataRequest, tfs_metadata_pb2.GetModelMetadataRequest),
    (get_model_metadata_pb2.GetModelMetadataResponse, tfs_metadata_pb2.GetModelMetadataResponse),
    (get_model_status_pb2.GetModelStatusRequest, tfs_status_pb2.GetModelStatusRequest),
    (get_model_status_pb2.GetModelStatusResponse, tfs_status_pb2.GetModelStatusResponse),
]


def same_bytes(ours, official) -> bytes:
    """Serialize both deterministically, assert equal bytes, and check each parses the other's."""
    ours_bytes = ours.SerializeToString(deterministic=True)
    official_bytes = official.SerializeToString(deterministic=True)
    assert ours_bytes == official_bytes
    assert type(official).FromString(ours_bytes) == official
    assert type(ours).FromString(official_bytes) == ours
    return ours_bytes


def images(batch: int = 3) -> np.ndarray:
    return np.random.default_rng(batch).random((batch, 28, 28), dtype=np.float32)


# -- descriptors ------------------------------------------------------------------------------------


def _check_fields(ours, official, seen: set[str]) -> None:
    if ours.full_name in seen:
        return
    seen.add(ours.full_name)
    official_fields = {field.number: field for field in official.fields}
    for field in ours.fields:
        assert field.number in official_fields, f"{ours.full_name}.{field.name}: no field {field.number} upstream"
        other = official_fields[field.number]
        where = f"{ours.full_name}.{field.name} vs {official.full_name}.{other.name}"
        assert (field.name, field.type, field.is_repeated) == (other.name, other.type, other.is_repeated), where
        assert field.is_packed == other.is_packed, where
        assert (field.containing_oneof is None) == (other.containing_oneof is None), where
        if field.enum_type is not None:
            upstream = {value.name: value.number for value in other.enum_type.values}
            for value in field.enum_type.values:
                assert upstream.get(value.name) == value.number, f"{where}: enum value {value.name}"
        if field.message_type is not None:
            assert field.message_type.name == other.message_type.name, where
            _check_fields(field.message_type, other.message_type, seen)
    # Every upstream field we left out is reserved in ours, so it can never be reused by mistake.
    for number, other in official_fields.items():
        if number not in {field.number for field in ours.fields}:
            assert _is_reserved(ours, number), f"{ours.full_name}: upstream field {number} ({other.name}) not reserved"


def _is_reserved(descriptor, number: int) -> bool:
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.DescriptorProto()
    descriptor.CopyToProto(proto)
    return any(r.start <= number < r.end for r in proto.reserved_range)


@pytest.mark.parametrize(("ours", "official"), PAIRS, ids=[ours.DESCRIPTOR.name for ours, _ in PAIRS])
def test_fields_match_the_official_definitions(ours, official):
    assert ours.DESCRIPTOR.full_name.startswith("mnist_client.tfs.")
    _check_fields(ours.DESCRIPTOR, official.DESCRIPTOR, set())


def test_enums_match_the_official_definitions():
    upstream_types = {v.name: v.number for v in tf_types_pb2.DataType.DESCRIPTOR.values}
    assert all(upstream_types[v.name] == v.number for v in tensor_pb2.DataType.DESCRIPTOR.values)
    upstream_codes = {v.name: v.number for v in tf_error_codes_pb2.Code.DESCRIPTOR.values}
    assert all(upstream_codes[v.name] == v.number for v in get_model_status_pb2.ErrorCode.DESCRIPTOR.values)
    upstream_states = {v.name: v.number for v in tfs_status_pb2.ModelVersionStatus.State.DESCRIPTOR.values}
    assert {
        v.name: v.number for v in get_model_status_pb2.ModelVersionStatus.State.DESCRIPTOR.values
    } == upstream_states


def test_health_messages_match_grpc_health_checking():
    from grpc_health.v1 import health_pb2 as official

    same_bytes(health_pb2.HealthCheckRequest(service="x"), official.HealthCheckRequest(service="x"))
    same_bytes(
        health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING),
        official.HealthCheckResponse(status=official.HealthCheckResponse.NOT_SERVING),
    )


# -- requests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_tensor_content", [True, False])
def test_predict_request_bytes_equal_tensorflows(use_tensor_content):
    batch = images()
    ours = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="mnist", signature_name="serving_default"))
    ours.model_spec.version.value = 3
    ours.inputs[contract.INPUT_NAME].CopyFrom(make_tensor_proto(batch, use_tensor_content=use_tensor_content))
    ours.output_filter.append(contract.CLASSES_NAME)

    official = tfs_predict_pb2.PredictRequest()
    official.model_spec.name = "mnist"
    official.model_spec.signature_name = "serving_default"
    official.model_spec.version.value = 3
    if use_tensor_content:
        official.inputs[contract.INPUT_NAME].CopyFrom(tf.make_tensor_proto(batch))  # TF's own encoder
    else:
        tensor = official.inputs[contract.INPUT_NAME]
        tensor.dtype = tf_types_pb2.DT_FLOAT
        tensor.tensor_shape.dim.extend(tf_tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in batch.shape)
        tensor.float_val.extend(batch.ravel().tolist())
    official.output_filter.append(contract.CLASSES_NAME)
    data = same_bytes(ours, official)
    np.testing.assert_array_equal(
        tf.make_ndarray(tfs_predict_pb2.PredictRequest.FromString(data).inputs["images"]), batch
    )


def test_client_prepare_is_what_tensorflow_serving_parses():
    batch = (np.arange(2 * 784) % 256).reshape(2, 28, 28).astype(np.uint8)
    client = GrpcClient("127.0.0.1:1")
    try:
        request = tfs_predict_pb2.PredictRequest.FromString(client.prepare(batch).request)
    finally:
        client.close()
    assert (request.model_spec.name, request.model_spec.signature_name) == ("mnist", "serving_default")
    assert not request.model_spec.HasField("version")
    tensor = request.inputs[contract.INPUT_NAME]
    assert tensor.dtype == tf_types_pb2.DT_FLOAT and tensor.tensor_content
    np.testing.assert_array_equal(tf.make_ndarray(tensor), batch.astype(np.float32) / np.float32(255))


def test_model_spec_version_label_and_unknown_fields_survive():
    same_bytes(
        model_pb2.ModelSpec(name="m", version_label="stable"), tfs_model_pb2.ModelSpec(name="m", version_label="stable")
    )
    # Fields we do not define (request_options upstream) pass through our parser unchanged.
    official = tfs_predict_pb2.PredictRequest()
    official.model_spec.name = "mnist"
    official.request_options.max_cache_length = 7
    data = official.SerializeToString()
    assert (
        tfs_predict_pb2.PredictRequest.FromString(predict_pb2.PredictRequest.FromString(data).SerializeToString())
        == official
    )


# -- responses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_tensor_content", [True, False])
def test_predict_response_bytes_equal_and_decode_like_tensorflow(use_tensor_content):
    probabilities = np.random.default_rng(1).random((5, 10)).astype(np.float32)
    classes = probabilities.argmax(axis=1).astype(np.int64)
    official = tfs_predict_pb2.PredictResponse()
    official.model_spec.name = "mnist"
    official.model_spec.version.value = 2
    if use_tensor_content:
        official.outputs[contract.PROBABILITIES_NAME].CopyFrom(tf.make_tensor_proto(probabilities))
        official.outputs[contract.CLASSES_NAME].CopyFrom(tf.make_tensor_proto(classes))
    else:
        for name, array, field, dtype in (
            (contract.PROBABILITIES_NAME, probabilities, "float_val", tf_types_pb2.DT_FLOAT),
            (contract.CLASSES_NAME, classes, "int64_val", tf_types_pb2.DT_INT64),
        ):
            tensor = official.outputs[name]
            tensor.dtype = dtype
            tensor.tensor_shape.dim.extend(tf_tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape)
            getattr(tensor, field).extend(array.ravel().tolist())

    ours = predict_pb2.PredictResponse()
    ours.model_spec.name = "mnist"
    ours.model_spec.version.value = 2
    ours.outputs[contract.PROBABILITIES_NAME].CopyFrom(
        make_tensor_proto(probabilities, use_tensor_content=use_tensor_content)
    )
    ours.outputs[contract.CLASSES_NAME].CopyFrom(make_tensor_proto(classes, use_tensor_content=use_tensor_content))
    data = same_bytes(ours, official)

    parsed = predict_pb2.PredictResponse.FromString(data)
    for name in contract.OUTPUT_NAMES:
        mine, theirs = make_ndarray(parsed.outputs[name], name), tf.make_ndarray(official.outputs[name])
        assert mine.dtype == theirs.dtype
        np.testing.assert_array_equal(mine, theirs)


def test_short_value_lists_decode_like_tensorflow():
    official = tf.make_tensor_proto(7.0, shape=[2, 3])  # TF stores one float_val for a filled tensor
    ours = tensor_pb2.TensorProto.FromString(official.SerializeToString())
    np.testing.assert_array_equal(make_ndarray(ours), tf.make_ndarray(official))
    official.ClearField("float_val")
    np.testing.assert_array_equal(
        make_ndarray(tensor_pb2.TensorProto.FromString(official.SerializeToString())), tf.make_ndarray(official)
    )


def _official_metadata_response():
    signature = tf_meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for group, specs in contract.signature().items():
        for name, spec in specs.items():
            info = getattr(signature, group)[name]
            info.name = f"serving_default_{name}:0"
            info.dtype = tf_types_pb2.DataType.Value(spec["dtype"])
            info.tensor_shape.dim.extend(tf_tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in spec["shape"])
    signatures = tfs_metadata_pb2.SignatureDefMap()
    signatures.signature_def[contract.SIGNATURE_NAME].CopyFrom(signature)
    response = tfs_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = "mnist"
    response.model_spec.version.value = 4
    response.metadata["signature_def"].Pack(signatures, deterministic=True)  # map order is otherwise unspecified
    return response


def test_metadata_messages_bytes_equal_and_decode():
    official = _official_metadata_response()
    signature = get_model_metadata_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    for group, specs in contract.signature().items():
        for name, spec in specs.items():
            info = getattr(signature, group)[name]
            info.name = f"serving_default_{name}:0"
            info.dtype = tensor_pb2.DataType.Value(spec["dtype"])
            info.tensor_shape.dim.extend(tensor_pb2.TensorShapeProto.Dim(size=s) for s in spec["shape"])
    ours = get_model_metadata_pb2.GetModelMetadataResponse()
    ours.model_spec.name = "mnist"
    ours.model_spec.version.value = 4
    signatures = get_model_metadata_pb2.SignatureDefMap()
    signatures.signature_def[contract.SIGNATURE_NAME].CopyFrom(signature)
    packed = ours.metadata["signature_def"]
    packed.type_url = "type.googleapis.com/tensorflow.serving.SignatureDefMap"  # TF Serving's type, not ours
    packed.value = signatures.SerializeToString(deterministic=True)
    data = same_bytes(ours, official)

    metadata = _parse_metadata(get_model_metadata_pb2.GetModelMetadataResponse.FromString(data), "serving_default")
    assert metadata.matches_contract() and (metadata.name, metadata.version) == ("mnist", 4)

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    official_request = tfs_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    official_request.model_spec.name = "mnist"
    same_bytes(request, official_request)


def test_status_messages_bytes_equal():
    official = tfs_status_pb2.GetModelStatusResponse()
    for version, state in (
        (1, tfs_status_pb2.ModelVersionStatus.END),
        (2, tfs_status_pb2.ModelVersionStatus.AVAILABLE),
    ):
        entry = official.model_version_status.add(version=version, state=state)
        entry.status.error_code = tf_error_codes_pb2.NOT_FOUND if version == 1 else tf_error_codes_pb2.OK
        entry.status.error_message = "unloaded" if version == 1 else ""
    ours = get_model_status_pb2.GetModelStatusResponse()
    for version, state in (
        (1, get_model_status_pb2.ModelVersionStatus.END),
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE),
    ):
        entry = ours.model_version_status.add(version=version, state=state)
        entry.status.error_code = get_model_status_pb2.NOT_FOUND if version == 1 else get_model_status_pb2.OK
        entry.status.error_message = "unloaded" if version == 1 else ""
    same_bytes(ours, official)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    request.model_spec.version.value = 2
    official_request = tfs_status_pb2.GetModelStatusRequest()
    official_request.model_spec.name = "mnist"
    official_request.model_spec.version.value = 2
    same_bytes(request, official_request)


# -- one process with TensorFlow ---------------------------------------------------------------------

_SAME_PROCESS = """
import sys
import numpy as np
sys.path[:0] = [{tests!r}, {repo!r}]
order = {order!r}
if order == "client-first":
    from mnist_client import GrpcClient
    from mnist_client.protos import predict_pb2
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2 as official_predict_pb2, prediction_service_pb2_grpc
if order == "tensorflow-first":
    from mnist_client import GrpcClient
    from mnist_client.protos import predict_pb2
from google.protobuf import descriptor_pool
from client_fakes import GrpcServer, fake_model

pool = descriptor_pool.Default()
assert pool.FindMessageTypeByName("tensorflow.TensorProto").full_name == "tensorflow.TensorProto"
assert pool.FindMessageTypeByName("mnist_client.tfs.TensorProto").full_name == "mnist_client.tfs.TensorProto"
assert float(tf.reduce_sum(tf.constant([1.0, 2.0]))) == 3.0  # TensorFlow still works

server = GrpcServer()
try:
    images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    with GrpcClient(server.target) as client:
        prediction = client.predict(images)
        assert client.metadata().matches_contract() and client.ready()
    assert prediction.classes.tolist() == fake_model(images)[1].tolist()
    assert prediction.model_version == 1
finally:
    server.stop()
ours = predict_pb2.PredictRequest(model_spec={{"name": "mnist"}})
request = official_predict_pb2.PredictRequest.FromString(ours.SerializeToString())
assert request.model_spec.name == "mnist"
print("SAME-PROCESS-OK")
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["client-first", "tensorflow-first"])
def test_client_works_in_one_process_with_tensorflow_and_tensorflow_serving_api(order):
    script = _SAME_PROCESS.format(tests=str(REPO / "tests"), repo=str(REPO), order=order)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=180, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAME-PROCESS-OK" in result.stdout


def test_committed_generated_modules_match_the_proto_files(tmp_path):
    """Editing a .proto without `make protos` would leave stale *_pb2.py files: catch it."""
    pytest.importorskip("grpc_tools")
    clients = REPO / "clients"
    protos = sorted((clients / "mnist_client" / "protos").glob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", "--proto_path=.", f"--python_out={tmp_path}",
               f"--pyi_out={tmp_path}", *(str(p.relative_to(clients)) for p in protos)]  # fmt: skip
    subprocess.run(command, cwd=clients, check=True, capture_output=True, timeout=60)
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2.pyi"):
            name = proto.stem + suffix
            generated = (tmp_path / "mnist_client" / "protos" / name).read_text()
            assert (proto.parent / name).read_text() == generated, f"{name} is stale: run `make protos`"
