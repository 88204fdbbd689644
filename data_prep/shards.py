"""Writing one split into webdataset shards, byte-identical for the same input."""

from __future__ import annotations

import math
import os
import sys
import tarfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from common.files import file_sha256
from data_prep.manifest import SplitInfo

MIN_SHARDS = 16  # enough for any realistic ranks x workers split to give every reader a shard
SEQ_KEY, LABEL_KEY, CAPTION_KEY = "seq.bin", "cls", "txt"
PARTIAL_SUFFIX = ".partial"
# A fixed mtime (and webdataset's fixed user, group and mode) make the tar bytes depend only on
# the samples; with the wall clock in every header the same arguments would give other bytes.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member


def sample_key(split: str, index: int) -> str:
    """The webdataset __key__ of a sample: no dots (webdataset splits file names at the first dot)."""
    return f"{split}_{index:07d}"


# The default shard size keeps shards under this (shards of ImageNet 64 would otherwise be 1 GB each).
MAX_DEFAULT_SHARD_BYTES = 64 << 20


def default_shard_size(count: int, sample_bytes: int | None = None) -> int:
    """Samples per shard that give at least MIN_SHARDS shards (fewer only if there are fewer samples),
    and shards of at most MAX_DEFAULT_SHARD_BYTES of sequences when sample_bytes is given."""
    size = max(1, math.ceil(count / MIN_SHARDS))
    if sample_bytes:
        size = min(size, max(1, MAX_DEFAULT_SHARD_BYTES // sample_bytes))
    return size


class OpenShard:
    """One shard being written with webdataset's ShardWriter, fed samples in as many pieces as come.

    The shard appears under its final name only once complete: ShardWriter writes NAME.partial and
    its `post` hook renames the closed file.
    """

    def __init__(self, out_dir: str, split: str, shard: int):
        # Imported here, not at the top: webdataset imports torch (about 500 MB resident), which a process
        # that hands every shard to the writer processes never needs (see _start_writer_process).
        import webdataset as wds

        self.split, self.count, self.written = split, 0, []
        pattern = os.path.join(out_dir, f"{split}-%06d.tar{PARTIAL_SUFFIX}")
        # maxcount: never roll over to a second file; the caller closes the shard.
        self.writer = wds.ShardWriter(pattern, maxcount=1 << 62, maxsize=float("inf"), post=self._finished,
                                      verbose=0, start_shard=shard, encoder=False, mtime=TAR_MTIME)
        # webdataset 1.0.2's TarWriter takes format= but never hands it to tarfile.open, which then writes
        # PAX headers. GNU headers (names here are short) are the same for every reader and build about
        # 40% faster in python's tarfile, the bottleneck of preparing.
        self.writer.tarstream.tarstream.format = tarfile.GNU_FORMAT

    def _finished(self, partial_path: str) -> None:
        final = partial_path[: -len(PARTIAL_SUFFIX)]
        os.replace(partial_path, final)
        self.written.append(final)

    def write(self, first_sample: int, seqs: np.ndarray, labels: np.ndarray, captions: list[str]) -> None:
        """Append samples first_sample, first_sample + 1, ... (seq.bin, cls, txt)."""
        try:
            for index, (seq, label, caption) in enumerate(zip(seqs, labels.tolist(), captions)):
                # Raw bytes (encoder=False): no per-sample encoding, and the reader needs no decoder.
                self.writer.write({
                    "__key__": sample_key(self.split, first_sample + index),
                    SEQ_KEY: seq.tobytes(),
                    LABEL_KEY: str(label).encode("ascii"),
                    CAPTION_KEY: caption.encode("utf-8"),
                })
                self.count += 1
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close a broken shard under its .partial name: it never looks complete (a second call does nothing)."""
        if self.writer is not None:
            self.writer.post = None
            self.writer.close()
            self.writer = None

    def close(self) -> tuple[str, int, str]:
        """Finish the shard; return (file name, sample count, sha256)."""
        self.writer.close()
        (path,) = self.written
        return os.path.basename(path), self.count, file_sha256(path)


def _start_writer_process() -> None:
    """Pool initializer: a writer process that has not imported torch loads webdataset without it."""
    # webdataset's package imports torch only for its DataLoader base classes and falls back to stubs when
    # torch is missing (webdataset/pytorch.py); writing a tar needs none of it. Without this each writer
    # would import torch: about 500 MB resident and 1.4 s. A parent that already has torch (mnist and
    # cifar10 load through torchvision) shares it with the forked writers instead.
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # "import torch" now raises ModuleNotFoundError in this process only


def _write_shard(job) -> tuple[str, int, str]:
    """Write one whole shard from the pieces it was gathered in (a pool job); return (file name, count, sha256)."""
    out_dir, split, shard, first_sample, pieces = job
    opened = OpenShard(out_dir, split, shard)
    for seqs, labels, captions in pieces:
        opened.write(first_sample, seqs, labels, captions)
        first_sample += len(seqs)
    return opened.close()


# Below this many samples a process pool costs more than it saves.
PARALLEL_MIN_SAMPLES = 20000
# A shard handed to a writer process is gathered in memory first (up to 2 x `workers` of them in flight);
# larger shards are written in the main process as their samples arrive, so memory stays bounded.
MAX_GATHERED_SHARD_BYTES = 64 << 20
# ... and the shards in flight hold at most this many bytes of sequences, though always one per writer plus
# one waiting: large shards (64 MB of ImageNet 64) take a writer seconds each, far longer than gathering
# the next one, so a second one per writer would only cost memory.
MAX_IN_FLIGHT_BYTES = 3 * MAX_GATHERED_SHARD_BYTES


def shards_in_flight(workers: int, shard_bytes: int) -> int:
    """How many gathered shards may wait for or be written by `workers` writer processes at once."""
    return max(workers + 1, min(2 * workers, MAX_IN_FLIGHT_BYTES // max(1, shard_bytes)))


def write_split(out_dir: str, split: str, seqs: np.ndarray, labels: np.ndarray, captions: list[str],
                shard_size: int, progress=None, workers: int | None = None) -> SplitInfo:
    """Write samples held in memory (seq.bin, cls, txt) into split-%06d.tar shards of shard_size samples."""
    return write_split_stream(out_dir, split, [(seqs, labels, captions)], shard_size, progress, workers,
                              expected=len(seqs))


def write_split_stream(out_dir: str, split: str, chunks, shard_size: int, progress=None,
                       workers: int | None = None, expected: int | None = None) -> SplitInfo:
    """Write a stream of (seqs [n, L] uint8, labels [n], captions) chunks into shards of shard_size samples.

    The bytes depend only on the samples and shard_size, not on how the stream is cut into chunks
    nor on the number of workers. Whole shards go to writer processes (python's tarfile header code
    is the bottleneck), at most shards_in_flight of them, so memory holds a chunk plus a few shards;
    shards over MAX_GATHERED_SHARD_BYTES, or a single worker, stream into an open shard instead.
    expected: how many samples are coming (for the choice of a pool; None: unknown, use one).
    """
    workers = workers or os.cpu_count() or 1
    if expected is not None:  # one writer for a small split, and never more writers than shards
        workers = 1 if expected < PARALLEL_MIN_SAMPLES else min(workers, math.ceil(expected / shard_size))
    results: list[tuple[str, int, str]] = []
    pool = None
    in_flight: deque = deque()
    opened: OpenShard | None = None  # the shard being streamed (no pool)
    gathered: list = []  # pieces of the shard being gathered for the pool
    filled, shard, first = 0, 0, 0  # samples in the current shard, its number, its first sample
    sample_bytes = 0  # bytes of one sequence, known from the first chunk

    def done(count: int) -> None:
        if progress is not None:
            progress.update(count)

    def finish_shard() -> None:
        if pool is None:
            results.append(opened.close())
        else:  # the pieces go as they are (pickled one by one): no concatenated copy of the shard here
            in_flight.append(pool.submit(_write_shard, (out_dir, split, shard, first, gathered)))

    def collect(wait_all: bool) -> None:
        # up to two shards per writer in flight: one being written, the next already gathered, so the
        # writers never wait for the main process to gather (memory: shards_in_flight shards)
        limit = shards_in_flight(workers, shard_size * sample_bytes)
        while in_flight and (wait_all or len(in_flight) >= limit or in_flight[0].done()):
            result = in_flight.popleft().result()
            results.append(result)
            done(result[1])

    try:
        for seqs, labels, captions in chunks:
            start, sample_bytes = 0, seqs.shape[1]
            while start < len(seqs):
                take = min(shard_size - filled, len(seqs) - start)
                piece = (seqs[start:start + take], labels[start:start + take], captions[start:start + take])
                if pool is None and workers > 1 and shard_size * seqs.shape[1] <= MAX_GATHERED_SHARD_BYTES:
                    pool = ProcessPoolExecutor(max_workers=workers, initializer=_start_writer_process)
                if pool is not None:
                    # part of a chunk is copied: a view would keep the whole chunk alive while the shard waits
                    gathered.append(piece if take == len(seqs) else (piece[0].copy(), piece[1].copy(), piece[2]))
                else:
                    if opened is None:
                        opened = OpenShard(out_dir, split, shard)
                    opened.write(first + filled, *piece)
                    done(take)
                filled += take
                start += take
                if filled == shard_size:
                    finish_shard()
                    collect(wait_all=False)
                    opened, gathered = None, []
                    shard, first, filled = shard + 1, first + filled, 0
        if filled:
            finish_shard()
            opened = None
        collect(wait_all=True)
    except BaseException:
        if opened is not None:
            opened.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return SplitInfo(
        shards=[name for name, _, _ in results],
        counts=[count for _, count, _ in results],
        sha256=[digest for _, _, digest in results],
    )
