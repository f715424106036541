"""Pixel normalization, done on the device: its modes, the paper's mean image, and the
function the steps apply, built before tracing.

Batches travel to the devices as uint8 (4x fewer bytes) and become floats there:

- ``mean_std``: minus ``mean_rgb``, divided by ``std_rgb`` (ImageNet's, in 0-255 units);
- ``mean``: minus ``mean_rgb`` only;
- ``mean_image``: minus the mean training image, the paper's "mean activity over the
  training set" subtracted from each pixel (computed once, saved as ``mean_image.npy``);
- ``unit``: divided by 255;
- ``none``: as they are.

Float batches (the digits source standardizes on the host) pass through every mode but
``mean_image``, which subtracts the mean image in the units of the batches' pixels.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from alexnet_jax.errors import ConfigError, DataError, MissingDataError
from alexnet_jax.files import atomic_write

NORMALIZATIONS = ("mean_std", "mean", "mean_image", "unit", "none")
MEAN_IMAGE_FILE = "mean_image.npy"

Normalizer = Callable[[jax.Array], jax.Array]


def make_normalizer(
    input_config: ml_collections.ConfigDict, mean_image: np.ndarray | None = None
) -> Normalizer:
    """The function that turns a batch of images into the model's input, on the device.

    ``input_config`` is ``config.input``; ``mean_image`` (H, W, C) is needed for
    ``normalization="mean_image"``. Only plain constants are captured: the returned function
    can be traced without reading any config.
    """
    mode = input_config.normalization
    if mode not in NORMALIZATIONS:
        raise ConfigError(f"config.input.normalization={mode!r}: choose one of {NORMALIZATIONS}")
    if mode == "mean_image":
        if mean_image is None:
            raise ValueError('config.input.normalization="mean_image" needs the mean image')
        mean = np.asarray(mean_image, np.float32)
        return lambda images: images.astype(jnp.float32) - mean
    mean_rgb = np.asarray(input_config.mean_rgb, np.float32)
    std_rgb = np.asarray(input_config.std_rgb, np.float32)

    def normalize(images: jax.Array) -> jax.Array:
        if images.dtype != jnp.uint8:
            return images
        images = images.astype(jnp.float32)
        channels = images.shape[-1]
        if mode in ("mean_std", "mean"):
            images = images - mean_rgb[:channels]
        if mode == "mean_std":
            images = images / std_rgb[:channels]
        if mode == "unit":
            images = images / 255.0
        return images

    return normalize


# --- the mean image ----------------------------------------------------------------------------


def compute_mean_image(
    batches: Iterator[dict],
    num_batches: int,
    image_shape: tuple[int, ...],
    augment: Callable | None = None,
) -> np.ndarray:
    """The mean image (H, W, C), float32, of the first ``num_batches`` of ``batches``, over
    every process, in the units of the batches' pixels.

    The paper subtracts "the mean activity over the training set from each pixel"; this
    averages the training batches as the network sees them (random crops and flips
    included: the mean of what it is subtracted from). ``augment`` (a data set's
    ``device_augment``) is applied first where the batches hold uncropped images.
    """
    total = np.zeros(image_shape, np.float64)
    count = 0
    augment = jax.jit(augment) if augment is not None else None
    for step in range(num_batches):
        images = np.asarray(next(batches)["image"])
        if augment is not None:
            images = augment(images.reshape((-1,) + images.shape[2:]), step, 0)
        images = np.asarray(images).reshape((-1,) + tuple(image_shape))
        total += images.sum(axis=0, dtype=np.float64)
        count += len(images)
    if jax.process_count() > 1:
        gathered = multihost_utils.process_allgather(np.concatenate([total.ravel(), [count]]))
        summed = np.asarray(gathered).sum(axis=0)
        total, count = summed[:-1].reshape(total.shape), summed[-1]
    return (total / count).astype(np.float32)


def mean_image_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where a run's mean image is: ``config.input.mean_image_path`` or the workdir's."""
    return config.input.mean_image_path or os.path.join(workdir, MEAN_IMAGE_FILE)


def load_mean_image(path: str, image_shape: tuple[int, ...]) -> np.ndarray:
    """A saved mean image, checked: a file of the wrong shape is an error naming the file
    and both shapes."""
    if not os.path.isfile(path):
        raise MissingDataError(f"The run subtracts a mean image but {path!r} is missing")
    try:
        mean = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(
            f"The mean image {path} is not a readable .npy file ({error}): delete it to "
            "compute it again"
        ) from error
    if not np.issubdtype(mean.dtype, np.number):
        raise DataError(f"The mean image {path} holds {mean.dtype} values, not numbers")
    if mean.shape != tuple(image_shape):
        raise DataError(
            f"The mean image {path} has shape {mean.shape}, but the model sees images of "
            f"shape {tuple(image_shape)} (config.image_size, channels); delete it "
            "to compute it again"
        )
    if not np.all(np.isfinite(mean)):
        raise DataError(
            f"The mean image {path} holds {int(np.sum(~np.isfinite(mean)))} NaN or infinite "
            "values: fix it, or delete it to compute it again"
        )
    return mean.astype(np.float32)


def load_or_compute_mean_image(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_batches: Callable[[int], Iterator[dict]],
    image_shape: tuple[int, ...],
    augment: Callable | None = None,
) -> np.ndarray:
    """``config.input.mean_image_path``, else ``WORKDIR/mean_image.npy``, else computed from
    ``train_batches(0)`` (``augment``-ed, see ``compute_mean_image``) and saved in the
    workdir, so a resumed run, ``--mode=eval`` and ``--mode=predict`` subtract the same one."""
    path = mean_image_path(config, workdir)
    if os.path.exists(path):
        return load_mean_image(path, image_shape)
    if config.input.mean_image_path:
        raise MissingDataError(f"config.input.mean_image_path={path!r} does not exist")
    mean = compute_mean_image(
        train_batches(0), config.input.mean_image_batches, image_shape, augment
    )
    if jax.process_index() == 0:
        buffer = io.BytesIO()
        np.save(buffer, mean)
        atomic_write(path, buffer.getvalue())
    return mean
