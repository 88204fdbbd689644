"""Writing one split into webdataset shards, byte-identical for the same input."""

from __future__ import annotations

import hashlib
import math
import os

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


def write_split(out_dir: str, split: str, seqs: np.ndarray, labels: np.ndarray, captions: list[str],
                shard_size: int, progress=None) -> SplitInfo:
    """Write samples (seq.bin, cls, txt) into split-%06d.tar shards; each appears under its final name
    only once complete (ShardWriter writes NAME.partial, renamed when the shard is closed)."""
    written: list[str] = []

    def finished(partial_path: str) -> None:
        final = partial_path[: -len(PARTIAL_SUFFIX)]
        os.replace(partial_path, final)
        written.append(final)

    pattern = os.path.join(out_dir, f"{split}-%06d.tar{PARTIAL_SUFFIX}")
    label_bytes = [str(int(label)).encode("ascii") for label in labels.tolist()]
    writer = wds.ShardWriter(pattern, maxcount=shard_size, maxsize=float("inf"), post=finished, verbose=0,
                             encoder=False, mtime=TAR_MTIME)
    try:
        for index in range(len(seqs)):
            # Raw bytes (encoder=False): no per-sample encoding, and the reader needs no decoder.
            writer.write({
                "__key__": sample_key(split, index),
                SEQ_KEY: seqs[index].tobytes(),
                LABEL_KEY: label_bytes[index],
                CAPTION_KEY: captions[index].encode("utf-8"),
            })
            if progress is not None and index % 1000 == 999:
                progress.update(1000)
        writer.close()
    except BaseException:
        writer.post = None  # close the broken shard under its .partial name: it never looks complete
        writer.close()
        raise
    if progress is not None:
        progress.update(len(seqs) % 1000)
    counts = [min(shard_size, len(seqs) - i * shard_size) for i in range(len(written))]
    return SplitInfo(
        shards=[os.path.basename(path) for path in written],
        counts=counts,
        sha256=[file_sha256(path) for path in written],
    )
