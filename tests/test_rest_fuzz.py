"""Fuzzing the REST server: the request decoders (hypothesis) and the whole API from its OpenAPI document
(schemathesis), with bounded example counts. Nothing may escape as a 5xx or an exception other than
the API's own errors.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mnist_client import contract
from serving.torch_server import codecs
from serving.torch_server.app import create_app
from serving.torch_server.errors import ApiError

MAX_BATCH = 8
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values: numbers (incl. huge and negative), strings, booleans, nulls, nested lists and objects.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=30) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=200,
)
# Image-like lists: about 28 x 28, mostly right, with a few wrong values or a ragged row.
wrong_values = st.sampled_from([0, 1, 255, -1, 1.5, 1e300, "0.5", None, True, False, [], [0.5], {}])


@st.composite
def image_like(draw: st.DrawFn) -> list[list[Any]]:
    rows, cols = draw(st.integers(26, 29)), draw(st.integers(26, 29))
    base = draw(st.floats(0, 1, width=32))
    image: list[list[Any]] = [[base] * cols for _ in range(rows)]
    for _ in range(draw(st.integers(0, 3))):
        image[draw(st.integers(0, rows - 1))][draw(st.integers(0, cols - 1))] = draw(wrong_values)
    if draw(st.booleans()):
        image[draw(st.integers(0, rows - 1))] = [base] * draw(st.integers(0, 30))
    return image


def assert_decodes_or_refuses(body: bytes, content_type: str) -> None:
    try:
        decoded = codecs.decode_request(body, content_type, MAX_BATCH)
    except ApiError as error:
        assert 400 <= error.status < 500 and error.message
        return
    images = decoded.images
    assert images.dtype == np.float32 and images.flags.c_contiguous and images.flags.writeable
    assert images.ndim == 3 and images.shape[1:] == contract.IMAGE_SHAPE and 1 <= len(images) <= MAX_BATCH
    assert np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1


@FUZZ
@given(st.binary(max_size=2000), st.sampled_from(["application/json", "application/x-npy"]))
def test_any_bytes_decode_or_get_a_4xx(body, content_type):
    assert_decodes_or_refuses(body, content_type)


@FUZZ
@given(st.sampled_from(["instances", "inputs", "images", "signature_name"]), json_values)
def test_any_json_document_decodes_or_gets_a_4xx(key, value):
    assert_decodes_or_refuses(json.dumps({key: value}).encode(), "application/json")


@FUZZ
@given(st.sampled_from(["instances", "inputs"]), st.lists(image_like(), min_size=0, max_size=3), st.booleans())
def test_image_like_batches_decode_or_get_a_4xx(key, batch, named):
    payload: Any = batch
    if named:
        payload = [{"images": image} for image in batch] if key == "instances" else {"images": batch}
    assert_decodes_or_refuses(json.dumps({key: payload}).encode(), "application/json")


@FUZZ
@given(
    st.sampled_from(["|u1", "<f4", ">f4", "<f8", "<i4", "|b1", "<f2"]),
    st.lists(st.integers(0, 30), min_size=0, max_size=4),
    st.booleans(),
    st.integers(-64, 64),
)
def test_npy_bodies_with_any_header_decode_or_get_a_4xx(descr, shape, fortran, trim):
    dtype = np.dtype(descr)
    count = int(np.prod(shape)) if shape else 1
    data = np.random.default_rng(0).random(min(count, 100_000)).astype(dtype).tobytes()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": fortran, "shape": tuple(shape)})
    body = header.getvalue() + data
    body = body[:trim] if trim < 0 else body + bytes(trim)
    assert_decodes_or_refuses(body, "application/x-npy")


# -- the whole API from its OpenAPI document -------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_app(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    base = tmp_path_factory.mktemp("rest-fuzz") / "mnist"
    shutil.copytree(model_repo / contract.TORCH_FRAMEWORK_DIR / contract.MODEL_NAME, base)
    app = create_app({"model_base_path": base, "poll_seconds": 3600, "max_batch": MAX_BATCH})
    yield app
    app.extensions["mnist"].store.stop_watching()


# .npy bodies are "format: binary" in the document: send the generated bytes as they are.
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")
# The coverage phase would also send every boundary case (1024 images of 784 numbers...): too slow
# for the default suite; the fuzzing phase with a bounded example count runs.
schema = schemathesis.openapi.from_path(
    Path(__file__).parent.parent / "serving/torch_server/openapi.yaml",
    config=SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}}),
)


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_document(fuzz_app, case):
    case.call_and_validate(
        app=fuzz_app,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
    )
