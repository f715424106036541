"""After training: evaluate a checkpoint, predict image files, start from earlier weights.

    python main.py --mode=eval --workdir W [--checkpoint=best|latest|STEP]
    python main.py --mode=predict --workdir W --images a.jpg b.png

Both read the run's ``WORKDIR/config.json`` unless ``--config`` is given. Evaluation runs
the centre crop and, for TFDS and image-folder sources, the 10 crops (four corners, centre
and their mirrors, softmaxes averaged); it appends one ``metrics.jsonl`` record per pass
(``"split": "eval_checkpoint"``) and writes ``per_class_accuracy_<crops>.csv`` and
``confusion_matrix_<crops>.png`` into the workdir.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from alexnet_jax import checkpointing, input_pipeline, train
from alexnet_jax.metrics import MetricsWriter, read_metrics

CROP_SOURCES = input_pipeline.TFDS_SOURCES + ("image_folder",)  # the ones with crops


# --- runs and checkpoints --------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run saved as ``WORKDIR/config.json``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path!r} does not exist: {workdir!r} is not a training or converted run's workdir "
            "(pass --config to say how the checkpoint was trained)"
        )
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def class_names(workdir: str, num_classes: int) -> list[str]:
    """The run's ``class_names.txt``, or "0".."n-1" when it is missing or does not fit."""
    path = os.path.join(workdir, "class_names.txt")
    if os.path.isfile(path):
        with open(path) as f:
            names = [line.strip() for line in f if line.strip()]
        if len(names) == num_classes:
            return names
        logging.warning("%s lists %d names for %d classes; numbering them", path,
                        len(names), num_classes)  # fmt: skip
    return [str(i) for i in range(num_classes)]


def choose_step(workdir: str, manager, which: str | int = "best") -> int:
    """The checkpoint step for ``which``: "best" (highest eval top-1 in ``metrics.jsonl`` among
    the kept checkpoints; the latest when none was evaluated), "latest", or a step number."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"No checkpoints in {manager.directory}")
    if which == "latest":
        return steps[-1]
    if which == "best":
        evals = {}
        for record in read_metrics(workdir):
            if record.get("split") == "eval" and record["step"] in steps:
                evals[record["step"]] = record["top1"]
        return max(evals, key=lambda s: (evals[s], s)) if evals else steps[-1]
    try:
        step = int(which)
    except ValueError as error:
        raise ValueError(f"checkpoint {which!r}: use best, latest or a step number") from error
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint at step {step} in {manager.directory}: {steps}")
    return step


def check_fits(manager, step: int, template: train.TrainState, config) -> None:
    """Raises ``ValueError`` naming each parameter whose saved shape differs from the model's."""
    saved_params = _saved_params_metadata(manager, step)
    expected = jax.tree_util.tree_map(lambda x: tuple(x.shape), template.params)
    got = jax.tree_util.tree_map(lambda m: tuple(m.shape), saved_params)
    flat_expected = traverse_util.flatten_dict(expected, sep="/")
    flat_got = traverse_util.flatten_dict(got, sep="/")
    problems = [
        f"{name}: checkpoint {flat_got.get(name)}, model {shape}"
        for name, shape in flat_expected.items()
        if flat_got.get(name) != shape
    ]
    problems += [f"{name}: in the checkpoint, not in the model" for name in flat_got
                 if name not in flat_expected]  # fmt: skip
    if problems:
        raise ValueError(
            f"The checkpoint at step {step} in {manager.directory} does not fit "
            f"AlexNet(variant={config.model.variant!r}, groups={config.model.groups}, "
            f"num_classes={config.num_classes}): " + "; ".join(problems)
        )


def _saved_params_metadata(manager, step: int) -> Any:
    """The saved parameters' metadata tree (shapes), read without restoring any array."""
    import orbax.checkpoint as ocp
    from etils import epath

    path = os.path.join(str(manager.directory), str(step), "default")
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
    except (FileNotFoundError, OSError, ValueError) as error:
        raise ValueError(f"{path!r} is not a readable Orbax checkpoint: {error}") from error
    tree = getattr(metadata, "tree", metadata)
    if not isinstance(tree, dict) or "params" not in tree:
        raise ValueError(f"{path!r} is not an alexnet_jax checkpoint: it saves no 'params'")
    return tree["params"]


