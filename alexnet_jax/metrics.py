"""Where metrics go: ``WORKDIR/metrics.jsonl``, TensorBoard events and the console.

Only process 0 writes. Each record is one JSON object per line with at least ``step``,
``epoch``, ``split`` ("train" or "eval"), ``loss``, ``top1``, ``top5`` (fractions), ``lr``
and ``img_per_s``. Each line is written with one call and flushed; a run killed mid-write
can leave a torn last line, which readers skip with a warning.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import numpy as np
from absl import logging


def summary_writer(logdir: str):
    """tensorboardX's ``SummaryWriter`` for ``logdir`` (TensorBoard events without TensorFlow),
    imported without PyTorch.

    tensorboardX imports ``torch`` whenever it is installed, only to accept its tensors; we
    write floats and numpy arrays. In a JAX process that import costs seconds at every start
    and, on a GPU machine, loads PyTorch's CUDA libraries next to JAX's. So where no one has
    imported ``torch`` yet, tensorboardX's first import sees it as missing (a ``None`` in
    ``sys.modules`` makes ``import torch`` raise ``ImportError``, which tensorboardX expects),
    and the entry is removed at once: a later ``import torch`` elsewhere works as usual. A
    tensorboardX that cannot be imported that way (one that needs torch to import) is imported
    the ordinary way."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX  # noqa: F401
        except (ImportError, ValueError):
            pass  # the import below, with torch, says what is wrong if anything still is
        finally:
            sys.modules.pop("torch", None)
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir)


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tensorboard = None
        if self.enabled:
            self._tensorboard = summary_writer(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            if f.tell() > 0 and not _ends_with_newline(self.path):
                f.write("\n")  # after a torn last line: start a fresh one
            f.write(json.dumps(record) + "\n")
            f.flush()
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, float | int):
                self._tensorboard.add_scalar(f"{record['split']}/{key}", value, record["step"])
        self._tensorboard.flush()

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """TensorBoard images, ``{tag: (H, W, C) floats in [0, 1]}``, at ``step``."""
        if not self.enabled:
            return
        for tag, image in images.items():
            self._tensorboard.add_image(tag, np.clip(image, 0, 1), step, dataformats="HWC")
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``WORKDIR/metrics.jsonl``, in order; none if there is no such file.

    A line that is not a JSON object (a write cut short by a crash) is skipped with a
    warning naming the file and the line.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    records = []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                logging.warning("%s, line %d: not a whole record (a write cut short?); "
                                "skipped", path, number)  # fmt: skip
                continue
            records.append(record)
    return records


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        value = np.asarray(value).item()
    if isinstance(value, float):
        return float(f"{value:.7g}")  # 7 significant digits: a 1e-9 learning rate stays
    return value
