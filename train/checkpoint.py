"""Checkpoints: complete or absent (folder names and completeness: common.run_layout).

A checkpoint folder holds accelerate's `save_state` output, the model folder model/ and meta.json
({"step", "model_config", "image", "train_state", "run", "data", "files"}): `files` lists every other
file with its size and sha256, and resuming checks them before loading anything. Every rank writes
into step_N.tmp-XXXX/ (save_state must run on every rank: it saves each rank's RNG state and waits on
collectives); the main process writes meta.json last and renames the folder once all ranks are done.
A crash leaves the previous checkpoints untouched or a `.tmp-` folder, which is never taken for a
checkpoint and is cleared by the next run. A complete folder whose files no longer match meta.json (a
flipped bit, a truncated copy), or a step_N folder without meta.json (a save never leaves one), is
"damaged": `--resume auto` moves it aside to `step_N.damaged-XXXX` (kept for inspection, never pruned or
resumed) and falls back to the previous one; `--resume PATH` refuses it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
from typing import Any, Callable, Optional

from accelerate.utils import broadcast_object_list

from common.files import atomic_file, file_sha256, fsync_file, publish_folder
from common.run_layout import (CHECKPOINTS, EXPORT, META_NAME, SIDE_FOLDER, checkpoint_folders, checkpoint_model,
                               checkpoint_name, checkpoints_folder, complete_checkpoints, export_folder, is_complete)
from model import ImageTransformer, ModelConfig
from model.pretrained import read_config
from train.run_lock import RunLockError


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; str() is one line naming the folder."""


class WriteFailure(OSError):
    """A checkpoint or export the file system refused to take (a full disk); str() is one line naming
    the file and why. Nothing half-written is left under the folder's final name."""


