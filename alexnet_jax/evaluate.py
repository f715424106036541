"""Evaluation and prediction, with one way of counting.

``evaluate_batches`` runs the eval step over a pass of batches and counts the outcome in a
``Tally`` (a confusion matrix, top-5 hits and summed loss, over every process): the
training loop's evaluations and ``--mode=eval`` both use it.

    python main.py --mode=eval --workdir W [--checkpoint=best|latest|STEP]
    python main.py --mode=predict --workdir W --images a.jpg b.png photos/

Both read the run's ``WORKDIR/config.json`` unless ``--config`` is given. Evaluation runs
the center crop and, for sources whose images are larger than the crop (TFDS, image
folders), the 10 crops (four corners, center and their mirrors, softmaxes averaged); it
appends one ``metrics.jsonl`` record per pass (``"split": "eval_checkpoint"``) and writes
``per_class_accuracy_<crops>.csv`` and ``confusion_matrix_<crops>.png`` into the workdir.
Prediction (``iter_predictions``) classifies files and folders of them an evaluation batch
at a time.
"""

from __future__ import annotations

import copy
import csv
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from alexnet_jax import data, normalization, steps
from alexnet_jax.data.image_folder import IMAGE_EXTENSIONS, has_image_extension, is_hidden
from alexnet_jax.errors import DataError
from alexnet_jax.metrics import MetricsWriter
from alexnet_jax.run_files import class_names, restore_state

# --- counting --------------------------------------------------------------------------------


def local_values(x: Any) -> np.ndarray:
    """This process's part of a pmap output (``(local devices, ...)``), as numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])
    return np.asarray(x)


class Tally:
    """Counts of an evaluation: a confusion matrix (true x top-1 class), top-5 hits per true
    class, the summed loss. ``add`` takes the eval step's per-example outputs."""

    def __init__(self, num_classes: int):
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.top5_hits = np.zeros(num_classes, np.int64)
        self.loss_sum = 0.0
        self.real = None  # ReaL: [top-1 in the image's labels, images with labels], if any

    def add(self, out: dict[str, Any]) -> None:
        values = {k: local_values(v) for k, v in out.items()}
        keep = values["mask"].reshape(-1) > 0
        labels = values["label"].reshape(-1)[keep]
        top5 = values["top5"].reshape(-1, values["top5"].shape[-1])[keep]
        np.add.at(self.confusion, (labels, top5[:, 0]), 1)
        np.add.at(self.top5_hits, labels, (top5 == labels[:, None]).any(-1))
        self.loss_sum += float(values["loss"].reshape(-1)[keep].astype(np.float64).sum())
        if "real_hit" in values:
            valid = keep & (values["real_valid"].reshape(-1) > 0)
            hits = int((values["real_hit"].reshape(-1)[valid] > 0).sum())
            previous = self.real if self.real is not None else np.zeros(2, np.int64)
            self.real = previous + np.asarray([hits, int(valid.sum())])

    def all_processes(self) -> Tally:
        """The tally summed over every process (each counted its own shard)."""
        if jax.process_count() == 1:
            return self
        total = Tally(len(self.top5_hits))
        real = self.real if self.real is not None else np.zeros(2, np.int64)
        total.confusion, total.top5_hits, loss, real = (
            np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)
            for x in (self.confusion, self.top5_hits, np.asarray(self.loss_sum), real)
        )
        total.loss_sum = float(loss)
        total.real = real if self.real is not None else None
        return total

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def summary(self) -> dict[str, float]:
        """Mean loss, top-1 and top-5 over the counted examples (fractions)."""
        count = max(self.count, 1)
        summary = {
            "loss": self.loss_sum / count,
            "top1": float(np.trace(self.confusion)) / count,
            "top5": float(self.top5_hits.sum()) / count,
        }
        if self.real is not None:  # ReaL accuracy, over the images that have labels
            summary["real_top1"] = float(self.real[0]) / max(int(self.real[1]), 1)
            summary["real_count"] = int(self.real[1])
        return summary


def evaluate_batches(
    p_eval_step: Callable,
    state: steps.TrainState,
    batches: Iterator,
    num_classes: int,
    interrupted: Callable[[], bool] | None = None,
) -> Tally | None:
    """One pass of ``p_eval_step`` (``steps.make_eval_step``) over ``batches``, counted over
    every process. A pass that counts no example at all is a ``DataError``. ``interrupted``
    (single-process: ``StopRequest.requested``), asked before each batch, abandons the pass
    when it says so: the result is then None."""
    tally = Tally(num_classes)
    for batch in batches:
        if interrupted is not None and interrupted():
            return None
        tally.add(p_eval_step(state, batch))
    tally = tally.all_processes()
    if tally.count == 0:  # a top-1 of 0.0 would drive the schedule and the best checkpoint
        raise DataError(
            "The evaluation counted nothing: no example of the evaluation could be read (its "
            "images all failed to decode, or the split is empty; see the warnings above)"
        )
    return tally


