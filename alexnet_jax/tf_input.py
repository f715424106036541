"""TensorFlow-backed sources: TFDS data sets and image folders.

The only module that imports TensorFlow, which is kept off the GPU here. Every epoch is its
own tf.data pipeline, shuffled with a seed made of (config.seed, epoch) and augmented with
per-example stateless seeds, so a run resumed at step ``s`` skips to the same batch, and the
batches do not depend on tf.data's parallelism. Each process reads its own shard, and every
process yields the same number of batches per epoch (collectives need it).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import input_pipeline
from alexnet_jax.input_pipeline import Batch, Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
EVAL_SPLITS = {"imagenet2012": "validation", "imagenette": "validation"}  # others: "test"
FOLDER_SPLITS = ("train", "val")


def _tensorflow():
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # the GPU belongs to JAX
    return tf


# --- image folders -------------------------------------------------------------------------


def list_image_folder(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Files, labels and sorted class names of ``root/split/<class>/<image>``.

    Raises ``FileNotFoundError`` or ``ValueError`` naming the path when the layout is wrong:
    a missing split, a split without class folders, an empty class folder.
    """
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Image folder split {directory!r} does not exist: expected {root}/{{train,val}}/"
            "<class>/<image files>"
        )
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise ValueError(f"Image folder split {directory!r} has no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        images = sorted(
            os.path.join(class_dir, f)
            for f in os.listdir(class_dir)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise ValueError(
                f"Class folder {class_dir!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files += images
        labels += [label] * len(images)
    return files, np.asarray(labels, np.int64), classes


def looks_complete(path: str) -> bool:
    """A cheap check that a file is a whole JPEG or PNG: its signature and its end marker.

    Catches non-images, empty files and truncated files without decoding them.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 12))
            tail = f.read()
    except OSError:
        return False
    if head[:3] == b"\xff\xd8\xff":
        return tail.endswith(b"\xff\xd9")
    if head == b"\x89PNG\r\n\x1a\n":
        return b"IEND" in tail
    return False


def drop_corrupt(
    files: list[str], labels: np.ndarray, split: str
) -> tuple[list[str], np.ndarray, list[str]]:
    """Removes files that are not whole images, naming each in a warning; returns them too."""
    keep = np.asarray([looks_complete(f) for f in files], bool)
    bad = [f for f, ok in zip(files, keep, strict=True) if not ok]
    for path in bad[:20]:
        logging.warning("Skipping corrupt or non-image file %s", path)
    if bad:
        logging.warning(
            "Skipped %d corrupt or non-image files of %d in split %r%s",
            len(bad), len(files), split, " (first 20 named above)" if len(bad) > 20 else "",
        )  # fmt: skip
    return [f for f, ok in zip(files, keep, strict=True) if ok], labels[keep], bad


# --- the pipelines -------------------------------------------------------------------------


def create_dataset(config: ml_collections.ConfigDict) -> Dataset:
    tf = _tensorflow()
    if config.dataset == "image_folder":
        train_files, train_labels, classes = list_image_folder(config.data_dir, "train")
        eval_files, eval_labels, eval_classes = list_image_folder(config.data_dir, "val")
        if eval_classes != classes:
            raise ValueError(
                f"The class folders of {config.data_dir}/val differ from those of train: "
                f"{sorted(set(eval_classes) ^ set(classes))}"
            )
        train_files, train_labels, train_bad = drop_corrupt(train_files, train_labels, "train")
        eval_files, eval_labels, eval_bad = drop_corrupt(eval_files, eval_labels, "val")

        def process_shard(files: list[str]) -> np.ndarray:
            return np.array_split(np.arange(len(files)), jax.process_count())[jax.process_index()]

        def source(split: str) -> tf.data.Dataset:
            files, labels = (
                (train_files, train_labels) if split == "train" else (eval_files, eval_labels)
            )
            shard = process_shard(files)
            ds = tf.data.Dataset.from_tensor_slices((np.asarray(files)[shard], labels[shard]))
            # Files are read where they are decoded: naming a failed one reads no images.
            return ds.map(lambda f, y: {"image": f, "label": y, "name": f})

        local = {"train": len(process_shard(train_files)), "eval": len(process_shard(eval_files))}
        listed_bad = {"train": len(train_bad), "eval": len(eval_bad)}
        return _build(
            config, source, classes, len(train_files), len(eval_files), local, listed_bad, True
        )
    return _tfds_dataset(config)


def _tfds_dataset(config: ml_collections.ConfigDict) -> Dataset:
    import tensorflow_datasets as tfds

    data_dir = config.data_dir or None
    builder = tfds.builder(config.dataset, data_dir=data_dir)
    eval_split = EVAL_SPLITS.get(config.dataset, "test")
    try:
        builder.as_dataset(split="train[:1]")  # fails fast when the data is not prepared
    except Exception as error:  # noqa: BLE001 - TFDS raises several types for missing data
        raise FileNotFoundError(
            f"TFDS data set {config.dataset!r} is not prepared in data_dir "
            f"{data_dir or tfds.core.constants.DATA_DIR!r}. Prepare it first (imagenet2012 "
            "needs the manual download TFDS documents); this run downloads nothing."
        ) from error
    label = builder.info.features["label"]
    classes = list(label.names) if hasattr(label, "names") else []
    sizes = {split: _split_size(builder, split) for split in ("train", eval_split)}

    def process_split(split: str) -> str:
        name = "train" if split == "train" else eval_split
        if jax.process_count() > 1:
            name = tfds.even_splits(name, n=jax.process_count())[jax.process_index()]
        return name

    def source(split: str):
        name = process_split(split)
        ds = builder.as_dataset(
            split=name,
            decoders={"image": tfds.decode.SkipDecoding()},
            shuffle_files=False,
            read_config=tfds.ReadConfig(add_tfds_id=True),
        )
        # ImageNet's records keep the original file name; other data sets name the record.
        key = "file_name" if "file_name" in builder.info.features else "tfds_id"
        return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"], "name": ex[key]})

    local = {"train": sizes["train"], "eval": sizes[eval_split]}
    if jax.process_count() > 1:
        local = {split: _split_size(builder, process_split(split)) for split in local}
    return _build(config, source, classes, sizes["train"], sizes[eval_split], local)


def _split_size(builder, split: str) -> int:
    """The (sub)split's size from TFDS metadata, or counted (mock data carries no metadata)."""
    if builder.info.splits:
        return builder.info.splits[split].num_examples
    return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))