# torch's zip writer reports a refused write(2) without errno or file name ("[enforce fail at
# inline_container.cc:672] . unexpected pos 704 vs 598", or its stream's "basic_ios::clear: iostream
# error"); safetensors (Rust) as "... (os error 28)".
TORCH_WRITE_FAILURE = re.compile(r"unexpected pos \d+|file write failed|basic_ios::clear")
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def write_failure(err: BaseException, folder: str, walk: bool = True) -> Optional[str]:
    """'FILE: reason' when err is a refused write into folder (OSError, or torch's or safetensors' form
    of one), else None. Without a file name the file is the one written last in folder (walk: folder is
    the temporary one being written, not a published one whose files are older and intact); without an
    errno, a disk with under 1 MiB free is full."""
    text, match = str(err), RUST_OS_ERROR.search(str(err))
    if isinstance(err, OSError):
        code, file = err.errno, err.filename
    elif match or TORCH_WRITE_FAILURE.search(text):
        written = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names] if walk else []
        code, file = int(match.group(1)) if match else None, max(written, key=os.path.getmtime, default=None)
    else:
        return None
    if code is None and shutil.disk_usage(os.path.dirname(os.path.abspath(folder))).free < 1 << 20:
        code = errno.ENOSPC
    return f"{file or folder}: {os.strerror(code) if code else text.strip().splitlines()[0]}"


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint folder; CheckpointError when missing (incomplete) or malformed."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not os.path.isfile(meta_path):
        newest = complete_checkpoints(path)  # the sampler takes a run folder for its newest model; say which to pass
        if newest:
            raise CheckpointError(f"{path}: a run folder, not a checkpoint folder: pass one of its checkpoints "
                                  f"(newest {newest[-1][1]}), or --resume auto to continue train.run_dir")
        raise CheckpointError(f"{path}: incomplete checkpoint (no {META_NAME}); the run was interrupted while saving it")
    try:
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "model_config" not in meta:
        raise CheckpointError(f"{meta_path}: checkpoint metadata lacks step or model_config")
    # A file a user can edit: the values resuming reads must have their types before anything is loaded.
    for key in ("train_state", "run", "data", "files"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{meta_path}: {key} must be an object, got {meta[key]!r}")
    for key, value in (meta.get("train_state") or {}).items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"{meta_path}: train_state.{key} must be an integer, got {value!r}")
    for name, record in (meta.get("files") or {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("size"), int) or \
                not isinstance(record.get("sha256"), str):
            raise CheckpointError(f"{meta_path}: files.{name} must hold an integer size and a sha256, got {record!r}")
    return meta


def _refuse_over_export(run_dir: str) -> None:
    """CheckpointError when run_dir holds an export (a trained model) but no checkpoint folder: a fresh start
    would write its own export over it (the checkpoints were deleted, the model was not)."""
    export = export_folder(run_dir)
    if checkpoint_folders(run_dir) or not os.path.isdir(export):
        return
    try:
        what = f"a model trained for {read_config(export)['step']} steps"
    except ValueError:
        what = "a model"
    raise CheckpointError(
        f"{run_dir}: {EXPORT}/ holds {what} but {CHECKPOINTS}/ no checkpoint to resume; a fresh start would "
        f"overwrite it: pass --resume PATH of a checkpoint, choose another train.run_dir, or move {export} "
        "away to start afresh here")


def resolve_resume(run_dir: str, resume: Optional[str]) -> Optional[str]:
    """The checkpoint folder to resume from: None for a fresh start, 'auto' = newest complete one.

    A run folder that already has checkpoints, or an export without them, is never silently overwritten
    by a fresh start.
    """
    existing = complete_checkpoints(run_dir)
    if resume is None:
        folders = checkpoint_folders(run_dir)  # complete or not: a fresh save of the same step replaces one
        if folders:
            raise CheckpointError(
                f"{run_dir}: already has checkpoints (newest {os.path.basename(folders[-1][1])}); "
                "pass --resume auto to continue it, or choose another train.run_dir")
        _refuse_over_export(run_dir)
        return None
    if resume == "auto":
        if not damaged_folders(run_dir):  # with damaged ones, choose_checkpoint refuses and names them
            _refuse_over_export(run_dir)
        return existing[-1][1] if existing else None
    step = read_meta(resume)["step"]  # raises for a missing or incomplete folder
    # keep_checkpoints prunes by step: a newer checkpoint left in this run folder would outlive the
    # resumed run's own saves and be what `--resume auto` picks next, so refuse rather than lose them.
    newer = [path for saved_step, path in existing
             if saved_step > step and os.path.realpath(path) != os.path.realpath(resume)]
    if newer:
        raise CheckpointError(
            f"--resume {resume} (step {step}): {run_dir} holds newer checkpoints "
            f"({', '.join(os.path.basename(p) for p in newer)}) that would outlive this run's saves; "
            "use --resume auto, another train.run_dir, or move them away")
    return resume


def checkpoint_damage(path: str) -> Optional[str]:
    """None when every file meta.json lists has its recorded size and sha256, else one line naming the file.

    Sizes are compared first (a truncated copy is found without reading anything); a checkpoint
    written before meta.json listed its files has nothing to compare and counts as intact.
    """
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, META_NAME)):
        # a save renames its folder into place only after meta.json is written: someone removed it since
        return f"{os.path.join(path, META_NAME)}: missing (removed, or copied without it)"
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        return str(err)
    files = sorted((os.path.join(path, name), record) for name, record in (meta.get("files") or {}).items())
    for file, record in files:
        if not os.path.isfile(file):
            return f"{file}: missing (meta.json lists it)"
        size = os.path.getsize(file)
        if size != record["size"]:
            return f"{file}: {size} bytes, meta.json says {record['size']} (truncated or damaged)"
    for file, record in files:
        if file_sha256(file) != record["sha256"]:
            return f"{file}: sha256 differs from meta.json (damaged)"
    return None


def damaged_folders(run_dir: str) -> list[str]:
    """Checkpoint folders moved aside as damaged (step_N.damaged-XXXX)."""
    folder = checkpoints_folder(run_dir)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(name for name in names if ".damaged-" in name and SIDE_FOLDER.match(name))


