"""VGG (Simonyan & Zisserman 2014) as Dive into Deep Learning teaches it beside AlexNet.

Blocks of 3x3 convolutions (padding 1) with ReLU, each block closed by a 2x2/2 max-pool,
then 4096-4096-num_classes with dropout 0.5. ``VGG11`` is d2l's default; ``VGG11Narrow``
divides every block's width by 4, the variant d2l trains on Fashion-MNIST.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from alexnet_jax.layers import max_pool, mixed_dot_general

VGG11_ARCH = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


class VGG(nn.Module):
    """VGG from ``conv_arch``: a sequence of (number of convs, channels) per block.

    Attributes:
      conv_arch: the blocks; VGG-11 by default.
      num_classes: size of the last layer.
      width_divisor: divides every block's channel count (4 gives d2l's narrow VGG-11).
      dropout_rate: dropout after the two hidden dense layers.
      dtype: computation dtype; parameters stay float32.
    """

    conv_arch: Sequence[tuple[int, int]] = VGG11_ARCH
    num_classes: int = 10
    width_divisor: int = 1
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        blocks = len(self.conv_arch)
        if min(images.shape[1:3]) < 2**blocks:
            raise ValueError(
                f"Input {images.shape[1]}x{images.shape[2]} is too small for {blocks} VGG "
                f"blocks: the smallest input is {2**blocks}x{2**blocks}"
            )
        x = images.astype(self.dtype)
        for block, (num_convs, channels) in enumerate(self.conv_arch):
            if channels % self.width_divisor:
                raise ValueError(f"width_divisor={self.width_divisor} does not divide {channels}")
            for conv in range(num_convs):
                x = nn.Conv(
                    channels // self.width_divisor,
                    (3, 3),
                    padding=[(1, 1), (1, 1)],
                    dtype=self.dtype,
                    name=f"block{block + 1}_conv{conv + 1}",
                )(x)
                x = nn.relu(x)
            x = max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        dense = functools.partial(nn.Dense, dtype=self.dtype, dot_general=mixed_dot_general)
        for index in range(2):
            x = dense(4096, name=f"fc{index + 1}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = dense(self.num_classes, name="fc3")(x)
        return x.astype(jnp.float32)


VGG11 = functools.partial(VGG, conv_arch=VGG11_ARCH)
VGG11Narrow = functools.partial(VGG, conv_arch=VGG11_ARCH, width_divisor=4)
