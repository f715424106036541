"""The paper's preparation, done once: every image's central square resized to 256x256, in
random-access record files.

    python -m alexnet_jax.data.prepare --source image_folder --data_dir /data/photos \
        --output /data/photos_256
    python -m alexnet_jax.data.prepare --source imagenet2012 \
        --data_dir ~/tensorflow_datasets --output /data/imagenet_256

Section 2 of the paper: "we down-sampled the images to a fixed resolution of 256 x 256 ...
rescaled the image such that the shorter side was of length 256, and then cropped out the
central 256 x 256 patch". Sources: an image folder (``root/{train,val}/<class>/<image>``)
or a prepared TFDS data set (its train split and its evaluation split, written as
``val``). The output (``alexnet_jax.data.records``) trains with ``config.dataset=prepared``
and ``config.data_dir=OUTPUT``.

Shards are written in parallel over ``--workers`` processes. Each shard is written to a
temporary file, read back and counted, checksummed, then renamed into place with a small
JSON beside it; a rerun after an interruption keeps the finished shards and writes the
rest. Files that cannot be decoded are named, counted and left out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

from absl import logging
from tqdm import tqdm

from alexnet_jax.data.dataset import tfds_eval_split
from alexnet_jax.data.image_folder import SPLITS as FOLDER_SPLITS
from alexnet_jax.data.image_folder import display_name, list_image_folder
from alexnet_jax.data.images import encode_jpeg, paper_square
from alexnet_jax.data.records import (
    ENCODINGS,
    Metadata,
    count_records,
    pack,
    sha256,
    shard_name,
    write_shard,
)
from alexnet_jax.errors import (
    ConfigError,
    DataError,
    MissingDataError,
    UserError,
    one_line_errors,
    reason,
)
from alexnet_jax.files import atomic_write

PLAN_FILE = "plan.json"


@dataclasses.dataclass
class Options:
    size: int = 256
    channels: int = 3
    encoding: str = "jpeg"
    quality: int = 95

    def check(self) -> None:
        if self.size < 1:
            raise ConfigError(f"--size={self.size}: must be positive")
        if self.channels not in (1, 3):
            raise ConfigError(f"--channels={self.channels}: 1 or 3")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"--encoding={self.encoding!r}: choose one of {ENCODINGS}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality={self.quality}: 1 to 100")


@dataclasses.dataclass
class ShardTask:
    """One shard to write: its examples are files (image folders) or a TFDS range."""

    output: str
    split: str
    index: int
    count: int  # shards in the split
    options: Options
    files: list[str] | None = None  # image folder: the files, with their labels
    labels: list[int] | None = None
    names: list[str] | None = None
    tfds: dict[str, Any] | None = None  # TFDS: {"name", "data_dir", "split", "start", "end"}

    @property
    def file(self) -> str:
        return shard_name(self.split, self.index, self.count)

    @property
    def sidecar(self) -> str:
        return os.path.join(self.output, self.file + ".json")


# --- one shard, in a worker process ----------------------------------------------------------


def encode(pixels, options: Options) -> bytes:
    if options.encoding == "raw":
        return pixels.tobytes()
    return encode_jpeg(pixels, options.quality)


def folder_examples(task: ShardTask):
    """(encoded image source, label, name) of an image folder shard: the files themselves."""
    yield from zip(task.files, task.labels, task.names, strict=True)


def tfds_examples(task: ShardTask):
    """(encoded image bytes, label, name) of a TFDS shard: its range of the split."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")
    spec = task.tfds
    builder = tfds.builder(spec["name"], data_dir=spec["data_dir"] or None)
    key = "file_name" if "file_name" in builder.info.features else None
    ds = builder.as_dataset(
        split=f"{spec['split']}[{spec['start']}:{spec['end']}]",
        decoders={"image": tfds.decode.SkipDecoding()},
        shuffle_files=False,
        read_config=tfds.ReadConfig(add_tfds_id=True),
    )
    examples = ds.as_numpy_iterator()
    while True:
        try:
            example = next(examples, None)
        except tf.errors.OpError as error:  # a records file cut short or corrupt
            raise DataError(
                f"Cannot read {spec['name']} {spec['split']}[{spec['start']}:{spec['end']}] "
                f"from {builder.data_dir} ({reason(error)}): its files are damaged; prepare "
                "the TFDS data set again"
            ) from error
        if example is None:
            return
        name = example[key] if key else example["tfds_id"]
        yield example["image"], int(example["label"]), name.decode(errors="replace")


