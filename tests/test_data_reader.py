"""The reader's contract: endless equal streams per rank, determinism, exact resume, eval coverage."""

from itertools import islice

import numpy as np
import pytest
import torch

from data_prep.errors import DataError
from data_prep.reader import Batch, eval_batches, read_samples, train_batches


def take(iterable, n):
    return list(islice(iter(iterable), n))


def same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x.seqs, y.seqs) and torch.equal(x.labels, y.labels) and x.captions == y.captions
        for x, y in zip(a, b))


@pytest.fixture(scope="module")
def every_train_sample(prepared_digits):
    """seq bytes -> (label, caption) of all 1,000 training samples."""
    table = {}
    for batch in eval_batches(prepared_digits, 100, split="train"):
        for seq, label, caption in zip(batch.seqs, batch.labels, batch.captions):
            table[seq.numpy().tobytes()] = (int(label), caption)
    assert len(table) > 990  # rendered digits are (almost surely) all different
    return table


def test_batches_have_the_contract_types(prepared_digits, every_train_sample):
    batches = take(train_batches(prepared_digits, 32, num_workers=0), 5)
    for batch in batches:
        assert isinstance(batch, Batch)
        assert batch.seqs.dtype == torch.uint8 and batch.seqs.shape == (32, 784)
        assert batch.labels.dtype == torch.long and batch.labels.shape == (32,)
        assert len(batch.captions) == 32 and all(isinstance(c, str) for c in batch.captions)
        for seq, label, caption in zip(batch.seqs, batch.labels, batch.captions):
            assert every_train_sample[seq.numpy().tobytes()] == (int(label), caption)  # sample kept whole


def test_stream_is_endless_deterministic_and_resumes_exactly(prepared_digits):
    kw = dict(num_workers=0, seed=3, shuffle_buffer=100, epoch_batches=7)
    # 2N batches straight == N batches, then a new call with start_batch=N (crossing epoch edges)
    full = take(train_batches(prepared_digits, 16, **kw), 40)  # 640 samples: more than a pass of the shards
    assert same(full, take(train_batches(prepared_digits, 16, **kw), 40))
    for n in (1, 7, 20):
        assert same(full[n:], take(train_batches(prepared_digits, 16, start_batch=n, **kw), 40 - n))
    other_seed = take(train_batches(prepared_digits, 16, **dict(kw, seed=4)), 3)
    assert not same(full[:3], other_seed)
    # iterating the same object again starts the same stream again
    stream = train_batches(prepared_digits, 16, **kw)
    assert same(take(stream, 3), take(stream, 3))


def test_resume_is_exact_with_worker_processes(prepared_digits):
    kw = dict(num_workers=2, seed=1, shuffle_buffer=50, epoch_batches=6)
    full = take(train_batches(prepared_digits, 16, **kw), 16)
    assert same(full[9:], take(train_batches(prepared_digits, 16, start_batch=9, **kw), 7))


def test_ranks_get_equal_endless_streams_of_their_own(prepared_digits):
    n = 60  # 60 x 32 = 1,920 samples per rank: nearly two passes over 1,000, and no rank runs out
    ranks = [take(train_batches(prepared_digits, 32, rank=r, world_size=2, num_workers=0, epoch_batches=25), n)
             for r in range(2)]
    assert [len(r) for r in ranks] == [n, n]
    assert all(len(b.labels) == 32 for r in ranks for b in r)
    assert not same(ranks[0][:5], ranks[1][:5])
    seen = set()
    for batch in ranks[0] + ranks[1]:
        seen.update(seq.numpy().tobytes() for seq in batch.seqs)
    assert len(seen) > 800  # resampling covers most of the data


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_covers_every_sample_once_across_ranks(prepared_digits, num_workers):
    keys = []
    for rank in range(2):
        batches = list(eval_batches(prepared_digits, 24, rank=rank, world_size=2, num_workers=num_workers))
        assert sum(len(b.labels) for b in batches) == eval_batches(prepared_digits, 24, rank=rank,
                                                                     world_size=2).num_samples
        keys.extend(seq.numpy().tobytes() for b in batches for seq in b.seqs)
    assert len(keys) == 200 and len(set(keys)) == 200
    # finite, and the same again on a second pass
    assert len(list(eval_batches(prepared_digits, 24))) == 9


def test_read_samples_by_global_index(prepared_digits):
    everything = list(eval_batches(prepared_digits, 200))[0]
    picked = read_samples(prepared_digits, [199, 0, 13, 14, 13])
    assert picked.seqs.shape == (5, 784)
    for row, index in enumerate([199, 0, 13, 14, 13]):
        assert torch.equal(picked.seqs[row], everything.seqs[index])
        assert picked.labels[row] == everything.labels[index] and picked.captions[row] == everything.captions[index]
    train_first = list(eval_batches(prepared_digits, 100, split="train"))[0]
    assert torch.equal(read_samples(prepared_digits, np.array([70]), split="train").seqs[0], train_first.seqs[70])
    with pytest.raises(DataError, match="200 out of range"):
        read_samples(prepared_digits, [200])
    with pytest.raises(DataError, match="split 'valid'"):
        read_samples(prepared_digits, [0], split="valid")


def test_a_folder_without_manifest_is_refused(tmp_path):
    with pytest.raises(DataError, match="not a prepared folder"):
        train_batches(tmp_path, 8)
    with pytest.raises(DataError, match="rank 2"):
        eval_batches(tmp_path, 8, rank=2, world_size=2)


def test_loader_workers_survive_stop_signals(prepared_digits):
    """Slurm signals every process of a step: workers must leave SIGTERM/SIGUSR1 to the trainer."""
    import os
    import signal

    import psutil

    stream = iter(train_batches(prepared_digits, 8, num_workers=2, seed=3, epoch_batches=1000))
    next(stream)
    workers = psutil.Process().children()
    assert workers, "expected DataLoader worker processes"
    for worker in workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR1)
    for _ in range(20):  # must keep yielding; a dead worker raises "worker killed by signal"
        batch = next(stream)
    assert batch.seqs.shape[0] == 8
    assert all(worker.is_running() for worker in workers)
