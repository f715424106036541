"""The paper's training augmentation on the accelerator, from uint8 batches of the stored
256x256 images: a random ``image_size`` crop, a horizontal flip, fancy-PCA lighting.

The host then only decodes: ``augment(images, step, first_index)`` runs inside the jitted
train step. Each example's randomness is a function of (seed, step, its position in the
global batch), so the batches do not depend on the number of devices or processes, and a
resumed run draws the same crops. The result is rounded to uint8, as the tf.data path's is,
and normalized after.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

# ImageNet RGB statistics for fancy-PCA lighting, for RGB scaled to [0, 1] (the paper's
# section 4.1; the widely used values of its eigen-decomposition).
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

Augment = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def make_augment(input_config: ml_collections.ConfigDict, image_size: int, seed: int) -> Augment:
    """``augment(images (N, S, S, C) uint8, step, first_index) -> (N, image_size, image_size,
    C) uint8``: crops (random, or the center with ``random_crop=False``), flips
    (``random_flip``) and lighting (``pca_lighting_std``, RGB only), as ``config.input`` says.
    ``first_index`` is the position of the first example in the global batch."""
    crop, flip = bool(input_config.random_crop), bool(input_config.random_flip)
    lighting = float(input_config.pca_lighting_std)
    base = jax.random.PRNGKey(seed)
    shift_basis = 255.0 * np.asarray(PCA_EIGVEC, np.float32) * np.asarray(PCA_EIGVAL, np.float32)

    def one(image: jax.Array, key: jax.Array) -> jax.Array:
        size, channels = image.shape[0], image.shape[-1]
        crop_key, flip_key, light_key = jax.random.split(key, 3)
        if crop:
            offset = jax.random.randint(crop_key, (2,), 0, size - image_size + 1)
        else:
            offset = jnp.full((2,), (size - image_size) // 2)
        out = lax.dynamic_slice(
            image, (offset[0], offset[1], 0), (image_size, image_size, channels)
        )
        if lighting > 0 and channels == 3:
            alpha = lighting * jax.random.normal(light_key, (3,))
            out = jnp.clip(jnp.round(out.astype(jnp.float32) + shift_basis @ alpha), 0, 255)
            out = out.astype(jnp.uint8)
        if flip:
            out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1], out)
        return out

    def augment(images: jax.Array, step: jax.Array, first_index: jax.Array) -> jax.Array:
        positions = first_index + jnp.arange(images.shape[0])
        step_key = jax.random.fold_in(base, step)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(positions)
        return jax.vmap(one)(images, keys)

    return augment
