"""Sequences -> images -> PNG grids, per-image PNGs and an .npz of the raw bytes, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from data_prep.codec import decode_sequences


def decode(seqs: torch.Tensor, image: dict) -> np.ndarray:
    """Byte sequences [N, L] -> uint8 images [N, H, W, C] (dequantized, patch order undone)."""
    return decode_sequences(seqs.cpu().numpy(), image["height"], image["width"], image["channels"],
                            image["bins"], image["order"])


def _to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def grid_tensor(images: np.ndarray, columns: int, padding: int = 2,
                pad_value: float = 1.0) -> torch.Tensor:
    """uint8 images [N, H, W, C] -> one float grid [3, rows*(H+p)+p, columns*(W+p)+p] in [0, 1]."""
    batch = _to_chw(images)  # (N, C, H, W)
    columns = max(1, min(columns, len(batch)))
    return make_grid(batch, nrow=columns, padding=padding, pad_value=pad_value)


def _atomic_target(path: Path) -> tuple[int, str]:
    """A temporary file beside path (same folder, so os.replace is atomic) with path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                    suffix=path.suffix or ".tmp")
    os.chmod(temp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared and viewed
    return handle, temp


def save_png(tensor: torch.Tensor, path: Path) -> None:
    """Write a float image [C, H, W] in [0, 1] as PNG via a temporary file and os.replace."""
    handle, temp = _atomic_target(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            save_image(tensor, stream, format="PNG")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def save_grid(images: np.ndarray, path: Path, columns: int, padding: int = 2) -> tuple[int, int]:
    """Write images [N, H, W, C] as one PNG grid; returns its (height, width) in pixels."""
    grid = grid_tensor(images, columns, padding)
    save_png(grid, path)
    return grid.shape[1], grid.shape[2]


def save_per_image(images: np.ndarray, folder: Path, names: Sequence[str]) -> None:
    """Write one PNG per image into folder, named by names (without suffix)."""
    for image, name in zip(images, names):
        save_png(_to_chw(image[None])[0], folder / f"{name}.png")


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
    handle, temp = _atomic_target(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            np.savez(stream, **arrays)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
