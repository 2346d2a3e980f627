"""Small stand-in servers for the client tests: TF-Serving-shaped REST and gRPC on 127.0.0.1.

They answer with a fixed, easily recomputed "model" (``fake_model``) and can be told to fail, stall,
demand a bearer token, or behave like TF Serving's REST API (no /readyz, no .npy bodies), so that the
client's error handling and retries can be tested deterministically. They count the calls they receive.
The gRPC one is built on the official tensorflow-serving-api stubs, so every client test against it is
also a wire-compatibility test.
The real servers are exercised in tests/test_client_integration.py.
"""

from __future__ import annotations

import io
import json
import re
import ssl
import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from mnist_client import contract


# numpy.load parses the header with ast.literal_eval, which threads must not run at once on CPython < 3.11.8
# (gh-106905; see serving/torch_server/codecs.py); these servers answer each request in its own thread.
_NPY_LOAD_LOCK = threading.Lock()


def load_npy(body: bytes) -> np.ndarray:
    """A ``.npy`` request body as an array, safe to call from many handler threads."""
    with _NPY_LOAD_LOCK:
        return np.load(io.BytesIO(body), allow_pickle=False)


def fake_model(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 [N, 10], classes int64 [N]) from float images [N, 28, 28]."""
    # Per-class score: mean brightness of one of 10 row bands, so different images give different classes.
    bands = images[:, :20, :].reshape(images.shape[0], 10, -1).mean(axis=2).astype(np.float64)
    logits = bands * 10.0
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return probabilities, probabilities.argmax(axis=1).astype(np.int64)


@dataclass
class Behaviour:
    """What the fake servers do; tests change it while a server runs."""

    fail_status: int | None = None  # REST: answer predict with this status
    fail_code: Any = None  # gRPC: grpc.StatusCode to abort predict with
    fail_times: int | None = None  # fail only the first N calls (None: always)
    fail_probes: bool = False  # also fail metadata/status calls (REST: with fail_status)
    stall_seconds: float = 0.0  # sleep before answering predict
    ready: bool = True
    token: str | None = None  # REST: required bearer token
    tf_serving_rest: bool = False  # REST: no /readyz and JSON bodies only, like TF Serving
    model_version: int = 1
    calls: Counter = field(default_factory=Counter)
    content_types: list = field(default_factory=list)
    peers: list = field(default_factory=list)  # REST: client (host, port) of each predict, to see reuse
    headers: list = field(default_factory=list)  # REST: request headers of each predict
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str) -> int:
        with self.lock:
            self.calls[name] += 1
            return self.calls[name]

    def should_fail(self, number: int) -> bool:
        return self.fail_times is None or number <= self.fail_times


def _signature_json() -> dict[str, Any]:
    def info(spec: dict[str, Any], name: str) -> dict[str, Any]:
        return {
            "dtype": spec["dtype"],
            "tensor_shape": {"dim": [{"size": str(size), "name": ""} for size in spec["shape"]], "unknown_rank": False},
            "name": f"serving_default_{name}:0",
        }

    sig = contract.signature()
    return {
        "inputs": {k: info(v, k) for k, v in sig["inputs"].items()},
        "outputs": {k: info(v, k) for k, v in sig["outputs"].items()},
        "method_name": "tensorflow/serving/predict",
    }


class RestServer:
    """A TF-Serving-shaped REST server for model ``mnist`` on 127.0.0.1 (port 0), optionally over TLS.

    Built on ``http.server`` with HTTP/1.1 keep-alive (werkzeug's dev server closes every connection,
    which would hide whether the client reuses connections).
    """

    def __init__(
        self, behaviour: Behaviour | None = None, ssl_context: ssl.SSLContext | None = None, port: int = 0
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        handler = type("Handler", (_RestHandler,), {"behaviour": self.behaviour})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self._server.daemon_threads = True
        if ssl_context is not None:
            self._server.socket = ssl_context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if ssl_context is not None else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class _RestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    behaviour: Behaviour

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _authorized(self) -> bool:
        token = self.behaviour.token
        if (
            token is not None
            and self.path.startswith("/v1/")
            and self.headers.get("Authorization") != f"Bearer {token}"
        ):
            self._error(401, "missing or wrong bearer token")
            return False
        return True

    def do_GET(self) -> None:
        behaviour = self.behaviour
        if self.path == "/readyz" and not behaviour.tf_serving_rest:
            behaviour.count("readyz")
            if behaviour.ready:
                self._send(200, {"status": "ready"})
            else:
                self._error(503, "model not loaded")
        elif not self._authorized():
            return
        elif self.path == "/v1/models/mnist":
            number = behaviour.count("status")
            if behaviour.fail_status is not None and behaviour.fail_probes and behaviour.should_fail(number):
                return self._error(behaviour.fail_status, "status failing on purpose")
            state = "AVAILABLE" if behaviour.ready else "LOADING"
            self._send(
                200,
                {
                    "model_version_status": [
                        {
                            "version": str(behaviour.model_version),
                            "state": state,
                            "status": {"error_code": "OK", "error_message": ""},
                        }
                    ]
                },
            )
        elif self.path == "/v1/models/mnist/metadata":
            number = behaviour.count("metadata")
            if behaviour.fail_status is not None and behaviour.fail_probes and behaviour.should_fail(number):
                return self._error(behaviour.fail_status, "metadata failing on purpose")
            self._send(
                200,
                {
                    "model_spec": {"name": "mnist", "signature_name": "", "version": str(behaviour.model_version)},
                    "metadata": {"signature_def": {"signature_def": {contract.SIGNATURE_NAME: _signature_json()}}},
                },
            )
        else:
            self._error(404, "Not Found")

    def do_POST(self) -> None:
        behaviour = self.behaviour
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if not self._authorized():
            return
        match = re.fullmatch(r"/v1/models/mnist(?:/versions/(\d+))?:predict", self.path)
        if match is None:
            return self._error(404, "Not Found")
        number = behaviour.count("predict")
        content_type = self.headers.get("Content-Type", "")
        behaviour.content_types.append(content_type)
        behaviour.peers.append(self.client_address)
        behaviour.headers.append(dict(self.headers))
        if behaviour.stall_seconds:
            time.sleep(behaviour.stall_seconds)
        if behaviour.fail_status is not None and behaviour.should_fail(number):
            return self._error(behaviour.fail_status, f"failing on purpose with {behaviour.fail_status}")
        if match.group(1) is not None and int(match.group(1)) != behaviour.model_version:
            return self._error(404, f"Servable not found for request: Specific(mnist, {match.group(1)})")
        if content_type == "application/x-npy" and not behaviour.tf_serving_rest:
            array = load_npy(body)
            images = array.astype(np.float32) / np.float32(255) if array.dtype == np.uint8 else array
        else:
            try:
                images = np.asarray(json.loads(body)["instances"], dtype=np.float32)
            except (ValueError, KeyError, TypeError):
                return self._error(400, "JSON Parse error: expected an object with 'instances'")
        probabilities, classes = fake_model(images)
        rows = [
            {contract.PROBABILITIES_NAME: p.tolist(), contract.CLASSES_NAME: int(c)}
            for p, c in zip(probabilities, classes, strict=True)
        ]
        self._send(200, {"predictions": rows})


class GrpcServer:
    """A gRPC server built on the official tensorflow-serving-api stubs, on 127.0.0.1 (port 0)."""

    def __init__(
        self, behaviour: Behaviour | None = None, credentials: Any = None, name: str = "fake", port: int = 0
    ) -> None:
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorflow_serving.apis import (
            get_model_metadata_pb2,
            get_model_status_pb2,
            model_service_pb2_grpc,
            predict_pb2,
            prediction_service_pb2_grpc,
        )

        self.behaviour = behaviour or Behaviour()
        self.name = name
        behaviour = self.behaviour

        def tensor(array: np.ndarray, dtype: int) -> Any:
            proto = tensor_pb2.TensorProto(dtype=dtype, tensor_content=array.tobytes())
            proto.tensor_shape.dim.extend(tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape)
            return proto

        class Prediction(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                number = behaviour.count("predict")
                if behaviour.stall_seconds:
                    time.sleep(behaviour.stall_seconds)
                if behaviour.fail_code is not None and behaviour.should_fail(number):
                    context.abort(behaviour.fail_code, f"failing on purpose with {behaviour.fail_code.name}")
                spec = request.model_spec
                if spec.name != contract.MODEL_NAME or (
                    spec.HasField("version") and spec.version.value != behaviour.model_version
                ):
                    version = spec.version.value if spec.HasField("version") else "latest"
                    context.abort(
                        grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {version})"
                    )
                proto = request.inputs[contract.INPUT_NAME]
                shape = [d.size for d in proto.tensor_shape.dim]
                if proto.tensor_content:
                    images = np.frombuffer(proto.tensor_content, dtype="<f4").reshape(shape)
                else:
                    images = np.asarray(proto.float_val, dtype=np.float32).reshape(shape)
                probabilities, classes = fake_model(images)
                response = predict_pb2.PredictResponse()
                response.model_spec.name = contract.MODEL_NAME
                response.model_spec.signature_name = contract.SIGNATURE_NAME
                response.model_spec.version.value = behaviour.model_version
                response.outputs[contract.PROBABILITIES_NAME].CopyFrom(tensor(probabilities, types_pb2.DT_FLOAT))
                response.outputs[contract.CLASSES_NAME].CopyFrom(tensor(classes, types_pb2.DT_INT64))
                return response

            def GetModelMetadata(self, request, context):
                number = behaviour.count("metadata")
                if behaviour.fail_code is not None and behaviour.fail_probes and behaviour.should_fail(number):
                    context.abort(behaviour.fail_code, "metadata failing on purpose")
                from tensorflow.core.protobuf import meta_graph_pb2

                signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
                for group, specs in contract.signature().items():
                    for tensor_name, spec in specs.items():
                        info = getattr(signature, group)[tensor_name]
                        info.name = f"serving_default_{tensor_name}:0"
                        info.dtype = types_pb2.DataType.Value(spec["dtype"])
                        info.tensor_shape.dim.extend(
                            tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in spec["shape"]
                        )
                signature_map = get_model_metadata_pb2.SignatureDefMap()
                signature_map.signature_def[contract.SIGNATURE_NAME].CopyFrom(signature)
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = contract.MODEL_NAME
                response.model_spec.version.value = behaviour.model_version
                response.metadata["signature_def"].Pack(signature_map)
                return response

        class Models(model_service_pb2_grpc.ModelServiceServicer):
            def GetModelStatus(self, request, context):
                number = behaviour.count("status")
                if behaviour.fail_code is not None and behaviour.fail_probes and behaviour.should_fail(number):
                    context.abort(behaviour.fail_code, "status failing on purpose")
                response = get_model_status_pb2.GetModelStatusResponse()
                status = response.model_version_status.add()
                status.version = behaviour.model_version
                status.state = (
                    get_model_status_pb2.ModelVersionStatus.AVAILABLE
                    if behaviour.ready
                    else get_model_status_pb2.ModelVersionStatus.LOADING
                )
                return response

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.health = health.HealthServicer()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Prediction(), self._server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(Models(), self._server)
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        self.target = f"127.0.0.1:{self.port}"
        self._server.start()

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait(5)
