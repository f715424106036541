"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) and the descendants users compare it with.

Three layouts share one module, chosen by ``variant``:

- ``"paper"``: the paper's network. conv1 96x11x11/4 (no padding) -> ReLU -> LRN -> max-pool
  3x3/2; conv2 256x5x5 (pad 2) -> ReLU -> LRN -> pool; conv3 384, conv4 384, conv5 256 (3x3,
  pad 1) -> pool; fc6, fc7 4096 with dropout on their outputs; fc8. ``groups=2`` reproduces
  the two-GPU towers on conv2, conv4 and conv5. Needs 227x227 input for the paper's 55x55.
- ``"torchvision"``: ``torchvision.models.alexnet`` (the "one weird trick" layout): 64/192/
  384/256/256 filters, conv1 padding 2, no LRN, adaptive average pooling to 6x6, dropout on
  the *inputs* of fc6 and fc7.
- ``"d2l"``: Dive into Deep Learning's AlexNet: conv1 padding 1, no LRN, meant for 1-channel
  224x224 input and 10 classes (fc6 sees 5x5x256 = 6400 features).

``create_model(config.model, num_classes)`` builds the network a config names: this AlexNet,
or d2l's VGG-11 (``alexnet_jax.vgg``). Images are NHWC floats; the model returns float32
logits (no softmax). Each layer's activation is sown into the ``"intermediates"``
collection as ``conv1_out`` ... ``fc8_out`` (Flax keeps submodule and sown names apart);
``features`` reads them out by layer name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax.layers import Conv, Dense, max_pool
from alexnet_jax.lrn import LocalResponseNorm
from alexnet_jax.vgg import VGG, VGG11_ARCH

