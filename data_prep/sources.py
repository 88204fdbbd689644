"""Source datasets as arrays: MNIST through torchvision, CIFAR-10 (downloaded by torchvision), the built-in digits."""

from __future__ import annotations

import os
import pickle

import numpy as np

from data_prep.errors import DataError, one_line
from data_prep.folders import load_folder
from data_prep.imagenet import IMAGENET_SIZES, load_imagenet
from data_prep.source_types import Source, SourceSplit

DATASETS = ("mnist", "cifar10", "digits", "folder", "imagenet32", "imagenet64")
# (height, width, channels) per dataset, known before anything is read so arguments fail fast
# (an image folder's come from --size and --channels).
SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3), "digits": (28, 28, 1), "imagenet32": (32, 32, 3),
          "imagenet64": (64, 64, 3)}
DIGIT_CLASS_NAMES = [str(d) for d in range(10)]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"], "meta": ["batches.meta"]}


def _missing(paths: list[str], dataset: str, root: str) -> DataError:
    listed = ", ".join(paths)
    return DataError(
        f"{dataset}: missing {listed} under --root {root}; put torchvision's files there or pass --download "
        f"to fetch them"
    )


def load_mnist(root: str, download: bool = False) -> Source:
    """MNIST from root/MNIST/raw/*-ubyte (torchvision's layout), read by torchvision.datasets.MNIST."""
    import torchvision  # deferred: the built-in digits need no torchvision
    from torchvision.datasets import mnist

    raw = os.path.join(root, "MNIST", "raw")
    if not download:
        missing = [
            os.path.join(raw, name) for names in MNIST_FILES.values() for name in names
            if not os.path.isfile(os.path.join(raw, name))
        ]
        if missing:
            if all(os.path.isfile(path + ".gz") for path in missing):
                # torchvision reads only unpacked idx files; its download step unpacks official .gz
                # files already present (their md5 matches) without touching the network.
                raise DataError(f"mnist: {raw} holds only the .gz files; pass --download to unpack them "
                                f"(no network needed for the official files) or gunzip them")
            raise _missing(missing, "mnist", root)
    splits = {}
    for split, (image_file, label_file) in MNIST_FILES.items():
        try:
            dataset = torchvision.datasets.MNIST(root, train=split == "train", download=download)
        except Exception as error:  # noqa: BLE001 - torchvision raises many kinds for a bad file
            if download and not all(os.path.isfile(os.path.join(raw, n)) for n in (image_file, label_file)):
                raise DataError(f"mnist: download into {raw} failed ({one_line(error)})") from None
            raise _mnist_fault(raw, image_file, label_file, mnist, error) from None
        images = dataset.data.numpy()
        labels = dataset.targets.numpy().astype(np.int64)
        where = os.path.join(raw, image_file)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataError(f"{where}: expected uint8 images of 28x28, got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise DataError(
                f"{os.path.join(raw, label_file)}: {len(labels)} labels for {len(images)} images in {where}"
            )
        _check_labels(labels, 10, os.path.join(raw, label_file))
        splits[split] = SourceSplit(images[..., None], labels)
    return Source("mnist", list(DIGIT_CLASS_NAMES), splits)


def _mnist_fault(raw, image_file, label_file, mnist_module, error) -> DataError:
    """Find which idx file torchvision could not parse, for a message that names it."""
    for name, reader in ((image_file, mnist_module.read_image_file), (label_file, mnist_module.read_label_file)):
        path = os.path.join(raw, name)
        try:
            reader(path)
        except Exception as file_error:  # noqa: BLE001
            return DataError(f"{path}: not a valid MNIST idx file ({one_line(file_error)})")
    return DataError(f"mnist: torchvision could not read {raw} ({one_line(error)})")


