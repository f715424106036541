"""Image folders: ``root/{train,val}/<class>/<image>``, listed and checked without TensorFlow.

Classes are the sorted folder names; files that are not whole JPEGs or PNGs are dropped
and named when the folder is listed (the tf.data pipeline names what later fails to
decode).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import logging

from alexnet_jax.errors import DataError, MissingDataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "val")


def list_image_folder(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Files, labels and sorted class names of ``root/split/<class>/<image>``.

    Raises ``MissingDataError`` or ``DataError`` naming the path when the layout is wrong:
    a missing split, a split without class folders, an empty class folder.
    """
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        raise MissingDataError(
            f"Image folder split {directory!r} does not exist: expected {root}/{{train,val}}/"
            "<class>/<image files>"
        )
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise DataError(f"Image folder split {directory!r} has no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        images = sorted(
            os.path.join(class_dir, f)
            for f in os.listdir(class_dir)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise DataError(
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


@dataclasses.dataclass
class FolderSplit:
    """One split of an image folder, corrupt files removed."""

    files: list[str]
    labels: np.ndarray
    dropped: list[str]  # files that were not whole images (named when listed)


def read_image_folder(root: str) -> tuple[list[str], dict[str, FolderSplit]]:
    """The class names and both splits (``"train"``, ``"val"``), listed and checked; the
    class folders of val must be those of train."""
    train_files, train_labels, classes = list_image_folder(root, "train")
    eval_files, eval_labels, eval_classes = list_image_folder(root, "val")
    if eval_classes != classes:
        raise DataError(
            f"The class folders of {root}/val differ from those of train: "
            f"{sorted(set(eval_classes) ^ set(classes))}"
        )
    splits = {
        "train": FolderSplit(*drop_corrupt(train_files, train_labels, "train")),
        "val": FolderSplit(*drop_corrupt(eval_files, eval_labels, "val")),
    }
    return classes, splits
