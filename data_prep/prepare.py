"""Prepare a dataset: images -> quantized byte sequences in webdataset shards, plus manifest.json.

    python -m data_prep.prepare --dataset digits --out data/digits
    python -m data_prep.prepare --dataset mnist --root data/src --out data/mnist --download
    python -m data_prep.prepare --dataset cifar10 --root data/src --out data/cifar10 --bins 256 --order patch:4
    python -m data_prep.prepare --dataset folder --root my_photos --size 32x32 --channels 3 --out data/photos
    python -m data_prep.prepare --dataset imagenet32 --root data/src/imagenet32 --out data/imagenet32

The folder gets train-000000.tar ..., test-000000.tar ..., preview.png and, last, manifest.json.
Exit codes: 0 done, 1 failure (bad or missing source files), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import os
import sys
import time
from dataclasses import dataclass, fields

import numpy as np

from common.exits import run_command
from common.files import check_writable, writable_message
from data_prep import shards as shard_io
from data_prep.captions import captions_for_labels
from data_prep.codec import check_bins, encode_images, parse_order
from data_prep.errors import DataError
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, load_manifest, manifest_path, write_manifest
from data_prep.preview import PreviewSamples
from data_prep.folders import RESIZE_MODES, parse_size
from data_prep.sources import DATASETS, SHAPES, load_source

PREVIEW_NAME = "preview.png"
# Images read, quantized and handed to the shard writers at a time (default --chunk-size: this many
# bytes of images): with a few shards in flight, what bounds memory whatever the dataset size.
CHUNK_BYTES = 16 << 20


class UsageError(DataError):
    """Bad arguments (exit code 2), as opposed to bad or missing source data (exit code 1)."""


@dataclass
class PrepareConfig:
    """Everything `prepare` needs; the command line maps one-to-one onto it."""

    dataset: str
    out: str
    root: str | None = None
    bins: int = 256
    order: str = "raster"
    seed: int = 0
    shard_size: int | None = None  # samples per shard; default: enough for 16 shards per split
    download: bool = False
    overwrite: bool = False
    train_size: int | None = None  # digits: how many to render (60,000); mnist/cifar10: keep the first N
    test_size: int | None = None  # digits: 10,000 by default
    workers: int | None = None  # processes rendering digits and writing shards (default: all cores)
    progress: bool = True
    chunk_size: int | None = None  # images read and quantized at a time (default: CHUNK_BYTES of images)
    # --dataset folder only:
    size: str | None = None  # "HxW": resize the shorter side and centre-crop (or resize="exact")
    channels: int | None = None  # 1 (grey) or 3 (RGB)
    resize: str = "crop"
    test_root: str | None = None  # a second folder in the same layout as the test split ...
    test_fraction: float | None = None  # ... or this seeded fraction of each class (default 0.1)
    captions: str | None = None  # JSONL or CSV: image path relative to the root, caption
    skip_bad: bool = False  # leave out (and count) files PIL cannot read instead of stopping


FOLDER_ONLY = ("size", "channels", "test_root", "test_fraction", "captions", "skip_bad")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _validate_folder(config: PrepareConfig) -> tuple[int, int, int]:
    for name in ("size", "channels"):
        if getattr(config, name) is None:
            raise UsageError(f"{_flag(name)} is required for --dataset folder")
    try:
        height, width = parse_size(config.size)
    except DataError as error:
        raise UsageError(str(error)) from None
    if config.channels not in (1, 3):
        raise UsageError(f"--channels must be 1 (grey) or 3 (RGB), got {config.channels}")
    if config.resize not in RESIZE_MODES:
        raise UsageError(f"--resize {config.resize!r} unknown: choose one of {', '.join(RESIZE_MODES)}")
    if config.test_root is not None and config.test_fraction is not None:
        raise UsageError("pass either --test-root or --test-fraction, not both")
    if config.test_fraction is not None and not 0 < config.test_fraction < 1:
        raise UsageError(f"--test-fraction must lie strictly between 0 and 1, got {config.test_fraction}")
    for name in ("root", "test_root", "captions"):
        path = getattr(config, name)
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{_flag(name)} {path}: not found")
    return height, width, config.channels


def validate(config: PrepareConfig) -> tuple[int, int, int]:
    """Check the arguments before any work; UsageError naming the one at fault. Returns (H, W, C)."""
    if config.dataset not in DATASETS:
        raise UsageError(f"--dataset {config.dataset!r} unknown: choose one of {', '.join(DATASETS)}")
    if config.dataset != "digits" and config.root is None:
        raise UsageError(f"--root is required for --dataset {config.dataset} (the folder of source files)")
    if config.dataset == "folder":
        height, width, channels = _validate_folder(config)
    else:
        given = [name for name in FOLDER_ONLY if getattr(config, name) not in (None, False)]
        if config.resize != "crop":
            given.append("resize")
        if given:
            raise UsageError(f"{_flag(given[0])} is only for --dataset folder")
        height, width, channels = SHAPES[config.dataset]
    try:
        check_bins(config.bins)
        parse_order(config.order, height, width)
    except DataError as error:
        raise UsageError(str(error)) from None
    for name in ("shard_size", "train_size", "test_size", "workers", "chunk_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {value}")
    if config.dataset == "folder" and (config.train_size or config.test_size):
        raise UsageError("--train-size and --test-size are not for --dataset folder (use --test-fraction)")
    return height, width, channels


def _recorded_roots(config: PrepareConfig) -> dict:
    """The source folders a manifest records for `config` (absolute; the digits are drawn, not read)."""
    if config.dataset == "digits":
        return {}
    return {name: None if getattr(config, name) is None else os.path.abspath(getattr(config, name))
            for name in (("root", "test_root") if config.dataset == "folder" else ("root",))}


def _same(key: str, there, now) -> bool:
    if key in ("root", "test_root") and there is not None and now is not None:
        return os.path.realpath(there) == os.path.realpath(now)  # the same folder by another path
    return there == now


def manifest_differences(old: Manifest, config: PrepareConfig, shape: tuple[int, int, int]) -> list[str]:
    """What the folder's manifest records differently from what `config` asks, as "KEY X there, Y now".

    Compared: dataset, the source folders, image size, channels, bins, order and seed (what makes other
    samples); not the shard size (the same samples, cut otherwise). A folder prepared before the
    manifest recorded its root is compared on the rest.
    """
    height, width, channels = shape
    there = {"dataset": old.dataset, "size": f"{old.height}x{old.width}", "channels": old.channels,
             "bins": old.bins, "order": old.order, "seed": old.seed}
    now = {"dataset": config.dataset, "size": f"{height}x{width}", "channels": channels, "bins": config.bins,
           "order": config.order, "seed": config.seed}
    roots = _recorded_roots(config)
    for key in ("root", "test_root"):
        # compared when recorded there, or asked now of a folder whose manifest records its roots
        if key in old.source or (roots.get(key) is not None and "root" in old.source):
            there[key], now[key] = old.source.get(key), roots.get(key)
    return [f"{key} {there[key]!r} there, {now[key]!r} now" for key in there if not _same(key, there[key], now[key])]


def _our_files(out: str) -> list[str]:
    # .manifest.* and .preview.*: what atomic_file leaves of them after a crash (*.tmp: older versions')
    patterns = ["train-*.tar", "test-*.tar", "*.partial", "*.tmp", ".manifest.*", ".preview.*", PREVIEW_NAME,
                MANIFEST_NAME]
    return sorted({path for pattern in patterns for path in glob.glob(os.path.join(glob.escape(out), pattern))})


def check_output(config: PrepareConfig, shape: tuple[int, int, int]) -> None:
    """Refuse an --out that holds another dataset (or files that are not ours) unless --overwrite.

    Refused before anything is read or removed, so the folder stays as it was. The same arguments again
    rebuild the folder in place (the same bytes while the source is unchanged).
    """
    out = config.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a folder")
    try:  # a folder that cannot be written is found now, not after the source is read
        check_writable(out)
    except OSError as error:
        raise UsageError(writable_message("--out", out, error)) from None
    if not os.path.isdir(out) or config.overwrite:
        return
    if os.path.isfile(manifest_path(out)):
        try:
            differences = manifest_differences(load_manifest(out), config, shape)
        except DataError as error:
            raise UsageError(f"--out {out} holds a manifest that cannot be read ({error}); "
                             f"pass --overwrite to replace the folder") from None
        if differences:
            raise UsageError(f"--out {out} was prepared with other arguments: {'; '.join(differences)}; "
                             f"pass --overwrite to replace it, or choose another --out")
        return
    foreign = sorted(set(os.listdir(out)) - {os.path.basename(p) for p in _our_files(out)})
    if foreign:
        raise UsageError(
            f"--out {out} is not empty and not a prepared folder (found {foreign[0]!r}); "
            f"choose an empty folder or pass --overwrite"
        )


def prepare(config: PrepareConfig) -> Manifest:
    """Write the prepared folder for `config` and return its manifest (the manifest file comes last)."""
    from tqdm import tqdm

    height, width, channels = validate(config)
    check_output(config, (height, width, channels))
    start = time.perf_counter()

    # The digits, image folders and ImageNet are rendered or read later, a chunk at a time, as the shards
    # are written (mnist and cifar10 are small enough to load whole).
    source = load_source(config)

    os.makedirs(config.out, exist_ok=True)
    # The manifest goes first: from here until the new one is written, the folder reads as unfinished.
    for path in _our_files(config.out):
        os.remove(path)

    splits = {}
    total = sum(len(part) for part in source.splits.values())
    chunk_size = config.chunk_size or max(1, CHUNK_BYTES // (height * width * channels))
    with tqdm(total=total, desc="writing shards", unit="img", disable=not config.progress) as bar:
        for split_code, (split, part) in enumerate(sorted(source.splits.items(), key=lambda kv: kv[0] != "train")):
            # One random stream per split for the caption templates, so either split can be re-made alone.
            # Its draws go one per sample in order, so they do not depend on the chunk size.
            rng = np.random.default_rng([config.seed, 1 + split_code])
            preview = PreviewSamples(len(source.class_names)) if split == "train" else None
            encoded = _encoded_chunks(config, source, part, chunk_size, rng, preview)
            shard_size = config.shard_size or shard_io.default_shard_size(len(part), sample_bytes=height * width * channels)
            splits[split] = shard_io.write_split_stream(config.out, split, encoded, shard_size, bar,
                                                        workers=config.workers, expected=len(part))
            if splits[split].total == 0:  # nothing in the source, or nothing readable in it
                raise DataError(f"{config.dataset}: the {split} split is empty")
            release_freed_memory()
            if preview is not None:
                preview.write(os.path.join(config.out, PREVIEW_NAME), height, width, channels, config.bins,
                              config.order)
        total = sum(info.total for info in splits.values())

    info = dict(_recorded_roots(config), **source.info)
    info.update({f"{split}_size": splits[split].total for split in splits})
    manifest = Manifest(
        format_version=FORMAT_VERSION, dataset=config.dataset, height=height, width=width, channels=channels,
        bins=config.bins, order=config.order, seed=config.seed, class_names=list(source.class_names),
        splits=splits, source=info,
    )
    write_manifest(config.out, manifest)
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{splits[s].total:,} {s}" for s in splits)
    bad = info.get("skipped_bad", 0)
    skipped = f", {bad:,} unreadable file{'s' if bad != 1 else ''} skipped" if bad else ""
    print(
        f"prepared {config.dataset} in {config.out}: {total:,} images ({counts}{skipped}) in {elapsed:.1f} s, "
        f"{total / elapsed:,.0f} images/s",
        flush=True,
    )
    return manifest


def release_freed_memory() -> None:
    """Hand the heap that a split's chunks freed back to the system (glibc keeps it for reuse otherwise).

    The preview's grid writer then imports torch and torchvision (about 680 MB) on top of what is
    left: without this, on top of the few hundred MB that the chunks and shards in flight once took.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


