"""The gRPC services, on the official tensorflow-serving-api generated stubs.

``tensorflow.serving.PredictionService``: Predict and GetModelMetadata
(Classify, Regress and MultiInference answer UNIMPLEMENTED with the reason).
``tensorflow.serving.ModelService``: GetModelStatus and HandleReloadConfigRequest.
Every ServingError becomes its status code and message; anything unexpected is
logged and answered INTERNAL, and the server keeps serving. ``model_status`` and
``model_metadata`` build the answers that the REST API (rest.py) writes as JSON.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.tfs_standin import predict, status
from serving.tfs_standin.config import ConfigError, model_configs_from_proto
from serving.tfs_standin.core import ServerCore

log = logging.getLogger(__name__)

SIGNATURE_DEF_FIELD = "signature_def"

_R = TypeVar("_R")


def _handler(method: Callable[..., _R]) -> Callable[..., _R]:
    """Turn ServingErrors into their status, and any other exception into a logged INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> _R:
        try:
            return method(self, request, context)
        except status.ServingError as exc:
            context.abort(exc.code, status.clip(exc.message, status.MAX_MESSAGE_CHARS))
        except Exception as exc:  # noqa: BLE001 - one bad call must not take the server down
            log.exception("%s failed unexpectedly", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL,
                          status.clip(f"{method.__name__} failed: {type(exc).__name__}: {exc}", status.MAX_MESSAGE_CHARS))
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def call_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the ``time.monotonic()`` clock, or None if the client set none."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e8:  # grpc reports "no deadline" as a huge value
        return None
    return time.monotonic() + remaining


def model_metadata(core: ServerCore, spec: model_pb2.ModelSpec) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadata's answer (the signature_def field) for the version ``spec`` resolves to (gRPC and REST)."""
    servable = core.servable_for(spec)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature_def in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature_def)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def model_status(core: ServerCore, spec: model_pb2.ModelSpec) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatus's answer: the state of one version (``spec.version``) or of all (gRPC and REST)."""
    try:
        manager = core.manager(spec.name)
    except status.ServingError:
        raise status.not_found(
            f"Could not find any versions of model {status.clip(spec.name)}; this server serves models "
            f"{{{','.join(core.model_names)}}}"
        ) from None
    if spec.HasField("version"):
        found = manager.status_of(spec.version.value)
        if found is None:
            raise status.not_found(f"Could not find version {spec.version.value} of model {status.clip(spec.name)}")
        statuses = [found]
    else:
        statuses = manager.statuses()
        if not statuses:
            raise status.not_found(
                f"Could not find any versions of model {spec.name} (none under {manager.config.base_path} yet)"
            )
    response = get_model_status_pb2.GetModelStatusResponse()
    for version_status in statuses:
        entry = response.model_version_status.add()
        entry.version = version_status.version
        entry.state = version_status.state  # type: ignore[assignment]
        entry.status.error_code = status.status_code_number(version_status.error_code)  # type: ignore[assignment]
        entry.status.error_message = version_status.error_message
    return response


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, core: ServerCore, tensor_content: bool) -> None:
        self._core = core
        self._tensor_content = tensor_content

    @_handler
    def Predict(  # noqa: N802 - gRPC method name
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        deadline = call_deadline(context)
        servable = self._core.servable_for(request.model_spec)
        return predict.predict(request, servable, self._core.runner, deadline, self._tensor_content)

    @_handler
    def GetModelMetadata(  # noqa: N802
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.HasField("model_spec"):
            raise status.invalid_argument("Missing ModelSpec")
        if not request.metadata_field:
            raise status.invalid_argument(
                f"GetModelMetadataRequest must specify at least one metadata_field (supported: {SIGNATURE_DEF_FIELD})"
            )
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise status.invalid_argument(
                    f"Metadata field {status.clip(field)} is not supported; the supported field is {SIGNATURE_DEF_FIELD}"
                )
        return model_metadata(self._core, request.model_spec)

    def _unimplemented(self, name: str, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} is not implemented by the TF Serving stand-in; it serves Predict and GetModelMetadata",
        )

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._unimplemented("Classify", context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._unimplemented("Regress", context)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._unimplemented("MultiInference", context)


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, core: ServerCore) -> None:
        self._core = core

    @_handler
    def GetModelStatus(  # noqa: N802
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        if not request.HasField("model_spec"):
            raise status.invalid_argument("Missing ModelSpec")
        return model_status(self._core, request.model_spec)

    @_handler
    def HandleReloadConfigRequest(  # noqa: N802
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        try:
            models = model_configs_from_proto(request.config, "ReloadConfigRequest")
        except ConfigError as exc:
            raise status.invalid_argument(str(exc)) from None
        self._core.reload(models)
        return model_management_pb2.ReloadConfigResponse()
