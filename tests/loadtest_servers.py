"""Servers for the load tester's tests: TF-Serving-shaped REST and gRPC on 127.0.0.1, free ports.

Their "model" is an oracle that knows the MNIST test labels (it looks each image up by its pixels), so
served accuracy and cross-server agreement have exact expected values: ``wrong_every=k`` answers
``(label + 1) % 10`` for every test image whose index is a multiple of ``k``. They can also stall once
on purpose (coordinated-omission tests), fail with a status, answer slowly, and close or keep alive
connections. They count every predict they answer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer

import grpc
import numpy as np

from mnist_client import contract
from mnist_client.protos import predict_pb2
from mnist_client.tensors import make_ndarray, make_tensor_proto
from client_fakes import load_npy


class Oracle:
    """Labels of MNIST test images, looked up by their uint8 pixels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, wrong_every: int | None = None) -> None:
        self._labels = {images[i].tobytes(): (i, int(labels[i])) for i in range(len(labels))}
        self.wrong_every = wrong_every

    def classify(self, model_input: np.ndarray) -> np.ndarray:
        """int64 classes for float32 [N, 28, 28] in [0, 1] (or uint8); unknown images get class 0."""
        pixels = model_input if model_input.dtype == np.uint8 else np.rint(model_input * 255.0).astype(np.uint8)
        classes = []
        for image in pixels:
            index, label = self._labels.get(image.tobytes(), (-1, 0))
            if self.wrong_every and index >= 0 and index % self.wrong_every == 0:
                label = (label + 1) % contract.NUM_CLASSES
            classes.append(label)
        return np.asarray(classes, dtype=np.int64)


def one_hot(classes: np.ndarray) -> np.ndarray:
    probabilities = np.zeros((len(classes), contract.NUM_CLASSES), dtype=np.float32)
    probabilities[np.arange(len(classes)), classes] = 1.0
    return probabilities


@dataclass
class Behaviour:
    """What a server does; tests may change it while it runs."""

    fail_status: int | None = None  # REST: answer predicts with this status...
    fail_code: grpc.StatusCode | None = None  # gRPC: abort predicts with this code...
    delay_s: float = 0.0  # ...and predicts take at least this long...
    from_call: int = 1  # ...from this predict on (2: let the load tester's pre-flight call pass)
    stall_at_call: int | None = None  # the predict with this number (1-based) stalls...
    stall_s: float = 0.0  # ...this long
    keep_alive: bool = False  # REST: HTTP/1.1 keep-alive instead of closing every connection
    predicts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_call(self) -> int:
        with self.lock:
            self.predicts += 1
            return self.predicts

    def wait(self, number: int) -> None:
        if self.stall_at_call is not None and number == self.stall_at_call:
            time.sleep(self.stall_s)
        elif self.delay_s and number >= self.from_call:
            time.sleep(self.delay_s)

    def failing(self, number: int) -> bool:
        return number >= self.from_call


class RestServer:
    """The oracle behind TF Serving's REST predict, plus /readyz and model status, on a free port.

    ``threaded=False`` answers one request at a time, so a stall holds back every request behind it.
    """

    def __init__(self, oracle: Oracle, behaviour: Behaviour | None = None, *, threaded: bool = True) -> None:
        self.oracle = oracle
        self.behaviour = behaviour or Behaviour()
        handler = _make_rest_handler(self)
        server_class = ThreadingHTTPServer if threaded else HTTPServer
        self._server = server_class(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> RestServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _make_rest_handler(owner: RestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in two writes; without this, Nagle's algorithm holds the body
            # until the client's delayed ACK (40 ms) on kept-alive connections.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _answer(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if not owner.behaviour.keep_alive:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/readyz":
                self._answer(200, {"status": "ready"})
            elif self.path.startswith("/v1/models/mnist"):
                self._answer(200, {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                                             "status": {"error_code": "OK", "error_message": ""}}]})
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def do_POST(self) -> None:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self.path.endswith(":predict"):
                self._answer(404, {"error": f"no route {self.path}"})
                return
            behaviour = owner.behaviour
            number = behaviour.next_call()
            behaviour.wait(number)
            if behaviour.fail_status is not None and behaviour.failing(number):
                self._answer(behaviour.fail_status, {"error": f"configured to fail with {behaviour.fail_status}"})
                return
            if self.headers.get("Content-Type", "").startswith("application/x-npy"):
                images = load_npy(data)
            else:
                images = np.asarray(json.loads(data)["instances"], dtype=np.float32)
            classes = owner.oracle.classify(images)
            probabilities = one_hot(classes)
            self._answer(200, {"predictions": [
                {"classes": int(c), "probabilities": p.tolist()} for c, p in zip(classes, probabilities)
            ]})

    return Handler


class GrpcServer:
    """The oracle behind TF Serving's gRPC Predict (the client's own wire-compatible messages)."""

    def __init__(self, oracle: Oracle, behaviour: Behaviour | None = None, workers: int = 8) -> None:
        self.oracle = oracle
        self.behaviour = behaviour or Behaviour()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
        handler = grpc.method_handlers_generic_handler(
            "tensorflow.serving.PredictionService",
            {
                "Predict": grpc.unary_unary_rpc_method_handler(
                    self._predict,
                    request_deserializer=predict_pb2.PredictRequest.FromString,
                    response_serializer=predict_pb2.PredictResponse.SerializeToString,
                )
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"

    def _predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> predict_pb2.PredictResponse:
        behaviour = self.behaviour
        number = behaviour.next_call()
        behaviour.wait(number)
        if behaviour.fail_code is not None and behaviour.failing(number):
            context.abort(behaviour.fail_code, f"configured to fail with {behaviour.fail_code.name}")
        images = make_ndarray(request.inputs[contract.INPUT_NAME], contract.INPUT_NAME)
        classes = self.oracle.classify(images)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = contract.MODEL_NAME
        response.model_spec.version.value = 1
        response.outputs[contract.CLASSES_NAME].CopyFrom(make_tensor_proto(classes))
        response.outputs[contract.PROBABILITIES_NAME].CopyFrom(make_tensor_proto(one_hot(classes)))
        return response

    def __enter__(self) -> GrpcServer:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)


__all__ = ["Behaviour", "GrpcServer", "Oracle", "RestServer", "one_hot"]
