"""Where metrics go: ``WORKDIR/metrics.jsonl``, TensorBoard events and the console.

Only process 0 writes. Each record is one JSON object per line with at least ``step``,
``epoch``, ``split`` ("train" or "eval"), ``loss``, ``top1``, ``top5`` (fractions), ``lr``
and ``img_per_s``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter  # writes events without TensorFlow


class MetricsWriter:
    def __init__(self, workdir: str, enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tensorboard = None
        if self.enabled:
            self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _plain(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, float | int):
                self._tensorboard.add_scalar(f"{record['split']}/{key}", value, record["step"])
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of ``WORKDIR/metrics.jsonl``, in order; none if there is no such file."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | jax.Array | np.generic):
        value = np.asarray(value).item()
    if isinstance(value, float):
        return round(value, 7)
    return value
