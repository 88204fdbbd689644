"""Quantization and sequence orders: exact inverses, layouts, and bad arguments; caption templates."""

import random

import numpy as np
import pytest
import torch

from data_prep.captions import MAX_CAPTION_BYTES, TEMPLATES, caption_for, captions_for_class
from data_prep.codec import (
    decode_sequences, dequantize, display_table, encode_images, from_sequence_order, parse_order, quantize,
    quantize_table, to_sequence_order,
)
from data_prep.errors import DataError


@pytest.mark.parametrize("bins", [2, 3, 7, 16, 100, 255, 256])
def test_quantize_picks_nearest_level_and_display_values_are_exact_inverses(bins):
    levels = quantize_table(bins)
    shown = display_table(bins).astype(np.int64)
    assert levels.max() == bins - 1 and levels.min() == 0
    # the display value of each level quantizes back to that level: decode -> encode is the identity
    assert np.array_equal(quantize(shown.astype(np.uint8), bins), np.arange(bins))
    assert shown[0] == 0 and shown[-1] == 255
    # every pixel goes to a level whose ideal value is nearest (ties either way)
    ideal = np.arange(bins) * 255.0 / (bins - 1)
    x = np.arange(256)
    distance = np.abs(ideal[None, :] - x[:, None])
    chosen = distance[x, levels.astype(np.int64)]
    assert np.all(chosen <= distance.min(axis=1) + 1e-9)


def test_256_bins_is_the_identity():
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    assert np.array_equal(encode_images(images, 256, "raster")[0], np.arange(256))
    assert np.array_equal(decode_sequences(encode_images(images, 256, "raster"), 16, 16, 1, 256, "raster"), images)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (8, 12, 3)])
@pytest.mark.parametrize("order", ["raster", "patch:1", "patch:2", "patch:4"])
def test_orders_have_exact_inverses(shape, order):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, *shape), dtype=np.uint8)
    seqs = to_sequence_order(images, order)
    assert seqs.shape == (5, np.prod(shape)) and seqs.dtype == np.uint8
    assert np.array_equal(from_sequence_order(seqs, *shape, order), images)
    assert np.array_equal(decode_sequences(encode_images(images, 256, order), *shape, 256, order), images)
    # quantized: decode gives display values, which encode back to the same sequence
    coarse = encode_images(images, 16, order)
    assert coarse.max() < 16
    assert np.array_equal(encode_images(decode_sequences(coarse, *shape, 16, order), 16, order), coarse)
    assert np.array_equal(decode_sequences(coarse, *shape, 16, order), dequantize(quantize(images, 16), 16))


def test_raster_interleaves_channels_row_by_row():
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3)  # r g b of each pixel
    seq = encode_images(images, 256, "raster")[0]
    assert seq[:6].tolist() == [0, 1, 2, 3, 4, 5]  # r1 g1 b1 r2 g2 b2
    assert seq[9:12].tolist() == images[0, 1, 0].tolist()  # second row starts after the first


def test_patch_order_is_raster_over_patches_and_inside_them():
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
    seq = encode_images(image, 256, "patch:2")[0]
    assert seq.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


def test_decode_takes_torch_tensors():
    seqs = torch.randint(0, 4, (3, 8 * 8 * 3))
    out = decode_sequences(seqs, 8, 8, 3, 4, "patch:4")
    assert out.dtype == np.uint8 and out.shape == (3, 8, 8, 3)
    assert set(np.unique(out)) <= {0, 85, 170, 255}


@pytest.mark.parametrize("bins", [0, 1, 257, 1000, 2.5, True])
def test_bins_out_of_range(bins):
    with pytest.raises(DataError, match="bins"):
        encode_images(np.zeros((1, 4, 4, 1), np.uint8), bins, "raster")


@pytest.mark.parametrize("order, message", [
    ("patch:5", "does not divide"), ("patch:0", "positive"), ("patch:x", "positive"), ("zigzag", "not understood"),
])
def test_bad_orders(order, message):
    with pytest.raises(DataError, match=message):
        parse_order(order, 28, 28)


def test_decode_rejects_values_outside_bins_and_wrong_lengths():
    with pytest.raises(DataError, match=r"\[0, 4\)"):
        decode_sequences(np.full((1, 16), 4), 4, 4, 1, 4, "raster")
    with pytest.raises(DataError, match="do not hold"):
        decode_sequences(np.zeros((1, 15)), 4, 4, 1, 4, "raster")


@pytest.mark.parametrize("dataset, names", [
    ("digits", [str(d) for d in range(10)]),
    ("mnist", [str(d) for d in range(10)]),
    ("cifar10", ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]),
])
def test_captions_fit_and_name_the_class(dataset, names):
    assert len(TEMPLATES[dataset]) >= 24
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for index, name in enumerate(names):
        captions = captions_for_class(dataset, name)
        assert len(set(captions)) == len(captions)
        for caption in captions:
            assert 0 < len(caption.encode("utf-8")) <= MAX_CAPTION_BYTES
            assert name in caption or (dataset != "cifar10" and words[index] in caption)
    assert "a handwritten seven" in captions_for_class("digits", "7")
    assert "the digit 7" in captions_for_class("mnist", "7")
    assert "a small picture of a frog" in captions_for_class("cifar10", "frog")
    assert "a photo of an airplane" in captions_for_class("cifar10", "airplane")


def test_caption_choice_follows_the_rng():
    first = [caption_for("digits", "3", random.Random(5)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = np.random.default_rng(0)
    drawn = {caption_for("cifar10", "ship", rng) for _ in range(200)}
    assert len(drawn) > 20
