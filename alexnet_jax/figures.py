"""Pictures of a model as arrays (numpy only): the first layer's kernels as a grid (the
paper's Figure 3), a confusion matrix as an image. ``plots`` draws them with matplotlib;
the training loop writes them into TensorBoard at each evaluation."""

from __future__ import annotations

import numpy as np


def grid_columns(count: int) -> int:
    """12 columns for the paper's 96 kernels; 8 otherwise."""
    return 12 if count % 12 == 0 else 8


def kernel_grid(kernel: np.ndarray, columns: int = 12, border: int = 1) -> np.ndarray:
    """(h, w, c, n) kernels as one (rows*(h+b)+b, columns*(w+b)+b, c) image in [0, 1], each
    kernel scaled by its own min and max; the borders are white."""
    h, w, c, n = kernel.shape
    rows = -(-n // columns)
    grid = np.ones((rows * (h + border) + border, columns * (w + border) + border, c))
    for i in range(n):
        k = kernel[..., i]
        span = k.max() - k.min()
        k = (k - k.min()) / span if span > 0 else np.zeros_like(k)
        r, col = divmod(i, columns)
        top, left = border + r * (h + border), border + col * (w + border)
        grid[top : top + h, left : left + w] = k
    return grid


def confusion_image(confusion: np.ndarray, min_side: int = 256) -> np.ndarray:
    """A confusion matrix (true x predicted counts) as a grayscale RGB image in [0, 1]: each
    row normalized to its class's count (the diagonal is per-class top-1), each cell
    enlarged to at least ``min_side`` pixels in all."""
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    scale = max(1, -(-min_side // len(confusion)))
    image = np.kron(rows, np.ones((scale, scale)))
    return np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
