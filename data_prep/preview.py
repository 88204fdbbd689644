"""preview.png: a 10 x 10 grid of prepared samples, decoded from their byte sequences."""

from __future__ import annotations

import numpy as np

from data_prep.codec import decode_sequences
from data_prep.grids import save_grid


def pick_preview(labels: np.ndarray, n_classes: int, per_class: int = 10, total: int = 100) -> np.ndarray:
    """Indices for the grid: one row per class (first `per_class` of each) when every class has enough
    samples and there are 10 classes, else simply the first `total`."""
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)]
    if n_classes * per_class == total and all(len(r) == per_class for r in rows):
        return np.concatenate(rows)
    return np.arange(min(total, len(labels)))


def write_preview(path: str, seqs: np.ndarray, labels: np.ndarray, n_classes: int, height: int, width: int,
                  channels: int, bins: int, order: str) -> str:
    """Decode 100 sequences (what the model will see, after quantization) into preview.png."""
    chosen = pick_preview(labels, n_classes)
    images = decode_sequences(seqs[chosen], height, width, channels, bins, order)
    save_grid(images, path, columns=10, scale=2)
    return path
