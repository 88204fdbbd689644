"""Shared pytest fixtures for the data pipeline (usable from any test file).

Session-scoped, built once per run in a temporary folder, CPU only, no downloads:

- ``tiny_mnist``: a ``TinySource`` with ``.root`` (a folder laid out as torchvision's MNIST expects:
  ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed idx files) and
  ``.splits`` = {"train": (images uint8 [50, 28, 28, 1], labels int64 [50]), "test": (... [20] ...)}
  holding exactly the random arrays written there.
- ``tiny_mnist_root``: ``tiny_mnist.root`` (a pathlib.Path) for tests that only need --root.
- ``tiny_cifar``: the same for CIFAR-10: ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}, python pickles in the format torchvision reads (data uint8 [N, 3072] channel-major,
  labels list); 50 train images (10 per batch) and 20 test images of 32x32x3; class names are the
  real CIFAR-10 ones.
- ``tiny_cifar_root``: ``tiny_cifar.root``.
- ``small_digits``: digits prepared through the real CLI, 256 train / 64 test (launcher and Slurm tests).
- ``prepared_digits``: a pathlib.Path to a folder prepared from the built-in digits (1,000 train /
  200 test images, 28x28x1, bins 256, order raster, seed 0, 16 shards per split, with
  manifest.json and preview.png), built in about 2-3 s. Treat it as read-only; copy it
  (shutil.copytree) before changing anything in it.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@dataclass
class TinySource:
    """A tiny source dataset on disk and the arrays written into it."""

    root: Path
    splits: dict  # split -> (images uint8 [N, H, W, C], labels int64 [N])


def write_idx_images(path: Path, images: np.ndarray) -> None:
    """MNIST idx3-ubyte: magic 0x00000803, then N, rows, cols as big-endian int32, then the pixels."""
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">iiii", 0x0803, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    """MNIST idx1-ubyte: magic 0x00000801, then N as big-endian int32, then one byte per label."""
    path.write_bytes(struct.pack(">ii", 0x0801, len(labels)) + labels.astype(np.uint8).tobytes())


def make_tiny_mnist(root: Path, n_train: int = 50, n_test: int = 20, seed: int = 1) -> TinySource:
    """Write random MNIST idx files under root/MNIST/raw and return them as arrays."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[split] = (images[..., None], labels)
    return TinySource(root, splits)


def make_tiny_cifar(root: Path, per_batch: int = 10, n_test: int = 20, seed: int = 2) -> TinySource:
    """Write random CIFAR-10 python batches under root/cifar-10-batches-py and return them as arrays."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(name: str, n: int):
        chw = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        entry = {"batch_label": name, "data": chw.reshape(n, 3072), "labels": labels.tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as stream:
            pickle.dump(entry, stream, protocol=2)
        return chw.transpose(0, 2, 3, 1), labels  # (N, 32, 32, 3)

    train = [batch(f"data_batch_{i}", per_batch) for i in range(1, 6)]
    test = batch("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as stream:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}, stream,
                    protocol=2)
    splits = {
        "train": (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])),
        "test": test,
    }
    return TinySource(root, splits)


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> TinySource:
    """Random MNIST idx files in torchvision's layout, and their arrays."""
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


@pytest.fixture(scope="session")
def tiny_mnist_root(tiny_mnist) -> Path:
    """--root of the tiny MNIST."""
    return tiny_mnist.root


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory) -> TinySource:
    """Random CIFAR-10 python batches in torchvision's layout, and their arrays."""
    return make_tiny_cifar(tmp_path_factory.mktemp("tiny_cifar"))


@pytest.fixture(scope="session")
def tiny_cifar_root(tiny_cifar) -> Path:
    """--root of the tiny CIFAR-10."""
    return tiny_cifar.root


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """A prepared digits folder: 1,000 train / 200 test, bins 256, raster, seed 0, 16 shards per split."""
    from data_prep.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared") / "digits"
    prepare(PrepareConfig(dataset="digits", out=str(out), train_size=1000, test_size=200, progress=False))
    return out


@pytest.fixture(scope="session")
def small_digits(tmp_path_factory) -> Path:
    """Digits prepared through the real CLI: 256 train / 64 test (for the launcher and Slurm tests)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("small_digits")
    subprocess.run([sys.executable, "-m", "data_prep.prepare", "--dataset", "digits", "--out", str(out),
                    "--train-size", "256", "--test-size", "64", "--workers", "1", "--no-progress",
                    "--overwrite"], cwd=Path(__file__).resolve().parent.parent, check=True,
                   capture_output=True, timeout=300)
    return out
