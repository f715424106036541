"""Random images and labels made on the devices, for benchmarks: no data, no host work, no
TensorFlow."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alexnet_jax.data.dataset import Batch, Dataset, local_batch_size


def synthetic_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """One random batch made on the devices and served every step."""
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
