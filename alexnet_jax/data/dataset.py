"""What every data source gives the trainer: a ``Dataset`` of batches shaped for the devices.

``train_batches(start_step)`` yields ``{"image": (devices, per_device, H, W, C), "label":
(devices, per_device)}`` from ``start_step`` on, forever (epoch after epoch);
``eval_batches()`` yields one pass over the evaluation split, padded to whole batches, with
``"mask"`` (0 for padding), and with 10-crop evaluation its images are ``(devices,
per_device, 10, H, W, C)``. The training order depends only on ``(config.seed, step)``: a
run resumed at step ``s`` sees the same batches as one that never stopped. Each process
yields its own part of every global batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from alexnet_jax.errors import ConfigError

Batch = dict[str, np.ndarray | jax.Array]


@dataclasses.dataclass
class Dataset:
    """A data source as the trainer sees it."""

    name: str
    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]  # (H, W, C) of what the model sees
    train_size: int  # examples in the training split (all processes)
    eval_size: int
    train_batches: Callable[[int], Iterator[Batch]]  # start_step -> batches from that step
    eval_batches: Callable[[], Iterator[Batch]]  # one pass, padded, with "mask"
    has_crops: bool = False  # images larger than image_size: center and 10-crop evaluation
    # Training batches hold larger uint8 images that this (jax) function crops, flips and
    # lights inside the train step: (images, step, first_index) -> images. None: as they are.
    device_augment: Callable | None = None
    resize_size: int = 0  # the side images are resized to before cropping (0: not resized)
    # The training split as evaluation sees images (center crop, no augmentation), in a fixed
    # order, padded with "mask", with each example's "index" in that order; and the name
    # (a file, a record) of the example at an index. For nearest neighbors in feature space.
    train_eval_batches: Callable[[], Iterator[Batch]] | None = None
    train_example_name: Callable[[int], str] | None = None


def shard(batch: Batch, num_devices: int) -> Batch:
    """Reshapes a process-local batch (N, ...) to (num_devices, N // num_devices, ...)."""
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def local_batch_size(global_batch: int) -> int:
    """This process's part of a global batch."""
    return global_batch // jax.process_count()


def process_part(indices: np.ndarray) -> np.ndarray:
    """This process's contiguous part of ``indices`` (the parts differ in size by at most 1)."""
    return np.array_split(indices, jax.process_count())[jax.process_index()]


def steps_per_epoch(train_size: int, config: ml_collections.ConfigDict) -> int:
    """Full global batches in one pass over the training split; an error if there are none."""
    steps = train_size // config.batch_size
    if steps == 0:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the {train_size} "
            f"training examples of {config.dataset!r}"
        )
    return steps


# TFDS data sets whose evaluation split is not called "test".
TFDS_EVAL_SPLITS = {"imagenet2012": "validation", "imagenette": "validation",
                    "imagenet2012_real": "validation"}  # fmt: skip


def tfds_eval_split(name: str) -> str:
    """The split a TFDS data set (``name`` without its ``/config``) is evaluated on."""
    return TFDS_EVAL_SPLITS.get(name.split("/")[0], "test")


AUGMENT_ON = ("device", "host")  # config.input.augment_on, for prepared records
PAPER_RESIZE_RATIO = 256 / 227  # the paper's 256x256 images and the 227 crops taken from them


def resize_size(config: ml_collections.ConfigDict) -> int:
    """The side the central square is resized to before cropping: ``config.input.resize_size``,
    or, when it is 0, ``image_size`` at the paper's ratio (227 -> 256, 67 -> 76)."""
    return config.input.resize_size or round(config.image_size * PAPER_RESIZE_RATIO)


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(size)
