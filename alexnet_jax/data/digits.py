"""The embedded default data set: scikit-learn's handwritten digits (no download, no TensorFlow).

1,797 8x8 grayscale images, bilinearly upscaled to ``config.image_size``, standardized with
the training split's mean and std, in a fixed 80/20 split. Batches are cut by index
arithmetic, so the order is a function of (seed, step) and a resume is exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from PIL import Image

from alexnet_jax.data.dataset import (
    Batch,
    Dataset,
    epoch_permutation,
    process_part,
    shard,
    steps_per_epoch,
)
from alexnet_jax.data.images import central_square, decode

EVAL_FRACTION = 0.2


def _upscale(image: np.ndarray, image_size: int) -> np.ndarray:
    """A float image in [0, 1] bilinearly resized to image_size x image_size, clipped."""
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (image_size, image_size), Image.BILINEAR
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def load_digits(image_size: int, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 images in [0, 1], bilinearly upscaled: (1797, S, S, C)."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.stack([_upscale(image / 16.0, image_size) for image in digits.images])[..., None]
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    return images.astype(np.float32), digits.target.astype(np.int32)


def split_digits(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed held-out split (the same for every seed): 80 % train, 20 % eval."""
    order = np.random.default_rng(0).permutation(num_examples)
    num_eval = int(round(num_examples * EVAL_FRACTION))
    return np.sort(order[num_eval:]), np.sort(order[:num_eval])


def digits_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of the digits training split of ``images`` (all 1,797, as loaded): the
    standardization the digits source applies."""
    train_idx, _ = split_digits(len(images))
    return float(images[train_idx].mean()), float(images[train_idx].std())


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
    """An image file made to look like the digits source's images: its central square in
    grayscale, reduced to 8x8 (the digits' resolution), upscaled like them and standardized
    with their statistics. Digits are light strokes on a dark ground."""
    gray = central_square(decode(path, channels=1))[..., 0]
    small = Image.fromarray(gray).resize((8, 8), Image.Resampling.BOX)
    small = np.asarray(small, np.float32)
    small = small / 255.0
    mean, std = digits_statistics(load_digits(config.image_size)[0])
    pixels = ((_upscale(small, config.image_size) - mean) / std)[..., None]
    if config.grayscale_to_rgb:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels.astype(np.float32)


def digits_dataset(config: ml_collections.ConfigDict) -> Dataset:
    images, labels = load_digits(config.image_size, 3 if config.grayscale_to_rgb else 1)
    train_idx, eval_idx = split_digits(len(labels))
    mean, std = digits_statistics(images)
    images = (images - mean) / std  # standardized with the training split's statistics
    return in_memory_dataset(
        config,
        "digits",
        [str(d) for d in range(10)],
        (images[train_idx], labels[train_idx]),
        (images[eval_idx], labels[eval_idx]),
    )


def in_memory_dataset(
    config: ml_collections.ConfigDict,
    name: str,
    class_names: list[str],
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
) -> Dataset:
    """A dataset held in host memory, batched by index arithmetic (exact resume)."""
    devices = jax.local_device_count()
    train_images, train_labels = train
    eval_images, eval_labels = evaluation
    steps = steps_per_epoch(len(train_labels), config)

    def train_batches(start_step: int) -> Iterator[Batch]:
        step = start_step
        while True:
            epoch, index = divmod(step, steps)
            order = epoch_permutation(config.seed, epoch, len(train_labels))
            chosen = order[index * config.batch_size : (index + 1) * config.batch_size]
            local = process_part(chosen)
            yield shard({"image": train_images[local], "label": train_labels[local]}, devices)
            step += 1

    def ordered_batches(images: np.ndarray, labels: np.ndarray) -> Iterator[Batch]:
        size = config.eval_batch_size
        for start in range(0, len(labels), size):
            chosen = np.arange(start, min(start + size, len(labels)))
            mask = np.ones(size, np.float32)
            mask[len(chosen) :] = 0
            chosen = np.pad(chosen, (0, size - len(chosen)))  # padding repeats example 0
            local = process_part(np.arange(size))
            yield shard(
                {
                    "image": images[chosen[local]],
                    "label": labels[chosen[local]],
                    "mask": mask[local],
                    "index": chosen[local],
                },
                devices,
            )

    def eval_batches() -> Iterator[Batch]:
        return ordered_batches(eval_images, eval_labels)

    return Dataset(
        name=name,
        num_classes=len(class_names),
        class_names=class_names,
        image_shape=train_images.shape[1:],
        train_size=len(train_labels),
        eval_size=len(eval_labels),
        train_batches=train_batches,
        eval_batches=eval_batches,
        train_eval_batches=lambda: ordered_batches(train_images, train_labels),
        train_example_name=lambda index: f"{name} training example {index}",
    )
