"""Data sources: ``create_dataset(config)`` returns the ``Dataset`` that ``config.dataset`` names.

- ``digits`` (``digits.py``): scikit-learn's bundled handwritten digits; numpy only.
- ``synthetic`` (``synthetic.py``): random batches made on the devices, for benchmarks.
- TFDS names and ``image_folder`` (``tf_sources.py``): through the tf.data pipeline
  (``tf_pipeline.py``, augmentation in ``preprocess.py``). Only these import TensorFlow.
- ``prepared`` (``prepared.py``): records written by ``python -m alexnet_jax.data.prepare``
  (``prepare.py``, ``records.py``), read at random with a true per-epoch shuffle, augmented
  on the device (``augment.py``). No TensorFlow.

``dataset.py`` defines the ``Dataset`` every source returns; ``image_folder.py`` lists and
checks image folders without TensorFlow.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from alexnet_jax.data.dataset import Dataset
from alexnet_jax.data.digits import digits_dataset
from alexnet_jax.data.digits import load_image as digits_load_image
from alexnet_jax.data.synthetic import synthetic_dataset
from alexnet_jax.errors import ConfigError

NUMPY_SOURCES = ("digits", "synthetic")
# Kept here, not in tf_sources, so that naming them imports no TensorFlow.
TFDS_SOURCES = ("imagenet2012", "fashion_mnist", "mnist", "cifar10", "imagenette")
# Harder ImageNet test sets, for --mode=eval only: ImageNet-V2 (its variants as
# "imagenet_v2/matched-frequency", "/threshold-0.7", "/topimages") and ReaL's labels.
EVAL_ONLY_SOURCES = ("imagenet_v2", "imagenet2012_real")
SOURCES = NUMPY_SOURCES + TFDS_SOURCES + EVAL_ONLY_SOURCES + ("image_folder", "prepared")


def source_name(dataset: str) -> str:
    """The source of ``config.dataset``: a TFDS name without its config (``imagenet_v2``)."""
    return dataset.split("/")[0]


def is_tf_source(dataset: str) -> bool:
    return source_name(dataset) in TFDS_SOURCES + EVAL_ONLY_SOURCES or dataset == "image_folder"


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
    """An image file as the evaluation pipeline of ``config.dataset`` gives the model its
    images (its center crop, the same decoder and resampling), for ``--mode=predict``."""
    if config.dataset == "digits":
        return digits_load_image(path, config)
    if config.dataset == "prepared":
        from alexnet_jax.data.prepared import load_image as prepared_load_image

        return prepared_load_image(path, config)
    if is_tf_source(config.dataset):
        from alexnet_jax.data import tf_pipeline

        return tf_pipeline.load_image(path, config)
    raise ConfigError(f"config.dataset={config.dataset!r} has no image files to predict like")


def create_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """The data source named by ``config.dataset``.

    Raises ``ConfigError`` when ``config.num_classes`` differs from the source's class count
    (for training, evaluation and prediction alike); 0 takes the source's.
    """
    if config.dataset == "digits":
        dataset = digits_dataset(config)
    elif config.dataset == "synthetic":
        dataset = synthetic_dataset(config)
    elif config.dataset == "prepared":
        # Its readers (array_record, libjpeg-turbo) are needed on this path alone.
        from alexnet_jax.data.prepared import prepared_dataset

        dataset = prepared_dataset(config)
    elif is_tf_source(config.dataset):
        # TensorFlow (an optional heavy dependency) is imported only for these sources.
        from alexnet_jax.data import tf_sources

        if config.dataset == "image_folder":
            dataset = tf_sources.image_folder_dataset(config)
        else:
            dataset = tf_sources.tfds_dataset(config)
    else:
        raise ConfigError(f"config.dataset={config.dataset!r}: choose one of {SOURCES}")
    if config.num_classes and dataset.num_classes != config.num_classes:
        raise ConfigError(
            f"config.num_classes={config.num_classes} but {dataset.name!r} has "
            f"{dataset.num_classes} classes ({', '.join(dataset.class_names[:5])}...): set "
            f"--config.num_classes={dataset.num_classes}"
        )
    return dataset
