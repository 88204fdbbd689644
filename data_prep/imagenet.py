"""Downsampled ImageNet 32x32 / 64x64 (Chrabaszcz et al. 2017) in the npz batches it is distributed in.

    ROOT/train_data_batch_1.npz ... ROOT/train_data_batch_10.npz, ROOT/val_data.npz
    (or each in a sub-folder of ROOT, as the archives Imagenet32_train_npz.zip etc. unpack)

Each file holds `data`, uint8 [N, 3*S*S] rows in CIFAR's plane layout (all red, then green, then
blue, each row-major), and `labels`, 1-based class numbers 1..1000. The validation file is the
test split (the published bits/dim are measured on it). Class names come from ROOT/map_clsloc.txt
(ImageNet devkit: "n02119789 1 kit_fox") when present, else "1".."1000", the label numbers of the files.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from data_prep.errors import DataError

IMAGENET_SIZES = {"imagenet32": 32, "imagenet64": 64}
N_CLASSES = 1000
TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL_FILE = "val_data.npz"
CLASS_MAP = "map_clsloc.txt"


def _find(root: str, name: str) -> str | None:
    """ROOT/name, or ROOT/*/name (the first in sorted order)."""
    direct = os.path.join(root, name)
    if os.path.isfile(direct):
        return direct
    for entry in sorted(os.listdir(root)):
        candidate = os.path.join(root, entry, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def read_batch(path: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """One npz batch -> (images uint8 [N, side, side, 3], labels int64 [N] 0-based); DataError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as batch:
            if "data" not in batch or "labels" not in batch:
                raise DataError(f"{path}: not a downsampled-ImageNet batch (needs data and labels, has "
                                f"{', '.join(batch.files) or 'nothing'})")
            data, labels = batch["data"], np.asarray(batch["labels"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"{path}: not a readable npz file ({' '.join(str(error).split())[:120]})") from None
    row = 3 * side * side
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        raise DataError(f"{path}: data is {data.dtype} {tuple(data.shape)}; expected uint8 rows of "
                        f"{row} = 3x{side}x{side} (is this the {side}x{side} release?)")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {labels.shape} labels of {labels.dtype} for {len(data)} images")
    if labels.size and (labels.min() < 1 or labels.max() > N_CLASSES):
        raise DataError(f"{path}: labels must be 1..{N_CLASSES} (1-based), found {labels.min()}..{labels.max()}")
    images = data.reshape(len(data), 3, side, side).transpose(0, 2, 3, 1)  # planes -> (N, H, W, C)
    return np.ascontiguousarray(images), labels.astype(np.int64) - 1


def class_names(root: str) -> list[str]:
    """Names from ROOT/map_clsloc.txt ('wnid number name' lines), else the 1-based label numbers."""
    path = os.path.join(root, CLASS_MAP)
    if not os.path.isfile(path):
        return [str(label) for label in range(1, N_CLASSES + 1)]
    names = [None] * N_CLASSES
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 3 or not fields[1].isdigit() or not 1 <= int(fields[1]) <= N_CLASSES:
                raise DataError(f"{path} line {line_number}: expected 'WNID NUMBER NAME' with NUMBER 1..{N_CLASSES}")
            names[int(fields[1]) - 1] = fields[2]
    missing = [index + 1 for index, name in enumerate(names) if name is None]
    if missing:
        raise DataError(f"{path}: no name for class {missing[0]}")
    return names


def load_imagenet(dataset: str, root: str, train_size: int | None = None, test_size: int | None = None):
    """The train batches 1..10 and the validation file as a Source (images in memory)."""
    from data_prep.sources import Source, SourceSplit

    side = IMAGENET_SIZES[dataset]
    if not os.path.isdir(root):
        raise DataError(f"{dataset}: --root {root} is not a folder")
    wanted = {"train": TRAIN_FILES, "test": [VAL_FILE]}
    located = {split: [(name, _find(root, name)) for name in names] for split, names in wanted.items()}
    missing = [name for names in located.values() for name, path in names if path is None]
    if missing:
        raise DataError(f"{dataset}: missing {', '.join(missing)} under --root {root} (the npz files of the "
                        f"{side}x{side} release, e.g. from Imagenet{side}_train_npz.zip and "
                        f"Imagenet{side}_val_npz.zip)")
    splits = {}
    for split, files in located.items():
        limit = train_size if split == "train" else test_size
        images, labels, held = [], [], 0
        for _, path in files:
            if limit is not None and held >= limit:
                break
            batch_images, batch_labels = read_batch(path, side)
            images.append(batch_images)
            labels.append(batch_labels)
            held += len(batch_labels)
        images, labels = np.concatenate(images), np.concatenate(labels)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        splits[split] = SourceSplit(images, labels)
    info = {"files": {split: [os.path.relpath(path, root) for _, path in files] for split, files in located.items()}}
    return Source(dataset, class_names(root), splits, info=info)
