"""Checkpoints: complete or absent.

Layout: RUN/checkpoints/step_0000500/ holds accelerate's `save_state` output plus meta.json
({"step", "model_config", "image"}). Every rank writes into RUN/checkpoints/step_0000500.tmp-XXXX/
(save_state must run on every rank: it saves each rank's RNG state and waits on collectives); the
main process writes meta.json last and renames the folder to its final name once all ranks are done.
A crash at any point leaves either the previous checkpoints untouched or a `.tmp-` folder, which is
never taken for a checkpoint and is cleared by the next run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from typing import Any, Optional

CHECKPOINT_DIR = "checkpoints"
META_NAME = "meta.json"
_NAME = re.compile(r"^step_(\d{7,})$")
# Model config keys that choose an implementation, not the weights: a checkpoint trained with the
# fast-transformers backend resumes with the torch one.
RUNTIME_MODEL_KEYS = ("backend", "chunk_size")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; str() is one line naming the folder."""


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at a global step, e.g. step_0000500."""
    return f"step_{step:07d}"


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint folder; CheckpointError when missing (incomplete) or malformed."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {META_NAME}); the run was interrupted while saving it")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "model_config" not in meta:
        raise CheckpointError(f"{meta_path}: checkpoint metadata lacks step or model_config")
    return meta


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in RUN/checkpoints, oldest first."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _NAME.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, META_NAME)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(run_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint folder to resume from: None for a fresh start, 'auto' = newest complete one.

    A run folder that already has checkpoints is never silently overwritten by a fresh start.
    """
    if resume is None:
        existing = complete_checkpoints(run_dir)
        if existing:
            raise CheckpointError(
                f"{run_dir}: already has checkpoints (newest {os.path.basename(existing[-1][1])}); "
                "pass --resume auto to continue it, or choose another train.run_dir")
        return None
    if resume == "auto":
        existing = complete_checkpoints(run_dir)
        return existing[-1][1] if existing else None
    step = read_meta(resume)["step"]  # raises for a missing or incomplete folder
    # keep_checkpoints prunes by step: a newer checkpoint left in this run folder would outlive the
    # resumed run's own saves and be what `--resume auto` picks next, so refuse rather than lose them.
    newer = [path for saved_step, path in complete_checkpoints(run_dir)
             if saved_step > step and os.path.realpath(path) != os.path.realpath(resume)]
    if newer:
        raise CheckpointError(
            f"--resume {resume} (step {step}): {run_dir} holds newer checkpoints "
            f"({', '.join(os.path.basename(p) for p in newer)}) that would outlive this run's saves; "
            "use --resume auto, another train.run_dir, or move them away")
    return resume


def model_config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two model config dicts (runtime-only keys ignored)."""
    keys = sorted(set(saved) | set(current))
    return [f"{key}: checkpoint {saved.get(key, '<absent>')!r} != config {current.get(key, '<absent>')!r}"
            for key in keys
            if key not in RUNTIME_MODEL_KEYS and _normalise(saved.get(key)) != _normalise(current.get(key))]


def _normalise(value: Any) -> Any:
    """Lists and tuples compare equal (JSON turns tuples into lists)."""
    return list(value) if isinstance(value, tuple) else value


def check_compatible(path: str, model_config: dict) -> dict:
    """meta.json of path, after refusing a checkpoint whose model config differs from model_config."""
    meta = read_meta(path)
    differences = model_config_differences(meta["model_config"], model_config)
    if differences:
        raise CheckpointError(f"{path}: model config differs from the run's: {'; '.join(differences)}")
    return meta


def _write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON to path through a temporary file, fsync, then os.replace."""
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    """Make a rename inside path durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator: Any, run_dir: str, step: int, meta: dict, keep: int) -> str:
    """Save the full training state at `step` on every rank; returns the final folder.

    Must be called by every rank (save_state writes per-rank RNG states and meets collectives).
    """
    from accelerate.utils import broadcast_object_list

    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    final = os.path.join(folder, checkpoint_name(step))
    # One temporary name for all ranks, chosen by the main process.
    token = [secrets.token_hex(4) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(token)
    tmp = f"{final}.tmp-{token[0]}"
    if accelerator.is_main_process:
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every rank's files are in tmp
    if accelerator.is_main_process:
        # Flush every file save_state wrote before meta.json marks the folder complete: after a crash a
        # folder must not look complete while its weights are still only in the page cache.
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as stream:
                    os.fsync(stream.fileno())
        _write_json_atomic(os.path.join(tmp, META_NAME), {**meta, "step": step})  # last: marks it complete
        _fsync_dir(tmp)
        if os.path.exists(final):
            # Saving the same step again (e.g. a stop right after resuming): swap, then drop the old one,
            # so that a complete folder carries the final name at every moment.
            old = f"{final}.replaced-{token[0]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(folder)
        prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints; returns the removed folders."""
    existing = complete_checkpoints(run_dir)
    removed = []
    for _, path in existing[:-keep] if keep > 0 else []:
        # Rename first so a crash during rmtree never leaves a half-deleted folder under a final name.
        doomed = f"{path}.deleting-{secrets.token_hex(4)}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(path)
    return removed


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete temporary folders left by an interrupted save or prune (call before any rank saves)."""
    folder = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        match = re.match(r"^(step_\d+)\.(tmp|replaced|deleting)-", name)
        if not match:
            continue
        path, final = os.path.join(folder, name), os.path.join(folder, match.group(1))
        if match.group(2) == "replaced" and not os.path.exists(final) and os.path.isfile(os.path.join(path, META_NAME)):
            os.replace(path, final)  # a crash between the two renames of a re-save: put the old one back
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(name)
    return removed