def choose_checkpoint(run_dir: str, resume: Optional[str], warn: Callable[[str], None]) -> Optional[str]:
    """The checkpoint to load, after checking its files against meta.json (main process, lock held).

    `--resume PATH`: a damaged PATH is a CheckpointError. `--resume auto`: a damaged checkpoint is
    moved aside to step_N.damaged-XXXX with a warning and the next older complete one is tried; when
    damaged ones exist and none is intact, CheckpointError rather than a silent fresh start.
    """
    if resume is None:
        return None
    if resume != "auto":
        damage = checkpoint_damage(resume)
        if damage:
            raise CheckpointError(f"--resume {resume}: damaged checkpoint: {damage}")
        return resume
    for _, path in reversed(checkpoint_folders(run_dir)):  # one without meta.json is damaged too
        damage = checkpoint_damage(path)
        if damage is None:
            return path
        aside = f"{path}.damaged-{secrets.token_hex(4)}"
        os.replace(path, aside)
        warn(f"warning: skipping damaged checkpoint {path}: {damage}; moved to {os.path.basename(aside)}, "
             "trying the previous one")
    left = damaged_folders(run_dir)
    if left:
        raise CheckpointError(
            f"{checkpoints_folder(run_dir)}: no intact checkpoint, only damaged ones ({', '.join(left)}); "
            "move them away to start afresh, or choose another train.run_dir")
    return None


