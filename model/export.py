"""Self-describing model file: config + image info + step + weights, written atomically.

Format 1: torch.save({"format": 1, "model_config": asdict(cfg), "image": image_info,
"step": step, "state_dict": net.state_dict()}).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch

from model.config import ModelConfig
from model.linear_backends import backend_available
from model.transformer import ImageTransformer

FORMAT = 1


def export_payload(net: ImageTransformer, image_info: dict, step: int) -> dict:
    """The dict an export file holds (weights moved to CPU so the file loads anywhere)."""
    if not isinstance(net, ImageTransformer):
        raise TypeError(f"export needs an ImageTransformer, got {type(net).__name__}; "
                        "unwrap DDP/compiled models first (accelerator.unwrap_model)")
    return {"format": FORMAT, "model_config": dataclasses.asdict(net.config), "image": dict(image_info),
            "step": int(step),
            "state_dict": {key: value.detach().cpu() for key, value in net.state_dict().items()}}


def save_export(path, net: ImageTransformer, image_info: dict, step: int) -> None:
    """Write the export to `path` atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = export_payload(net, image_info, step)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_export(path, map_location="cpu", backend: Optional[str] = None):
    """Rebuild (net, image_info, step) from an export; net is in eval mode.

    backend overrides the stored causal-linear backend; by default the stored one is kept where it
    is installed here, else 'auto' (all backends compute the same function on the same weights).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model export {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, pickle garbage, ...: one clear line
        raise ValueError(f"model export {path} is corrupt or not a torch file: "
                         f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"model export {path} has no 'format' key: not a model export")
    if payload["format"] != FORMAT:
        raise ValueError(f"model export {path} has format {payload['format']!r}; this code reads format {FORMAT}")
    for key in ("model_config", "image", "step", "state_dict"):
        if key not in payload:
            raise ValueError(f"model export {path} lacks the key {key!r}")
    try:
        config_values = dict(payload["model_config"])
        stored_backend = config_values.get("backend", "auto")
        if backend is not None:
            config_values["backend"] = backend
        elif not backend_available(stored_backend):
            warnings.warn(f"model export {path}: backend {stored_backend!r} is not installed here; "
                          "using 'auto'", RuntimeWarning, stacklevel=2)
            config_values["backend"] = "auto"
        config = ModelConfig.from_dict(config_values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model export {path}: {error}") from error
    net = ImageTransformer(config)
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(f"model export {path}: weights do not match its model_config: "
                         f"{str(error).splitlines()[0]}") from error
    net.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return net.eval(), payload["image"], int(payload["step"])
