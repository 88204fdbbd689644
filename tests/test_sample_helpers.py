"""Helpers shared by the test_sample_* files (no tests here): tiny models and checkpoint files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model import ImageTransformer, ModelConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer model over 6x6 grey images with 16 levels (36 bytes)."""
    values = dict(bins=16, seq_len=36, n_layers=2, n_heads=2, d_query=8, d_ff=32, condition="both",
                  n_classes=3, caption_len=16)
    values.update(overrides)
    return ModelConfig(**values)


def image_info(config: ModelConfig, height: int = 6, width: int = 6) -> dict:
    """Image info matching a tiny config (one channel, raster order)."""
    return dict(dataset="toy", height=height, width=width, channels=1, bins=config.bins, order="raster",
                class_names=[f"c{i}" for i in range(config.n_classes)])


def tiny_model(seed: int = 0, **overrides) -> ImageTransformer:
    """A freshly initialised tiny model in eval mode (random weights give varied samples).

    The per-block condition projections start at zero in a real model; here they get weight, so that
    the class visibly changes the samples (as it does in a trained model) whatever the seed."""
    torch.manual_seed(seed)
    net = ImageTransformer(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for block in net.blocks:
            if block.condition_projection is not None:
                block.condition_projection.weight.normal_(0.0, 0.5)
    return net


def write_export(path: Path, net: ImageTransformer, step: int = 1, info: dict | None = None) -> Path:
    """Save net as a model folder (save_pretrained), as the trainer writes RUN/export."""
    net.save_pretrained(path, info or image_info(net.config), step)
    return path


def write_step_folder(folder: Path, net: ImageTransformer, step: int, info: dict | None = None) -> Path:
    """Write a checkpoint folder the way the trainer does, less accelerate's files: model/ + meta.json."""
    info = info or image_info(net.config)
    net.save_pretrained(folder / "model", info, step)
    meta = {"step": step, "model_config": dataclasses.asdict(net.config), "image": info}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return folder
