"""Reading a prepared folder: endless training batches, finite evaluation batches, samples by index.

Training follows webdataset's multi-node recipe: shards are resampled (an endless stream of shard
names), split by node (rank) and by DataLoader worker, read and shuffled in the workers, batched in
the workers, then unbatched, shuffled across workers and re-batched in the main process. Every rank
therefore yields batches forever and never waits on another. Nothing depends on time, process ids or
torch.distributed: every random choice is seeded from (seed, epoch, rank, worker), so a call's stream
is a function of its arguments.

The endless stream is cut into epochs of `epoch_batches` batches, each read by a fresh pipeline with
its own seeds (webdataset's with_epoch idea, with the epoch number passed in explicitly: worker copies
of a dataset do not carry an epoch counter forward). That keeps resume cheap: `start_batch=N` starts
at epoch N // epoch_batches and reads and drops only the N % epoch_batches batches before N.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import tarfile
from itertools import islice
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds

from data_prep.errors import DataError
from data_prep.manifest import Manifest, load_manifest
from data_prep.shards import CAPTION_KEY, LABEL_KEY, SEQ_KEY

WORKER_BATCH = 64  # samples a worker hands over at once (amortizes the inter-process transfer)
EPOCH_BATCHES = 500  # batches per pipeline epoch: the most a resume ever reads and drops


class Batch(NamedTuple):
    """seqs uint8 [B, L], labels long [B], captions list of B strings."""

    seqs: torch.Tensor
    labels: torch.Tensor
    captions: list


def _check_share(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} not in 0..{world_size - 1} (world_size {world_size})")


def _split_urls(data_dir, split: str) -> tuple[Manifest, list[str]]:
    manifest = load_manifest(data_dir)
    if split not in manifest.splits:
        raise DataError(f"{data_dir}: no split {split!r} (has {', '.join(manifest.splits)})")
    urls = [os.path.join(os.fspath(data_dir), name) for name in manifest.splits[split].shards]  # manifest order
    for url in urls:
        if not os.path.exists(url):  # exists, not isfile: a pipe or device is read like a file
            raise DataError(f"{url}: shard listed in the manifest is missing")
    return manifest, urls


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: leave SIGTERM/SIGUSR1 to the main process.

    Slurm signals every process of a job step; a worker killed by it makes the DataLoader raise
    ("worker killed by signal") before the trainer can save its checkpoint. torch installs its own
    worker SIGTERM handler before worker_init_fn runs, so this overrides it. A worker still exits
    when the main process does: torch's worker watchdog notices the parent is gone.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit, kill daemonic children (reader workers) that are still alive.

    The workers ignore SIGTERM, and a loader that stopped on an error leaves them waiting: measured,
    a run that ended on a short shard then hung at exit, because multiprocessing's own exit handler
    sends SIGTERM to daemonic children and waits for them. Daemonic children die with their parent
    anyway; this makes it so. Registered after multiprocessing's handler, so it runs before it.
    """
    leftover = [process for process in multiprocessing.active_children() if process.daemon]
    if leftover:
        # torch's SIGCHLD handler would report each killed worker as an error; we are exiting.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for process in leftover:
        process.kill()


atexit.register(_kill_leftover_workers)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _Decode:
    """Webdataset sample dict -> (seq uint8 [L], label, caption), checking length and levels against the manifest."""

    def __init__(self, seq_len: int, bins: int):
        self.seq_len, self.bins = seq_len, bins

    def __call__(self, sample: dict) -> tuple[np.ndarray, int, str]:
        seq = np.frombuffer(sample[SEQ_KEY], dtype=np.uint8)
        if seq.shape[0] != self.seq_len:
            raise DataError(
                f"{sample.get('__url__', '?')}: sample {sample['__key__']} has {seq.shape[0]} bytes, "
                f"expected {self.seq_len}"
            )
        # A byte outside the levels would otherwise surface in the model as an error naming no shard.
        if seq.size and int(seq.max()) >= self.bins:
            raise DataError(f"{sample.get('__url__', '?')}: sample {sample['__key__']} has value {int(seq.max())}, "
                            f"outside the manifest's {self.bins} levels; run python -m data_prep.verify on the folder")
        return seq, int(sample[LABEL_KEY]), sample[CAPTION_KEY].decode("utf-8")


