"""Writing one split into webdataset shards, byte-identical for the same input."""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import webdataset as wds

from data_prep.manifest import SplitInfo

MIN_SHARDS = 16  # enough for any realistic ranks x workers split to give every reader a shard
SEQ_KEY, LABEL_KEY, CAPTION_KEY = "seq.bin", "cls", "txt"
PARTIAL_SUFFIX = ".partial"
# A fixed mtime (and webdataset's fixed user, group and mode) make the tar bytes depend only on
# the samples; with the wall clock in every header the same arguments would give other bytes.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of a split: train-000000.tar."""
    return f"{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    """The webdataset __key__ of a sample: no dots (webdataset splits file names at the first dot)."""
    return f"{split}_{index:07d}"


def default_shard_size(count: int, min_shards: int = MIN_SHARDS) -> int:
    """Samples per shard that give at least min_shards shards (fewer only if there are fewer samples)."""
    return max(1, math.ceil(count / min_shards)) if count >= min_shards else 1


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_shard(job) -> tuple[str, int, str]:
    """Write one shard with webdataset's ShardWriter; return (file name, sample count, sha256).

    The shard appears under its final name only once complete: ShardWriter writes NAME.partial and
    its `post` hook renames the closed file.
    """
    out_dir, split, shard, first_sample, seqs, labels, captions = job
    written: list[str] = []

    def finished(partial_path: str) -> None:
        final = partial_path[: -len(PARTIAL_SUFFIX)]
        os.replace(partial_path, final)
        written.append(final)

    pattern = os.path.join(out_dir, f"{split}-%06d.tar{PARTIAL_SUFFIX}")
    writer = wds.ShardWriter(pattern, maxcount=len(seqs), maxsize=float("inf"), post=finished, verbose=0,
                             start_shard=shard, encoder=False, mtime=TAR_MTIME)
    # webdataset 1.0.2's TarWriter takes format= but never hands it to tarfile.open, which then writes
    # PAX headers. GNU headers (names here are short) are the same for every reader and build about
    # 40% faster in python's tarfile, the bottleneck of preparing.
    writer.tarstream.tarstream.format = tarfile.GNU_FORMAT
    try:
        for index, (seq, label, caption) in enumerate(zip(seqs, labels.tolist(), captions)):
            # Raw bytes (encoder=False): no per-sample encoding, and the reader needs no decoder.
            writer.write({
                "__key__": sample_key(split, first_sample + index),
                SEQ_KEY: seq.tobytes(),
                LABEL_KEY: str(label).encode("ascii"),
                CAPTION_KEY: caption.encode("utf-8"),
            })
        writer.close()
    except BaseException:
        writer.post = None  # close the broken shard under its .partial name: it never looks complete
        writer.close()
        raise
    (path,) = written
    return os.path.basename(path), len(seqs), file_sha256(path)


# Below this many samples a process pool costs more than it saves.
PARALLEL_MIN_SAMPLES = 20000


def write_split(out_dir: str, split: str, seqs: np.ndarray, labels: np.ndarray, captions: list[str],
                shard_size: int, progress=None, workers: int | None = None) -> SplitInfo:
    """Write samples (seq.bin, cls, txt) into split-%06d.tar shards of shard_size samples each.

    Shards are independent, so blocks of them are written by several processes at once (python's
    tarfile header code is the bottleneck); the bytes do not depend on how many.
    """
    jobs = []
    for shard, start in enumerate(range(0, len(seqs), shard_size)):
        stop = start + shard_size
        jobs.append((out_dir, split, shard, start, seqs[start:stop], labels[start:stop], captions[start:stop]))
    if len(seqs) < PARALLEL_MIN_SAMPLES:
        workers = 1
    workers = min(len(jobs), workers or os.cpu_count() or 1)
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    results = []
    try:
        for job, result in zip(jobs, pool.map(_write_shard, jobs) if pool else map(_write_shard, jobs)):
            results.append(result)
            if progress is not None:
                progress.update(len(job[4]))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return SplitInfo(
        shards=[name for name, _, _ in results],
        counts=[count for _, count, _ in results],
        sha256=[digest for _, _, digest in results],
    )
