"""TensorFlow-backed sources: TFDS data sets and image folders, as ``TFPipeline`` inputs.

Each source lists a split's undecoded examples for this process (``RawSplit``):

- an image folder's file paths (read where they are decoded, so naming a failed file reads
  no images). Every training epoch is a permutation of all the files drawn from (seed,
  epoch), cut into global batches, each process taking its part of every batch: every
  process sees every class in proportion, however large the folder. A resume starts at its
  position without touching the files before it.
- TFDS records, their image bytes left encoded. Every epoch reads the files in a new
  order and mixes them in a ``config.input.shuffle_buffer``; TFDS wrote the records
  shuffled. A resume mid-epoch reads (without decoding) the epoch's records before the
  resume point: prepare the data (``alexnet_jax.data.prepare``) to resume in O(1).

Data sets TFDS can download are downloaded and prepared on first use (``config.download``);
imagenet2012 needs its manual download. Importing this module imports TensorFlow.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from alexnet_jax.data.dataset import Dataset, epoch_permutation, process_part, tfds_eval_split
from alexnet_jax.data.image_folder import FolderSplit, display_name, read_image_folder
from alexnet_jax.data.tf_pipeline import RawSplit, TFPipeline
from alexnet_jax.errors import DataError, MissingDataError

EVAL_ONLY_SPLITS = ("imagenet_v2", "imagenet2012_real")
MULTI_LABEL = ("imagenet2012_real",)
MANUAL_DOWNLOAD = ("imagenet2012", "imagenet2012_real")  # both read ImageNet's own archives


# --- image folders -----------------------------------------------------------------------------


def epoch_files(size: int, batch: int, seed: int, epoch: int) -> np.ndarray:
    """This process's positions (into the split's file list) for training epoch ``epoch``: a
    permutation of all ``size`` files, cut into global batches of ``batch`` (the remainder is
    left out this epoch), this process's part of each batch, batch after batch."""
    steps = size // batch
    order = epoch_permutation(seed, epoch, size)[: steps * batch].reshape(steps, batch)
    parts = np.array_split(order, jax.process_count(), axis=1)[jax.process_index()]
    return parts.reshape(-1)


