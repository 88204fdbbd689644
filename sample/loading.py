"""Load a model for sampling from a model folder, a checkpoint folder, or a run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep import DataError, Manifest, load_manifest
from model import ImageTransformer
from model.pretrained import IMAGE_KEYS, image_problem
from common.run_layout import model_folder
from sample.errors import SampleFailure, SampleUsageError


@dataclass
class LoadedModel:
    """A model ready to sample, with what turns its sequences back into images."""

    net: ImageTransformer
    image: dict  # dataset, height, width, channels, bins, order, class_names
    step: int
    source: Path  # the model folder the weights came from


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> LoadedModel:
    """Load the model folder that path means (common.run_layout), on device with `backend`, and check its image info."""
    try:
        folder = Path(model_folder(path))
        net = ImageTransformer.from_pretrained(folder, backend=backend, map_location=device)
    except FileNotFoundError as err:
        raise SampleUsageError(f"--checkpoint {err}") from None
    except ValueError as err:
        raise SampleFailure(str(err)) from None
    problem = image_problem(net.image_info, net.config)  # a folder written elsewhere or edited by hand
    if problem:
        raise SampleFailure(f"{folder}: {problem}")
    return LoadedModel(net, net.image_info, net.trained_steps, folder)


def data_manifest(loaded: LoadedModel, data, split: str) -> Manifest:
    """The manifest of the prepared folder --data, after checking it holds the model's images and --split."""
    try:
        manifest = load_manifest(data)
    except DataError as err:
        raise SampleUsageError(f"--data: {err}") from None
    differ = [f"{key}={getattr(manifest, key)!r} but the model was trained on {key}={loaded.image[key]!r}"
              for key in IMAGE_KEYS if getattr(manifest, key) != loaded.image[key]]
    if differ:
        raise SampleUsageError(f"--data {data}: {'; '.join(differ)} ({loaded.source})")
    if split not in manifest.splits:
        raise SampleUsageError(f"--split {split}: {data} has no such split (has {', '.join(manifest.splits)})")
    return manifest