def _build(
    config,
    source,
    classes: list[str],
    train_size: int,
    eval_size: int,
    local_sizes: dict[str, int],
    listed_bad: dict[str, int] | None = None,
    read_files: bool = False,
) -> Dataset:
    """The Dataset over ``source(split)``: raw examples {"image": encoded, "label", "name"}.

    ``local_sizes`` holds this process's number of raw examples per split ("train",
    "eval"); ``listed_bad`` the files already dropped per split (named when they were
    found), for the report at the end of every epoch. With ``read_files`` the examples'
    "image" is a file path, read just before decoding.
    """
    tf = _tensorflow()
    listed_bad = listed_bad or {"train": 0, "eval": 0}
    from alexnet_jax import preprocess

    devices = jax.local_device_count()
    local_batch = input_pipeline.local_batch_size(config.batch_size)
    local_eval_batch = input_pipeline.local_batch_size(config.eval_batch_size)
    steps_per_epoch = input_pipeline.steps_per_epoch(train_size, config)
    channels = 3 if config.grayscale_to_rgb else config.channels
    train_fn = functools.partial(
        preprocess.preprocess_for_train,
        image_size=config.image_size,
        resize_size=config.input.resize_size,
        channels=config.channels,
        crop=config.input.random_crop,
        flip=config.input.random_flip,
        lighting_std=config.input.pca_lighting_std,
    )
    eval_fn = functools.partial(
        preprocess.preprocess_for_eval,
        image_size=config.image_size,
        resize_size=config.input.resize_size,
        channels=config.channels,
        crops=config.input.eval_crops,
    )
    options = tf.data.Options()
    options.deterministic = True
    if config.input.threads:
        options.threading.private_threadpool_size = config.input.threads
    autotune = tf.data.AUTOTUNE

    def encoded(ex):
        return tf.io.read_file(ex["image"]) if read_files else ex["image"]

    def to_rgb(image):
        return tf.image.grayscale_to_rgb(image) if channels != config.channels else image

    def shuffled(epoch: int):
        """The epoch's raw examples in their shuffled order, and the epoch's seed."""
        seed = config.seed * 1_000_003 + epoch
        ds = source("train").shuffle(
            min(config.input.shuffle_buffer, train_size), seed=seed, reshuffle_each_iteration=False
        )
        return ds, seed

    def decoded(epoch: int, start: int):
        """Examples ``start``... of the epoch, augmented, with their positions in ``index``.

        Skipped examples are never decoded; one that fails to decode is dropped here and
        named by the epoch's report (its index is missing from the batches). The skip counts
        raw examples, so a resume is exact unless an image before the resume point failed
        to decode (that shifts the batch boundaries after it).
        """
        ds, seed = shuffled(epoch)
        ds = ds.enumerate().skip(start)
        ds = ds.map(
            lambda i, ex: {
                "image": to_rgb(train_fn(encoded(ex), tf.stack([tf.cast(seed, tf.int64), i]))),
                "label": tf.cast(ex["label"], tf.int32),
                "index": i,
            },
            num_parallel_calls=autotune,
        )
        return ds.ignore_errors()

    def epoch_batches(epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """Epoch ``epoch``'s batches from its batch ``skip`` on.

        When images failed to decode, the epoch runs short of full batches; it is then
        filled up from its own beginning, so every epoch has ``steps_per_epoch`` batches.
        The filler is built only then (building it every epoch costs a trace of the
        preprocessing: a quarter of the input time of a small data set).
        """
        needed = steps_per_epoch - skip
        main = decoded(epoch, skip * local_batch).batch(local_batch).take(needed)
        pending: list[dict[str, np.ndarray]] = []
        for batch in main.with_options(options).prefetch(autotune).as_numpy_iterator():
            if len(batch["label"]) == local_batch:
                needed -= 1
                yield batch
            else:
                pending.append(batch)  # the epoch's last, partial batch
        if needed == 0:
            return
        filler = decoded(epoch, 0).with_options(options).as_numpy_iterator()
        count = sum(len(p["label"]) for p in pending)
        while needed > 0:
            example = next(filler, None)
            if example is None:
                raise RuntimeError(
                    f"Epoch {epoch} of {config.dataset!r} cannot fill its {steps_per_epoch} "
                    "batches: most of its images failed to decode"
                )
            pending.append({k: v[None] for k, v in example.items()})
            count += 1
            if count == local_batch:
                yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                pending, count, needed = [], 0, needed - 1

    def train_batches(start_step: int) -> Iterator[Batch]:
        epoch, skip = divmod(start_step, steps_per_epoch)
        while True:
            gaps = _Gaps(skip * local_batch, local_sizes["train"])
            for batch in epoch_batches(epoch, skip):
                gaps.update(batch.pop("index"))
                yield input_pipeline.shard(batch, devices)
            failed = _names_at(shuffled(epoch)[0], gaps.missing) if gaps.missing else []
            _report_skipped(f"{config.dataset} train, epoch {epoch}", listed_bad["train"], failed)
            epoch, skip = epoch + 1, 0

    # Every process runs the same number of evaluation steps, padded and masked.
    eval_steps = math.ceil(math.ceil(eval_size / jax.process_count()) / local_eval_batch)

    def eval_batches() -> Iterator[Batch]:
        ds = (
            source("eval")
            .enumerate()
            .map(
                lambda i, ex: {
                    "image": to_rgb(eval_fn(encoded(ex))),
                    "label": tf.cast(ex["label"], tf.int32),
                    "index": i,
                },
                num_parallel_calls=autotune,
            )
        )
        ds = ds.ignore_errors().batch(local_eval_batch).with_options(options)
        iterator = ds.prefetch(autotune).as_numpy_iterator()
        gaps = _Gaps(0, local_sizes["eval"])
        for _ in range(eval_steps):
            batch = next(iterator, None)
            if batch is not None:
                gaps.update(batch.pop("index"))
            yield input_pipeline.shard(_pad(batch, local_eval_batch, eval_fn_shape()), devices)
        if next(iterator, None) is None:  # the split was read to its end
            gaps.close()
        failed = _names_at(source("eval"), gaps.missing) if gaps.missing else []
        _report_skipped(f"{config.dataset} eval", listed_bad["eval"], failed)

    def eval_fn_shape():
        crops = (10,) if config.input.eval_crops == 10 else ()
        return crops + (config.image_size, config.image_size, channels)

    return Dataset(
        name=config.dataset,
        num_classes=len(classes),
        class_names=classes,
        image_shape=(config.image_size, config.image_size, channels),
        train_size=train_size,
        eval_size=eval_size,
        train_batches=train_batches,
        eval_batches=eval_batches,
    )


def _pad(batch: dict | None, size: int, image_shape: tuple) -> Batch:
    """Pads an evaluation batch (or makes an empty one) to ``size`` with a 0/1 mask."""
    if batch is None:
        batch = {"image": np.zeros((0,) + image_shape, np.uint8), "label": np.zeros(0, np.int32)}
    n = len(batch["label"])
    mask = np.zeros(size, np.float32)
    mask[:n] = 1
    return {
        "image": np.concatenate([batch["image"], np.zeros((size - n,) + image_shape, np.uint8)]),
        "label": np.concatenate([batch["label"], np.zeros(size - n, np.int32)]),
        "mask": mask,
    }


class _Gaps:
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


def _names_at(raw, positions: list[int]) -> list[str]:
    """The names of the examples at ``positions`` of the raw (undecoded) stream."""
    tf = _tensorflow()
    wanted = tf.constant(positions, tf.int64)
    ds = raw.enumerate().filter(lambda i, ex: tf.reduce_any(tf.equal(i, wanted)))
    names = ds.map(lambda i, ex: ex["name"]).take(len(positions))
    return [name.decode(errors="replace") for name in names.as_numpy_iterator()]


def _report_skipped(where: str, listed: int, failed: list[str]) -> None:
    """The per-epoch count of skipped files, naming the ones that failed to decode."""
    for name in failed[:20]:
        logging.warning("Skipped %s: it failed to decode", name)
    if listed or failed:
        logging.warning(
            "%s: skipped %d bad files (%d found when the folder was listed and named then, "
            "%d failed to decode%s)",
            where, listed + len(failed), listed, len(failed),
            "; the first 20 named above" if len(failed) > 20 else "",
        )  # fmt: skip
