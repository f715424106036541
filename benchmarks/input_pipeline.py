"""Images/s of every input path, per CPU core, on the same photographs, in one run.

    python benchmarks/input_pipeline.py [--images 256] [--batches 30] [--batch 64] [--json]

Writes ImageNet-sized (500x375) photographs as JPEGs into a temporary image folder, then
times, on the same photos:

- the tf.data path (``config.dataset=image_folder``): decode, central square, a random 227
  window of its resize to 256, flip, PCA lighting; with tf.data on one thread and on all;
- preparing them (``python -m alexnet_jax.data.prepare``): decode, square, 256x256, JPEG;
- training batches from the prepared records (``config.dataset=prepared``), with 1 and 2
  reader threads: uint8 256x256 for the augmentation on the device (the default, the host
  only decodes), the augmentation on the host (uint8 227x227), and the host also
  normalizing to float32 (what a loader that hands the model floats does);
- the same reads through grain (``grain.MapDataset`` over the same records: shuffle, map,
  batch, read threads), if grain is installed, as the obvious alternative to our loader.

"Per core" divides images by the CPU seconds the process used (all its threads), so it
says how many cores a GPU needs at a given rate. ``--json`` ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from alexnet_jax import data
from alexnet_jax.data import prepare, records
from alexnet_jax.defaults import default_config


def paper_config(root: str, batch: int, threads: int, dataset: str = "image_folder"):
    """The paper's preprocessing (configs/imagenet.py's) on a folder of 4 classes."""
    config = default_config()
    config.dataset, config.data_dir, config.num_classes, config.channels = dataset, root, 4, 3
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


def rates(batches, count: int, batch_size: int) -> tuple[float, float]:
    """(images/s of wall time, images per CPU second) over ``count`` batches after one."""
    next(batches)  # warm up: build the pipeline, fill buffers, compile
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(count):
        jax.block_until_ready(next(batches))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count * batch_size / wall, count * batch_size / cpu


def host_float32(batches, config):
    """The batches normalized to float32 on the host, as a loader feeding floats would."""
    mean = np.asarray(config.input.mean_rgb, np.float32)
    std = np.asarray(config.input.std_rgb, np.float32)
    for batch in batches:
        yield {**batch, "image": (batch["image"].astype(np.float32) - mean) / std}


def grain_batches(output: str, batch: int, threads: int):
    """The prepared training split through grain: its shuffle, our decode, its batching."""
    import grain

    metadata = records.Metadata.load(output)
    reader = records.SplitReader(output, metadata, "train")

    class Source:
        def __len__(self):
            return len(reader)

        def __getitem__(self, index):
            record = reader.read(int(index))
            return {"image": reader.image(record), "label": np.int32(record["label"])}

    ds = grain.MapDataset.source(Source()).repeat().shuffle(seed=0).batch(batch)
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads)
    return iter(ds.to_iter_dataset(options))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    cores = os.cpu_count()
    results: dict[str, float] = {}

    def report(key: str, label: str, rate: tuple[float, float]) -> None:
        results[key] = round(rate[1], 1)
        print(f"{label:58s} {rate[0]:8.1f} img/s {rate[1]:8.1f} img/CPU-s", flush=True)

    with tempfile.TemporaryDirectory() as root:
        folder = os.path.join(root, "photos")
        kilobytes = write_jpegs(folder, args.images)
        print(
            f"{args.images} photos of 500x375 (JPEG, {kilobytes:.0f} KB on average), "
            f"{cores} CPU cores, batch {args.batch}"
        )

        # tf.data, as the image_folder source runs it.
        for threads in (1, 0):
            config = paper_config(folder, args.batch, threads)
            config.input.shuffle_buffer = args.images
            train = data.create_dataset(config).train_batches(0)
            label = f"tf.data train, {'1 thread' if threads == 1 else f'{cores} threads'}"
            rate = rates(train, args.batches, args.batch)
            report(f"tfdata_train_{threads or cores}", label, rate)

        # Preparing the same photos (1 worker process, then one per core).
        for workers in (1, cores):
            output = os.path.join(root, f"prepared{workers}")
            wall = time.perf_counter()
            prepare.prepare(
                "image_folder",
                folder,
                output,
                workers=workers,
                shard_size=max(1, args.images // (2 * workers)),
            )
            wall = time.perf_counter() - wall
            images = 2 * args.images  # train and val
            # The workers' CPU time is theirs, not this process's: count cores as busy.
            per_core = images / (wall * workers)
            results[f"prepare_{workers}"] = round(per_core, 1)
            print(
                f"{f'prepare, {workers} worker process(es)':58s} {images / wall:8.1f} img/s "
                f"{per_core:8.1f} img/core-s"
            )

        # Training batches from the prepared records.
        output = os.path.join(root, f"prepared{cores}")
        for threads in (1, 2):
            config = paper_config(output, args.batch, threads, dataset="prepared")
            config.input.resize_size = 0
            dataset = data.create_dataset(config)
            report(
                f"prepared_device_{threads}",
                f"prepared, {threads} thread(s): uint8 256x256 (augment on device)",
                rates(dataset.train_batches(0), args.batches, args.batch),
            )
            config.input.augment_on = "host"
            dataset = data.create_dataset(config)
            report(
                f"prepared_host_{threads}",
                f"prepared, {threads} thread(s): uint8 227x227 (augment on host)",
                rates(dataset.train_batches(0), args.batches, args.batch),
            )
            floats = host_float32(dataset.train_batches(0), config)
            report(
                f"prepared_host_float32_{threads}",
                f"prepared, {threads} thread(s): float32 227x227 (host normalizes)",
                rates(floats, args.batches, args.batch),
            )
            try:
                grain_rate = rates(
                    grain_batches(output, args.batch, threads), args.batches, args.batch
                )
            except ImportError:
                print("grain is not installed: pip install grain to compare")
            else:
                report(f"grain_{threads}", f"grain, {threads} thread(s): uint8 256x256", grain_rate)

    summary = {
        "tfdata_train_img_per_s_per_core": results["tfdata_train_1"],
        "prepared_train_img_per_s_per_core": results["prepared_device_1"],
        "prepare_img_per_s_per_core": results["prepare_1"],
        **results,
        "cores": cores,
        "versions": {"jax": jax.__version__},
    }
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