MODEL_NAMES = ("alexnet", "vgg11")  # config.model.name
VARIANTS = ("paper", "torchvision", "d2l")
INITS = ("paper", "torch", "xavier", "he")
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolutional layer and what follows it."""

    features: int
    kernel: int
    stride: int = 1
    padding: int = 0
    grouped: bool = False  # split into ``groups`` towers when the model has groups > 1
    lrn: bool = False  # LRN after the ReLU (where the variant uses LRN at all)
    pool: bool = False  # 3x3 stride-2 max-pool after (ReLU, LRN)
    bias: float = 0.0  # the paper's bias constant for this layer


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    convs: tuple[ConvSpec, ...]
    fc_features: tuple[int, ...] = (4096, 4096)
    fc_biases: tuple[float, ...] = (1.0, 1.0)  # the paper's fc6, fc7 bias constants
    use_lrn: bool = False
    dropout_before_fc: bool = False  # torchvision drops fc inputs; the paper drops outputs
    adaptive_pool: int | None = None  # torchvision's AdaptiveAvgPool2d((6, 6))
    init: str = "paper"


SPECS: dict[str, VariantSpec] = {
    "paper": VariantSpec(
        convs=(
            ConvSpec(96, 11, stride=4, padding=0, lrn=True, pool=True),
            ConvSpec(256, 5, padding=2, grouped=True, lrn=True, pool=True, bias=1.0),
            ConvSpec(384, 3, padding=1),
            ConvSpec(384, 3, padding=1, grouped=True, bias=1.0),
            ConvSpec(256, 3, padding=1, grouped=True, pool=True, bias=1.0),
        ),
        use_lrn=True,
        init="paper",
    ),
    "torchvision": VariantSpec(
        convs=(
            ConvSpec(64, 11, stride=4, padding=2, pool=True),
            ConvSpec(192, 5, padding=2, grouped=True, pool=True),
            ConvSpec(384, 3, padding=1),
            ConvSpec(256, 3, padding=1, grouped=True),
            ConvSpec(256, 3, padding=1, grouped=True, pool=True),
        ),
        dropout_before_fc=True,
        adaptive_pool=6,
        init="torch",
    ),
    "d2l": VariantSpec(
        convs=(
            ConvSpec(96, 11, stride=4, padding=1, pool=True),
            ConvSpec(256, 5, padding=2, grouped=True, pool=True),
            ConvSpec(384, 3, padding=1),
            ConvSpec(384, 3, padding=1, grouped=True),
            ConvSpec(256, 3, padding=1, grouped=True, pool=True),
        ),
        init="xavier",
    ),
}


def spatial_sizes(variant: str, size: int, overlap_pool: bool = True) -> dict[str, int]:
    """Height (= width) of each conv layer's output (after its pool, if any) for a square input.

    Floor rounding, as in XLA and PyTorch: 227 gives the paper's 55, 27, 13, 13, 13 -> 6.
    A size of 0 or less means the input is too small for that layer.
    """
    window, stride = (3, 2) if overlap_pool else (2, 2)
    sizes = {}
    for index, conv in enumerate(_spec(variant).convs):
        size = (size + 2 * conv.padding - conv.kernel) // conv.stride + 1
        if size >= 1 and conv.pool:
            size = (size - window) // stride + 1
        sizes[f"conv{index + 1}"] = size
        if size < 1:
            break
    return sizes


def min_input_size(variant: str, overlap_pool: bool = True) -> int:
    """The smallest square input whose every layer output is at least 1x1 (67 for the paper)."""
    layers = len(_spec(variant).convs)
    size = 1
    while True:
        sizes = spatial_sizes(variant, size, overlap_pool)
        if len(sizes) == layers and min(sizes.values()) >= 1:
            return size
        size += 1


def layer_widths(
    variant: str, groups: int = 1, width_divisor: int = 1
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The filters of each conv layer and the units of fc6, fc7 for ``variant`` with every
    width divided by ``width_divisor`` (a narrow network for ablations and quick runs; 1:
    the variant's own). ``ValueError`` naming the layer if the divisor does not divide a
    width, or ``groups`` a grouped layer's input or output channels."""
    spec = _spec(variant)
    if width_divisor < 1:
        raise ValueError(f"width_divisor={width_divisor}: must be a positive integer")
    named = [(f"conv{i + 1}", c.features) for i, c in enumerate(spec.convs)]
    named += [(f"fc{i + 6}", f) for i, f in enumerate(spec.fc_features)]
    for name, width in named:
        if width % width_divisor:
            raise ValueError(
                f"width_divisor={width_divisor} does not divide {name}'s width {width} "
                f"(variant {variant!r})"
            )
    convs = tuple(c.features // width_divisor for c in spec.convs)
    inputs = (None,) + convs[:-1]  # conv1 sees the image; it is never grouped
    for index, conv in enumerate(spec.convs):
        if not conv.grouped or groups == 1:
            continue
        for what, channels in (("filters", convs[index]), ("input channels", inputs[index])):
            if channels % groups:
                raise ValueError(
                    f"groups={groups} does not divide conv{index + 1}'s {channels} {what} "
                    f"(variant {variant!r}, width_divisor={width_divisor})"
                )
    return convs, tuple(f // width_divisor for f in spec.fc_features)


def _spec(variant: str) -> VariantSpec:
    if variant not in SPECS:
        raise ValueError(f"Unknown AlexNet variant {variant!r}; choose one of {VARIANTS}")
    return SPECS[variant]


def _kernel_init(init: str) -> Callable:
    if init == "paper":
        return nn.initializers.normal(stddev=0.01)
    if init == "torch":  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    if init == "xavier":
        return nn.initializers.xavier_uniform()
    if init == "he":
        return nn.initializers.he_normal()
    raise ValueError(f"Unknown init {init!r}; choose one of {INITS}")


def _bias_init(init: str, paper_constant: float, fan_in: int) -> Callable:
    if init == "paper":
        return nn.initializers.constant(paper_constant)
    if init == "torch":
        bound = 1.0 / np.sqrt(fan_in)
        return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
            key, shape, dtype, -bound, bound
        )
    return nn.initializers.zeros


def _adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d: bin i averages rows floor(i*H/out) .. ceil((i+1)*H/out)-1."""

    def pooling_matrix(n: int) -> np.ndarray:
        matrix = np.zeros((out, n), np.float32)
        for i in range(out):
            start, end = (i * n) // out, -((-(i + 1) * n) // out)
            matrix[i, start:end] = 1.0 / (end - start)
        return matrix

    _, height, width, _ = x.shape
    if height == width == out:
        return x
    ph = jnp.asarray(pooling_matrix(height), x.dtype)
    pw = jnp.asarray(pooling_matrix(width), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", ph, x, pw)


class AlexNet(nn.Module):
    """AlexNet and its descendants; see the module docstring for the variants.

    Attributes:
      num_classes: size of the final layer (fc8).
      variant: "paper", "torchvision" or "d2l".
      groups: 2 splits conv2, conv4 and conv5 into the paper's two towers.
      dropout_rate: dropout on fc6/fc7 (0 disables it).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
      use_lrn: override the variant's LRN (None: the variant's own). For ablations.
      overlap_pool: 3x3/2 pooling (True, the paper's) or non-overlapping 2x2/2. For ablations.
      initializer: "paper" (N(0, 0.01^2), the paper's bias constants), "torch" (PyTorch's
        defaults), "xavier" or "he"; None takes the variant's own.
      lrn_size, lrn_k, lrn_alpha, lrn_beta: the LRN constants, in the paper's convention.
      width_divisor: divides every conv layer's filters and fc6's and fc7's units (4: the
        paper's network at 227 with 1,000 classes has 4.7 M parameters instead of 62.4 M;
        for ablations and quick runs); fc8 keeps ``num_classes``.
      cpu_convolutions: "auto" (oneDNN's convolutions on the CPU where they can be built),
        "onednn" (required) or "xla" (XLA's own: exportable); see ``alexnet_jax/onednn.py``.
        The same parameters and, within rounding, the same results either way.
      cpu_matmuls: the same choice for the dense layers' products (``layers.Dense``).
    """

    num_classes: int = 1000
    variant: str = "paper"
    groups: int = 1
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    use_lrn: bool | None = None
    overlap_pool: bool = True
    initializer: str | None = None
    lrn_size: int = 5
    lrn_k: float = 2.0
    lrn_alpha: float = 1e-4
    lrn_beta: float = 0.75
    width_divisor: int = 1
    cpu_convolutions: str = "auto"
    cpu_matmuls: str = "auto"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        spec = _spec(self.variant)
        init = self.initializer or spec.init
        kernel_init = _kernel_init(init)
        use_lrn = spec.use_lrn if self.use_lrn is None else self.use_lrn
        if images.ndim != 4:
            raise ValueError(f"AlexNet expects NHWC images, got shape {images.shape}")
        smallest = min_input_size(self.variant, self.overlap_pool)
        if min(images.shape[1:3]) < smallest:
            raise ValueError(
                f"Input {images.shape[1]}x{images.shape[2]} is too small for AlexNet variant "
                f"{self.variant!r}: the smallest input is {smallest}x{smallest}"
            )
        conv_widths, fc_widths = layer_widths(self.variant, self.groups, self.width_divisor)
        window = (3, 3) if self.overlap_pool else (2, 2)

        x = images.astype(self.dtype)
        for index, conv in enumerate(spec.convs):
            name = f"conv{index + 1}"
            groups = self.groups if conv.grouped else 1
            fan_in = conv.kernel * conv.kernel * x.shape[-1] // groups
            x = Conv(
                conv_widths[index],
                (conv.kernel, conv.kernel),
                strides=(conv.stride, conv.stride),
                padding=[(conv.padding, conv.padding)] * 2,
                feature_group_count=groups,
                dtype=self.dtype,
                kernel_init=kernel_init,
                bias_init=_bias_init(init, conv.bias, fan_in),
                cpu_convolutions=self.cpu_convolutions,
                name=name,
            )(x)
            x = nn.relu(x)
            if conv.lrn and use_lrn:
                lrn = LocalResponseNorm(self.lrn_size, self.lrn_k, self.lrn_alpha, self.lrn_beta)
                x = lrn(x)
            if conv.pool:
                x = max_pool(x, window, (2, 2))
            self.sow("intermediates", f"{name}_out", x)

        if spec.adaptive_pool:
            x = _adaptive_avg_pool(x, spec.adaptive_pool)  # torchvision: (N, 6, 6, 256)
        # fc6 reads (N, 6, 6, 256) as its NHWC flattening, (N, 9216) at 227 / 224, in place
        # (``layers.Dense``): a reshape here would slow the last pooling down.
        dense = functools.partial(
            Dense, dtype=self.dtype, kernel_init=kernel_init, cpu_matmuls=self.cpu_matmuls
        )
        for index, features in enumerate(fc_widths):
            name = f"fc{index + 6}"
            if spec.dropout_before_fc:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            x = dense(
                features,
                bias_init=_bias_init(init, spec.fc_biases[index], math.prod(x.shape[1:])),
                name=name,
            )(x)
            x = nn.relu(x)
            if not spec.dropout_before_fc:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
            self.sow("intermediates", f"{name}_out", x)
        x = dense(self.num_classes, bias_init=_bias_init(init, 0.0, x.shape[-1]), name="fc8")(x)
        self.sow("intermediates", "fc8_out", x)
        return x.astype(jnp.float32)


AlexNetPaper = functools.partial(AlexNet, variant="paper")
AlexNetTwoTower = functools.partial(AlexNet, variant="paper", groups=2)
AlexNetTorchvision = functools.partial(AlexNet, variant="torchvision")
AlexNetD2L = functools.partial(AlexNet, variant="d2l", num_classes=10)


def features(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    layers: Sequence[str] = LAYER_NAMES,
) -> dict[str, jax.Array]:
    """Returns the named activations of ``images`` (evaluation mode), for probes and plots.

    Conv layers give their output after ReLU (and LRN and pooling where the layer has them),
    NHWC; fc6 and fc7 after ReLU; fc8 the logits. Example::

        feats = features(model, variables, images, layers=("conv5", "fc7"))
        feats["fc7"].shape  # (N, 4096)
    """
    unknown = [layer for layer in layers if layer not in LAYER_NAMES]
    if unknown:
        raise ValueError(f"Unknown layer names {unknown}; choose from {LAYER_NAMES}")
    _, state = model.apply(
        {"params": variables["params"]}, images, train=False, mutable=["intermediates"]
    )
    sown = state["intermediates"]
    return {layer: sown[f"{layer}_out"][0] for layer in layers}


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter tree."""
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def create_model(
    model_config: ml_collections.ConfigDict,
    num_classes: int,
    dtype: Any = jnp.float32,
    cpu_convolutions: str = "auto",
    cpu_matmuls: str = "auto",
) -> nn.Module:
    """The network ``config.model`` names (``name``: alexnet | vgg11), with its fields;
    ``cpu_convolutions`` and ``cpu_matmuls`` (``config.cpu_convolutions``,
    ``config.cpu_matmuls``) are AlexNet's (VGG-11 computes with ``flax.linen.Conv`` and
    ``Dense``)."""
    m = model_config
    if m.name == "alexnet":
        return AlexNet(
            num_classes=num_classes,
            variant=m.variant,
            groups=m.groups,
            dropout_rate=m.dropout_rate,
            dtype=dtype,
            use_lrn=m.use_lrn,
            overlap_pool=m.overlap_pool,
            initializer=m.initializer,
            lrn_size=m.lrn_size,
            lrn_k=m.lrn_k,
            lrn_alpha=m.lrn_alpha,
            lrn_beta=m.lrn_beta,
            width_divisor=m.width_divisor,
            cpu_convolutions=cpu_convolutions,
            cpu_matmuls=cpu_matmuls,
        )
    if m.name == "vgg11":
        return VGG(
            conv_arch=VGG11_ARCH,
            num_classes=num_classes,
            width_divisor=m.width_divisor,
            dropout_rate=m.dropout_rate,
            dtype=dtype,
        )
    raise ValueError(f"Unknown model {m.name!r}; choose one of {MODEL_NAMES}")


def smallest_input(model_config: ml_collections.ConfigDict) -> int:
    """The smallest square input the network ``config.model`` names accepts."""
    if model_config.name == "vgg11":
        return 2 ** len(VGG11_ARCH)
    return min_input_size(model_config.variant, model_config.overlap_pool)


def first_layer(model_config: ml_collections.ConfigDict) -> str:
    """The name of the layer that sees the pixels (its kernels are the paper's Figure 3)."""
    return "block1_conv1" if model_config.name == "vgg11" else "conv1"


def head_layer(model_config: ml_collections.ConfigDict) -> str:
    """The name of the layer that outputs the classes (replaced when fine-tuning)."""
    return "fc3" if model_config.name == "vgg11" else "fc8"


def describe(model_config: ml_collections.ConfigDict, num_classes: int) -> str:
    """The network a config names, for messages: ``AlexNet(variant='paper', groups=1, ...)``."""
    m = model_config
    if m.name == "vgg11":
        return f"VGG11(width_divisor={m.width_divisor}, num_classes={num_classes})"
    narrow = f", width_divisor={m.width_divisor}" if m.width_divisor != 1 else ""
    return f"AlexNet(variant={m.variant!r}, groups={m.groups}{narrow}, num_classes={num_classes})"
