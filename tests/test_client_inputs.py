"""Input checks and conversion of mnist_client.inputs: everything is rejected before a request is made."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_client import contract
from mnist_client.errors import InvalidInputError
from mnist_client.inputs import to_model_input, validate_images


def test_uint8_is_divided_by_255_and_nothing_more():
    pixels = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 256
    converted = to_model_input(pixels.astype(np.uint8))
    assert converted.dtype == np.float32 and converted.shape == (2, 28, 28)
    np.testing.assert_array_equal(converted, pixels.astype(np.float32) / np.float32(255))
    assert converted.min() == 0.0 and converted.max() == 1.0


def test_float_input_is_kept_and_cast_to_float32():
    images = np.random.default_rng(0).random((3, 28, 28))  # float64
    converted = to_model_input(images)
    assert converted.dtype == contract.INPUT_DTYPE
    np.testing.assert_array_equal(converted, images.astype(np.float32))


def test_single_image_gets_a_batch_dimension():
    assert to_model_input(np.zeros(contract.IMAGE_SHAPE, np.float32)).shape == (1, 28, 28)
    assert validate_images(np.zeros((28, 28), np.uint8)).dtype == np.uint8


def test_nested_lists_are_accepted():
    assert to_model_input([[[0.5] * 28] * 28]).shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("images", "got", "expected"),
    [
        (np.zeros((2, 28, 27), np.float32), "shape [2, 28, 27]", "[N, 28, 28]"),
        (np.zeros((2, 1, 28, 28), np.float32), "rank 4", "[N, 28, 28]"),
        (np.zeros(784, np.float32), "rank 1", "[N, 28, 28]"),
        (np.zeros((0, 28, 28), np.float32), "empty batch", "at least one image"),
        (np.zeros((1, 28, 28), np.int64), "dtype int64", ".astype(np.uint8)"),
        (np.zeros((1, 28, 28), np.bool_), "dtype bool", "float32/float64 or uint8"),
        (np.full((1, 28, 28), 255.0), "values in [255, 255]", "divide by 255"),
        (np.full((1, 28, 28), -0.5), "values in [-0.5, -0.5]", "[0, 1]"),
        ("not images", "is a str", "numpy array"),
        (None, "is a NoneType", "numpy array"),
        ([[1, 2], [3]], "could not be read", "numpy array"),
        ([["a"] * 28] * 28, "not numeric", "numpy array"),
        (np.array([["a"] * 28] * 28), "dtype <U1", "float32/float64 or uint8"),
    ],
)
def test_bad_input_says_what_was_got_and_what_was_expected(images, got, expected):
    with pytest.raises(InvalidInputError) as caught:
        to_model_input(images)
    assert got in str(caught.value) and expected in str(caught.value)
    assert caught.value.code == "INVALID_ARGUMENT" and caught.value.kind == "invalid_input"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    images = np.zeros((2, 28, 28), np.float32)
    images[1, 3, 4] = bad
    with pytest.raises(InvalidInputError, match="1 NaN or infinite"):
        to_model_input(images)
