"""Prepared records: the paper's 256x256 images in random-access ArrayRecord files.

A prepared folder (written by ``python -m alexnet_jax.data.prepare``) holds, per split
(``train``, ``val``), shards ``<split>-00000-of-00042.array_record``, each record a msgpack
map ``{"image": JPEG or raw uint8 bytes, "label": int, "name": the source file or record}``,
and ``metadata.json``: the class names, the image size, channels and encoding, every shard's
record count and SHA-256, and the files that could not be decoded. TensorFlow-free.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import threading
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from alexnet_jax.data.images import decode_jpeg
from alexnet_jax.errors import DataError, MissingDataError
from alexnet_jax.files import atomic_write

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
EXTENSION = ".array_record"
ENCODINGS = ("jpeg", "raw")
SPLITS = ("train", "val")
WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # tuned for random access


def pack(image: bytes, label: int, name: str) -> bytes:
    return msgpack.packb({"image": image, "label": int(label), "name": name})


def unpack(record: bytes) -> dict[str, Any]:
    return msgpack.unpackb(record)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{EXTENSION}"


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str, records: list[bytes]) -> None:
    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()


def read_all(path: str) -> list[dict[str, Any]]:
    """Every record of a shard, unpacked, in order (for inspection and tests)."""
    reader = ArrayRecordReader(path)
    try:
        return [unpack(record) for record in reader.read_all()]
    finally:
        reader.close()


def count_records(path: str) -> int:
    reader = ArrayRecordReader(path, READER_OPTIONS)
    try:
        return reader.num_records()
    finally:
        reader.close()


@dataclasses.dataclass
class Metadata:
    """``metadata.json`` of a prepared folder."""

    source: str  # the data set it came from: an image folder's path or a TFDS name
    size: int  # images are size x size
    channels: int
    encoding: str  # jpeg | raw
    class_names: list[str]
    splits: dict[str, dict[str, Any]]  # split -> {num_examples, shards: [...], failed: [...]}
    quality: int = 95
    version: int = FORMAT_VERSION

    def save(self, directory: str) -> None:
        atomic_write(
            os.path.join(directory, METADATA_FILE),
            json.dumps(dataclasses.asdict(self), indent=1) + "\n",
        )

    @classmethod
    def load(cls, directory: str) -> Metadata:
        path = os.path.join(directory, METADATA_FILE)
        if not os.path.isfile(path):
            raise MissingDataError(
                f"{directory!r} holds no prepared records ({METADATA_FILE} is missing): "
                "prepare them with python -m alexnet_jax.data.prepare"
            )
        try:
            with open(path) as f:
                fields = json.load(f)
            metadata = cls(**fields)
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as error:
            raise DataError(
                f"{path} is not a readable prepared-records metadata file: {error}"
            ) from error
        if metadata.version != FORMAT_VERSION:
            raise DataError(
                f"{path} is format version {metadata.version}; this version reads "
                f"{FORMAT_VERSION}: prepare the records again"
            )
        return metadata


class SplitReader:
    """Random access to one split's records, across its shards; safe to use from threads
    (each thread opens its own readers)."""

    def __init__(self, directory: str, metadata: Metadata, split: str):
        if split not in metadata.splits:
            raise MissingDataError(f"{directory!r} has no prepared split {split!r}")
        info = metadata.splits[split]
        self.paths = [os.path.join(directory, shard["file"]) for shard in info["shards"]]
        for path, shard in zip(self.paths, info["shards"], strict=True):
            if not os.path.isfile(path):
                raise MissingDataError(f"Prepared shard {path!r} is missing")
            if os.path.getsize(path) != shard["bytes"]:
                raise DataError(
                    f"Prepared shard {path!r} has {os.path.getsize(path)} bytes, metadata.json "
                    f"says {shard['bytes']}: it was changed or cut short; prepare it again"
                )
        self.starts = list(np.cumsum([0] + [s["num_examples"] for s in info["shards"]]))
        self.size = int(self.starts[-1])
        self.metadata = metadata
        self._local = threading.local()

    def __len__(self) -> int:
        return self.size

    def _reader(self, shard: int) -> ArrayRecordReader:
        readers = getattr(self._local, "readers", None)
        if readers is None:
            readers = self._local.readers = {}
        if shard not in readers:
            readers[shard] = ArrayRecordReader(self.paths[shard], READER_OPTIONS)
        return readers[shard]

    def read(self, index: int) -> dict[str, Any]:
        """Record ``index`` of the split, unpacked: ``{"image": bytes, "label", "name"}``."""
        shard = bisect.bisect_right(self.starts, index) - 1
        return unpack(self._reader(shard).read([index - self.starts[shard]])[0])

    def image(self, record: dict[str, Any]) -> np.ndarray:
        """A record's image as uint8 (size, size, channels)."""
        m = self.metadata
        if m.encoding == "raw":
            return np.frombuffer(record["image"], np.uint8).reshape(m.size, m.size, m.channels)
        return decode_jpeg(record["image"], m.channels).reshape(m.size, m.size, m.channels)
