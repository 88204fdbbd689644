"""Images <-> byte sequences: quantization to `bins` levels and the raster / patch:P orders, with exact inverses.

Quantization maps a pixel value x in 0..255 to the nearest of `bins` evenly spaced levels,
q = round(x * (bins - 1) / 255); the display value of level q is round(q * 255 / (bins - 1)).
Display values quantize back to their own level, so decode -> encode is the identity on sequences,
and bins=256 is the identity on pixels.
"""

from __future__ import annotations

import numpy as np

from data_prep.errors import DataError

MIN_BINS, MAX_BINS = 2, 256


def check_bins(bins) -> int:
    """Return bins as an int, or raise DataError if it is not in 2..256."""
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not MIN_BINS <= bins <= MAX_BINS:
        raise DataError(f"bins {bins!r} out of range: must be an integer from {MIN_BINS} to {MAX_BINS}")
    return int(bins)


def parse_order(order: str, height: int | None = None, width: int | None = None) -> int:
    """Validate an order string; return the patch size P (1 for raster, where a pixel is its own patch)."""
    if order == "raster":
        return 1
    if not isinstance(order, str) or not order.startswith("patch:"):
        raise DataError(f"order {order!r} not understood: use 'raster' or 'patch:P' (e.g. patch:4)")
    text = order[len("patch:"):]
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"order {order!r}: patch size must be a positive integer")
    patch = int(text)
    for name, size in (("height", height), ("width", width)):
        if size is not None and size % patch:
            raise DataError(f"order {order!r}: patch size {patch} does not divide the image {name} {size}")
    return patch


def quantize_table(bins: int) -> np.ndarray:
    """Lookup table (256,) uint8: pixel value -> nearest level in [0, bins)."""
    bins = check_bins(bins)
    x = np.arange(256, dtype=np.int64)
    # Integer round-half-up of x * (bins-1) / 255: no float ties that differ between machines.
    return ((2 * x * (bins - 1) + 255) // 510).astype(np.uint8)


def display_table(bins: int) -> np.ndarray:
    """Lookup table (bins,) uint8: level -> its display value in 0..255."""
    bins = check_bins(bins)
    q = np.arange(bins, dtype=np.int64)
    return ((2 * q * 255 + (bins - 1)) // (2 * (bins - 1))).astype(np.uint8)


def quantize(images: np.ndarray, bins: int) -> np.ndarray:
    """Pixel values 0..255 (uint8) -> levels in [0, bins), same shape."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 in 0..255, got dtype {images.dtype}")
    if bins == 256:
        return images  # the identity; callers never write into the result
    return quantize_table(bins)[images]


def dequantize(levels: np.ndarray, bins: int) -> np.ndarray:
    """Levels in [0, bins) -> display values 0..255 (uint8), same shape."""
    levels = np.asarray(levels)
    if levels.size and (levels.min() < 0 or levels.max() >= bins):
        raise DataError(f"sequence values must lie in [0, {bins}), found {levels.min()}..{levels.max()}")
    return display_table(bins)[levels.astype(np.int64)]


def to_sequence_order(images: np.ndarray, order: str) -> np.ndarray:
    """[N, H, W, C] -> [N, H*W*C] in the given order (values untouched)."""
    n, height, width, channels = images.shape
    patch = parse_order(order, height, width)
    if patch == 1:
        return np.ascontiguousarray(images).reshape(n, -1)
    blocks = images.reshape(n, height // patch, patch, width // patch, patch, channels)
    # (N, rows of patches, cols of patches, P, P, C): patches in raster order, raster inside each patch.
    return np.ascontiguousarray(blocks.transpose(0, 1, 3, 2, 4, 5)).reshape(n, -1)


def from_sequence_order(seqs: np.ndarray, height: int, width: int, channels: int, order: str) -> np.ndarray:
    """[N, H*W*C] in the given order -> [N, H, W, C]: the exact inverse of to_sequence_order."""
    seqs = np.asarray(seqs)
    if seqs.ndim != 2 or seqs.shape[1] != height * width * channels:
        raise DataError(
            f"sequences of shape {tuple(seqs.shape)} do not hold {height}x{width}x{channels} images"
        )
    n = seqs.shape[0]
    patch = parse_order(order, height, width)
    if patch == 1:
        return seqs.reshape(n, height, width, channels)
    blocks = seqs.reshape(n, height // patch, width // patch, patch, patch, channels)
    # back to (N, rows of patches, P, cols of patches, P, C) = (N, H, W, C)
    return np.ascontiguousarray(blocks.transpose(0, 1, 3, 2, 4, 5)).reshape(n, height, width, channels)


def encode_images(images: np.ndarray, bins: int, order: str) -> np.ndarray:
    """uint8 images [N, H, W, C] in 0..255 -> uint8 sequences [N, H*W*C] (quantize, then order)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise DataError(f"images must have shape [N, H, W, C], got {tuple(images.shape)}")
    # Quantizing after reordering is the same (elementwise) and keeps one contiguous pass.
    return quantize(to_sequence_order(images, order), bins)


def decode_sequences(seqs, height: int, width: int, channels: int, bins: int, order: str) -> np.ndarray:
    """Sequences [N, L] (numpy or torch, ints in [0, bins)) -> uint8 images [N, H, W, C] in 0..255."""
    if hasattr(seqs, "detach"):  # a torch tensor, without importing torch here
        seqs = seqs.detach().cpu().numpy()
    seqs = np.asarray(seqs)
    if seqs.ndim == 1:
        seqs = seqs[None]
    check_bins(bins)
    return dequantize(from_sequence_order(seqs, height, width, channels, order), bins)
