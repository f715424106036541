"""TensorFlow-backed sources: TFDS data sets and image folders, as ``TFPipeline`` inputs.

Each source lists a split's undecoded examples for this process (``RawSplit``): TFDS
records with their image bytes left encoded, or an image folder's file paths (read where
they are decoded, so naming a failed file reads no images). Importing this module imports
TensorFlow.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data.dataset import Dataset, process_part
from alexnet_jax.data.image_folder import FolderSplit, read_image_folder
from alexnet_jax.data.tf_pipeline import RawSplit, TFPipeline
from alexnet_jax.errors import MissingDataError

EVAL_SPLITS = {"imagenet2012": "validation", "imagenette": "validation"}  # others: "test"


def image_folder_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """``config.data_dir/{train,val}/<class>/<image>`` (classes in sorted order)."""
    classes, splits = read_image_folder(config.data_dir)

    def raw(split: FolderSplit) -> RawSplit:
        local = process_part(np.arange(len(split.files)))
        files, labels = np.asarray(split.files)[local], split.labels[local]

        def examples() -> tf.data.Dataset:
            ds = tf.data.Dataset.from_tensor_slices((files, labels))
            return ds.map(lambda f, y: {"image": f, "label": y, "name": f})

        return RawSplit(examples, len(split.files), len(local), len(split.dropped), True)

    pipeline = TFPipeline(config, "image_folder", classes, raw(splits["train"]), raw(splits["val"]))
    return pipeline.dataset()


def tfds_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The TFDS data set ``config.dataset`` from ``config.data_dir``, already prepared."""
    data_dir = config.data_dir or None
    builder = tfds.builder(config.dataset, data_dir=data_dir)
    eval_split = EVAL_SPLITS.get(config.dataset, "test")
    try:
        builder.as_dataset(split="train[:1]")  # fails fast when the data is not prepared
    except Exception as error:  # noqa: BLE001 - TFDS raises several types for missing data
        raise MissingDataError(
            f"TFDS data set {config.dataset!r} is not prepared in data_dir "
            f"{data_dir or tfds.core.constants.DATA_DIR!r}. Prepare it first (imagenet2012 "
            "needs the manual download TFDS documents); this run downloads nothing."
        ) from error
    label = builder.info.features["label"]
    classes = list(label.names) if hasattr(label, "names") else []
    # ImageNet's records keep the original file name; other data sets name the record.
    key = "file_name" if "file_name" in builder.info.features else "tfds_id"

    def raw(split: str) -> RawSplit:
        local_split = split
        if jax.process_count() > 1:
            local_split = tfds.even_splits(split, n=jax.process_count())[jax.process_index()]

        def examples() -> tf.data.Dataset:
            ds = builder.as_dataset(
                split=local_split,
                decoders={"image": tfds.decode.SkipDecoding()},
                shuffle_files=False,
                read_config=tfds.ReadConfig(add_tfds_id=True),
            )
            return ds.map(lambda ex: {"image": ex["image"], "label": ex["label"], "name": ex[key]})

        size = split_size(builder, split)
        local_size = split_size(builder, local_split) if local_split != split else size
        return RawSplit(examples, size, local_size)

    return TFPipeline(config, config.dataset, classes, raw("train"), raw(eval_split)).dataset()


def split_size(builder, split: str) -> int:
    """The (sub)split's size from TFDS metadata, or counted (mock data carries no metadata)."""
    if builder.info.splits:
        return builder.info.splits[split].num_examples
    return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