def image_folder_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """``config.data_dir/{train,val}/<class>/<image>`` (classes in sorted order)."""
    classes, splits = read_image_folder(config.data_dir)

    paths = {  # as bytes: file names need not be UTF-8
        id(split): np.asarray([os.fsencode(f) for f in split.files], dtype=object)
        for split in splits.values()
    }

    def file_examples(split: FolderSplit, positions: np.ndarray) -> tf.data.Dataset:
        files, labels = paths[id(split)][positions], split.labels[positions]
        ds = tf.data.Dataset.from_tensor_slices((files.astype(bytes), labels))
        return ds.map(lambda f, y: {"image": f, "label": y, "name": f})

    train, evaluation = splits["train"], splits["val"]
    size = len(train.files)

    ordered_train = process_part(np.arange(size))

    def train_examples(epoch, start, seed):
        if epoch is None:  # the split in its order (nearest neighbors)
            return file_examples(train, ordered_train[start:])
        positions = epoch_files(size, config.batch_size, config.seed, epoch)
        return file_examples(train, positions[start:])

    def eval_examples(epoch, start, seed):
        return file_examples(evaluation, process_part(np.arange(len(evaluation.files)))[start:])

    steps = size // config.batch_size
    local_epoch = steps * (config.batch_size // jax.process_count())
    local_eval = len(process_part(np.arange(len(evaluation.files))))
    pipeline = TFPipeline(
        config,
        "image_folder",
        classes,
        RawSplit(train_examples, size, local_epoch, len(train.dropped), True, len(ordered_train)),
        RawSplit(eval_examples, len(evaluation.files), local_eval, len(evaluation.dropped), True),
    )
    dataset = pipeline.dataset()
    dataset.train_example_name = lambda index: display_name(train.files[ordered_train[index]])
    return dataset


# --- TFDS --------------------------------------------------------------------------------------


def tfds_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The TFDS data set ``config.dataset`` from ``config.data_dir``, prepared now if TFDS
    can download it and ``config.download`` allows."""
    name = config.dataset.split("/")[0]  # e.g. imagenet_v2/threshold-0.7: a TFDS config
    eval_split = tfds_eval_split(name)
    builder = ensure_prepared(
        tfds.builder(config.dataset, data_dir=config.data_dir or None), config, eval_split
    )
    multi_label = name in MULTI_LABEL
    label_key = "original_label" if multi_label else "label"
    label = builder.info.features[label_key]
    classes = list(label.names) if hasattr(label, "names") else []

    def fields(ex):
        out = {"image": ex["image"], "label": ex[label_key], "name": ex[key]}
        if multi_label:  # the ReaL labels as a multi-hot (classes,) vector; empty: all 0
            hot = tf.one_hot(ex["real_label"], len(classes), dtype=tf.uint8)
            out["real"] = tf.reduce_max(hot, axis=0)
        return out

    # ImageNet's records keep the original file name; other data sets name the record.
    key = "file_name" if "file_name" in builder.info.features else "tfds_id"

    def raw(split: str) -> RawSplit:
        local_split = split
        if jax.process_count() > 1:
            local_split = tfds.even_splits(split, n=jax.process_count())[jax.process_index()]
        size = split_size(builder, split)
        local_size = split_size(builder, local_split) if local_split != split else size

        def examples(epoch, start, seed):
            training = epoch is not None
            ds = builder.as_dataset(
                split=local_split,
                decoders={"image": tfds.decode.SkipDecoding()},
                shuffle_files=training,
                # A damaged file then ends its records early (named at the epoch's end)
                # instead of failing TFDS's count check at every read: ``ignore_errors``
                # after decoding would retry that check forever.
                read_config=tfds.ReadConfig(
                    add_tfds_id=True, shuffle_seed=seed, assert_cardinality=False
                ),
            )
            if training:
                buffer = min(config.input.shuffle_buffer, local_size)
                ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
            ds = ds.skip(start)  # reads the records before ``start``; decodes none of them
            return ds.map(fields)

        damaged = functools.cache(lambda: damaged_files(builder, split))  # walked once a run
        return RawSplit(examples, size, local_size, damaged_files=damaged)

    train = None if name in EVAL_ONLY_SPLITS else raw("train")
    return TFPipeline(config, config.dataset, classes, train, raw(eval_split)).dataset()


def tfrecord_count(path: str) -> int:
    """The whole records of a TFRecord file, counted from their headers alone (each record:
    an 8-byte little-endian length, its 4-byte CRC, the data, the data's 4-byte CRC): a
    seek per record, no data read. A file cut short ends at its last whole record."""
    count, offset = 0, 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while offset + 12 <= size:
            f.seek(offset)
            length = int.from_bytes(f.read(8), "little")
            offset += 16 + length
            if offset > size:
                break
            count += 1
    return count


def damaged_files(builder, split: str) -> list[str]:
    """TFDS's records files of ``split`` whose whole records are not as many as its metadata
    says, as "path: N of M records"; only TFRecord files are checked."""
    if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
        return []
    info = builder.info.splits[split]
    found = []
    for path, expected in zip(info.filepaths, info.shard_lengths, strict=True):
        try:
            count = tfrecord_count(os.fspath(path))
        except OSError as error:
            found.append(f"{path}: {error}")
            continue
        if count != expected:
            found.append(f"{path}: {count} of {expected} records")
    return found


def ensure_prepared(builder, config: ml_collections.ConfigDict, split: str = "train"):
    """The builder, its data downloaded and prepared with TFDS's own ``download_and_prepare``
    (and its progress bar) if it was not there yet; a clear one-line error where that cannot
    be done."""
    data_dir = config.data_dir or tfds.core.constants.DATA_DIR
    if is_prepared(builder, split):
        return builder
    if config.dataset.split("/")[0] in MANUAL_DOWNLOAD:
        raise MissingDataError(
            f"TFDS data set {config.dataset!r} is not prepared in data_dir {data_dir!r}. It "
            "needs a manual download: place ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in <data_dir>/downloads/manual and run "
            f"tfds.builder({config.dataset!r}, data_dir=...).download_and_prepare()"
        )
    if not config.download:
        raise MissingDataError(
            f"TFDS data set {config.dataset!r} is not prepared in data_dir {data_dir!r} and "
            "config.download=False: prepare it there, or let the run download it"
        )
    logging.info("Downloading and preparing %r into %s (first use)", config.dataset, data_dir)
    if jax.process_index() == 0:
        try:
            builder.download_and_prepare()
        except Exception as error:  # noqa: BLE001 - network errors come in many types
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise DataError(
                f"Could not download {config.dataset!r} into data_dir {data_dir!r} "
                f"({type(error).__name__}: {reason[:200]}). Without network access, prepare it "
                "by hand on a connected machine and copy it to that data_dir"
            ) from error
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tfds download")  # the others wait for process 0
    builder = tfds.builder(config.dataset, data_dir=config.data_dir or None)  # re-read info
    if not is_prepared(builder, split):
        raise MissingDataError(
            f"TFDS data set {config.dataset!r} is still not readable in {data_dir!r} after "
            "download_and_prepare (a data_dir that the processes do not share?)"
        )
    return builder


def is_prepared(builder, split: str = "train") -> bool:
    try:
        builder.as_dataset(split=f"{split}[:1]")
    except Exception:  # noqa: BLE001 - TFDS raises several types for missing data
        return False
    return True


def split_size(builder, split: str) -> int:
    """The (sub)split's size from TFDS metadata, or counted (mock data carries no metadata)."""
    if builder.info.splits:
        return builder.info.splits[split].num_examples
    return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
