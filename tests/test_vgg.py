"""d2l's VGG-11 and its narrow variant, the sister network from the same lecture."""

import chex
import jax
import jax.numpy as jnp
import pytest

from alexnet_jax.model import count_params
from alexnet_jax.vgg import VGG, VGG11, VGG11_ARCH, VGG11Narrow


def torch_vgg(divisor):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    layers, in_channels = [], 1
    for num_convs, channels in VGG11_ARCH:
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, channels // divisor, 3, padding=1), nn.ReLU()]
            in_channels = channels // divisor
        layers.append(nn.MaxPool2d(2, 2))
    layers += [nn.Flatten(), nn.Linear(in_channels * 7 * 7, 4096), nn.ReLU(), nn.Dropout(0.5)]
    layers += [nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4096, 10)]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("module,divisor", [(VGG11, 1), (VGG11Narrow, 4)])
def test_vgg11_parameter_count_matches_pytorch(module, divisor):
    params = jax.eval_shape(module().init, jax.random.key(0), jnp.zeros((1, 224, 224, 1)))
    expected = sum(p.numel() for p in torch_vgg(divisor).parameters())
    assert count_params(params["params"]) == expected


def test_vgg_shapes_and_errors():
    model = VGG11Narrow(num_classes=10)
    x = jnp.zeros((2, 32, 32, 1))
    variables = model.init(jax.random.key(0), x)
    chex.assert_shape(model.apply(variables, x), (2, 10))
    chex.assert_shape(variables["params"]["fc1"]["kernel"], (128, 4096))  # 1x1x128 after 5 pools
    with pytest.raises(ValueError, match="smallest input is 32x32"):
        model.init(jax.random.key(0), jnp.zeros((1, 31, 31, 1)))
    with pytest.raises(ValueError, match="width_divisor=3"):
        VGG(width_divisor=3).init(jax.random.key(0), x)
