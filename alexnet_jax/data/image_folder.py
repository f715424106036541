"""Image folders: ``root/{train,val}/<class>/<image>``, listed and checked without TensorFlow.

Classes are the sorted folder names, images the files with an image extension below each
(subfolders included). Files that do not start as an image does are dropped and named when
the folder is listed (the tf.data pipeline names what later fails to decode).
"""

from __future__ import annotations

import collections
import dataclasses
import os

import numpy as np
from absl import logging

from alexnet_jax.errors import DataError, MissingDataError

# The formats both decoders read: TensorFlow's ``decode_image`` (training) and Pillow
# (prepared records, prediction). Matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "val")


def display_name(path: str) -> str:
    """A file name as it can be printed and stored: bytes that are not UTF-8 (file names
    are bytes on POSIX) become U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def is_hidden(name: str) -> bool:
    """Names starting with a dot: ``.ipynb_checkpoints`` (Jupyter), ``.DS_Store`` and the
    ``._*`` files macOS writes beside copied ones, ``.git``. Never classes or images."""
    return name.startswith(".")


def has_image_extension(name: str) -> bool:
    """Whether a file name ends in one of ``IMAGE_EXTENSIONS``, in any case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_class(class_dir: str, ignored: collections.Counter) -> list[str]:
    """The image files under ``class_dir`` and its subfolders (links followed, each folder
    once), hidden entries left out, sorted. Other files are counted in ``ignored`` by
    extension. An unreadable folder is a ``DataError`` naming it."""
    images, pending, seen = [], [class_dir], set()
    while pending:
        folder = pending.pop()
        try:
            real = os.path.realpath(folder)
            if real in seen:  # a link back up the tree, or two links to one folder
                continue
            seen.add(real)
            with os.scandir(folder) as entries:
                for entry in entries:
                    if is_hidden(entry.name):
                        continue
                    if entry.is_dir():
                        pending.append(entry.path)
                    elif has_image_extension(entry.name):
                        images.append(entry.path)
                    else:
                        ignored[os.path.splitext(entry.name)[1].lower() or entry.name] += 1
        except OSError as error:
            raise DataError(
                f"Cannot read class folder {display_name(folder)!r}: {error}"
            ) from error
    return sorted(images)


def list_image_folder(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Files, labels and sorted class names of ``root/split/<class>/<image>`` (numbered
    class folders sorted by their numbers).

    A class's images are the files with an image extension (``IMAGE_EXTENSIONS``) in its
    folder and in any folder below it, as torchvision's ``ImageFolder`` and Keras read them.
    Hidden folders and files (``is_hidden``) are neither classes nor images; other files are
    left out and counted in one warning.

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
        with os.scandir(directory) as entries:
            classes = sorted(e.name for e in entries if e.is_dir() and not is_hidden(e.name))
    except OSError as error:
        raise DataError(f"Cannot read the image folder split {directory!r}: {error}") from error
    if classes and all(name.isdigit() for name in classes):
        classes.sort(key=int)  # "0".."999" (ImageNet-V2's folders): by number, not as text
    if not classes:
        raise DataError(f"Image folder split {directory!r} has no class folders")
    files, labels, ignored = [], [], collections.Counter()
    for label, name in enumerate(classes):
        class_dir = os.path.join(directory, name)
        images = _walk_class(class_dir, ignored)
        if not images:
            raise DataError(
                f"Class folder {display_name(class_dir)!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}), in it or below it"
            )
        files += images
        labels += [label] * len(images)
    if ignored:
        count = sum(ignored.values())
        logging.warning(
            "Image folder %s: left out %d %s without an image extension (%s): %s",
            display_name(directory),
            count,
            "file" if count == 1 else "files",
            ", ".join(IMAGE_EXTENSIONS),
            ", ".join(f"{n} {ext}" for ext, n in ignored.most_common(10)),
        )
    return files, np.asarray(labels, np.int64), classes


def looks_like_image(path: str) -> bool:
    """A cheap check, without decoding, that a file starts as a JPEG, PNG, GIF, BMP or WebP
    does.

    Catches non-images and empty files. Bytes after the image's end (phones append data
    there) are accepted, as decoders accept them; a truncated image fails in the decoder,
    which names it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return (
        head[:3] == b"\xff\xd8\xff"
        or head[:8] == b"\x89PNG\r\n\x1a\n"
        or head[:6] in (b"GIF87a", b"GIF89a")
        or head[:2] == b"BM"
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


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
