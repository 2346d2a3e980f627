"""Both frameworks build the same network: same parameters, same layers, same function."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import torch
from torch import nn

from mnist_client import contract
from training import model_tf, model_torch

# The classic pytorch/examples MNIST CNN: 320 + 18,496 + 1,179,776 + 1,290 parameters.
EXPECTED_PARAMETERS = 1_199_882


@pytest.fixture(scope="module")
def torch_net() -> model_torch.Net:
    torch.manual_seed(0)
    return model_torch.Net().eval()


@pytest.fixture(scope="module")
def keras_net() -> tf.keras.Model:
    tf.keras.utils.set_random_seed(0)
    return model_tf.build_model()


def torch_layers(net: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(kind, output features / channels and kernel) of each layer with parameters, in order."""
    layers = []
    for module in net.children():
        if isinstance(module, nn.Conv2d):
            layers.append(("conv", (module.out_channels, *module.kernel_size)))
        elif isinstance(module, nn.Linear):
            layers.append(("dense", (module.out_features,)))
    return layers


def keras_layers(model: tf.keras.Model) -> list[tuple[str, tuple[int, ...]]]:
    layers = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.Conv2D):
            layers.append(("conv", (layer.filters, *layer.kernel_size)))
        elif isinstance(layer, tf.keras.layers.Dense):
            layers.append(("dense", (layer.units,)))
    return layers


def test_same_parameter_count(torch_net: model_torch.Net, keras_net: tf.keras.Model) -> None:
    assert model_torch.count_parameters(torch_net) == EXPECTED_PARAMETERS
    assert keras_net.count_params() == EXPECTED_PARAMETERS


def test_same_layers_and_dropout(torch_net: model_torch.Net, keras_net: tf.keras.Model) -> None:
    expected = [("conv", (32, 3, 3)), ("conv", (64, 3, 3)), ("dense", (128,)), ("dense", (contract.NUM_CLASSES,))]
    assert torch_layers(torch_net) == expected
    assert keras_layers(keras_net) == expected
    torch_dropout = sorted(m.p for m in torch_net.modules() if isinstance(m, nn.Dropout))
    keras_dropout = sorted(layer.rate for layer in keras_net.layers if isinstance(layer, tf.keras.layers.Dropout))
    assert torch_dropout == keras_dropout == [0.25, 0.5]
    pools = [layer.pool_size for layer in keras_net.layers if isinstance(layer, tf.keras.layers.MaxPooling2D)]
    assert pools == [(2, 2)]  # the torch net pools with F.max_pool2d(x, 2) in forward()


def copy_torch_weights_to_keras(net: model_torch.Net, model: tf.keras.Model) -> None:
    """Load the torch weights into the Keras model (OIHW -> HWIO kernels, CHW -> HWC flatten order)."""
    conv1, conv2, fc1, fc2 = (layer for layer in model.layers if layer.weights)
    conv1.set_weights([net.conv1.weight.detach().permute(2, 3, 1, 0).numpy(), net.conv1.bias.detach().numpy()])
    conv2.set_weights([net.conv2.weight.detach().permute(2, 3, 1, 0).numpy(), net.conv2.bias.detach().numpy()])
    # torch flattens [64, 12, 12] channel-first, Keras [12, 12, 64] channel-last: reorder fc1's inputs.
    fc1_weight = net.fc1.weight.detach().reshape(128, 64, 12, 12).permute(2, 3, 1, 0).reshape(9216, 128)
    fc1.set_weights([fc1_weight.numpy(), net.fc1.bias.detach().numpy()])
    fc2.set_weights([net.fc2.weight.detach().T.numpy(), net.fc2.bias.detach().numpy()])


def test_same_function_given_the_same_weights(
    torch_net: model_torch.Net, keras_net: tf.keras.Model, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    """The strongest structural check: with torch's weights copied over, Keras computes the same logits."""
    copy_torch_weights_to_keras(torch_net, keras_net)
    images = test_images[0][:32]  # [32, 28, 28] pixel/255
    normalised = (images - contract.NORMALIZE_MEAN) / contract.NORMALIZE_STD
    with torch.inference_mode():
        torch_logits = torch_net(torch.from_numpy(normalised[:, np.newaxis])).numpy()  # NCHW
    keras_logits = keras_net(normalised[..., np.newaxis], training=False).numpy()  # NHWC
    np.testing.assert_allclose(keras_logits, torch_logits, atol=1e-4, rtol=1e-4)