class _CheckedShardSamples:
    """Pipeline stage: shard urls -> samples (webdataset's tar reading), each shard checked as it ends.

    A shard read to its end must hold exactly the manifest's count of samples, and a tar error names
    the shard: a truncated or damaged shard stops the run instead of reading as a shorter one. Only
    counting, so it costs nothing; `python -m data_prep.verify` does the full sha256 check.
    """

    def __init__(self, counts: dict[str, int]):
        self.counts = counts  # url -> samples, from the manifest

    def __call__(self, src):
        for shard in src:
            url = shard["url"]
            seen = 0
            try:
                for sample in wds.tariterators.tarfile_samples([shard]):
                    seen += 1
                    yield sample
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                raise DataError(f"{url}: unreadable after {seen} samples ({type(err).__name__}: {err}); "
                                "run python -m data_prep.verify on the folder") from None
            if seen != self.counts[url]:
                raise DataError(f"{url}: {seen} samples, the manifest says {self.counts[url]} "
                                "(truncated or replaced); run python -m data_prep.verify on the folder")


def _worker_message(error: DataError) -> str:
    """The DataError raised in a DataLoader worker, without the traceback torch puts around it."""
    return str(error).rsplit("DataError: ", 1)[-1]


def _collate_numpy(samples: list) -> tuple[np.ndarray, np.ndarray, list]:
    seqs, labels, captions = zip(*samples)
    return np.stack(seqs), np.asarray(labels, dtype=np.int64), list(captions)


def _collate_batch(samples: list) -> Batch:
    seqs, labels, captions = _collate_numpy(samples)
    return Batch(torch.from_numpy(seqs), torch.from_numpy(labels), captions)


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: stable across runs and machines)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class _Stages:
    """Picklable pipeline stages that know rank and worker without asking torch.distributed."""

    def __init__(self, rank: int, world_size: int, seed: int, shuffle_buffer: int):
        # seed already mixes in the epoch
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer

    def split_by_node(self, src):
        """Every world_size-th shard of the common resampled stream, from position rank."""
        yield from islice(src, self.rank, None, self.world_size)

    def split_by_worker(self, src):
        """Every num_workers-th shard of this rank's stream, from position worker."""
        worker, num_workers = _worker()
        yield from islice(src, worker, None, num_workers)

    def shuffle_in_worker(self, src):
        """Shuffle samples within a worker with a seed of its own (seed, rank, worker)."""
        worker, _ = _worker()
        yield from wds.filters.shuffle(self.shuffle_buffer, seed=_seed(self.seed, 1, self.rank, worker))(src)


def _shard_stream_seed() -> int:
    # ResampledShards mixes this "worker seed" into its own; a constant makes every rank and worker
    # draw the same shard stream, which split_by_node / split_by_worker then deal out disjointly.
    return 0


class TrainBatches:
    """Endless, deterministic training batches for one rank (start_batch=N continues from batch N);
    iterating again starts the same stream again."""

    def __init__(self, data_dir, batch_size: int, *, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, start_batch: int = 0, shuffle_buffer: int = 1000, split: str = "train",
                 epoch_batches: int = EPOCH_BATCHES, read_timeout: float = 0.0):
        _check_share(batch_size, rank, world_size)
        if start_batch < 0 or num_workers < 0 or shuffle_buffer < 0 or epoch_batches < 1:
            raise DataError("start_batch, num_workers and shuffle_buffer must not be negative, epoch_batches >= 1")
        self.manifest, self.urls = _split_urls(data_dir, split)
        self.split = split
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.start_batch = num_workers, seed, start_batch
        self.shuffle_buffer, self.epoch_batches = shuffle_buffer, epoch_batches
        # Seconds the workers may take for one batch (0: no limit; in-process reading has none).
        self.read_timeout = read_timeout if num_workers > 0 else 0.0

    def _loader(self, epoch: int):
        epoch_seed = _seed(self.seed, epoch)
        stages = _Stages(self.rank, self.world_size, epoch_seed, self.shuffle_buffer)
        pipeline = wds.DataPipeline(
            wds.ResampledShards(self.urls, seed=epoch_seed, worker_seed=_shard_stream_seed, deterministic=True),
            stages.split_by_node,
            stages.split_by_worker,
            _CheckedShardSamples(dict(zip(self.urls, self.manifest.splits[self.split].counts))),
            stages.shuffle_in_worker,
            wds.map(_Decode(self.manifest.seq_len, self.manifest.bins)),
            wds.batched(min(WORKER_BATCH, self.batch_size), collation_fn=_collate_numpy, partial=False),
        )
        loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=self.num_workers,
                               persistent_workers=False, timeout=self.read_timeout,
                               worker_init_fn=_ignore_stop_signals if self.num_workers else None)
        # Mix the workers' samples (a seed per rank), then cut this rank's batches.
        return (
            loader.unbatched()
            .shuffle(self.shuffle_buffer, seed=_seed(epoch_seed, 2, self.rank))
            .batched(self.batch_size, collation_fn=_collate_batch, partial=False)
        )

    def __iter__(self):
        epoch, skip = divmod(self.start_batch, self.epoch_batches)
        while True:
            batches = islice(iter(self._loader(epoch)), self.epoch_batches)
            # Exact resume: the epoch's stream is deterministic, so dropping `skip` batches lands on start_batch.
            try:
                yield from islice(batches, skip, None)
            except DataError as error:
                raise DataError(_worker_message(error)) from None
            except RuntimeError as error:
                if "timed out" not in str(error):
                    raise
                # A hung read (a stuck network file system) would otherwise block the run, and any
                # stop request, until the job's time limit.
                raise DataError(f"{os.path.dirname(self.urls[0])}: rank {self.rank}: no batch from the reader "
                                f"workers in {self.read_timeout:g} s; a shard read hangs") from None
            skip = 0
            epoch += 1


