"""The one grid writer: uint8 images -> a torchvision grid -> PNG, written atomically.

Used by the dataset preview, the trainer's sample grids (TensorBoard and RUN/samples/) and the
sampler, so every grid in the project looks alike: white padding, one image per cell.
"""

from __future__ import annotations

import numpy as np
import torch

from common.files import atomic_file

# torchvision is imported where a grid is made: lit-eval's classifier needs only to_chw. (prepare imports this
# module, and with it torch, only once the training split is written: see preview.PreviewSamples.write.)


def to_chw(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def grid_tensor(images: np.ndarray, columns: int, padding: int = 2, scale: int = 1) -> torch.Tensor:
    """uint8 images [N, H, W, C] -> one float grid [3, H', W'] in [0, 1], each pixel `scale` x `scale`."""
    from torchvision.utils import make_grid

    batch = to_chw(images)  # (N, C, H, W)
    if scale > 1:
        batch = batch.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    columns = max(1, min(columns, len(batch)))
    return make_grid(batch, nrow=columns, padding=padding, pad_value=1.0)


def save_png(tensor: torch.Tensor, path, durable: bool = True) -> None:
    """Write a float image [C, H, W] in [0, 1] as PNG, atomically (durable: as common.files.atomic_file)."""
    from torchvision.utils import save_image

    with atomic_file(path, durable) as stream:
        save_image(tensor, stream, format="PNG")


def save_grid(images: np.ndarray, path, columns: int, padding: int = 2, scale: int = 1) -> tuple[int, int]:
    """Write images [N, H, W, C] as one PNG grid; returns its (height, width) in pixels."""
    grid = grid_tensor(images, columns, padding, scale)
    save_png(grid, path)
    return grid.shape[1], grid.shape[2]
