"""The one stored-model format: a folder with model.safetensors and config.json, written atomically.

config.json: {"format": 2, "model_config": {...}, "image": {...}, "step": N}. Nothing is pickled.
ImageTransformer.save_pretrained / from_pretrained (PretrainedMixin, below) are the entry points.
Not huggingface_hub's PyTorchModelHubMixin (2.4): its save_pretrained writes into the final folder in
place (deleting config.json first, then a README.md model card besides), so a crash leaves a mixture,
and its config.json is the __init__ arguments, not this format; keeping both would override everything
but push_to_hub, and `huggingface_hub.upload_folder(folder_path=..., repo_id=...)` pushes a folder as is.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
from pathlib import Path
from typing import Optional

from safetensors.torch import load_model, save_model
from torch import nn

from common.files import fsync_file, publish_folder
from model.config import ModelConfig

FORMAT = 2  # format 1 was a torch pickle (export/model.pt)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
IMAGE_KEYS = ("height", "width", "channels", "bins", "order")  # what turns a sequence back into an image


def image_problem(image, config: ModelConfig) -> Optional[str]:
    """Why image info cannot decode the sequences of a model of this config; None when it can."""
    if not isinstance(image, dict) or any(key not in image for key in IMAGE_KEYS):
        return f"image info lacks one of {', '.join(IMAGE_KEYS)}"
    length = image["height"] * image["width"] * image["channels"]
    if length != config.seq_len or image["bins"] != config.bins:
        return (f"image info ({length} bytes, {image['bins']} bins) does not match the model "
                f"({config.seq_len} bytes, {config.bins} bins)")
    return None


def read_config(path) -> dict:
    """config.json of a model folder, checked; ValueError (one line naming the file) otherwise."""
    path = Path(path)
    file = path / CONFIG_NAME
    old = path if path.is_file() else path / "model.pt"
    if old.suffix == ".pt" and old.is_file() and not file.exists():
        raise ValueError(f"{old}: an export of an earlier version (a torch pickle), no longer read; resume "
                         "its run once (train/run.py --resume auto) to write RUN/export/ as a model folder")
    if not path.is_dir():
        raise ValueError(f"{path} is a file, not a model folder" if path.exists()
                         else f"model folder {path} does not exist")
    if not file.is_file():
        raise ValueError(f"{path}: no {CONFIG_NAME}: not a model folder (save_pretrained writes one)")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: unreadable ({error})") from None
    if not isinstance(values, dict) or "format" not in values:
        raise ValueError(f"{file} has no 'format' key: not a model config")
    if values["format"] != FORMAT:
        raise ValueError(f"{file} has format {values['format']!r}; this code reads format {FORMAT}")
    for key in ("model_config", "image", "step"):
        if key not in values:
            raise ValueError(f"{file} lacks the key {key!r}")
    if not isinstance(values["step"], int):
        raise ValueError(f"{file}: step {values['step']!r} is not an integer")
    return values


def load_weights(net: nn.Module, path) -> None:
    """Load model.safetensors of folder `path` into net, strictly; ValueError (one line) otherwise."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{file} does not exist")
    try:
        missing, unexpected = load_model(net, str(file), strict=False)
    except RuntimeError as error:  # shapes that differ from config.json's
        raise ValueError(f"{file}: weights do not match its {CONFIG_NAME}: "
                         f"{str(error).strip().splitlines()[-1].strip()}") from None
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"{file} is corrupt or not a safetensors file: {error}") from None
    if missing or unexpected:
        which = f"missing {sorted(missing)[0]!r}" if missing else f"unexpected {sorted(unexpected)[0]!r}"
        raise ValueError(f"{file}: weights do not match its {CONFIG_NAME} ({which}, ...)")


class PretrainedMixin:
    """save_pretrained and from_pretrained for ImageTransformer (its config, image_info and trained_steps)."""

    def save_pretrained(self, path, image: Optional[dict] = None, step: Optional[int] = None) -> None:
        """Write the folder `path` (model.safetensors + config.json) atomically, built in PATH.tmp-XXXX and
        renamed; image (the data's manifest.image_info()) and step default to this model's image_info and
        trained_steps, and a model with neither image nor image_info is a ValueError: it could not be sampled."""
        image = self.image_info if image is None else image
        problem = image_problem(image, self.config)
        if problem:  # the sampler could not read the folder back: refuse now, not at sampling time
            raise ValueError(f"save_pretrained({path}): {problem}; pass image=, the data's image info "
                             "(manifest.image_info())")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(f"{path}.tmp-{secrets.token_hex(4)}")
        temporary.mkdir()
        try:
            save_model(self, str(temporary / WEIGHTS_NAME), force_contiguous=True)  # tied tensors stored once
            payload = {"format": FORMAT, "model_config": dataclasses.asdict(self.config), "image": image,
                       "step": int(self.trained_steps if step is None else step)}
            (temporary / CONFIG_NAME).write_text(json.dumps(payload, indent=2), encoding="utf-8")
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                fsync_file(temporary / name)
            publish_folder(temporary, path)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, path, backend: str = "auto", chunk_size: int = 64, map_location="cpu"):
        """The model save_pretrained wrote into folder `path`, in eval mode, with its image_info and
        trained_steps, running on `backend`; ValueError (one line naming the file) for anything else."""
        values = read_config(path)
        try:  # older folders' backend and chunk_size are ignored (ModelConfig.from_dict)
            config = ModelConfig.from_dict(values["model_config"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{Path(path) / CONFIG_NAME}: {error}") from None
        net = cls(config, backend, chunk_size)
        load_weights(net, path)
        net.image_info, net.trained_steps = values["image"], values["step"]
        return net.to(map_location).eval()