def prepare_shard(task: ShardTask) -> dict[str, Any]:
    """Writes one shard and its sidecar JSON; returns the sidecar's content."""
    examples = folder_examples(task) if task.files is not None else tfds_examples(task)
    records, failed = [], []
    for source, label, name in examples:
        try:
            pixels = paper_square(source, task.options.size, task.options.channels, name)
        except DataError as error:
            failed.append({"name": name, "error": str(error)})
            continue
        records.append(pack(encode(pixels, task.options), label, name))
    path = os.path.join(task.output, task.file)
    temporary = path + ".tmp"
    write_shard(temporary, records)
    written = count_records(temporary)  # read back: every record there
    if written != len(records):
        raise DataError(f"{temporary}: wrote {len(records)} records, read back {written}")
    summary = {
        "file": task.file,
        "num_examples": written,
        "bytes": os.path.getsize(temporary),
        "sha256": sha256(temporary),
        "failed": failed,
    }
    os.replace(temporary, path)
    atomic_write(task.sidecar, json.dumps(summary) + "\n")  # the shard counts as done
    return summary


def finished(task: ShardTask) -> dict[str, Any] | None:
    """The sidecar of a shard an earlier run finished (its file still whole), or None."""
    path = os.path.join(task.output, task.file)
    if not (os.path.isfile(task.sidecar) and os.path.isfile(path)):
        return None
    try:
        with open(task.sidecar) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return summary if os.path.getsize(path) == summary.get("bytes") else None


# --- planning --------------------------------------------------------------------------------


