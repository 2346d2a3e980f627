"""The stand-in's last line of defence: an exception nobody planned for inside a handler.

No well-formed or malformed request reaches this path on purpose (every known failure has its own
status), so the fault is injected: the predict step raises once, as a bug would. The call goes through
gRPC and the official stubs like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from mnist_client import contract
from serving.tfs_standin import predict as predict_module
from serving.tfs_standin import status
from serving.tfs_standin.server import ModelServer
from tests.standin_helpers import (
    Stubs,
    outputs,
    standin_server,  # noqa: F401 - fixture
    standin_stubs,  # noqa: F401 - fixture
    tf_model_copy,  # noqa: F401 - fixture
)

# Far longer than a gRPC trailer may be: the answer must still arrive as INTERNAL, its message cut short.
HUGE_DETAIL = "the model's cache is inconsistent " * 2000


class Bug(RuntimeError):
    """What a programming error inside the server would raise."""


@pytest.fixture
def fails_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    real = predict_module.predict
    calls: list[int] = []

    def predict(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise Bug(HUGE_DETAIL)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(predict_module, "predict", predict)
    yield calls


def test_an_unexpected_exception_is_internal_with_a_short_message_and_the_server_keeps_answering(
    server: ModelServer, stubs: Stubs, fails_once: list[int], test_images: tuple[np.ndarray, np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = test_images[0][:2]
    caplog.set_level(logging.ERROR, logger="serving.tfs_standin.services")
    with pytest.raises(grpc.RpcError) as caught:
        stubs.predict(images)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details()
    assert details.startswith("Predict failed: Bug: the model's cache is inconsistent")
    assert len(details) <= status.MAX_MESSAGE_CHARS and details.endswith("...")
    # Logged once, with the traceback, for the operator.
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[0] is Bug]
    assert len(logged) == 1 and "Predict failed unexpectedly" in logged[0].getMessage()
    # The same server and channel answer the next call.
    answer = outputs(stubs.predict(images))
    assert answer[contract.CLASSES_NAME].shape == (2,)
    assert len(fails_once) == 2
    assert [s.state for s in stubs.status()] == [30]  # version 1 still AVAILABLE