def _check_labels(labels: np.ndarray, n_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"{where}: labels must lie in 0..{n_classes - 1}, found {labels.min()}..{labels.max()}")


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 python batch holds: dicts, lists, str/bytes, numbers and numpy arrays.

    A pickle may name any callable to build its objects (`__reduce__`), so unpickling a file from
    someone else runs whatever code it names; here every global but numpy's array rebuilders is refused.
    """

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")}  # the official batches name numpy.core (numpy 1)

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds only data, this "
                                     f"pickle would call code")


def _read_cifar_file(path: str, needed: tuple[str, ...]) -> dict:
    """One CIFAR-10 batch (or batches.meta) as its dict; DataError naming the file if it is anything else."""
    try:
        with open(path, "rb") as stream:
            entry = _CifarUnpickler(stream, encoding="latin1").load()  # the official files are Python 2 pickles
    except Exception as error:  # noqa: BLE001 - a bad pickle raises anything from EOFError to KeyError
        raise DataError(f"{path}: not a valid CIFAR-10 pickle ({one_line(error)})") from None
    if not isinstance(entry, dict) or any(key not in entry for key in needed):
        raise DataError(f"{path}: not a CIFAR-10 python batch (missing {', '.join(needed)})")
    return entry


def load_cifar10(root: str, download: bool = False) -> Source:
    """CIFAR-10 from root/cifar-10-batches-py (torchvision's layout), read by a restricted unpickler.

    torchvision only downloads (--download): it checks the archive's and the files' md5 against the
    official release before it unpickles any. Batches from anywhere else are read here, by an unpickler
    that runs no code (torchvision's own reader would run any code a planted batch names).
    """
    folder = os.path.join(root, CIFAR_FOLDER)
    if download:
        import torchvision  # deferred: the built-in digits need no torchvision

        try:  # the test split: the smallest load that makes torchvision fetch and check everything
            torchvision.datasets.CIFAR10(root, train=False, download=True)
        except Exception as error:  # noqa: BLE001 - network, archive and md5 failures all land here
            raise DataError(f"cifar10: download into {root} failed ({one_line(error)})") from None
    names = CIFAR_FILES["train"] + CIFAR_FILES["test"] + CIFAR_FILES["meta"]
    missing = [os.path.join(folder, n) for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise _missing(missing, "cifar10", root)
    meta = os.path.join(folder, "batches.meta")
    class_names = [str(name) for name in _read_cifar_file(meta, ("label_names",))["label_names"]]
    splits = {}
    for split in ("train", "test"):
        images, labels = [], []
        for name in CIFAR_FILES[split]:
            path = os.path.join(folder, name)
            entry = _read_cifar_file(path, ("data", "labels"))
            data = entry["data"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                shape = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise DataError(f"{path}: data is {shape}; expected uint8 rows of 3072 bytes (32x32x3 images)")
            try:
                file_labels = np.asarray(entry["labels"], dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as error:
                raise DataError(f"{path}: labels are not integers ({one_line(error)})") from None
            if len(file_labels) != len(data):
                raise DataError(f"{path}: {len(file_labels)} labels for {len(data)} images")
            _check_labels(file_labels, len(class_names), path)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # planes -> (N, 32, 32, 3)
            labels.append(file_labels)
        splits[split] = SourceSplit(np.concatenate(images), np.concatenate(labels))
    return Source("cifar10", class_names, splits)


def load_digits(train_size: int, test_size: int, seed: int, workers: int | None = None) -> Source:
    """The built-in hand-written-looking digits (no files needed), rendered a chunk at a time as they are written."""
    from data_prep import digits

    splits = {}
    for split, count in (("train", train_size), ("test", test_size)):
        def stream(chunk_size: int, split=split, count=count):
            for images, labels in digits.render_chunks(split, count, seed, chunk_size, workers=workers):
                yield images, labels, None

        splits[split] = SourceSplit(None, None, size=count, stream=stream)
    fonts = [os.path.basename(f) for f in digits.find_fonts()]
    return Source("digits", list(DIGIT_CLASS_NAMES), splits, info={"fonts": fonts})


def load_source(config) -> Source:
    """The Source a checked PrepareConfig names; train_size/test_size keep the first N (digits: render N)."""
    if config.dataset == "digits":
        return load_digits(config.train_size or 60000, config.test_size or 10000, config.seed, workers=config.workers)
    if config.dataset == "folder":
        return load_folder(config)
    if config.dataset in IMAGENET_SIZES:
        return load_imagenet(config.dataset, config.root, config.train_size, config.test_size)
    load = load_mnist if config.dataset == "mnist" else load_cifar10
    source = load(config.root, config.download)
    for split, size in (("train", config.train_size), ("test", config.test_size)):
        if size is not None:
            part = source.splits[split]
            source.splits[split] = SourceSplit(part.images[:size], part.labels[:size])
    return source
