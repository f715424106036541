"""Training and evaluation batches from prepared records (``config.dataset="prepared"``).

Random access makes the order of every epoch a true permutation of all the training
examples, drawn from (seed, epoch) and cut into global batches; each process reads its
own part of every global batch, and a run resumed at step ``s`` computes where it is
without reading anything before it. Worker threads read and decode whole batches
(libjpeg-turbo releases the GIL), several batches ahead.

With ``config.input.augment_on="device"`` (the default) the batches hold the stored
256x256 images as uint8 and the train step crops, flips and lights them on the accelerator
(``alexnet_jax.data.augment``); with ``"host"`` the same function runs here on the CPU.
Evaluation crops (the center, or ten) are cut here: they are slices.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from alexnet_jax.data.augment import make_augment
from alexnet_jax.data.dataset import (
    Batch,
    Dataset,
    epoch_permutation,
    local_batch_size,
    process_part,
    resize_size,
    shard,
    steps_per_epoch,
)
from alexnet_jax.data.images import paper_square
from alexnet_jax.data.records import Metadata, SplitReader
from alexnet_jax.errors import ConfigError


def prepared_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The prepared records in ``config.data_dir``, checked against the config."""
    metadata = Metadata.load(config.data_dir)
    check_config(config, metadata)
    loader = PreparedLoader(config, metadata)
    channels = metadata.channels
    device_augment = loader.augment if config.input.augment_on == "device" else None
    return Dataset(
        name=f"prepared ({metadata.source})",
        num_classes=len(metadata.class_names),
        class_names=metadata.class_names,
        image_shape=(config.image_size, config.image_size, channels),
        train_size=len(loader.train),
        eval_size=len(loader.evaluation),
        train_batches=loader.train_batches,
        eval_batches=loader.eval_batches,
        has_crops=True,
        device_augment=device_augment,
        resize_size=metadata.size,
        train_eval_batches=lambda: loader.ordered_batches(loader.train),
        train_example_name=lambda index: loader.train.read(index)["name"],
    )


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
    """An image file as the prepared path evaluates it: prepared as ``prepare`` prepares
    (the central square, resized to the records' size, ``config.input.resize_size``), then
    the center ``image_size`` crop, uint8."""
    square = paper_square(path, resize_size(config), config.channels)
    offset = (square.shape[0] - config.image_size) // 2
    return square[offset : offset + config.image_size, offset : offset + config.image_size]


def check_config(config: ml_collections.ConfigDict, metadata: Metadata) -> None:
    where = f"the records in {config.data_dir}"
    if config.channels != metadata.channels:
        raise ConfigError(
            f"config.channels={config.channels} but {where} have {metadata.channels} "
            f"channels: set --config.channels={metadata.channels}"
        )
    if config.input.resize_size and config.input.resize_size != metadata.size:
        raise ConfigError(
            f"config.input.resize_size={config.input.resize_size} but {where} are "
            f"{metadata.size}x{metadata.size}: set it to {metadata.size} (or 0), or prepare "
            f"them again with --size {config.input.resize_size}"
        )
    if config.image_size > metadata.size:
        raise ConfigError(
            f"config.image_size={config.image_size} is larger than {where} "
            f"({metadata.size}x{metadata.size})"
        )