def _encoded_chunks(config: PrepareConfig, source, part, chunk_size: int, rng, preview):
    """The split as (byte sequences, labels, captions) chunks: quantized, ordered and captioned a chunk at a time."""
    for images, labels, given in part.chunks(chunk_size):
        seqs = encode_images(images, config.bins, config.order)  # (n, H*W*C) uint8
        captions = captions_for_labels(config.dataset, source.class_names, labels, rng)
        if given is not None:  # a captions file; the templates fill in where it has none
            captions = [caption if caption is not None else template for caption, template in zip(given, captions)]
        if preview is not None:
            preview.add(seqs, labels)
        yield seqs, labels, captions


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (its --help is the reference for the flags)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.prepare",
        description="Turn MNIST, CIFAR-10, the built-in digits, a folder of your own images or downsampled "
                    "ImageNet into quantized byte sequences in webdataset shards (DIR/train-000000.tar ..., "
                    "DIR/manifest.json, DIR/preview.png).",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="which dataset to prepare")
    parser.add_argument("--root", help="the source folder: torchvision's data folder for mnist/cifar10 "
                                       "(MNIST/raw/..., cifar-10-batches-py/...); for folder, images in "
                                       "ImageFolder's layout (ROOT/CLASS/IMAGE, or ROOT/IMAGE for one class); "
                                       "for imagenet32/64, the npz batches (train_data_batch_1..10.npz, "
                                       "val_data.npz); not used by digits")
    parser.add_argument("--out", required=True, help="folder to write the prepared dataset into")
    parser.add_argument("--bins", type=int, default=256, help="quantization levels, 2..256 (256 keeps every "
                                                              "pixel value; default %(default)s)")
    parser.add_argument("--order", default="raster", help="sequence order: raster (rows, channels interleaved) "
                                                          "or patch:P (PxP patches); default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed for captions and digits (default %(default)s)")
    parser.add_argument("--shard-size", type=int, help="samples per shard (default: at least 16 shards a split)")
    parser.add_argument("--download", action="store_true", help="let torchvision download mnist/cifar10 into --root")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an --out prepared from another source or with another dataset, size, channels, "
                             "bins, order or seed (without it such a folder is refused, untouched)")
    parser.add_argument("--train-size", type=int, help="digits: training images to render (default 60000); "
                                                       "mnist/cifar10: keep only the first N")
    parser.add_argument("--test-size", type=int, help="digits: test images to render (default 10000); "
                                                      "mnist/cifar10: keep only the first N")
    parser.add_argument("--workers", type=int, help="processes rendering digits, decoding images and writing "
                                                    "shards (default: all CPU cores; small sets use one)")
    parser.add_argument("--chunk-size", type=int, help="images read, quantized and written at a time (default: "
                                                       f"{CHUNK_BYTES >> 20} MiB of images); memory stays bounded "
                                                       "by a chunk and a few shards whatever the dataset size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    folder = parser.add_argument_group("--dataset folder")
    folder.add_argument("--size", help="image size HxW, e.g. 32x32 (required)")
    folder.add_argument("--channels", type=int, help="1 (grey) or 3 (RGB) (required)")
    folder.add_argument("--resize", default="crop", help="crop: resize the shorter side to fit, then centre-crop "
                                                         "(default); exact: resize to HxW, ignoring the aspect ratio")
    folder.add_argument("--test-root", help="a second folder in the same layout: the test split")
    folder.add_argument("--test-fraction", type=float, help="without --test-root: this fraction of each class, "
                                                            "drawn with --seed, is the test split (default 0.1)")
    folder.add_argument("--captions", help="JSONL ({\"image\": PATH, \"caption\": TEXT} a line) or CSV (image,caption) "
                                           "with paths relative to --root (--test-root for its images); images "
                                           "without one get class-name templates")
    folder.add_argument("--skip-bad", action="store_true", help="leave out files PIL cannot read (counted in the "
                                                                "manifest and the summary) instead of stopping")
    return parser


def main(argv=None) -> int:
    """Command line: parse, prepare, and map errors to exit codes (2 bad arguments, 1 failure)."""
    args = build_parser().parse_args(argv)
    # every flag but --no-progress has its field's name
    names = [field.name for field in fields(PrepareConfig) if field.name != "progress"]
    config = PrepareConfig(progress=not args.no_progress, **{name: getattr(args, name) for name in names})
    try:
        return run_command("prepare", lambda: prepare(config), usage=(UsageError,), failure=(DataError, OSError))[1]
    except KeyboardInterrupt:
        print("prepare: interrupted; the folder has no manifest and reads as unfinished", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