class EvalBatches:
    """This rank's round-robin share of a split's shards, read once in order, in batches: all ranks
    together see each sample once."""

    def __init__(self, data_dir, batch_size: int, *, split: str = "test", rank: int = 0, world_size: int = 1,
                 num_workers: int = 0):
        _check_share(batch_size, rank, world_size)
        self.manifest, urls = _split_urls(data_dir, split)
        self.urls = urls[rank::world_size]
        self.counts = self.manifest.splits[split].counts[rank::world_size]
        self.batch_size, self.num_workers = batch_size, num_workers

    @property
    def num_samples(self) -> int:
        """Samples this rank will see."""
        return sum(self.counts)

    def __iter__(self):
        if not self.urls:
            return
        workers = min(self.num_workers, len(self.urls))
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.split_by_worker,
            _CheckedShardSamples(dict(zip(self.urls, self.counts))),
            wds.map(_Decode(self.manifest.seq_len, self.manifest.bins)),
            wds.batched(self.batch_size, collation_fn=_collate_batch, partial=True),
        )
        if workers > 0:
            pipeline = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                                     worker_init_fn=_ignore_stop_signals)
        try:
            yield from pipeline
        except DataError as error:  # from a worker: its own one line, not torch's wrapping
            raise DataError(_worker_message(error)) from None


# the package's names for them (data_prep.train_batches, data_prep.eval_batches): calling one builds the iterable
train_batches, eval_batches = TrainBatches, EvalBatches


def read_samples(data_dir, indices, *, split: str = "test") -> Batch:
    """The samples at these global indices (shard order, then order within the shard), in the given order."""
    manifest, urls = _split_urls(data_dir, split)
    counts = manifest.splits[split].counts
    total = sum(counts)
    wanted = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
    for index in wanted:
        if not 0 <= index < total:
            raise DataError(f"{data_dir}: sample index {index} out of range for split {split!r} (0..{total - 1})")
    starts = np.concatenate([[0], np.cumsum(counts)])
    by_shard: dict[int, set[int]] = {}
    for index in wanted:
        shard = int(np.searchsorted(starts, index, side="right") - 1)
        by_shard.setdefault(shard, set()).add(index - int(starts[shard]))
    decode = _Decode(manifest.seq_len, manifest.bins)
    found: dict[int, tuple] = {}
    for shard, positions in sorted(by_shard.items()):
        last = max(positions)
        samples = wds.DataPipeline(wds.SimpleShardList([urls[shard]]), wds.tarfile_to_samples())
        for position, sample in enumerate(samples):
            if position in positions:
                found[int(starts[shard]) + position] = decode(sample)
            if position >= last:
                break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise DataError(f"{data_dir}: sample {missing[0]} of split {split!r} is missing from its shard")
    return _collate_batch([found[i] for i in wanted])
