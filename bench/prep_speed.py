"""Benchmark: prepare a CIFAR-10-sized synthetic set and print images/s.

    python bench/prep_speed.py [--train 50000] [--test 10000] [--order raster] [--bins 256]

Writes random CIFAR-10 python batches (the format torchvision reads) to a temporary folder, runs
the real `prepare` on them (torchvision load, quantize + order, captions, shards, checksums,
preview, manifest), then times the stages once more on their own. Goal: 50,000 training images
in under 15 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import shards  # noqa: E402
from data_prep.captions import captions_for_labels  # noqa: E402
from data_prep.codec import encode_images  # noqa: E402
from data_prep.prepare import PrepareConfig, prepare  # noqa: E402
from data_prep.sources import load_cifar10  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_synthetic_cifar(root: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images in CIFAR-10's on-disk layout: 5 training batches, a test batch, batches.meta."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for name, n in [(f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)] + [("test_batch", n_test)]:
        entry = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, size=n).tolist()}
        with open(os.path.join(folder, name), "wb") as stream:
            pickle.dump(entry, stream, protocol=4)
    with open(os.path.join(folder, "batches.meta"), "wb") as stream:
        pickle.dump({"label_names": CLASSES}, stream)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the shard writers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds) of one call."""
    start, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start, cpu_seconds() - cpu


def main(argv=None) -> int:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=50000)
    parser.add_argument("--test", type=int, default=10000)
    parser.add_argument("--order", default="raster")
    parser.add_argument("--bins", type=int, default=256)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="prep_speed_") as work:
        root, out = os.path.join(work, "src"), os.path.join(work, "out")
        write_synthetic_cifar(root, args.train, args.test)
        _, total, total_cpu = timed(prepare, PrepareConfig(dataset="cifar10", root=root, out=out, bins=args.bins,
                                                order=args.order, progress=False))
        n_all = args.train + args.test

        # The stages on their own, on the training split.
        source, t_load, c_load = timed(load_cifar10, root)
        images, labels = source.splits["train"].images, source.splits["train"].labels
        seqs, t_encode, c_encode = timed(encode_images, images, args.bins, args.order)
        captions, t_captions, c_captions = timed(captions_for_labels, "cifar10", CLASSES, labels, np.random.default_rng(0))
        stage_out = os.path.join(work, "stages")
        os.makedirs(stage_out)
        _, t_write, c_write = timed(shards.write_split, stage_out, "train", seqs, labels, captions,
                           shards.default_shard_size(len(seqs)))
        size = sum(os.path.getsize(os.path.join(stage_out, f)) for f in os.listdir(stage_out))

    n = args.train
    print(f"prepare cifar10-sized synthetic set: {args.train:,} train + {args.test:,} test, 32x32x3, "
          f"bins {args.bins}, order {args.order}, {os.cpu_count()} CPU cores")
    print(f"{'stage':<34}{'wall s':>8}{'CPU s':>8}{'images/s':>11}")
    rows = [
        ("load both splits (torchvision)", t_load, c_load, n_all),
        ("quantize + order (train)", t_encode, c_encode, n),
        ("captions (train)", t_captions, c_captions, n),
        ("write shards + sha256 (train)", t_write, c_write, n),
        ("whole prepare, both splits", total, total_cpu, n_all),
    ]
    for name, seconds, cpu, count in rows:
        print(f"{name:<34}{seconds:>8.2f}{cpu:>8.2f}{count / seconds:>11,.0f}")
    print(f"train shards: {size / 1e6:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
