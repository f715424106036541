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


def display_name(path: str) -> str:
    """A file name as it can be printed and stored: bytes that are not UTF-8 (file names
    are bytes on POSIX) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def list_image_folder(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Files, labels and sorted class names of ``root/split/<class>/<image>`` (numbered
    class folders sorted by their numbers).

    Raises ``MissingDataError`` or ``DataError`` naming the path when the layout is wrong:
    a missing or unreadable split, a split without class folders, an unreadable or empty
    class folder. File names that are not UTF-8 are kept as the file system gives them.
    """
    directory = os.path.join(root, split)
    if not os.path.isdir(directory):
        raise MissingDataError(
            f"Image folder split {directory!r} does not exist: expected {root}/{{train,val}}/"
            "<class>/<image files>"
        )
    try:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    except OSError as error:
        raise DataError(f"Cannot read the image folder split {directory!r}: {error}") from error
    if classes and all(name.isdigit() for name in classes):
        classes.sort(key=int)  # "0".."999" (ImageNet-V2's folders): by number, not as text
    if not classes:
        raise DataError(f"Image folder split {directory!r} has no class folders")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        try:
            entries = os.listdir(class_dir)
        except OSError as error:
            raise DataError(
                f"Cannot read class folder {display_name(class_dir)!r}: {error}"
            ) from error
        images = sorted(
            os.path.join(class_dir, f) for f in entries if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not images:
            raise DataError(
                f"Class folder {display_name(class_dir)!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        files += images
        labels += [label] * len(images)
    return files, np.asarray(labels, np.int64), classes


def looks_like_image(path: str) -> bool:
    """A cheap check, without decoding, that a file starts as a JPEG or a PNG does.

    Catches non-images and empty files. Bytes after the image's end (phones append data
    there) are accepted, as decoders accept them; a truncated image fails in the decoder,
    which names it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head[:3] == b"\xff\xd8\xff" or head == b"\x89PNG\r\n\x1a\n"


def drop_corrupt(
    files: list[str], labels: np.ndarray, split: str
) -> tuple[list[str], np.ndarray, list[str]]:
    """Removes files that are not images, naming each in a warning; returns them too. A class
    left with no image at all is a ``DataError`` naming its folder."""
    keep = np.asarray([looks_like_image(f) for f in files], bool)
    bad = [f for f, ok in zip(files, keep, strict=True) if not ok]
    for path in bad[:20]:
        logging.warning("Skipping corrupt or non-image file %s", display_name(path))
    emptied = sorted(set(labels.tolist()) - set(labels[keep].tolist()))
    if emptied:
        folder = os.path.dirname(files[int(np.flatnonzero(labels == emptied[0])[0])])
        raise DataError(
            f"Class folder {display_name(folder)!r} of split {split!r} holds no readable image: "
            f"all its {int(np.sum(labels == emptied[0]))} files are corrupt or not images"
        )
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
