"""Decoded and augmented images/s of the TF input pipeline, per CPU core and on all cores.

    python benchmarks/input_pipeline.py [--images 256] [--batches 30]

Writes ImageNet-sized (500x375) photographs as JPEGs to a temporary image folder, then
times the paper's training path (decode, central square, a random 227 window of its resize
to 256, flip, PCA lighting) and the evaluation paths (center crop, 10 crops), with tf.data
limited to one thread and with all of them. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from alexnet_jax import data
from alexnet_jax.defaults import default_config


def paper_config(root: str, batch: int, threads: int):
    """The paper's preprocessing (configs/imagenet.py's) on an image folder of 4 classes."""
    config = default_config()
    config.dataset, config.data_dir, config.num_classes, config.channels = (
        "image_folder", root, 4, 3)  # fmt: skip
    config.image_size, config.input.resize_size = 227, 256
    config.input.pca_lighting_std = 0.1
    config.batch_size = config.eval_batch_size = batch
    config.input.threads = threads
    return config


def write_jpegs(root: str, count: int) -> float:
    """``count`` photographs of ImageNet's typical 500x375 (a third of them 375x500): random
    windows of scikit-learn's two sample photos, saved at quality 95. Returns their mean KB."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427x640 RGB photographs
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in range(4):
            os.makedirs(os.path.join(root, split, f"class{label}"))
    sizes = []
    for i in range(count):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 375 + 1), rng.integers(0, photo.shape[1] - 500 + 1)
        window = photo[y : y + 375, x : x + 500]
        image = Image.fromarray(window.transpose(1, 0, 2) if i % 3 == 2 else window)
        for split in ("train", "val"):
            path = os.path.join(root, split, f"class{i % 4}", f"{i}.jpg")
            image.save(path, quality=95)
        sizes.append(os.path.getsize(path))
    return float(np.mean(sizes)) / 1e3


def images_per_second(iterator, batches: int, batch_size: int) -> float:
    next(iterator)  # warm up: build the pipeline, fill buffers
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as root:
        kilobytes = write_jpegs(root, args.images)
        print(f"{args.images} photos of 500x375 (JPEG, {kilobytes:.0f} KB on average), "
              f"{cores} CPU cores, batch {args.batch}")  # fmt: skip
        for threads in (1, 0):
            config = paper_config(root, args.batch, threads)
            config.input.shuffle_buffer = args.images
            label = "1 thread " if threads == 1 else f"{cores} threads"
            train = data.create_dataset(config)
            rate = images_per_second(train.train_batches(0), args.batches, args.batch)
            print(f"{label}  {'train (crop+flip+PCA)':24s} {rate:8.1f} img/s")
            for crops in (1, 10):
                config.input.eval_crops = crops
                evaluation = data.create_dataset(config)

                def eval_forever(dataset=evaluation):
                    while True:
                        yield from dataset.eval_batches()

                batches = min(args.batches, args.images // args.batch - 1)
                rate = images_per_second(eval_forever(), batches, args.batch)
                name = f"eval ({crops} crop{'s' if crops > 1 else ''})"
                print(f"{label}  {name:24s} {rate:8.1f} img/s")


if __name__ == "__main__":
    main()
