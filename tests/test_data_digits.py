"""The built-in digits: deterministic, MNIST-like framing, and recognisable (a 1-NN classifier works)."""

import os

import numpy as np
import pytest

from data_prep import digits
from data_prep import prepare as prepare_module
from data_prep.prepare import PrepareConfig, prepare
from data_prep.reader import eval_batches
from data_prep.source_types import SourceSplit


@pytest.fixture(scope="module")
def prepared_arrays(prepared_digits):
    """(images [N, 28, 28], labels [N]) of both splits of the prepared digits."""
    out = {}
    for split in ("train", "test"):
        batch = list(eval_batches(prepared_digits, 1000, split=split))[0]
        out[split] = (batch.seqs.numpy().reshape(-1, 28, 28), batch.labels.numpy())
    return out


def test_rendering_is_deterministic_and_independent_of_process_count():
    one = digits.make_digits({"train": 30, "test": 5}, seed=11, workers=1)
    two = digits.make_digits({"train": 30, "test": 5}, seed=11, workers=2)
    other = digits.make_digits({"train": 30, "test": 5}, seed=12, workers=1)
    for split in ("train", "test"):
        assert np.array_equal(one[split][0], two[split][0]) and np.array_equal(one[split][1], two[split][1])
    assert not np.array_equal(one["train"][0], other["train"][0])
    assert one["train"][0].shape == (30, 28, 28, 1) and one["train"][0].dtype == np.uint8


def test_streamed_digits_are_the_bytes_of_digits_rendered_whole(tmp_path, monkeypatch):
    """prepare renders the digits a chunk at a time as it writes; the folder is the same bytes whatever the
    chunk size (here across the 500-image random streams) and the processes, and the same as from splits
    rendered whole in memory first (as prepare did before it streamed them)."""
    def folder(name, **options):
        out = tmp_path / name
        prepare(PrepareConfig(dataset="digits", out=str(out), train_size=640, test_size=30, seed=5, shard_size=150,
                              progress=False, **options))
        return {entry: (out / entry).read_bytes() for entry in sorted(os.listdir(out))}

    one = folder("one", chunk_size=10**6, workers=1)
    assert folder("small", chunk_size=130, workers=2) == one
    chunks = list(digits.render_chunks("train", 640, 5, chunk_size=130, workers=1))
    assert [len(labels) for _, labels in chunks] == [130] * 3 + [110, 130, 10]  # rounds of 500: 500, then 140

    whole = digits.make_digits({"train": 640, "test": 30}, seed=5, workers=1)
    real_load_source = prepare_module.load_source

    def rendered_whole(*args, **kwargs):
        source = real_load_source(*args, **kwargs)
        source.splits = {split: SourceSplit(*arrays) for split, arrays in whole.items()}
        return source

    monkeypatch.setattr(prepare_module, "load_source", rendered_whole)
    assert folder("whole", workers=1) == one


def test_framed_like_mnist(prepared_arrays):
    images, labels = prepared_arrays["train"]
    weights = images.astype(np.float64)
    ys, xs = np.indices((28, 28))
    cy = (weights * ys).sum((1, 2)) / weights.sum((1, 2))
    cx = (weights * xs).sum((1, 2)) / weights.sum((1, 2))
    assert abs(cy.mean() - 13.5) < 1.0 and abs(cx.mean() - 13.5) < 1.0 and cy.std() < 1.5  # centred by mass
    assert images[:, :, 0].max() == 0 and images[:, 0, :].max() == 0  # a margin, as in MNIST
    assert (images.max(axis=(1, 2)) >= 240).all()  # saturated strokes
    ink = (images > 128).mean(axis=(1, 2))
    assert 0.07 < ink.mean() < 0.25 and ink.min() > 0.01  # strokes, not blobs or dust
    assert np.bincount(labels, minlength=10).min() >= 60  # every digit well represented


def test_digits_are_recognisable(prepared_arrays):
    # If a 1-nearest-neighbour classifier on raw pixels tells the digits apart, the renderer draws each
    # digit consistently enough to be learned and read, while the variation keeps it well below 100%.
    train, train_labels = prepared_arrays["train"]
    test, test_labels = prepared_arrays["test"]
    a = train.reshape(len(train), -1).astype(np.float32)
    b = test.reshape(len(test), -1).astype(np.float32)
    distance = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None]
    accuracy = (train_labels[distance.argmin(1)] == test_labels).mean()
    assert 0.75 < accuracy < 0.995
    assert len({image.tobytes() for image in train}) == len(train)  # no two alike


def test_pillow_default_font_alone_suffices(monkeypatch):
    # A fresh machine may have no system fonts at all: Pillow's own scalable font must do.
    monkeypatch.setattr(digits, "find_fonts", lambda: (digits.BUILTIN_FONT,))
    images, labels = digits.make_digits({"train": 20}, seed=0, workers=1)["train"]
    ink = (images > 128).mean(axis=(1, 2, 3))
    assert (ink > 0.02).all() and (images.max(axis=(1, 2, 3)) >= 240).all()
