"""Load a model for sampling from an export file, a checkpoint folder, or a run folder."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model import ImageTransformer, ModelConfig
from model.export import load_export
from model.linear_backends import backend_available
from sample.errors import SampleFailure, SampleUsageError

EXPORT_PATH = Path("export") / "model.pt"
CHECKPOINTS = "checkpoints"
META_NAME = "meta.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # accelerate's names, safe first
EMA_FILE = "ema.safetensors"  # the trainer's weight average (train.ema_decay > 0)
_STEP_FOLDER = re.compile(r"^step_(\d+)$")  # temporaries (step_N.tmp-XXXX) never match
# wrappers whose prefixes may end up in a saved state dict (DDP, torch.compile)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_IMAGE_KEYS = ("height", "width", "channels", "bins", "order")


@dataclass
class LoadedModel:
    """A model ready to sample, with what turns its sequences back into images."""

    net: ImageTransformer
    image: dict  # dataset, height, width, channels, bins, order, class_names
    step: int
    source: Path  # the export file or checkpoint folder the weights came from


def _check_image_info(image: object, where: Path, config: ModelConfig) -> dict:
    """The image info must name the shape and quantization that decode_sequences needs."""
    if not isinstance(image, dict) or any(key not in image for key in _IMAGE_KEYS):
        raise SampleFailure(f"{where}: image info lacks one of {', '.join(_IMAGE_KEYS)}")
    length = image["height"] * image["width"] * image["channels"]
    if length != config.seq_len or image["bins"] != config.bins:
        raise SampleFailure(f"{where}: image info ({length} bytes, {image['bins']} bins) does not match "
                            f"the model ({config.seq_len} bytes, {config.bins} bins)")
    return image


def load_export_file(path: Path) -> LoadedModel:
    """Load export/model.pt (model.export format)."""
    try:
        net, image, step = load_export(str(path), map_location="cpu")
    except ValueError as err:
        raise SampleFailure(str(err)) from None
    return LoadedModel(net, _check_image_info(image, path, net.config), int(step), path)


def _read_meta(folder: Path) -> dict:
    """meta.json of a checkpoint folder (written last by the trainer, so its presence means complete)."""
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise SampleFailure(f"{folder}: incomplete checkpoint (no {META_NAME}); "
                            "the run was interrupted while saving it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SampleFailure(f"{meta_path}: unreadable checkpoint metadata ({err})") from None
    if not isinstance(meta, dict) or not all(key in meta for key in ("step", "model_config", "image")):
        raise SampleFailure(f"{meta_path}: checkpoint metadata lacks step, model_config or image")
    return meta


def _read_weights(folder: Path) -> tuple[dict, Path]:
    """The model's state dict in folder: the weight average (ema.safetensors, what the trainer
    evaluates and exports) when the run kept one, else accelerate's save_state output."""
    for name in (EMA_FILE,) + WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path), device="cpu")
                state.pop("n_averaged", None)  # the average's update count, not a weight
                return state, path
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as err:  # safetensors and torch raise several types for a damaged file
            raise SampleFailure(f"{path}: unreadable weights ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''})") from None
    raise SampleFailure(f"{folder}: no model weights ({' or '.join(WEIGHT_FILES)})")


def _strip_wrappers(state: dict) -> dict:
    """Drop DDP / torch.compile prefixes so keys match the bare module."""
    cleaned = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def _load_state(net: torch.nn.Module, state: dict, where: Path) -> None:
    """Load weights strictly, except for tied parameters that safetensors stored only once."""
    state = _strip_wrappers(state)
    own = net.state_dict()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected:
        raise SampleFailure(f"{where}: weights do not fit the model (unexpected {unexpected[0]!r}, ...)")
    loaded_pointers = {own[key].data_ptr() for key in own if key in state}
    # safetensors refuses shared storage, so accelerate saves one name per tied tensor: the other
    # names point at storage that was just loaded
    real_missing = [key for key in missing if own[key].data_ptr() not in loaded_pointers]
    if real_missing:
        raise SampleFailure(f"{where}: weights do not fit the model (missing {real_missing[0]!r}, ...)")


def load_checkpoint_folder(folder: Path) -> LoadedModel:
    """Load a checkpoints/step_N folder: meta.json plus accelerate's model.safetensors."""
    meta = _read_meta(folder)
    values = dict(meta["model_config"]) if isinstance(meta["model_config"], dict) else meta["model_config"]
    if isinstance(values, dict) and not backend_available(values.get("backend", "auto")):
        # backends compute the same function on the same weights; sample with what is installed here
        values["backend"] = "auto"
    try:
        config = ModelConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise SampleFailure(f"{folder / META_NAME}: {err}") from None
    net = ImageTransformer(config)
    state, weights_path = _read_weights(folder)
    try:
        _load_state(net, state, weights_path)
    except RuntimeError as err:  # shape mismatches
        raise SampleFailure(f"{weights_path}: weights do not fit the model "
                            f"({str(err).splitlines()[0]})") from None
    net.eval()
    return LoadedModel(net, _check_image_info(meta["image"], folder / META_NAME, config),
                       int(meta["step"]), folder)


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints of a run folder, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _STEP_FOLDER.match(child.name)
        if match and (child / META_NAME).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def load_run_folder(run_dir: Path) -> LoadedModel:
    """Load a run folder: export/model.pt if it is at least as new, else the newest checkpoint."""
    checkpoints = complete_checkpoints(run_dir)
    export = run_dir / EXPORT_PATH
    if export.is_file():
        loaded = load_export_file(export)
        if not checkpoints or loaded.step >= checkpoints[-1][0]:
            return loaded
    if checkpoints:
        return load_checkpoint_folder(checkpoints[-1][1])
    raise SampleUsageError(f"{run_dir}: a run folder without {EXPORT_PATH} or complete checkpoints "
                           f"in {CHECKPOINTS}/ (has training saved anything yet?)")


def load_for_sampling(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load an export file, a checkpoint folder or a run folder, and move the model to device."""
    path = Path(path)
    if path.is_file():
        loaded = load_export_file(path)
    elif path.is_dir() and ((path / META_NAME).is_file() or _STEP_FOLDER.match(path.name)):
        loaded = load_checkpoint_folder(path)
    elif path.is_dir() and ((path / EXPORT_PATH).exists() or (path / CHECKPOINTS).is_dir()):
        loaded = load_run_folder(path)
    elif path.is_dir():
        raise SampleUsageError(f"--checkpoint {path}: not an export file, a checkpoint folder "
                               f"(with {META_NAME}) or a run folder (with {EXPORT_PATH} or {CHECKPOINTS}/)")
    else:
        raise SampleUsageError(f"--checkpoint {path}: no such file or folder")
    loaded.net.to(device).eval()
    return loaded
