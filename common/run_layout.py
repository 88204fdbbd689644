"""The run folder's layout, known only here: the trainer writes it, the sampler reads it.

    RUN/config.yaml                      the resolved training config
    RUN/logs/                            the trackers' files (TensorBoard events; wandb in logs/wandb)
    RUN/samples/step_0000500.png         the sample grid of an evaluation
    RUN/checkpoints/step_0000500/        accelerate's save_state files (exact resume) + meta.json
    RUN/checkpoints/step_0000500/model/  the weights evaluated and sampled (a model folder)
    RUN/export/                          the newest model (a model folder)
    RUN/.kernel-cache/{triton,inductor}/  compiled kernels and autotuning results (train.kernel_cache)
A model folder is model.safetensors + config.json (model.pretrained). A checkpoint is complete once
its meta.json exists (written last). Folders are written as NAME.tmp-XXXX and renamed; a folder being
replaced is NAME.replaced-XXXX for a moment, one being deleted NAME.deleting-XXXX, a damaged
checkpoint set aside NAME.damaged-XXXX: none of them is ever taken for a checkpoint or a model.
"""

from __future__ import annotations

import json
import os
import re

CONFIG_NAME = "config.json"  # a model folder's config (model.pretrained writes it; tests/test_imports.py checks the name)

CHECKPOINTS = "checkpoints"
EXPORT = "export"
MODEL = "model"  # the model folder inside a checkpoint
META_NAME = "meta.json"
RUN_CONFIG = "config.yaml"
LOGS = "logs"
SAMPLES = "samples"
KERNEL_CACHE = ".kernel-cache"
STEP_FOLDER = re.compile(r"^step_(\d{7,})$")  # checkpoint_name's 7 digits, or more
SIDE_FOLDER = re.compile(r"^(step_\d{7,}|export)\.(tmp|replaced|deleting|damaged)-")


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at a global step, e.g. step_0000500."""
    return f"step_{step:07d}"


def checkpoints_folder(run_dir) -> str:
    """RUN/checkpoints."""
    return os.path.join(run_dir, CHECKPOINTS)


def export_folder(run_dir) -> str:
    """RUN/export: the model folder of the newest evaluated weights."""
    return os.path.join(run_dir, EXPORT)


def checkpoint_model(checkpoint) -> str:
    """The model folder inside a checkpoint folder."""
    return os.path.join(checkpoint, MODEL)


def is_complete(folder) -> bool:
    """Whether a checkpoint folder has its meta.json or a model folder its config.json (each written last)."""
    return os.path.isfile(os.path.join(folder, META_NAME)) or os.path.isfile(os.path.join(folder, CONFIG_NAME))


def checkpoint_folders(run_dir) -> list[tuple[int, str]]:
    """(step, path) of every step_N folder in RUN/checkpoints, complete or not, oldest first."""
    folder = checkpoints_folder(run_dir)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    matches = [(STEP_FOLDER.match(name), os.path.join(folder, name)) for name in names]
    return sorted((int(match.group(1)), path) for match, path in matches if match and os.path.isdir(path))


def complete_checkpoints(run_dir) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in RUN/checkpoints, oldest first."""
    return [(step, path) for step, path in checkpoint_folders(run_dir) if os.path.isfile(os.path.join(path, META_NAME))]


def _stored_model(checkpoint: str) -> str:
    """The model folder of a complete checkpoint; ValueError for one of an earlier version without it."""
    folder = checkpoint_model(checkpoint)
    if not os.path.isdir(folder):
        raise ValueError(f"{checkpoint}: a checkpoint of an earlier version (no {os.path.basename(folder)}/ "
                         "folder to sample from): resume its run once (train/run.py ... --resume auto) to "
                         "write a model folder in RUN/export/")
    return folder


def _step(model: str) -> float:
    """The step a model folder's config.json records; -inf when unreadable (from_pretrained says why)."""
    try:
        with open(os.path.join(model, CONFIG_NAME), encoding="utf-8") as stream:
            return int(json.load(stream)["step"])
    except (OSError, ValueError, TypeError, KeyError):
        return float("-inf")


def model_folder(path) -> str:
    """The model folder that a model folder, a checkpoint folder or a run folder means.

    A run folder means its export when that is at least as new as its newest complete checkpoint.
    FileNotFoundError when nothing is there to load; ValueError for an incomplete checkpoint.
    """
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) or not os.path.isdir(path):
        return path  # a model folder (or a file, which from_pretrained explains)
    if os.path.isfile(os.path.join(path, META_NAME)) or STEP_FOLDER.match(os.path.basename(os.path.normpath(path))):
        if not os.path.isfile(os.path.join(path, META_NAME)):
            raise ValueError(f"{path}: incomplete checkpoint (no {META_NAME}); the run was interrupted while saving it")
        return _stored_model(path)
    export, checkpoints = export_folder(path), complete_checkpoints(path)
    if os.path.isfile(os.path.join(export, CONFIG_NAME)):
        if not checkpoints or _step(export) >= checkpoints[-1][0]:
            return export
    if checkpoints:
        return _stored_model(checkpoints[-1][1])
    if os.path.isdir(export):
        return export  # e.g. an export of an earlier version, which from_pretrained explains
    raise FileNotFoundError(f"{path}: not a model folder (with {CONFIG_NAME}), a checkpoint folder (with "
                            f"{META_NAME}) or a run folder (with {EXPORT}/ or complete {CHECKPOINTS}/)")