def plan_image_folder(root: str, output: str, options: Options, shard_size: int):
    """Shard tasks of both splits of an image folder, and its class names."""
    tasks, classes = [], None
    for split in FOLDER_SPLITS:
        files, labels, split_classes = list_image_folder(root, split)
        if classes is not None and split_classes != classes:
            raise DataError(
                f"The class folders of {root}/{split} differ from those of train: "
                f"{sorted(set(split_classes) ^ set(classes))}"
            )
        classes = split_classes
        names = [display_name(os.path.relpath(f, root)) for f in files]
        count = max(1, -(-len(files) // shard_size))
        for i in range(count):
            part = slice(i * shard_size, (i + 1) * shard_size)
            tasks.append(
                ShardTask(
                    output,
                    split,
                    i,
                    count,
                    options,
                    files[part],
                    [int(y) for y in labels[part]],
                    names[part],
                )
            )
    return tasks, classes


def plan_tfds(name: str, data_dir: str, output: str, options: Options, shard_size: int):
    """Shard tasks of a prepared TFDS data set's train and evaluation splits, and its class
    names."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir or None)
    try:
        builder.as_dataset(split="train[:1]")
    except Exception as error:  # noqa: BLE001 - TFDS raises several types for missing data
        raise MissingDataError(
            f"TFDS data set {name!r} is not prepared in {data_dir or 'the default data_dir'}: "
            "prepare it with TFDS first (python main.py downloads those TFDS can download)"
        ) from error
    label = builder.info.features["label"]
    classes = list(label.names) if hasattr(label, "names") else []
    tasks = []
    for split, stored in (("train", "train"), (tfds_eval_split(name), "val")):
        size = _tfds_split_size(builder, split)
        count = max(1, -(-size // shard_size))
        for i in range(count):
            spec = {
                "name": name,
                "data_dir": data_dir,
                "split": split,
                "start": i * shard_size,
                "end": min((i + 1) * shard_size, size),
            }
            tasks.append(ShardTask(output, stored, i, count, options, tfds=spec))
    return tasks, classes


def _tfds_split_size(builder, split: str) -> int:
    if builder.info.splits:
        return builder.info.splits[split].num_examples
    return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))


def fingerprint(tasks: list[ShardTask], classes: list[str], source: str) -> str:
    """What the plan depends on: an earlier run's shards are kept only if this matches."""
    digest = hashlib.sha256(json.dumps([source, classes]).encode())
    for t in tasks:
        digest.update(
            json.dumps([t.file, dataclasses.asdict(t.options), t.names, t.labels, t.tfds]).encode()
        )
    return digest.hexdigest()


# --- the command -----------------------------------------------------------------------------


def prepare(
    source: str,
    data_dir: str,
    output: str,
    options: Options | None = None,
    workers: int | None = None,
    shard_size: int = 1024,
    shard_fn: Callable[[ShardTask], dict[str, Any]] = prepare_shard,
) -> Metadata:
    """Prepares ``source`` (``image_folder`` or a TFDS name) from ``data_dir`` into ``output``.

    ``workers`` processes (default: every core; 0 runs in this process). Returns the
    metadata written to ``output/metadata.json``.
    """
    options = options or Options()
    options.check()
    if shard_size < 1:
        raise ConfigError(f"--shard_size={shard_size}: must be positive")
    if source == "image_folder":
        if not os.path.isdir(data_dir):
            raise MissingDataError(f"--data_dir={data_dir!r} is not a directory")
        tasks, classes = plan_image_folder(data_dir, output, options, shard_size)
        name = os.path.abspath(data_dir)
    else:
        tasks, classes = plan_tfds(source, data_dir, output, options, shard_size)
        name = source
    os.makedirs(output, exist_ok=True)
    plan = {"fingerprint": fingerprint(tasks, classes, name)}
    plan_path = os.path.join(output, PLAN_FILE)
    if os.path.isfile(plan_path):
        with open(plan_path) as f:
            if json.load(f) != plan:
                raise UserError(
                    f"{output!r} holds shards of another preparation (other files, classes or "
                    "options): choose an empty --output, or delete it"
                )
    atomic_write(plan_path, json.dumps(plan) + "\n")

    done = {t.file: s for t in tasks if (s := finished(t)) is not None}
    todo = [t for t in tasks if t.file not in done]
    if done:
        logging.info("Keeping %d shards an earlier run finished; writing %d", len(done), len(todo))
    start = time.perf_counter()
    progress = tqdm(total=len(tasks), initial=len(done), unit="shard", disable=None)
    try:
        for summary in _run(shard_fn, todo, workers):
            done[summary["file"]] = summary
            progress.update(1)
    finally:
        progress.close()
    seconds = time.perf_counter() - start

    splits = {}
    for split in sorted({t.split for t in tasks}, key=("train", "val").index):
        shards = [done[t.file] for t in tasks if t.split == split]
        failed = [f for s in shards for f in s["failed"]]
        splits[split] = {
            "num_examples": sum(s["num_examples"] for s in shards),
            "shards": [
                {k: s[k] for k in ("file", "num_examples", "bytes", "sha256")} for s in shards
            ],
            "failed": failed,
        }
        for failure in failed[:20]:
            logging.warning("Left out %s", failure["error"])
        if failed:
            logging.warning(
                "%s: %d files could not be decoded and were left out%s",
                split,
                len(failed),
                " (the first 20 named above)" if len(failed) > 20 else "",
            )
    metadata = Metadata(
        source=name,
        size=options.size,
        channels=options.channels,
        encoding=options.encoding,
        quality=options.quality,
        class_names=classes,
        splits=splits,
    )
    verify(output, metadata)
    metadata.save(output)
    written = sum(s["num_examples"] for t in todo for s in [done[t.file]])
    if todo and seconds > 0:
        logging.info(
            "Prepared %d images in %.1f s (%.0f img/s)", written, seconds, written / seconds
        )
    return metadata


def _run(shard_fn, tasks: list[ShardTask], workers: int | None):
    """Runs ``shard_fn`` over ``tasks``: in this process (``workers=0``) or in a pool of
    fresh processes (spawned: TensorFlow and threads do not survive a fork)."""
    if workers == 0 or not tasks:
        yield from map(shard_fn, tasks)
        return
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(shard_fn, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def verify(output: str, metadata: Metadata) -> None:
    """Every shard is there, whole (its size and record count as recorded)."""
    for split, info in metadata.splits.items():
        for shard in info["shards"]:
            path = os.path.join(output, shard["file"])
            if os.path.getsize(path) != shard["bytes"]:
                raise DataError(f"{path} changed size while it was being prepared")
            if count_records(path) != shard["num_examples"]:
                raise DataError(
                    f"{path} does not hold the {shard['num_examples']} records it was written with"
                )
        if info["num_examples"] == 0:
            raise DataError(f"No image of split {split!r} could be decoded: nothing to train on")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Prepares images as the paper did (central square, 256x256) into "
        "random-access ArrayRecord files for config.dataset=prepared."
    )
    parser.add_argument(
        "--source", required=True, help="image_folder, or a TFDS data set name (e.g. imagenet2012)"
    )
    parser.add_argument(
        "--data_dir", default="", help="the image folder's root, or the TFDS data_dir"
    )
    parser.add_argument("--output", required=True, help="folder for the records")
    parser.add_argument("--size", type=int, default=256, help="side of the stored images")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3])
    parser.add_argument(
        "--encoding",
        default="jpeg",
        choices=list(ENCODINGS),
        help="jpeg (about 30 KB an image) or raw (196 KB, no decoding)",
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: every core; 0: this process)"
    )
    parser.add_argument("--shard_size", type=int, default=1024, help="images per shard")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.INFO)
    options = Options(args.size, args.channels, args.encoding, args.quality)
    metadata = prepare(
        args.source, args.data_dir, args.output, options, args.workers, args.shard_size
    )
    print(
        json.dumps(
            {
                "output": args.output,
                "classes": len(metadata.class_names),
                **{s: i["num_examples"] for s, i in metadata.splits.items()},
                "failed": sum(len(i["failed"]) for i in metadata.splits.values()),
            }
        )
    )


if __name__ == "__main__":
    one_line_errors(main)
