"""preview.png: a 10 x 10 grid of prepared samples, decoded from their byte sequences."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_prep.codec import decode_sequences


def pick_preview(labels: np.ndarray, n_classes: int, per_class: int = 10, total: int = 100) -> np.ndarray:
    """Indices for the grid: one row per class (first `per_class` of each) when every class has enough
    samples and there are 10 classes, else simply the first `total`."""
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)]
    if n_classes * per_class == total and all(len(r) == per_class for r in rows):
        return np.concatenate(rows)
    return np.arange(min(total, len(labels)))


def save_grid(path: str, images: np.ndarray, columns: int = 10, padding: int = 2, scale: int = 2) -> str:
    """Write uint8 images [N, H, W, C] as a PNG grid (pixels scaled up `scale` times), atomically.

    Plain numpy + Pillow rather than torchvision's make_grid: the built-in dataset then needs no
    torchvision at all.
    """
    n, height, width, channels = images.shape
    rows = (n + columns - 1) // columns
    cell_h, cell_w = height + padding, width + padding
    grid = np.zeros((rows * cell_h + padding, columns * cell_w + padding, channels), np.uint8)
    for i in range(n):
        top, left = padding + (i // columns) * cell_h, padding + (i % columns) * cell_w
        grid[top:top + height, left:left + width] = images[i]
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    temporary = path + ".tmp"
    picture.save(temporary, format="PNG")
    os.replace(temporary, path)
    return path


def write_preview(path: str, seqs: np.ndarray, labels: np.ndarray, n_classes: int, height: int, width: int,
                  channels: int, bins: int, order: str) -> str:
    """Decode 100 sequences (what the model will see, after quantization) into preview.png."""
    chosen = pick_preview(labels, n_classes)
    images = decode_sequences(seqs[chosen], height, width, channels, bins, order)
    return save_grid(path, images)
