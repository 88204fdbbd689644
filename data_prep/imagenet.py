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

from data_prep.errors import DataError, one_line
from data_prep.source_types import Source, SourceSplit

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


def _bad_npz(path: str, error: BaseException) -> DataError:
    return DataError(f"{path}: not a readable npz file ({one_line(error)})")


def _planes_to_images(rows: np.ndarray, side: int) -> np.ndarray:
    """CIFAR plane-layout rows [N, 3*S*S] -> images [N, S, S, 3]."""
    return np.ascontiguousarray(rows.reshape(len(rows), 3, side, side).transpose(0, 2, 3, 1))


class _DataMember:
    """The `data` array of an npz file, read a block of rows at a time (stored or deflated members alike)."""

    def __init__(self, path: str):
        self.archive = zipfile.ZipFile(path)
        try:
            self.stream = self.archive.open("data.npy")
            version = np.lib.format.read_magic(self.stream)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, self.fortran, self.dtype = header(self.stream)
        except BaseException:
            self.archive.close()
            raise

    def rows(self, count: int) -> np.ndarray:
        """The next `count` rows."""
        size = count * self.shape[1] * self.dtype.itemsize
        data = self.stream.read(size)
        if len(data) != size:
            raise EOFError(f"data ends {size - len(data)} bytes early")
        return np.frombuffer(data, dtype=self.dtype).reshape(count, self.shape[1])

    def close(self) -> None:
        self.stream.close()
        self.archive.close()


def check_batch(path: str, side: int) -> tuple[int, np.ndarray]:
    """Read one npz batch's header and labels (not its images): (image count, labels int64 0-based)."""
    try:
        with np.load(path, allow_pickle=False) as batch:
            if "data" not in batch or "labels" not in batch:
                raise DataError(f"{path}: not a downsampled-ImageNet batch (needs data and labels, has "
                                f"{', '.join(batch.files) or 'nothing'})")
            labels = np.asarray(batch["labels"])
        member = _DataMember(path)
        member.close()
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise _bad_npz(path, error) from None
    row, shape = 3 * side * side, member.shape
    if member.dtype != np.uint8 or len(shape) != 2 or shape[1] != row:
        raise DataError(f"{path}: data is {member.dtype} {tuple(shape)}; expected uint8 rows of "
                        f"{row} = 3x{side}x{side} (is this the {side}x{side} release?)")
    if member.fortran:
        raise DataError(f"{path}: data is stored in Fortran order; expected C order (rows of images)")
    count = shape[0]
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {labels.shape} labels of {labels.dtype} for {count} images")
    if labels.size and (labels.min() < 1 or labels.max() > N_CLASSES):
        raise DataError(f"{path}: labels must be 1..{N_CLASSES} (1-based), found {labels.min()}..{labels.max()}")
    return count, labels.astype(np.int64) - 1


def iter_batch(path: str, side: int, chunk_size: int, limit: int | None = None):
    """(images [n, side, side, 3], row offset) for the rows of one checked npz batch, chunk_size rows at a time."""
    try:
        member = _DataMember(path)
        try:
            count = member.shape[0] if limit is None else min(limit, member.shape[0])
            for start in range(0, count, chunk_size):
                yield _planes_to_images(member.rows(min(chunk_size, count - start)), side), start
        finally:
            member.close()
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        raise _bad_npz(path, error) from None


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
    """The train batches 1..10 and the validation file as a Source whose splits stream from the files.

    Every file's header and labels are checked here, before anything is written; the images are read
    later, a chunk at a time.
    """
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
        parts, held = [], 0  # (path, labels of the rows used)
        for _, path in files:
            if limit is not None and held >= limit:
                break
            _, labels = check_batch(path, side)
            if limit is not None:
                labels = labels[: limit - held]
            parts.append((path, labels))
            held += len(labels)
        splits[split] = SourceSplit(None, None, size=held, stream=_split_stream(parts, side))
    info = {"files": {split: [os.path.relpath(path, root) for _, path in files] for split, files in located.items()}}
    return Source(dataset, class_names(root), splits, info=info)


def _split_stream(parts: list, side: int):
    def stream(chunk_size: int):
        for path, labels in parts:
            for images, start in iter_batch(path, side, chunk_size, limit=len(labels)):
                yield images, labels[start:start + len(images)], None
    return stream
