"""The sampler's outputs: sequences -> images, per-image PNGs and an .npz of the raw bytes (the grid
itself is data_prep.grids', shared with the preview and the trainer), written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from common.files import atomic_file, fsync_folder
from data_prep import decode_sequences, save_png, to_chw


def decode(seqs: torch.Tensor, image: dict) -> np.ndarray:
    """Byte sequences [N, L] -> uint8 images [N, H, W, C] (dequantized, patch order undone)."""
    return decode_sequences(seqs.cpu().numpy(), image["height"], image["width"], image["channels"],
                            image["bins"], image["order"])


def save_per_image(images: np.ndarray, folder: Path, names: Sequence[str]) -> None:
    """Write one PNG per image into folder, named by names (without suffix)."""
    for image, name in zip(images, names):
        save_png(to_chw(image[None])[0], folder / f"{name}.png", durable=False)
    fsync_folder(folder)  # the names; an fsync per file would cost seconds for thousands of images


def save_npz(path: Path, seqs: torch.Tensor, image: dict, labels: Optional[torch.Tensor],
             captions: Optional[list[str]], names: Sequence[str]) -> None:
    """Write the raw bytes [N, L] (uint8) with labels, captions, names and the image info."""
    n = len(seqs)
    arrays = {
        "sequences": seqs.cpu().numpy().astype(np.uint8),  # bins <= 256, so bytes fit
        "labels": (np.full(n, -1, dtype=np.int64) if labels is None
                   else labels.cpu().numpy().astype(np.int64)),  # -1 = no class condition
        "captions": np.array(captions if captions is not None else [""] * n, dtype=str),
        "names": np.array(list(names), dtype=str),
        "image_info": np.array(json.dumps(image)),  # what decode_sequences needs, self-describing
    }
    with atomic_file(path) as stream:
        np.savez(stream, **arrays)
