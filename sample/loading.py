"""Load a model for sampling from a model folder, a checkpoint folder, or a run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model import ImageTransformer
from model.run_layout import model_folder
from sample.errors import SampleFailure, SampleUsageError

IMAGE_KEYS = ("height", "width", "channels", "bins", "order")


@dataclass
class LoadedModel:
    """A model ready to sample, with what turns its sequences back into images."""

    net: ImageTransformer
    image: dict  # dataset, height, width, channels, bins, order, class_names
    step: int
    source: Path  # the model folder the weights came from


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the model folder that path means (model.run_layout), on device, and check its image info."""
    try:
        folder = Path(model_folder(path))
        net = ImageTransformer.from_pretrained(folder, map_location=device)
    except FileNotFoundError as err:
        raise SampleUsageError(f"--checkpoint {err}") from None
    except ValueError as err:
        raise SampleFailure(str(err)) from None
    image, config = net.image_info, net.config
    # the image info must name the shape and quantization that decode_sequences needs
    if not isinstance(image, dict) or any(key not in image for key in IMAGE_KEYS):
        raise SampleFailure(f"{folder}: image info lacks one of {', '.join(IMAGE_KEYS)}")
    length = image["height"] * image["width"] * image["channels"]
    if length != config.seq_len or image["bins"] != config.bins:
        raise SampleFailure(f"{folder}: image info ({length} bytes, {image['bins']} bins) does not match "
                            f"the model ({config.seq_len} bytes, {config.bins} bins)")
    return LoadedModel(net, image, net.trained_steps, folder)
