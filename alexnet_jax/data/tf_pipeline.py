"""The tf.data pipeline that turns undecoded examples into device-shaped batches.

A source (``alexnet_jax.data.tf_sources``) hands over each split's raw examples,
``{"image": encoded bytes or a file path, "label", "name"}``, as this process reads them,
each training epoch in its own order (an image folder: a permutation of all its files;
TFDS: shuffled files and a shuffle buffer); ``TFPipeline`` decodes, augments
(``alexnet_jax.data.preprocess``) and batches them:

- training: every epoch is its own tf.data pipeline, ordered by a seed made of
  (config.seed, epoch) and augmented with per-example stateless seeds, so a run resumed at
  step ``s`` starts at the same batch, and the batches do not depend on tf.data's
  parallelism. Images that fail to decode are dropped, named at the epoch's end, and the
  epoch is filled up from its own beginning: every epoch has ``steps_per_epoch`` batches on
  every process (collectives need it).
- evaluation: one pass in order, padded and masked to the same number of batches on every
  process.

Importing this module imports TensorFlow and hides the GPU from it (the GPU belongs to JAX).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

import alexnet_jax.data.preprocess as preprocess
from alexnet_jax.data.dataset import (
    Batch,
    Dataset,
    local_batch_size,
    resize_size,
    shard,
    steps_per_epoch,
)
from alexnet_jax.errors import ConfigError, DataError

tf.config.set_visible_devices([], "GPU")


@dataclasses.dataclass
class RawSplit:
    """One split's undecoded examples, as this process reads them.

    ``examples(epoch, start)`` gives this process's examples ``{"image": bytes or a path,
    "label", "name"}`` of training epoch ``epoch`` in that epoch's order, from position
    ``start`` on (``seed`` seeds the order); ``examples(None, 0)`` the split in its fixed
    order, for evaluation. ``local_size`` is how many an epoch (or the split) has.
    """

    examples: Callable[[int | None, int, int], tf.data.Dataset]  # (epoch, start, seed)
    size: int  # examples in the split, all processes together
    local_size: int  # examples in this process's epoch (or split)
    listed_bad: int = 0  # files dropped before (named when the folder was listed)
    read_files: bool = False  # "image" holds a path, read just before decoding
    ordered_size: int = -1  # examples of examples(None, ...) when not local_size
    # The split's damaged files, named (TFDS: records files holding fewer whole records than
    # their metadata says), looked for only when records could not be read.
    damaged_files: Callable[[], list[str]] | None = None


class TFPipeline:
    """Batches of one data set's train and eval splits; ``dataset()`` is what the trainer uses."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        name: str,
        class_names: list[str],
        train: RawSplit,
        evaluation: RawSplit,
    ):
        self.config = config
        self.name = name
        self.class_names = class_names
        self.train, self.evaluation = train, evaluation
        self.devices = jax.local_device_count()
        self.local_batch = local_batch_size(config.batch_size)
        self.local_eval_batch = local_batch_size(config.eval_batch_size)
        # An evaluation set alone (ImageNet-V2, ReaL) has no training split.
        self.steps_per_epoch = steps_per_epoch(train.size, config) if train else 0
        self.channels = 3 if config.grayscale_to_rgb else config.channels
        self.options = tf.data.Options()
        self.options.deterministic = True
        if config.input.threads:
            self.options.threading.private_threadpool_size = config.input.threads
        inputs = config.input
        self.train_fn = functools.partial(
            preprocess.preprocess_for_train,
            image_size=config.image_size,
            resize_size=resize_size(config),
            channels=config.channels,
            crop=inputs.random_crop,
            flip=inputs.random_flip,
            lighting_std=inputs.pca_lighting_std,
        )
        self.eval_fn = eval_preprocess(config)

    def dataset(self) -> Dataset:
        size = self.config.image_size
        return Dataset(
            name=self.name,
            num_classes=len(self.class_names),
            class_names=self.class_names,
            image_shape=(size, size, self.channels),
            train_size=self.train.size if self.train else 0,
            eval_size=self.evaluation.size,
            train_batches=self.train_batches,
            eval_batches=self.eval_batches,
            has_crops=True,
            resize_size=resize_size(self.config),
            train_eval_batches=(
                (lambda: self.ordered_batches(self.train, "train", True)) if self.train else None
            ),
        )

    # --- decoding ------------------------------------------------------------------------------

    def _encoded(self, split: RawSplit, example: dict) -> tf.Tensor:
        return tf.io.read_file(example["image"]) if split.read_files else example["image"]

    def _to_rgb(self, image: tf.Tensor) -> tf.Tensor:
        return to_rgb(image, self.config)

    # --- training ------------------------------------------------------------------------------

    def epoch_seed(self, epoch: int) -> int:
        """Seeds the epoch's order and its examples' augmentation."""
        return self.config.seed * 1_000_003 + epoch

    def raw_epoch(self, epoch: int, start: int = 0) -> tf.data.Dataset:
        """The epoch's raw training examples in their order, from position ``start``."""
        return self.train.examples(epoch, start, self.epoch_seed(epoch))

    def decoded(self, epoch: int, start: int) -> tf.data.Dataset:
        """Examples ``start``... of the epoch, augmented, with their positions in ``index``.

        Examples before ``start`` are never decoded; one that fails to decode is dropped here
        and named by the epoch's report (its index is missing from the batches). Positions
        count raw examples, so a resume is exact unless an image before the resume point
        failed to decode (that shifts the batch boundaries after it).
        """
        seed = self.epoch_seed(epoch)

        def augment(i, example):
            i = i + start
            image = self.train_fn(
                self._encoded(self.train, example), tf.stack([tf.cast(seed, tf.int64), i])
            )
            label = tf.cast(example["label"], tf.int32)
            return {"image": self._to_rgb(image), "label": label, "index": i}

        ds = self.raw_epoch(epoch, start).enumerate()
        return ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()

    def epoch_batches(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """Epoch ``epoch``'s batches from its batch ``skip`` on, always full (see
        ``full_batches``). The filler is built only when needed: building it every epoch costs
        a trace of the preprocessing."""
        needed = self.steps_per_epoch - skip
        ds = self.decoded(epoch, skip * self.local_batch).batch(self.local_batch).take(needed)
        batches = ds.with_options(self.options).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()

        def filler() -> Iterator[dict[str, np.ndarray]]:
            return self.decoded(epoch, 0).with_options(self.options).as_numpy_iterator()

        what = f"Epoch {epoch} of {self.name!r}"
        yield from full_batches(batches, filler, self.local_batch, needed, what)

    def train_batches(self, start_step: int) -> Iterator[Batch]:
        if self.train is None:
            raise ConfigError(
                f"{self.name!r} is an evaluation set with no training split: use it with "
                "--mode=eval on a workdir trained on ImageNet"
            )
        epoch, skip = divmod(start_step, self.steps_per_epoch)
        while True:
            gaps = Gaps(skip * self.local_batch, self.train.local_size)
            for batch in self.epoch_batches(epoch, skip):
                gaps.update(batch.pop("index"))
                yield shard(batch, self.devices)
            failed = names_at(self.raw_epoch(epoch), gaps.missing) if gaps.missing else []
            report_skipped(f"{self.name} train, epoch {epoch}", self.train, gaps, failed)
            epoch, skip = epoch + 1, 0

    # --- evaluation ----------------------------------------------------------------------------

    def eval_image_shape(self) -> tuple[int, ...]:
        crops = (10,) if self.config.input.eval_crops == 10 else ()
        return crops + (self.config.image_size, self.config.image_size, self.channels)

    def eval_batches(self) -> Iterator[Batch]:
        """One pass over the evaluation split; every process yields the same number of
        batches, padded and masked."""
        return self.ordered_batches(self.evaluation, "eval")

    def ordered_batches(
        self, split: RawSplit, what: str, keep_index: bool = False
    ) -> Iterator[Batch]:
        """One pass over ``split`` in its fixed order, as evaluation sees images."""

        def prepare(i, example):
            out = {k: v for k, v in example.items() if k not in ("image", "label", "name")}
            out["image"] = self.eval_fn(self._encoded(split, example))
            out.update(label=tf.cast(example["label"], tf.int32), index=i)
            return out  # with any other per-example field (ReaL's "real" labels)

        ds = split.examples(None, 0, 0).enumerate()
        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.ignore_errors().batch(self.local_eval_batch).with_options(self.options)
        iterator = ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
        steps = math.ceil(math.ceil(split.size / jax.process_count()) / self.local_eval_batch)
        gaps = Gaps(0, split.ordered_size if split.ordered_size >= 0 else split.local_size)
        for _ in range(steps):
            batch = next(iterator, None)
            if batch is not None:
                gaps.update(batch["index"] if keep_index else batch.pop("index"))
            padded = pad_batch(batch, self.local_eval_batch, self.eval_image_shape())
            yield shard(padded, self.devices)
        if next(iterator, None) is None:  # the split was read to its end
            gaps.close()
        failed = names_at(split.examples(None, 0, 0), gaps.missing) if gaps.missing else []
        report_skipped(f"{self.name} {what}", split, gaps, failed)


# --- the parts, each testable alone --------------------------------------------------------------


def to_rgb(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
    """Grayscale replicated to 3 channels where ``config.grayscale_to_rgb`` asks for it."""
    return tf.image.grayscale_to_rgb(image) if config.grayscale_to_rgb else image


def eval_preprocess(config: ml_collections.ConfigDict) -> Callable[[tf.Tensor], tf.Tensor]:
    """Encoded image -> the model's uint8 evaluation input (center crop, or ten crops), as
    ``config`` says; the pipeline's evaluation and ``--mode=predict`` both use it."""
    inner = functools.partial(
        preprocess.preprocess_for_eval,
        image_size=config.image_size,
        resize_size=resize_size(config),
        channels=config.channels,
        crops=config.input.eval_crops,
    )
    return lambda contents: to_rgb(inner(contents), config)


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
    """An image file as the evaluation pipeline gives it (the center crop), the same
    pixels; a file that cannot be read or decoded is a ``DataError`` naming it."""
    one_crop = config.copy_and_resolve_references()
    one_crop.input.eval_crops = 1
    try:
        return eval_preprocess(one_crop)(tf.io.read_file(path)).numpy()
    except tf.errors.OpError as error:
        raise DataError(f"Cannot read image {path!r}: {error.message}") from error


def full_batches(
    batches: Iterator[dict[str, np.ndarray]],
    filler: Callable[[], Iterator[dict[str, np.ndarray]]],
    batch_size: int,
    needed: int,
    what: str,
) -> Iterator[dict[str, np.ndarray]]:
    """``needed`` batches of ``batch_size`` examples: the full ones of ``batches``, then, when
    examples failed to decode and the stream ran short, its last partial batch topped up with
    single examples from ``filler()`` (the epoch again from its beginning).

    Raises ``DataError`` naming ``what`` when even the filler cannot make up the count.
    """
    pending: list[dict[str, np.ndarray]] = []
    for batch in batches:
        if len(batch["label"]) == batch_size:
            needed -= 1
            yield batch
        else:
            pending.append(batch)  # the epoch's last, partial batch
    if needed <= 0:
        return
    examples = filler()
    count = sum(len(p["label"]) for p in pending)
    while needed > 0:
        example = next(examples, None)
        if example is None:
            raise DataError(f"{what} cannot fill its batches: most of its images failed to decode")
        pending.append({k: v[None] for k, v in example.items()})
        count += 1
        if count == batch_size:
            yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            pending, count, needed = [], 0, needed - 1


def pad_batch(batch: dict | None, size: int, image_shape: tuple) -> Batch:
    """Pads an evaluation batch (or makes an empty one) to ``size`` with a 0/1 mask."""
    if batch is None:
        batch = {"image": np.zeros((0,) + image_shape, np.uint8), "label": np.zeros(0, np.int32)}
    n = len(batch["label"])
    mask = np.zeros(size, np.float32)
    mask[:n] = 1
    padded = {
        k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
        if k != "image"
    }
    padded["image"] = np.concatenate(
        [batch["image"], np.zeros((size - n,) + image_shape, np.uint8)]
    )
    padded["mask"] = mask
    return padded


class Gaps:
    """Tracks which positions of a stream are missing from its batches (failed to decode).

    Positions arrive in increasing order from ``start``; a smaller one means the stream has
    moved on to the filler taken from its beginning, whose failures were counted already.
    """

    def __init__(self, start: int, end: int):
        self.next, self.end = start, end  # end: the stream's length
        self.missing: list[int] = []
        self.in_filler = False

    def update(self, indices: np.ndarray) -> None:
        for i in indices.tolist():
            if self.in_filler or i < self.next:
                if not self.in_filler:
                    self.close()
                self.in_filler = True
                continue
            self.missing.extend(range(self.next, i))
            self.next = i + 1

    def close(self) -> None:
        """The stream was read to its end: whatever followed the last position failed."""
        self.missing.extend(range(self.next, self.end))
        self.next = self.end


def names_at(raw: tf.data.Dataset, positions: list[int]) -> list[str]:
    """The names of the examples at ``positions`` of the raw (undecoded) stream; fewer when
    the stream ends before some of them (records that could not be read). A read error is
    passed over as in the decoding pipeline: after ``enumerate``, which counts it."""
    wanted = tf.constant(positions, tf.int64)
    ds = raw.enumerate().ignore_errors().filter(lambda i, ex: tf.reduce_any(tf.equal(i, wanted)))
    names = ds.map(lambda i, ex: ex["name"]).take(len(positions))
    return [name.decode(errors="replace") for name in names.as_numpy_iterator()]


def report_skipped(where: str, split: RawSplit, gaps: Gaps, failed: list[str]) -> None:
    """The per-epoch count of skipped files, naming the ones that failed to decode. Where
    the raw stream ended before the positions ``gaps`` expected (``failed`` names fewer
    than are missing: TFDS's records files cut short or damaged), a warning naming the
    damaged files where they can be found."""
    for name in failed[:20]:
        logging.warning("Skipped %s: it failed to decode", name)
    listed = split.listed_bad
    if listed or failed:
        logging.warning(
            "%s: skipped %d bad files (%d found when the folder was listed and named then, "
            "%d failed to decode%s)",
            where, listed + len(failed), listed, len(failed),
            "; the first 20 named above" if len(failed) > 20 else "",
        )  # fmt: skip
    unread = len(gaps.missing) - len(failed)
    if unread > 0:
        damaged = split.damaged_files() if split.damaged_files else []
        logging.warning(
            "%s: %d records could not be read: the data set's files are damaged or cut short "
            "(%s); prepare the data set again",
            where,
            unread,
            "; ".join(damaged) if damaged else "none is cut short: a record inside is corrupt",
        )
