"""gRPC client for TensorFlow Serving's PredictionService and ModelService (and the local stand-in).

The messages are this package's own wire-compatible definitions (:mod:`mnist_client.protos`, proto
package ``mnist_client.tfs``), sent on TF Serving's method paths
(``/tensorflow.serving.PredictionService/Predict`` ...), so the client needs neither TensorFlow nor
``tensorflow-serving-api`` and never clashes with them in one process.

One channel is opened per client and reused by every call (it is thread-safe; do not share it across
``fork``). Every call has a deadline. ``grpc.RpcError`` is translated into :mod:`mnist_client.errors` in
:func:`translate_rpc_error` only.

Load balancing: gRPC's default ``pick_first`` sends every call of a channel to one server. With
``load_balancing="round_robin"`` the channel connects to every address the target resolves to and spreads
calls across them: use a multi-address target (``"ipv4:10.0.0.1:8500,10.0.0.2:8500"``, or a list of
``host:port`` strings) or a DNS name with several A records (``"dns:///mnist-tfs-headless.default.svc.
cluster.local:8500"``, a Kubernetes headless Service).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import grpc

from mnist_client import contract
from mnist_client._checks import check_model, positive_int
from mnist_client._client_base import ClientBase
from mnist_client.errors import (
    ClientConfigError,
    DeadlineExceededError,
    MnistClientError,
    ProtocolError,
    ServerError,
    UnavailableError,
)
from mnist_client.inputs import to_model_input
from mnist_client.prediction import ModelMetadata, ModelVersionStatus, Prediction, TensorSpec
from mnist_client.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    health_pb2,
    model_pb2,
    predict_pb2,
)
from mnist_client.retry import RetryPolicy, call_with_retries, is_retryable_predict, is_retryable_probe
from mnist_client.tensors import dtype_name, make_ndarray, make_tensor_proto

logger = logging.getLogger(__name__)

PREDICT_METHOD: Final = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_METADATA_METHOD: Final = "/tensorflow.serving.PredictionService/GetModelMetadata"
GET_MODEL_STATUS_METHOD: Final = "/tensorflow.serving.ModelService/GetModelStatus"
HEALTH_CHECK_METHOD: Final = "/grpc.health.v1.Health/Check"
SIGNATURE_DEF_TYPE_URL_SUFFIX: Final = "/tensorflow.serving.SignatureDefMap"

DEFAULT_TIMEOUT: Final = 10.0  # seconds per call, retries included
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024  # a batch of 1,000 float32 images is 3.1 MB
LOAD_BALANCING_POLICIES: Final = ("pick_first", "round_robin")

# UNAVAILABLE details that gRPC core produces when the call failed before it was given to any transport
# (name resolution failed, or no backend is connected): the request was never sent.
_NEVER_SENT_MARKERS: Final = (
    "failed to connect to all addresses",
    "connections to all backends failing",
    "errors resolving",
    "DNS resolution failed",
    "empty address list",
    "no children",
)

Readiness = Literal["model_status", "health"]


@dataclass(frozen=True)
class PreparedPredict:
    """A serialized PredictRequest, reusable for many calls (the load tester sends the same bytes)."""

    request: bytes
    batch_size: int


class GrpcClient(ClientBase):
    """Client for the MNIST model over TF Serving's gRPC API.

    Args:
        target: ``host:port``, any gRPC target (``"ipv4:a:p,b:p"``, ``"dns:///name:port"``), or a list
            of ``host:port`` IP addresses (turned into one multi-address target).
        model_name, model_version, signature_name: the ModelSpec sent with each call.
        timeout: deadline of each call in seconds, retries included.
        load_balancing: ``"pick_first"`` (gRPC's default) or ``"round_robin"`` (spread calls over all
            resolved addresses).
        tls: use a secure channel; ``root_certificates`` (PEM bytes or a file path) verifies the server
            (default: the system roots), ``client_certificate_chain``/``client_private_key`` for mutual
            TLS, ``tls_server_name`` overrides the name checked against the certificate.
        max_send_message_bytes, max_receive_message_bytes: gRPC message size limits.
        readiness: ``"model_status"`` (a version AVAILABLE, works with real TF Serving) or ``"health"``
            (``grpc.health.v1.Health/Check`` of ``health_service``).
        use_tensor_content: send images as raw ``tensor_content`` bytes (fast) rather than ``float_val``.
        retry: backoff policy for the retries in :mod:`mnist_client.retry`.
        channel_options: extra ``(key, value)`` gRPC channel arguments.
    """

    def __init__(
        self,
        target: str | Sequence[str] = f"127.0.0.1:{contract.TFS_GRPC_PORT}",
        *,
        model_name: str = contract.MODEL_NAME,
        model_version: int | None = None,
        signature_name: str = contract.SIGNATURE_NAME,
        timeout: float = DEFAULT_TIMEOUT,
        load_balancing: str | None = None,
        tls: bool = False,
        root_certificates: bytes | str | os.PathLike[str] | None = None,
        client_certificate_chain: bytes | str | os.PathLike[str] | None = None,
        client_private_key: bytes | str | os.PathLike[str] | None = None,
        tls_server_name: str | None = None,
        max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        readiness: Readiness = "model_status",
        health_service: str = "",
        use_tensor_content: bool = True,
        retry: RetryPolicy | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(timeout)
        check_model(model_name, model_version)
        if not isinstance(signature_name, str) or not signature_name:
            raise ClientConfigError(f"signature_name is {signature_name!r}; expected a non-empty string")
        if load_balancing is not None and load_balancing not in LOAD_BALANCING_POLICIES:
            raise ClientConfigError(f"load_balancing is {load_balancing!r}; expected one of {LOAD_BALANCING_POLICIES}")
        if readiness not in ("model_status", "health"):
            raise ClientConfigError(f"readiness is {readiness!r}; expected 'model_status' or 'health'")
        positive_int("max_send_message_bytes", max_send_message_bytes)
        positive_int("max_receive_message_bytes", max_receive_message_bytes)
        has_tls_material = any(
            v is not None for v in (root_certificates, client_certificate_chain, client_private_key, tls_server_name)
        )
        if has_tls_material and not tls:
            raise ClientConfigError("TLS settings were given with tls=False; expected tls=True to use them")
        if (client_certificate_chain is None) != (client_private_key is None):
            raise ClientConfigError(
                "only one of client_certificate_chain/client_private_key was given; expected both for mutual TLS"
            )

        self.target = _normalize_target(target)
        self.model_name = model_name
        self.model_version = model_version
        self.signature_name = signature_name
        self._readiness = readiness
        self._health_service = health_service
        self._use_tensor_content = bool(use_tensor_content)
        self._retry = retry or RetryPolicy()

        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_send_message_bytes),
            ("grpc.max_receive_message_length", max_receive_message_bytes),
        ]
        if load_balancing is not None:
            options.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
        if tls_server_name is not None:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        options.extend(channel_options)

        if tls:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem("root_certificates", root_certificates),
                private_key=_pem("client_private_key", client_private_key),
                certificate_chain=_pem("client_certificate_chain", client_certificate_chain),
            )
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)

        self._predict = self._channel.unary_unary(
            PREDICT_METHOD,
            request_serializer=None,  # PreparedPredict already holds the serialized request
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )
        self._get_metadata = self._channel.unary_unary(
            GET_MODEL_METADATA_METHOD,
            request_serializer=get_model_metadata_pb2.GetModelMetadataRequest.SerializeToString,
            response_deserializer=get_model_metadata_pb2.GetModelMetadataResponse.FromString,
        )
        self._get_status = self._channel.unary_unary(
            GET_MODEL_STATUS_METHOD,
            request_serializer=get_model_status_pb2.GetModelStatusRequest.SerializeToString,
            response_deserializer=get_model_status_pb2.GetModelStatusResponse.FromString,
        )
        self._health_check = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    # -- predict -----------------------------------------------------------------------------------

    def model_spec(self) -> model_pb2.ModelSpec:
        """The ModelSpec sent with every call."""
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=self.signature_name)
        if self.model_version is not None:
            spec.version.value = self.model_version
        return spec

    def prepare(self, images: Any) -> PreparedPredict:
        """Validate and serialize ``images`` once; pass the result to :meth:`predict` any number of times."""
        array = to_model_input(images)
        request = predict_pb2.PredictRequest(model_spec=self.model_spec())
        request.inputs[contract.INPUT_NAME].CopyFrom(
            make_tensor_proto(array, use_tensor_content=self._use_tensor_content)
        )
        return PreparedPredict(request=request.SerializeToString(), batch_size=int(array.shape[0]))

    def predict(self, images: Any, *, timeout: float | None = None) -> Prediction:
        """Classify ``images`` (``[N, 28, 28]`` float in [0, 1] or uint8, or one ``[28, 28]`` image).

        ``images`` may also be a :class:`PreparedPredict` from :meth:`prepare`. Retried only when the
        request provably never reached a server (see :mod:`mnist_client.retry`).
        """
        prepared = images if isinstance(images, PreparedPredict) else self.prepare(images)
        response = call_with_retries(
            lambda remaining: self._call(self._predict, prepared.request, remaining, "Predict"),
            policy=self._retry,
            timeout=self._call_timeout(timeout),
            retryable=is_retryable_predict,
            description=f"Predict at {self.target}",
        )
        return parse_prediction(response, prepared.batch_size)

    # -- model information -----------------------------------------------------------------------

    def metadata(self, *, timeout: float | None = None) -> ModelMetadata:
        """The served signature (``PredictionService/GetModelMetadata``, field ``signature_def``)."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self.model_spec(), metadata_field=["signature_def"]
        )
        response = self._probe(self._get_metadata, request, timeout, "GetModelMetadata")
        return _parse_metadata(response, self.signature_name)

    def model_status(self, *, timeout: float | None = None) -> list[ModelVersionStatus]:
        """State of each version of the model (``ModelService/GetModelStatus``)."""
        response = self._probe(self._get_status, self._status_request(), timeout, "GetModelStatus")
        return _parse_model_status(response)

    def ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server can predict now (one attempt); never raises for an unreachable or unready server.

        ``readiness="model_status"``: a version of the model (the pinned one, if any) is AVAILABLE.
        ``readiness="health"``: the gRPC health service reports SERVING.
        """
        call_timeout = self._call_timeout(timeout)
        try:
            if self._readiness == "health":
                request = health_pb2.HealthCheckRequest(service=self._health_service)
                response = self._call(self._health_check, request, call_timeout, "Health/Check")
                return response.status == health_pb2.HealthCheckResponse.SERVING
            response = self._call(self._get_status, self._status_request(), call_timeout, "GetModelStatus")
        except (UnavailableError, DeadlineExceededError, ServerError, ProtocolError) as error:
            logger.debug("%s not ready: %s", self.target, error)
            return False
        return any(status.available for status in _parse_model_status(response))

    # -- lifecycle (close, with, wait_until_ready: ClientBase) ---------------------------------------

    def _release(self) -> None:
        self._channel.close()  # in-flight calls are cancelled

    def __repr__(self) -> str:
        return f"GrpcClient({self.target!r}, model={self.model_name!r})"

    # -- internals ---------------------------------------------------------------------------------

    def _status_request(self) -> get_model_status_pb2.GetModelStatusRequest:
        spec = model_pb2.ModelSpec(name=self.model_name)
        if self.model_version is not None:
            spec.version.value = self.model_version
        return get_model_status_pb2.GetModelStatusRequest(model_spec=spec)

    def _probe(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float | None, name: str) -> Any:
        return call_with_retries(
            lambda remaining: self._call(method, request, remaining, name),
            policy=self._retry,
            timeout=self._call_timeout(timeout),
            retryable=is_retryable_probe,
            description=f"{name} at {self.target}",
        )

    def _call(self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float, name: str) -> Any:
        if self._closed:
            raise ClientConfigError(f"{self!r} is closed; expected a call before close()")
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise translate_rpc_error(error, f"{name} at {self.target}", timeout) from None
        except ValueError as error:  # grpc raises ValueError when the channel was closed meanwhile
            if self._closed:
                raise ClientConfigError(f"{self!r} is closed; expected a call before close()") from error
            raise


# -- the one place where grpc.RpcError becomes a client error ------------------------------------------


def translate_rpc_error(error: grpc.RpcError, what: str, timeout: float) -> MnistClientError:
    """The client error for a failed RPC (its status code and details); ``timeout`` is the deadline used.

    Public so that other callers of the same API (the load tester) report errors alike.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or ""
    code_name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    message = f"{what}: {code_name}: {details or '(no details)'}"
    if code == grpc.StatusCode.UNAVAILABLE:
        never_sent = any(marker in details for marker in _NEVER_SENT_MARKERS)
        return UnavailableError(message, request_sent=not never_sent, code=code_name, server_message=details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError(f"{what}: no answer within {timeout:.3g} s ({details})", server_message=details)
    return ServerError(message, code=code_name, server_message=details)


# -- decoding ----------------------------------------------------------------------------------------


def parse_prediction(response: predict_pb2.PredictResponse, batch_size: int) -> Prediction:
    """A PredictResponse -> :class:`Prediction`, checking the contract's outputs; ProtocolError if not."""
    outputs = response.outputs
    missing = [name for name in contract.OUTPUT_NAMES if name not in outputs]
    if missing:
        raise ProtocolError(f"Predict answer has outputs {sorted(outputs)}; expected {list(contract.OUTPUT_NAMES)}")
    probabilities = make_ndarray(outputs[contract.PROBABILITIES_NAME], contract.PROBABILITIES_NAME)
    classes = make_ndarray(outputs[contract.CLASSES_NAME], contract.CLASSES_NAME)
    expected = (batch_size, contract.NUM_CLASSES)
    if probabilities.shape != expected or classes.shape != (batch_size,):
        raise ProtocolError(
            f"Predict answer has probabilities {list(probabilities.shape)} and classes {list(classes.shape)}; "
            f"expected {list(expected)} and [{batch_size}]"
        )
    version = response.model_spec.version.value if response.model_spec.HasField("version") else None
    return Prediction(
        classes=classes.astype(contract.CLASSES_DTYPE, copy=False),
        probabilities=probabilities.astype(contract.PROBABILITIES_DTYPE, copy=False),
        model_version=version,
    )


def _parse_metadata(response: get_model_metadata_pb2.GetModelMetadataResponse, signature_name: str) -> ModelMetadata:
    if "signature_def" not in response.metadata:
        raise ProtocolError(f"GetModelMetadata answer has fields {sorted(response.metadata)}; expected 'signature_def'")
    packed = response.metadata["signature_def"]
    if not packed.type_url.endswith(SIGNATURE_DEF_TYPE_URL_SUFFIX):
        raise ProtocolError(
            f"GetModelMetadata signature_def has type {packed.type_url!r}; "
            f"expected '...{SIGNATURE_DEF_TYPE_URL_SUFFIX}'"
        )
    signature_map = get_model_metadata_pb2.SignatureDefMap.FromString(packed.value)
    if signature_name not in signature_map.signature_def:
        raise ProtocolError(f"model has signatures {sorted(signature_map.signature_def)}; expected {signature_name!r}")
    signature = signature_map.signature_def[signature_name]
    spec = response.model_spec
    return ModelMetadata(
        name=spec.name,
        version=spec.version.value if spec.HasField("version") else None,
        signature_name=signature_name,
        inputs={name: _tensor_spec(info) for name, info in signature.inputs.items()},
        outputs={name: _tensor_spec(info) for name, info in signature.outputs.items()},
        method_name=signature.method_name,
        raw=response,
    )


def _parse_model_status(response: get_model_status_pb2.GetModelStatusResponse) -> list[ModelVersionStatus]:
    states = get_model_status_pb2.ModelVersionStatus.State
    return [
        ModelVersionStatus(
            version=status.version,
            state=states.Name(status.state) if status.state in states.values() else "UNKNOWN",
            error_code=_error_code_name(status.status.error_code),
            error_message=status.status.error_message,
        )
        for status in response.model_version_status
    ]


def _tensor_spec(info: get_model_metadata_pb2.TensorInfo) -> TensorSpec:
    shape = None if info.tensor_shape.unknown_rank else tuple(dim.size for dim in info.tensor_shape.dim)
    return TensorSpec(dtype=dtype_name(info.dtype), shape=shape)


def _error_code_name(code: int) -> str:
    try:
        return get_model_status_pb2.ErrorCode.Name(code)
    except ValueError:
        return str(code)


# -- configuration helpers -----------------------------------------------------------------------------


def _normalize_target(target: str | Sequence[str]) -> str:
    """A gRPC target string; a list of ``ip:port`` becomes ``ipv4:a:p,b:p`` (or ``ipv6:[..]:p,...``)."""
    if isinstance(target, str):
        if not target.strip():
            raise ClientConfigError("target is empty; expected 'host:port' or a gRPC target such as 'dns:///host:port'")
        return target
    addresses = list(target) if isinstance(target, Sequence) else None
    if not addresses or not all(isinstance(a, str) for a in addresses):
        raise ClientConfigError(f"target is {target!r}; expected 'host:port' or a non-empty list of 'ip:port'")
    families = {_address_family(address) for address in addresses}
    if len(families) != 1:
        raise ClientConfigError(f"target list {addresses!r} mixes IPv4 and IPv6; expected one family")
    return f"{families.pop()}:{','.join(addresses)}"


def _address_family(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise ClientConfigError(f"target address {address!r} has no port; expected 'ip:port'")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ClientConfigError(
            f"target address {address!r} is not an IP address; expected 'ip:port' in a list "
            "(for host names use one target string such as 'dns:///host:port')"
        ) from None
    return "ipv4" if ip.version == 4 else "ipv6"


def _pem(name: str, value: bytes | str | os.PathLike[str] | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ClientConfigError(
            f"{name} {os.fspath(value)!r} could not be read ({error}); expected a PEM file"
        ) from error


__all__ = ["GrpcClient", "PreparedPredict", "LOAD_BALANCING_POLICIES"]