# --- a checkpoint's evaluation -----------------------------------------------------------------


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, which: str | int = "best"
) -> list[dict[str, Any]]:
    """Top-1/top-5 of a checkpoint with the center crop and (where the source has crops) the
    10 crops; writes per-class CSVs, confusion-matrix PNGs and ``metrics.jsonl`` records."""
    state, step = restore_state(config, workdir, which)
    state = steps.inference_state(state, config)  # once for both passes
    names = class_names(workdir, config.num_classes)
    passes = [_with_crops(config, 1)]
    if passes[0][1].has_crops:
        passes.append(_with_crops(config, 10))
    else:
        logging.info("%s images are already the model's size: center crop only", config.dataset)
    results = []
    writer = MetricsWriter(workdir)
    try:
        for run, dataset in passes:
            mean_image = None
            if run.input.normalization == "mean_image":
                mean_image = normalization.load_or_compute_mean_image(
                    run,
                    workdir,
                    dataset.train_batches,
                    dataset.image_shape,
                    dataset.device_augment,
                )
            normalize = normalization.make_normalizer(run.input, mean_image)
            p_eval_step = steps.make_eval_step(run, normalize)
            tally = evaluate_batches(p_eval_step, state, dataset.eval_batches(), run.num_classes)
            crops = run.input.eval_crops
            record = {"step": step, "split": "eval_checkpoint", "crops": crops,
                      "count": tally.count, **tally.summary()}  # fmt: skip
            writer.write(record)
            tag = "center" if crops == 1 else "10crop"
            if jax.process_index() == 0:
                write_per_class_csv(
                    os.path.join(workdir, f"per_class_accuracy_{tag}.csv"), names, tally
                )
                plot_confusion(
                    os.path.join(workdir, f"confusion_matrix_{tag}.png"),
                    tally.confusion,
                    names,
                    record,
                )
            logging.info("checkpoint %d, %s: %s", step, tag, record)
            results.append(record)
    finally:
        writer.close()
    return results


def _with_crops(config: ml_collections.ConfigDict, crops: int):
    """The config evaluated with ``crops`` crops per image, and its data set."""
    run = copy.deepcopy(config)
    run.input.eval_crops = crops
    return run, data.create_dataset(run)


def write_per_class_csv(path: str, names: Sequence[str], tally: Tally) -> None:
    counts = tally.confusion.sum(axis=1)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["class", "name", "count", "top1", "top5"])
        for c, name in enumerate(names):
            n = int(counts[c])
            top1 = tally.confusion[c, c] / n if n else float("nan")
            top5 = tally.top5_hits[c] / n if n else float("nan")
            out.writerow([c, name, n, f"{top1:.6f}", f"{top5:.6f}"])


def plot_confusion(path: str, confusion: np.ndarray, names: Sequence[str], record: dict):
    """Rows (true classes) normalized to 1; class names on the axes up to 30 classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = 6 if len(names) <= 30 else 10
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rows, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=90)
        ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"step {record['step']}, {record['crops']} crop(s): top-1 {record['top1']:.4f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- prediction on image files -----------------------------------------------------------------


def image_paths(paths: Sequence[str]) -> list[str]:
    """The files to predict: each path as given, a folder replaced by its image files
    (``image_folder.IMAGE_EXTENSIONS``, hidden files left out, sorted; not its subfolders). A
    folder with none is a ``DataError`` naming it."""
    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(
            os.path.join(path, name)
            for name in os.listdir(path)
            if has_image_extension(name)
            and not is_hidden(name)
            and os.path.isfile(os.path.join(path, name))
        )
        if not found:
            raise DataError(
                f"Folder {path!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                "name other files one by one"
            )
        files += found
    return files


def predict_files(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: Sequence[str],
    which: str | int = "best",
    top_k: int = 5,
) -> list[dict[str, Any]]:
    """Each file's ``top_k`` classes with probabilities: ``[{"path", "step", "top": [(name,
    p)]}]`` (``iter_predictions``, all at once)."""
    return list(iter_predictions(config, workdir, paths, which, top_k))


def iter_predictions(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: Sequence[str],
    which: str | int = "best",
    top_k: int = 5,
) -> Iterator[dict[str, Any]]:
    """Each file's ``top_k`` classes with probabilities, ``{"path", "step", "top": [(name,
    p)]}``, in the order given, folders expanded (``image_paths``).

    Files are read and classified ``config.eval_batch_size`` at a time (the last batch
    padded, so one program serves them all): memory stays that of one batch however many
    files there are, and the first results come before the last files are read. The first
    batch is read before the checkpoint, so a bad file there fails fast; an unreadable file
    is a ``DataError`` naming it."""
    paths = image_paths(paths)
    if not paths:
        raise DataError("No images given: --images a.jpg b.png ... (or a folder of them)")
    size = min(config.eval_batch_size, len(paths))
    images = np.stack([data.load_image(path, config) for path in paths[:size]])
    state, step = restore_state(config, workdir, which)
    names = class_names(workdir, config.num_classes)
    mean_image = None
    if config.input.normalization == "mean_image":
        mean_image = normalization.load_mean_image(
            normalization.mean_image_path(config, workdir), images.shape[1:]
        )
    normalize = normalization.make_normalizer(config.input, mean_image)
    probabilities = jax.jit(
        functools.partial(steps.predict_probabilities, normalize=normalize),
        compiler_options=steps.compiler_options(config) or None,
    )
    k = min(top_k, config.num_classes)
    for start in range(0, len(paths), size):
        chunk = paths[start : start + size]
        if start:
            images = np.stack([data.load_image(path, config) for path in chunk])
        if len(chunk) < size:  # the last batch, padded with blank images
            images = np.concatenate([images, np.zeros((size - len(chunk),) + images.shape[1:],
                                                      images.dtype)])  # fmt: skip
        probs = np.asarray(probabilities(state, jnp.asarray(images)))
        for path, p in zip(chunk, probs[: len(chunk)], strict=True):
            order = np.argsort(-p)[:k]
            yield {"path": path, "step": step,
                   "top": [(names[c], float(p[c])) for c in order]}  # fmt: skip
