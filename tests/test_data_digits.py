"""The built-in digits: deterministic, MNIST-like framing, and recognisable (a 1-NN classifier works)."""

import numpy as np
import pytest

from data_prep import digits
from data_prep.reader import eval_batches


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