def restore_state(
    config: ml_collections.ConfigDict, workdir: str, which: str | int = "best"
) -> tuple[train.TrainState, int]:
    """The TrainState of a run's checkpoint (``which``: best, latest or a step) and its step."""
    manager = checkpointing.create_manager(workdir, config)
    try:
        step = choose_step(workdir, manager, which)
        channels = 3 if config.grayscale_to_rgb else config.channels
        model = train.create_model(config, config.num_classes)
        template = train.create_train_state(
            jax.random.PRNGKey(0), config, model, (config.image_size, config.image_size, channels)
        )
        check_fits(manager, step, template, config)
        return checkpointing.restore(manager, template, step), step
    finally:
        manager.close()


def params_from_workdir(workdir: str, which: str | int = "best") -> tuple[dict, int]:
    """The parameters of another run's (or a converted model's) checkpoint, and its step."""
    state, step = restore_state(load_run_config(workdir), workdir, which)
    return jax.device_get(state.params), step


def transfer_params(target: dict, source: dict, source_name: str) -> dict:
    """``target`` with every layer taken from ``source``; fc8 stays newly initialised when its
    class count differs (a new head). Any other mismatch raises ``ValueError`` naming it."""
    params = dict(target)
    for layer, values in target.items():
        if layer not in source:
            raise ValueError(f"{source_name} has no layer {layer!r}: another architecture?")
        shapes = {k: (tuple(v.shape), tuple(source[layer][k].shape)) for k, v in values.items()}
        if all(ours == theirs for ours, theirs in shapes.values()):
            params[layer] = jax.tree_util.tree_map(jnp.asarray, source[layer])
        elif layer == "fc8":
            logging.info("New head: fc8 %s from %s is replaced by a fresh %s",
                         shapes["kernel"][1], source_name, shapes["kernel"][0])  # fmt: skip
        else:
            raise ValueError(
                f"Layer {layer!r} of {source_name} does not fit this model: "
                + ", ".join(
                    f"{k} {theirs} there, {ours} here" for k, (ours, theirs) in shapes.items()
                )
                + " (same config.model.variant, groups and input channels needed)"
            )
    return params


# --- evaluation ------------------------------------------------------------------------------


def predict_step(state: train.TrainState, batch: dict, *, config, mean_image=None) -> dict:
    """Per-example top-5 classes and loss (10-crop softmaxes averaged), for one device."""
    logits = train.eval_logits(state, train.normalize_images(batch["image"], config, mean_image))
    return {
        "top5": jax.lax.top_k(logits, min(5, logits.shape[-1]))[1],
        "loss": train.classification_metrics(logits, batch["label"])["loss"],
        "label": batch["label"],
        "mask": batch["mask"],
    }


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str, which: str | int = "best"
) -> list[dict[str, Any]]:
    """Top-1/top-5 of a checkpoint with the centre crop and (where the source has crops) the
    10 crops; writes per-class CSVs, confusion-matrix PNGs and ``metrics.jsonl`` records."""
    state, step = restore_state(config, workdir, which)
    names = class_names(workdir, config.num_classes)
    crop_counts = (1, 10) if config.dataset in CROP_SOURCES else (1,)
    if config.dataset not in CROP_SOURCES:
        logging.info("%s images are already the model's size: centre crop only", config.dataset)
    results = []
    writer = MetricsWriter(workdir)
    try:
        for crops in crop_counts:
            run = copy.deepcopy(config)
            run.input.eval_crops = crops
            dataset = input_pipeline.create_dataset(run)
            mean_image = None
            if run.input.normalization == "mean_image":
                mean_image = input_pipeline.load_or_compute_mean_image(run, dataset, workdir)
            step_fn = jax.pmap(
                lambda s, b, run=run, m=mean_image: predict_step(s, b, config=run, mean_image=m),
                axis_name=train.AXIS,
                in_axes=(None, 0),
            )
            options = train.compiler_options(run) if jax.process_count() == 1 else {}
            if options:
                step_fn = train.CompiledWithOptions(step_fn, options)
            confusion = np.zeros((config.num_classes, config.num_classes), np.int64)
            top5_hits = np.zeros(config.num_classes, np.int64)
            loss_sum = 0.0
            for batch in dataset.eval_batches():
                out = jax.device_get(step_fn(state, batch))
                keep = out["mask"].reshape(-1) > 0
                labels = out["label"].reshape(-1)[keep]
                top5 = out["top5"].reshape(-1, out["top5"].shape[-1])[keep]
                np.add.at(confusion, (labels, top5[:, 0]), 1)
                np.add.at(top5_hits, labels, (top5 == labels[:, None]).any(-1))
                loss_sum += float(out["loss"].reshape(-1)[keep].sum())
            if jax.process_count() > 1:  # each process saw its own shard: add them up
                from jax.experimental import multihost_utils

                confusion, top5_hits, loss_sum = (
                    np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)
                    for x in (confusion, top5_hits, np.asarray(loss_sum))
                )
            count = int(confusion.sum())
            tag = "centre" if crops == 1 else "10crop"
            record = {
                "step": step,
                "split": "eval_checkpoint",
                "crops": crops,
                "count": count,
                "loss": float(loss_sum) / max(count, 1),
                "top1": float(np.trace(confusion)) / max(count, 1),
                "top5": float(top5_hits.sum()) / max(count, 1),
            }
            writer.write(record)
            if jax.process_index() == 0:
                write_per_class_csv(
                    os.path.join(workdir, f"per_class_accuracy_{tag}.csv"),
                    names,
                    confusion,
                    top5_hits,
                )
                plot_confusion(
                    os.path.join(workdir, f"confusion_matrix_{tag}.png"), confusion, names, record
                )
            logging.info("checkpoint %d, %s: %s", step, tag, record)
            results.append(record)
    finally:
        writer.close()
    return results


