"""The paper's Figure 4, its other half: for query images, the training images whose fc7
activations are nearest (Euclidean distance in the last 4096-d hidden layer).

    python main.py --mode=neighbors --workdir W --images a.jpg b.jpg [--neighbors 6] \
        [--neighbors_pool 20000]

Queries are read as ``--mode=predict`` reads them; the training split is read as evaluation
sees images (center crop, no augmentation), in order, at most ``pool`` of them (0: all;
the paper searched all 1.2 million). Writes ``WORKDIR/neighbors.png`` (a row per query:
the query, then its neighbors with their distances) and returns the neighbors' names.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from alexnet_jax import data, normalization, steps
from alexnet_jax.errors import ConfigError, DataError
from alexnet_jax.model import features
from alexnet_jax.run_files import restore_state


def nearest_training_images(
    config: ml_collections.ConfigDict,
    workdir: str,
    paths: Sequence[str],
    k: int = 6,
    pool: int = 20_000,
    which: str | int = "best",
    figure: str | None = None,
) -> list[dict[str, Any]]:
    """``[{"path", "neighbors": [{"name", "index", "distance"}]}]``, nearest first, and the
    figure at ``figure`` (default ``WORKDIR/neighbors.png``)."""
    if not paths:
        raise DataError("No query images given: --images a.jpg b.png ...")
    if config.model.name != "alexnet":
        raise ConfigError(f"config.model.name={config.model.name!r}: fc7 neighbors need AlexNet")
    if jax.process_count() > 1:
        raise ConfigError("--mode=neighbors runs in one process")
    if k < 1:
        raise ConfigError(f"--neighbors={k}: must be at least 1")
    one_crop = copy.deepcopy(config)
    one_crop.input.eval_crops = 1
    dataset = data.create_dataset(one_crop)
    if dataset.train_eval_batches is None:
        raise ConfigError(f"config.dataset={config.dataset!r} has no training images to search")
    queries = np.stack([data.load_image(path, config) for path in paths])
    state, step = restore_state(config, workdir, which)
    mean_image = None
    if config.input.normalization == "mean_image":
        mean_image = normalization.load_mean_image(
            normalization.mean_image_path(config, workdir), dataset.image_shape
        )
    normalize = normalization.make_normalizer(config.input, mean_image)
    model = steps.create_model(config, config.num_classes)

    @functools.partial(jax.jit, compiler_options=steps.compiler_options(config) or None)
    def fc7(params, images):
        return features(model, {"params": params}, normalize(images), ("fc7",))["fc7"]

    query_features = np.asarray(fc7(state.params, queries), np.float64)
    best: list[list[tuple[float, int, np.ndarray]]] = [[] for _ in paths]
    searched = 0
    for batch in dataset.train_eval_batches():
        keep = np.asarray(batch["mask"]).reshape(-1) > 0
        images = np.asarray(batch["image"]).reshape((-1,) + queries.shape[1:])[keep]
        indices = np.asarray(batch["index"]).reshape(-1)[keep]
        found = np.asarray(fc7(state.params, images), np.float64)
        distances = np.sqrt(
            np.maximum(
                (query_features**2).sum(1)[:, None]
                - 2 * query_features @ found.T
                + (found**2).sum(1)[None],
                0,
            )
        )
        for q, row in enumerate(distances):
            candidates = best[q] + [(float(row[j]), int(indices[j]), images[j]) for j in
                                    np.argsort(row)[:k]]  # fmt: skip
            best[q] = sorted(candidates, key=lambda c: c[0])[:k]
        searched += len(indices)
        if pool and searched >= pool:
            break
    name_of = dataset.train_example_name or (lambda index: f"training example {index}")
    results = [
        {"path": path, "step": step,
         "neighbors": [{"name": name_of(i), "index": i, "distance": d} for d, i, _ in row]}
        for path, row in zip(paths, best, strict=True)
    ]  # fmt: skip
    if jax.process_index() == 0:
        draw(figure or os.path.join(workdir, "neighbors.png"), queries, best, searched, step)
    return results


def _displayable(image: np.ndarray) -> np.ndarray:
    """An image as matplotlib shows it: [0, 1] RGB or grayscale (floats min-max scaled)."""
    image = np.asarray(image, np.float64)
    image = image / 255.0 if image.max() > 1.5 or image.min() >= 0 else image
    if image.min() < 0 or image.max() > 1:
        image = (image - image.min()) / max(image.max() - image.min(), 1e-9)
    return image[..., 0] if image.shape[-1] == 1 else image


def draw(path: str, queries: np.ndarray, best: list, searched: int, step: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + max(len(row) for row in best)
    fig, axes = plt.subplots(
        len(queries), columns, figsize=(1.6 * columns, 1.7 * len(queries)), squeeze=False
    )
    for r, (query, row) in enumerate(zip(queries, best, strict=True)):
        cells = [(query, "query")] + [(image, f"{d:.1f}") for d, _, image in row]
        for c, ax in enumerate(axes[r]):
            ax.set_axis_off()
            if c < len(cells):
                ax.imshow(_displayable(cells[c][0]), cmap="gray", interpolation="nearest")
                ax.set_title(cells[c][1], fontsize=8)
    fig.suptitle(f"nearest in fc7 among {searched} training images (step {step})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
