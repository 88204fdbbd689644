"""preview.png: a 10 x 10 grid of prepared samples, decoded from their byte sequences."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from data_prep.codec import decode_sequences


def pick_preview(labels: np.ndarray, n_classes: int, per_class: int = 10, total: int = 100) -> np.ndarray:
    """Indices for the grid: one row per class (first `per_class` of each) when every class has enough
    samples and there are 10 classes, else simply the first `total`."""
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)]
    if n_classes * per_class == total and all(len(r) == per_class for r in rows):
        return np.concatenate(rows)
    return np.arange(min(total, len(labels)))


def save_grid(path: str, images: np.ndarray, columns: int = 10, padding: int = 2, scale: int = 2) -> str:
    """Write uint8 images [N, H, W, C] as a PNG grid (pixels scaled up `scale` times), atomically."""
    channels = images.shape[-1]
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, C, H, W) uint8
    grid = make_grid(batch, nrow=columns, padding=padding, pad_value=0)  # (3, H', W'), grey repeated
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = grid[0] if channels == 1 else grid.permute(1, 2, 0)  # keep a grey preview single-channel
    temporary = path + ".tmp"
    Image.fromarray(pixels.numpy()).save(temporary, format="PNG")
    os.replace(temporary, path)
    return path


def write_preview(path: str, seqs: np.ndarray, labels: np.ndarray, n_classes: int, height: int, width: int,
                  channels: int, bins: int, order: str) -> str:
    """Decode 100 sequences (what the model will see, after quantization) into preview.png."""
    chosen = pick_preview(labels, n_classes)
    images = decode_sequences(seqs[chosen], height, width, channels, bins, order)
    return save_grid(path, images)