def write_per_class_csv(path: str, names: Sequence[str], confusion: np.ndarray, top5_hits):
    counts = confusion.sum(axis=1)
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["class", "name", "count", "top1", "top5"])
        for c, name in enumerate(names):
            n = int(counts[c])
            top1 = confusion[c, c] / n if n else float("nan")
            top5 = top5_hits[c] / n if n else float("nan")
            out.writerow([c, name, n, f"{top1:.6f}", f"{top5:.6f}"])


def plot_confusion(path: str, confusion: np.ndarray, names: Sequence[str], record: dict):
    """Rows (true classes) normalised to 1; class names on the axes up to 30 classes."""
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


def load_image(path: str, config: ml_collections.ConfigDict) -> np.ndarray:
    """One file as the model's evaluation input: the central square, resized to
    ``resize_size``, centre-cropped to ``image_size`` (uint8), as the evaluation pipeline does
    (PIL's decoder and bilinear resize instead of TensorFlow's). Digits configs get the
    digits source's float preprocessing. A file PIL cannot read raises ``ValueError``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.convert("L" if config.channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"Cannot read image {path!r}: {error}") from error
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if config.dataset == "digits":
        return input_pipeline.digits_like(image, config)
    size, resize = config.image_size, config.input.resize_size
    pixels = np.asarray(image.resize((resize, resize), Image.BILINEAR))
    offset = (resize - size) // 2
    pixels = pixels[offset : offset + size, offset : offset + size]
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if config.grayscale_to_rgb and pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels.astype(np.uint8)


def predict_files(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: Sequence[str],
    which: str | int = "best",
    top_k: int = 5,
) -> list[dict[str, Any]]:
    """Each file's ``top_k`` classes with probabilities: ``[{"path", "top": [(name, p)]}]``."""
    if not paths:
        raise ValueError("No images given: --images a.jpg b.png ...")
    images = np.stack([load_image(path, config) for path in paths])  # all read before compute
    state, step = restore_state(config, workdir, which)
    names = class_names(workdir, config.num_classes)
    mean_image = None
    if config.input.normalization == "mean_image":
        path = input_pipeline.mean_image_path(config, workdir)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The run subtracts a mean image but {path!r} is missing")
        mean_image = np.load(path)

    @functools.partial(jax.jit, compiler_options=train.compiler_options(config) or None)
    def probabilities(params, images):
        x = train.normalize_images(images, config, mean_image)
        return jax.nn.softmax(state.apply_fn({"params": params}, x))

    probs = np.asarray(probabilities(state.params, jnp.asarray(images)))
    k = min(top_k, config.num_classes)
    results = []
    for path, p in zip(paths, probs, strict=True):
        order = np.argsort(-p)[:k]
        results.append({"path": path, "step": step,
                        "top": [(names[c], float(p[c])) for c in order]})  # fmt: skip
    return results