def model_config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose values differ between two model config dicts.

    Both are completed by ModelConfig.from_dict first, so a key added after a checkpoint was written
    takes the value that checkpoint's model had (condition_inject "prefix", conv_kernel 0, ...), and
    the run-time keys older checkpoints stored (backend, chunk_size) are dropped.
    """
    try:
        saved, current = (dataclasses.asdict(ModelConfig.from_dict(values)) for values in (saved, current))
    except (TypeError, ValueError):
        pass  # a config this code cannot read: compare the raw keys, which names the odd one
    keys = sorted(set(saved) | set(current))
    return [f"{key}: checkpoint {saved.get(key, '<absent>')!r} != config {current.get(key, '<absent>')!r}"
            for key in keys
            if _normalise(saved.get(key)) != _normalise(current.get(key))]


def _normalise(value: Any) -> Any:
    """Lists and tuples compare equal (JSON turns tuples into lists)."""
    return list(value) if isinstance(value, tuple) else value


def check_compatible(path: str, model_config: dict, image: Optional[dict] = None,
                     optimizer: Optional[str] = None) -> dict:
    """meta.json of path, after refusing a checkpoint whose model config, image format or optimizer differs.

    The image format (dataset, shape, bins, order, classes) decides what the bytes mean: weights
    trained on one cannot continue on another, even where the shapes happen to fit. An optimizer's
    state does not carry over to another (checkpoints before optim.name was recorded had one optimizer).
    """
    meta = read_meta(path)
    saved_optimizer = (meta.get("run") or {}).get("optimizer", optimizer if optimizer != "muon" else "adamw")
    if optimizer is not None and saved_optimizer != optimizer:
        raise CheckpointError(f"{path}: trained with optim.name={saved_optimizer}, this run has optim.name={optimizer}: "
                              "resume with the checkpoint's optimizer, or start a new train.run_dir")
    differences = model_config_differences(meta["model_config"], model_config)
    if image is not None and isinstance(meta.get("image"), dict):
        differences += [f"data {key}: checkpoint {meta['image'].get(key)!r} != data.dir {value!r}"
                        for key, value in image.items()
                        if key in meta["image"] and _normalise(meta["image"][key]) != _normalise(value)]
    if differences:
        raise CheckpointError(f"{path}: model config differs from the run's: {'; '.join(differences)}")
    return meta


def run_changes(meta: dict, run: dict, data: dict) -> list[str]:
    """Warnings for a resume with another allocation, batch, seed or data set than the checkpoint's.

    None of these is refused: changing grad_accum or the number of ranks on a requeue is normal.
    The step (optimizer updates) and the learning-rate schedule go on; what changes is said.
    """
    saved_run, saved_data, lines = meta.get("run") or {}, meta.get("data") or {}, []
    changed = [key for key in ("world_size", "batch_size", "grad_accum") if key in saved_run
               and saved_run[key] != run[key]]
    if changed:
        lines.append(", ".join(f"{key} {saved_run[key]} -> {run[key]}" for key in changed)
                     + f": global batch {saved_run.get('global_batch')} -> {run['global_batch']} images per step; "
                     "steps go on counting optimizer updates (the schedule continues from the checkpoint's step)"
                     + ("; the data stream is a new random one" if "grad_accum" not in changed or len(changed) > 1
                        else ""))
    if "seed" in saved_run and saved_run["seed"] != run["seed"]:
        lines.append(f"train.seed {saved_run['seed']} -> {run['seed']}: the data order and dropout differ "
                     "from an uninterrupted run")
    if saved_data and any(saved_data.get(key) != data.get(key) for key in ("dataset", "seed", "splits")):
        lines.append(f"trained on {saved_data.get('dir')} ({saved_data.get('dataset')}, prep seed "
                     f"{saved_data.get('seed')}, {saved_data.get('splits')}), now {data.get('dir')} "
                     f"({data.get('dataset')}, prep seed {data.get('seed')}, {data.get('splits')})")
    return lines


def on_main_then_share(accelerator: Any, work: Any) -> Any:
    """Run work() on the main process and hand its result (or its error) to every rank.

    Raises on every rank what work() raised on the main one (CheckpointError, RunLockError).
    """
    box: list = [None]
    if accelerator.is_main_process:
        try:
            box[0] = (work(), None)
        except (CheckpointError, RunLockError) as err:
            box[0] = (None, err)  # pickled to the other ranks with the result
    broadcast_object_list(box)  # nothing to do in a single process
    value, error = box[0]
    if error is not None:
        raise error
    return value


def _write_meta(folder: str, payload: dict) -> None:
    """meta.json into a temporary checkpoint folder, on disk before the rename that makes it visible."""
    with atomic_file(os.path.join(folder, META_NAME)) as stream:
        stream.write(json.dumps(payload, indent=2).encode("utf-8"))


def save_checkpoint(accelerator: Any, run_dir: str, step: int, meta: dict, keep: int, model: ImageTransformer) -> str:
    """Save the full training state at `step` on every rank; returns the final folder.

    Must be called by every rank (save_state writes per-rank RNG states and meets collectives).
    The main process writes `model` (the weights evaluated and sampled: the EMA when it is on, which
    resuming reads back from there) as the model folder before the digests go into meta.json.
    """
    final = os.path.join(checkpoints_folder(run_dir), checkpoint_name(step))
    # One temporary name for all ranks, chosen by the main process.
    tmp = f"{final}.tmp-{on_main_then_share(accelerator, lambda: secrets.token_hex(4))}"
    writing = tmp  # where a refused write happened: save_pretrained removes its own temporary folder
    try:
        accelerator.save_state(tmp)  # every rank makes the folder it writes into
        accelerator.wait_for_everyone()  # every rank's files are in tmp
        if accelerator.is_main_process:
            writing = checkpoint_model(tmp)
            model.save_pretrained(writing, meta["image"], step)
            writing = tmp
            # Flush every file save_state wrote before meta.json marks the folder complete: after a crash a
            # folder must not look complete while its weights are still only in the page cache. The same
            # pass records each file's size and sha256, which resuming checks.
            files = {}
            for root, _, names in os.walk(tmp):
                for name in names:
                    file = os.path.join(root, name)
                    fsync_file(file)
                    files[os.path.relpath(file, tmp)] = {"size": os.path.getsize(file), "sha256": file_sha256(file)}
            _write_meta(tmp, {**meta, "step": step, "files": dict(sorted(files.items()))})  # last: marks it complete
            # Saving the same step again (e.g. a stop right after resuming) swaps the folders.
            publish_folder(tmp, final)
    except Exception as err:
        failure = write_failure(err, writing)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the space back, and nothing half-written left
        if failure is None:
            raise
        raise WriteFailure(f"checkpoint of step {step} not saved: {failure}") from None
    if accelerator.is_main_process:
        prune_checkpoints(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints.

    Damaged folders moved aside (step_N.damaged-XXXX) are not checkpoints here: they are neither
    counted nor deleted.
    """
    for _, path in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        # Rename first so a crash during rmtree never leaves a half-deleted folder under a final name.
        doomed = f"{path}.deleting-{secrets.token_hex(4)}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete temporary checkpoint and export folders left by an interrupted save or prune (call
    before any rank saves)."""
    removed = []
    for folder in (run_dir, checkpoints_folder(run_dir)):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            match = SIDE_FOLDER.match(name)
            if not match or match.group(2) == "damaged":
                continue
            path, final = os.path.join(folder, name), os.path.join(folder, match.group(1))
            if match.group(2) == "replaced" and not os.path.exists(final) and is_complete(path):
                os.replace(path, final)  # a crash between the two renames of a re-save: put the old one back
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed
