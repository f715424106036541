"""Figures of a run: ``python -m alexnet_jax.plots --workdir W [--checkpoint best|latest|STEP]``.

Writes into the workdir:
- ``training_curves.png``: loss, top-1 and top-5 over steps, training against evaluation
  (from ``metrics.jsonl``);
- ``conv1_kernels.png``: the checkpoint's conv1 kernels as a grid, each scaled to its own
  range, as in the paper's Figure 3 (96 kernels of 11x11x3 for the paper's network).
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from alexnet_jax.figures import grid_columns, kernel_grid
from alexnet_jax.metrics import read_metrics
from alexnet_jax.model import first_layer
from alexnet_jax.run_files import load_run_config, params_from_workdir


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(workdir: str, path: str | None = None) -> str:
    """Loss, top-1 and top-5 against the step, train and eval; returns the PNG's path."""
    records = read_metrics(workdir)
    if not records:
        raise FileNotFoundError(f"{os.path.join(workdir, 'metrics.jsonl')} has no records")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("loss", "top1", "top5"), strict=True):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
            if points:
                steps, values = zip(*sorted(points), strict=True)
                ax.plot(steps, values, style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    path = path or os.path.join(workdir, "training_curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_conv1_kernels(workdir: str, which: str = "best", path: str | None = None) -> str:
    """The checkpoint's conv1 kernels as a grid (the paper's Figure 3); returns the path."""
    params, step = params_from_workdir(workdir, which)
    layer = first_layer(load_run_config(workdir).model)  # conv1; VGG's block1_conv1
    kernel = np.asarray(params[layer]["kernel"], np.float32)
    grid = kernel_grid(kernel, columns=grid_columns(kernel.shape[-1]))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(12, 12 * grid.shape[0] / grid.shape[1] + 0.6))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(
        f"conv1: {kernel.shape[-1]} kernels of {kernel.shape[0]}x{kernel.shape[1]}x"
        f"{kernel.shape[2]}, step {step}"
    )
    fig.tight_layout()
    path = path or os.path.join(workdir, "conv1_kernels.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Training curves and conv1 kernels of a run.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--checkpoint", default="best", help="best, latest or a step")
    args = parser.parse_args(argv)
    print(plot_training_curves(args.workdir))
    print(plot_conv1_kernels(args.workdir, args.checkpoint))


if __name__ == "__main__":
    main()