class PreparedLoader:
    """Batches of a prepared folder's ``train`` and ``val`` splits."""

    def __init__(self, config: ml_collections.ConfigDict, metadata: Metadata):
        self.config = config
        self.metadata = metadata
        self.train = SplitReader(config.data_dir, metadata, "train")
        self.evaluation = SplitReader(config.data_dir, metadata, "val")
        self.devices = jax.local_device_count()
        self.steps_per_epoch = steps_per_epoch(len(self.train), config)
        self.augment = make_augment(config.input, config.image_size, config.seed)
        self.host_augment = None
        if config.input.augment_on == "host":
            self.cpu = jax.local_devices(backend="cpu")[0]
            self.host_augment = jax.jit(self.augment)
        workers = config.input.threads or os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "prepared-reader")
        self.ahead = max(config.input.prefetch, 1) + workers  # batches in flight

    def read(self, reader: SplitReader, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images (uint8, stored size) and labels of ``indices``, decoded in this thread."""
        m = self.metadata
        images = np.empty((len(indices), m.size, m.size, m.channels), np.uint8)
        labels = np.empty(len(indices), np.int32)
        for j, index in enumerate(indices):
            record = reader.read(int(index))
            images[j] = reader.image(record)
            labels[j] = record["label"]
        return images, labels

    def _in_order(self, tasks: Iterator) -> Iterator:
        """Runs ``(fn, *args)`` tasks on the pool, ``self.ahead`` at a time, in order."""
        pending: collections.deque = collections.deque()
        for task in tasks:
            pending.append(self.pool.submit(*task))
            if len(pending) > self.ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    # --- training ------------------------------------------------------------------------------

    def batch_indices(self, step: int) -> np.ndarray:
        """This process's part of global batch ``step``: a function of (seed, step) only."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        batch = self.config.batch_size
        return process_part(order[index * batch : (index + 1) * batch])

    def _epoch_order(self, epoch: int) -> np.ndarray:
        cached = getattr(self, "_order", None)
        if cached is None or cached[0] != epoch:
            self._order = (epoch, epoch_permutation(self.config.seed, epoch, len(self.train)))
        return self._order[1]

    def _train_batch(self, step: int, indices: np.ndarray) -> Batch:
        images, labels = self.read(self.train, indices)
        if self.host_augment is not None:
            first = jax.process_index() * local_batch_size(self.config.batch_size)
            images = jax.device_put(images, self.cpu)  # runs where its input is: the CPU
            images = np.asarray(self.host_augment(images, step, first))
        return shard({"image": images, "label": labels}, self.devices)

    def train_batches(self, start_step: int) -> Iterator[Batch]:
        """Batches from ``start_step`` on, forever; nothing before it is read."""

        def tasks():
            step = start_step
            while True:
                yield self._train_batch, step, self.batch_indices(step)
                step += 1

        yield from self._in_order(tasks())

    # --- evaluation ----------------------------------------------------------------------------

    def _eval_batch(self, reader: SplitReader, indices: np.ndarray, count: int) -> Batch:
        """Global eval batch ``indices`` (padded to a whole batch; ``count`` real examples):
        this process's part, cropped, with its mask."""
        size = self.config.eval_batch_size
        local = process_part(np.arange(size))
        images, labels = self.read(reader, indices[local])
        batch = {"image": self.eval_crops(images), "label": labels,
                 "mask": (local < count).astype(np.float32), "index": indices[local]}  # fmt: skip
        return shard(batch, self.devices)

    def eval_crops(self, images: np.ndarray) -> np.ndarray:
        """The center ``image_size`` crop (N, S, S, C), or the ten crops (N, 10, S, S, C):
        four corners and the center, then their mirrors."""
        size, crop = images.shape[1], self.config.image_size
        center = (size - crop) // 2
        if self.config.input.eval_crops != 10:
            return images[:, center : center + crop, center : center + crop]
        far = size - crop
        corners = [(0, 0), (0, far), (far, 0), (far, far), (center, center)]
        crops = [images[:, y : y + crop, x : x + crop] for y, x in corners]
        crops += [c[:, :, ::-1] for c in crops]
        return np.stack(crops, axis=1)

    def eval_batches(self) -> Iterator[Batch]:
        """One pass over ``val`` in order, padded (repeating example 0) and masked."""
        return self.ordered_batches(self.evaluation)

    def ordered_batches(self, reader: SplitReader) -> Iterator[Batch]:
        """One pass over a split in its order, as evaluation sees it."""
        size, total = self.config.eval_batch_size, len(reader)

        def tasks():
            for start in range(0, total, size):
                count = min(size, total - start)
                indices = np.zeros(size, np.int64)
                indices[:count] = np.arange(start, start + count)
                yield self._eval_batch, reader, indices, count

        yield from self._in_order(tasks())
