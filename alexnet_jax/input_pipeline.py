"""One interface to every data source: batches shaped for the local devices.

``create_dataset(config)`` returns a ``Dataset`` whose ``train_batches(start_step)`` and
``eval_batches()`` yield ``{"image": (devices, per_device, H, W, C), "label": (devices,
per_device)}``; evaluation batches also carry ``"mask"`` (0 for padding), and with 10-crop
evaluation their images are ``(devices, per_device, 10, H, W, C)``.

The training order depends only on ``(config.seed, step)``: a run resumed at step ``s`` sees
the same batches as one that never stopped. Each process reads its own part of every global
batch. Sources:

- ``digits``: scikit-learn's bundled handwritten digits (1,797 8x8 images; no download),
  upscaled to ``config.image_size``. Numpy only.
- ``synthetic``: random images and labels made on the device, for benchmarks. No data.
- TFDS names and ``image_folder``: ``alexnet_jax.tf_input`` (TensorFlow is imported there
  only, and hidden from the GPU).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

Batch = dict[str, np.ndarray | jax.Array]

NUMPY_SOURCES = ("digits", "synthetic")
TFDS_SOURCES = ("imagenet2012", "fashion_mnist", "mnist", "cifar10", "imagenette")
SOURCES = NUMPY_SOURCES + TFDS_SOURCES + ("image_folder",)
DIGITS_EVAL_FRACTION = 0.2


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


def shard(batch: Batch, num_devices: int) -> Batch:
    """Reshapes a process-local batch (N, ...) to (num_devices, N // num_devices, ...)."""
    return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def local_batch_size(global_batch: int) -> int:
    return global_batch // jax.process_count()


def steps_per_epoch(train_size: int, config: ml_collections.ConfigDict) -> int:
    """Full global batches in one pass over the training split; an error if there are none."""
    steps = train_size // config.batch_size
    if steps == 0:
        raise ValueError(
            f"config.batch_size={config.batch_size} is larger than the {train_size} "
            f"training examples of {config.dataset!r}"
        )
    return steps


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def create_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The data source named by ``config.dataset``.

    Raises ``ConfigError`` when ``config.num_classes`` differs from the source's class count
    (for training, evaluation and prediction alike).
    """
    if config.dataset == "digits":
        dataset = _digits(config)
    elif config.dataset == "synthetic":
        dataset = _synthetic(config)
    elif config.dataset in TFDS_SOURCES or config.dataset == "image_folder":
        from alexnet_jax import tf_input  # TensorFlow stays out unless a TF source is used

        dataset = tf_input.create_dataset(config)
    else:
        raise ValueError(
            f"config.dataset={config.dataset!r} is not a known source; choose {SOURCES}"
        )
    if dataset.num_classes != config.num_classes:
        from alexnet_jax.config_checks import ConfigError  # it imports this module

        raise ConfigError(
            f"config.num_classes={config.num_classes} but {dataset.name!r} has "
            f"{dataset.num_classes} classes ({', '.join(dataset.class_names[:5])}...): set "
            f"--config.num_classes={dataset.num_classes}"
        )
    return dataset


# --- the mean image ----------------------------------------------------------------------------

MEAN_IMAGE_FILE = "mean_image.npy"


def compute_mean_image(dataset: Dataset, num_batches: int) -> np.ndarray:
    """The mean training image (H, W, C), float32, in the units of the batches' pixels.

    The paper subtracts "the mean activity over the training set from each pixel". This
    averages the first ``num_batches`` training batches as the network sees them (random
    crops and flips included: the mean of what is subtracted from), over every process.
    """
    total = np.zeros(dataset.image_shape, np.float64)
    count = 0
    batches = dataset.train_batches(0)
    for _ in range(num_batches):
        images = np.asarray(next(batches)["image"])
        images = images.reshape((-1,) + tuple(dataset.image_shape))
        total += images.sum(axis=0, dtype=np.float64)
        count += len(images)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather(np.concatenate([total.ravel(), [count]]))
        summed = np.asarray(gathered).sum(axis=0)
        total, count = summed[:-1].reshape(total.shape), summed[-1]
    return (total / count).astype(np.float32)


def mean_image_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where a run's mean image is: ``config.input.mean_image_path`` or the workdir's."""
    return config.input.mean_image_path or os.path.join(workdir, MEAN_IMAGE_FILE)


def load_or_compute_mean_image(
    config: ml_collections.ConfigDict, dataset: Dataset, workdir: str
) -> np.ndarray:
    """``config.input.mean_image_path``, else ``WORKDIR/mean_image.npy``, else computed.

    A computed mean image is saved in the workdir, so a resumed run, ``--mode=eval`` and
    ``--mode=predict`` subtract the same one. A file of the wrong shape is an error naming
    the file and both shapes.
    """
    path = mean_image_path(config, workdir)
    if os.path.exists(path):
        mean = np.load(path)
        if mean.shape != tuple(dataset.image_shape):
            raise ValueError(
                f"The mean image {path} has shape {mean.shape}, but the model sees images of "
                f"shape {tuple(dataset.image_shape)} (config.image_size, channels); delete it "
                "to compute it again"
            )
        return mean.astype(np.float32)
    if config.input.mean_image_path:
        raise FileNotFoundError(f"config.input.mean_image_path={path!r} does not exist")
    mean = compute_mean_image(dataset, config.input.mean_image_batches)
    if jax.process_index() == 0:
        np.save(path, mean)
    return mean


# --- digits: the embedded default ------------------------------------------------------------


def _upscale(image: np.ndarray, image_size: int) -> np.ndarray:
    """A float image in [0, 1] bilinearly resized to image_size x image_size, clipped."""
    from PIL import Image

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


def digits_statistics(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of the digits training split of ``images`` (all 1,797, as loaded): the
    standardisation the digits source applies."""
    train_idx, _ = split_digits(len(images))
    return float(images[train_idx].mean()), float(images[train_idx].std())


def digits_like(image, config: ml_collections.ConfigDict) -> np.ndarray:
    """A grayscale PIL image made to look like the digits source's: reduced to 8x8 (the
    digits' resolution), upscaled like them and standardised with their statistics.
    Digits are light strokes on a dark ground."""
    from PIL import Image

    small = np.asarray(image.convert("L").resize((8, 8), Image.Resampling.BOX), np.float32)
    small = small / 255.0
    mean, std = digits_statistics(load_digits(config.image_size)[0])
    pixels = ((_upscale(small, config.image_size) - mean) / std)[..., None]
    if config.grayscale_to_rgb:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels.astype(np.float32)


def split_digits(num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed held-out split (the same for every seed): 80 % train, 20 % eval."""
    order = np.random.default_rng(0).permutation(num_examples)
    num_eval = int(round(num_examples * DIGITS_EVAL_FRACTION))
    return np.sort(order[num_eval:]), np.sort(order[:num_eval])


def _digits(config: ml_collections.ConfigDict) -> Dataset:
    images, labels = load_digits(config.image_size, 3 if config.grayscale_to_rgb else 1)
    train_idx, eval_idx = split_digits(len(labels))
    mean, std = digits_statistics(images)
    images = (images - mean) / std  # standardised with the training split's statistics
    return _in_memory_dataset(
        config,
        "digits",
        [str(d) for d in range(10)],
        (images[train_idx], labels[train_idx]),
        (images[eval_idx], labels[eval_idx]),
    )


def _in_memory_dataset(
    config: ml_collections.ConfigDict,
    name: str,
    class_names: list[str],
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
) -> Dataset:
    """A dataset held in host memory, batched by index arithmetic (exact resume)."""
    devices = jax.local_device_count()
    process, processes = jax.process_index(), jax.process_count()
    train_images, train_labels = train
    eval_images, eval_labels = evaluation
    steps = steps_per_epoch(len(train_labels), config)

    def train_batches(start_step: int) -> Iterator[Batch]:
        step = start_step
        while True:
            epoch, index = divmod(step, steps)
            order = epoch_permutation(config.seed, epoch, len(train_labels))
            chosen = order[index * config.batch_size : (index + 1) * config.batch_size]
            local = np.array_split(chosen, processes)[process]
            yield shard({"image": train_images[local], "label": train_labels[local]}, devices)
            step += 1

    def eval_batches() -> Iterator[Batch]:
        size = config.eval_batch_size
        for start in range(0, len(eval_labels), size):
            chosen = np.arange(start, min(start + size, len(eval_labels)))
            mask = np.ones(size, np.float32)
            mask[len(chosen) :] = 0
            chosen = np.pad(chosen, (0, size - len(chosen)))  # padding repeats example 0
            local = np.array_split(np.arange(size), processes)[process]
            yield shard(
                {
                    "image": eval_images[chosen[local]],
                    "label": eval_labels[chosen[local]],
                    "mask": mask[local],
                },
                devices,
            )

    return Dataset(
        name=name,
        num_classes=len(class_names),
        class_names=class_names,
        image_shape=train_images.shape[1:],
        train_size=len(train_labels),
        eval_size=len(eval_labels),
        train_batches=train_batches,
        eval_batches=eval_batches,
    )


# --- synthetic: for benchmarks -----------------------------------------------------------------


def _synthetic(config: ml_collections.ConfigDict) -> Dataset:
    """One random batch made on the devices and served every step; no host work at all."""
    devices = jax.local_devices()
    size, channels = config.image_size, 3 if config.grayscale_to_rgb else config.channels
    per_device = local_batch_size(config.batch_size) // len(devices)
    eval_per_device = local_batch_size(config.eval_batch_size) // len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

    def make(per: int, seed: int) -> Batch:
        shape = (len(devices), per)

        def generate(key: jax.Array) -> Batch:
            image_key, label_key = jax.random.split(key)
            return {
                "image": jax.random.normal(image_key, shape + (size, size, channels)),
                "label": jax.random.randint(label_key, shape, 0, config.num_classes),
                "mask": jnp.ones(shape, jnp.float32),
            }

        return jax.jit(generate, out_shardings=sharding)(jax.random.key(seed))

    def train_batches(start_step: int) -> Iterator[Batch]:
        batch = make(per_device, config.seed)
        batch = {"image": batch["image"], "label": batch["label"]}
        while True:
            yield batch

    def eval_batches() -> Iterator[Batch]:
        yield make(eval_per_device, config.seed + 1)

    return Dataset(
        name="synthetic",
        num_classes=config.num_classes,
        class_names=[str(c) for c in range(config.num_classes)],
        image_shape=(size, size, channels),
        train_size=config.batch_size * max(config.synthetic_steps_per_epoch, 1),
        eval_size=config.eval_batch_size,
        train_batches=train_batches,
        eval_batches=eval_batches,
    )
