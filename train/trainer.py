"""One training function: `train(cfg)` builds everything from a TrainConfig and runs the loop.

The CLI (train/run.py) and the tests both call it. Every rank runs the same code; the main process
alone writes TensorBoard events, the resolved config, sample grids and the export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from data_prep.captions import caption_for
from data_prep.codec import decode_sequences
from data_prep.errors import DataError
from data_prep.grids import grid_tensor, save_png
from data_prep.manifest import load_manifest
from data_prep.reader import eval_batches, train_batches
from model import ImageTransformer, ModelConfig
from model.run_layout import export_folder, is_complete
from train.checkpoint import (CheckpointError, check_compatible, choose_checkpoint, remove_stale_temporaries,
                              resolve_resume, run_changes, save_checkpoint)
from train.config import ConfigError, TrainConfig, write_config, config_to_dict
from train.run_lock import RunLock, RunLockError
from train.schedule import learning_rate
from train.stop_request import EXIT_STOPPED, StopRequest

LN2 = math.log(2.0)


class TrainingError(RuntimeError):
    """Training could not go on (e.g. too many non-finite losses in a row); exit code 1."""


@dataclass
class TrainState:
    """Counters saved in every checkpoint's meta.json (JSON: resuming unpickles nothing of ours).

    `step` counts optimizer steps (skipped ones included) and alone drives the learning-rate
    schedule; `micro_batches` is this rank's position in its data stream, so that a resume with
    another train.grad_accum continues the stream where it stopped; `samples_seen` is the number of
    training images over all ranks, whatever the global batch was at each step.
    """

    step: int = 0
    micro_batches: int = 0
    samples_seen: int = 0
    bad_in_a_row: int = 0
    bad_total: int = 0

    @classmethod
    def from_meta(cls, meta: dict, grad_accum: int) -> "TrainState":
        """The counters of a checkpoint's meta.json (older ones recorded only the step)."""
        saved = meta.get("train_state") or {"step": meta["step"], "micro_batches": meta["step"] * grad_accum}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: int(value) for key, value in saved.items() if key in names})


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports to its caller."""

    exit_code: int
    step: int
    max_steps: int
    eval_bits_per_dim: list[tuple[int, float]] = field(default_factory=list)
    bad_total: int = 0
    param_digest: str = ""
    run_dir: str = ""


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without consuming the global Python, NumPy or torch RNGs.

    Evaluation, sampling and (re)starting data iterators happen at different steps in a resumed run
    than in an uninterrupted one; isolating them keeps dropout masks identical in both.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def build_model_config(cfg: TrainConfig, manifest: Any, source: str) -> Any:
    """ModelConfig from the model section plus bins/seq_len/n_classes of the data manifest."""
    values = dataclasses.asdict(cfg.model)
    values.update(bins=manifest.bins, seq_len=manifest.seq_len, n_classes=max(1, len(manifest.class_names)))
    try:
        return ModelConfig.from_dict(values)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_data_manifest(cfg: TrainConfig, source: str) -> Any:
    """The manifest of data.dir; ConfigError naming the key and the file when the folder is not usable."""
    if not os.path.isdir(cfg.data.dir):
        raise ConfigError(f"{source}: data.dir {cfg.data.dir!r} does not exist "
                          "(prepare it with python -m data_prep.prepare)")
    try:
        return load_manifest(cfg.data.dir)
    except DataError as err:
        raise ConfigError(f"{source}: data.dir: {err}") from None


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decay for matrices, none for norms, embeddings and biases."""
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)) or "norm" in type(module).__name__.lower():
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in no_decay_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused where the device supports it) or RAdam, with decoupled weight decay."""
    groups = parameter_groups(model, cfg.optim.weight_decay)
    common = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if cfg.optim.name == "radam":
        return torch.optim.RAdam(groups, decoupled_weight_decay=True, **common)
    try:
        # One kernel per step instead of a loop over tensors; CUDA and (torch >= 2.4) CPU have it.
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **common)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **common)


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests mean identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def resolve_max_steps(cfg: TrainConfig, manifest: Any, world_size: int) -> int:
    """train.max_steps, or train.epochs converted with the global batch size."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world_size
    return max(1, math.ceil(cfg.train.epochs * manifest.splits["train"].total / global_batch))


def _condition_inputs(model_config: Any, batch: Any, device: torch.device) -> dict:
    """labels/captions keyword arguments for the model, as its condition needs."""
    kwargs: dict = {}
    if model_config.condition in ("class", "both"):
        kwargs["labels"] = batch.labels.to(device, non_blocking=True)
    if model_config.condition in ("caption", "both"):
        kwargs["captions"] = list(batch.captions)
    return kwargs


def evaluate(accelerator: Any, net: torch.nn.Module, cfg: TrainConfig, model_config: Any) -> float:
    """Exact bits/dim over the whole test split: each rank its disjoint part, totals summed over ranks.

    Runs the unwrapped model so that no DDP collective happens inside the loop (ranks may hold
    different numbers of test batches).
    """
    was_training = net.training
    net.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (nats, bytes)
    with torch.no_grad(), accelerator.autocast():
        for batch in eval_batches(cfg.data.dir, cfg.train.eval_batch_size, split="test",
                                  rank=accelerator.process_index, world_size=accelerator.num_processes):
            seqs = batch.seqs.to(accelerator.device, non_blocking=True).long()  # (B, L)
            nll = net.nll(seqs, **_condition_inputs(model_config, batch, accelerator.device))  # (B, L) nats
            total[0] += nll.double().sum()
            total[1] += seqs.numel()
    net.train(was_training)
    total = accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total
    if total[1].item() == 0:
        raise TrainingError(f"{cfg.data.dir}: the test split is empty; cannot evaluate")
    return (total[0] / total[1]).item() / LN2


def sample_grid(net: torch.nn.Module, model_config: Any, manifest: Any, n: int, seed: int,
                device: torch.device) -> torch.Tensor:
    """A float grid (3, H', W') of n recurrent samples, one class per column when class-conditional."""
    kwargs: dict = {}
    n_classes = len(manifest.class_names)
    classes = [i % n_classes for i in range(n)] if n_classes else []
    if model_config.condition in ("class", "both"):
        kwargs["labels"] = torch.tensor(classes, dtype=torch.long, device=device)
    if model_config.condition in ("caption", "both"):
        rng = random.Random(seed)
        kwargs["captions"] = [caption_for(manifest.dataset, manifest.class_names[c], rng) for c in classes]
    was_training = net.training
    net.eval()
    with torch.no_grad():
        # the sampler's per-image streams: `lit-sample --seed` with these labels draws the same images
        seqs = net.generate(n, seed=seed, **kwargs)  # (n, L)
    net.train(was_training)
    images = decode_sequences(seqs.cpu(), manifest.height, manifest.width, manifest.channels,
                              manifest.bins, manifest.order)  # (n, H, W, C) uint8
    columns = min(n, n_classes if 0 < n_classes <= 16 else int(math.ceil(math.sqrt(n))))
    return grid_tensor(images, columns)  # (3, H', W') float in [0, 1]


EMA_NAME = "ema.safetensors"


def save_ema(ema: AveragedModel, folder: str) -> None:
    """The weight average (and its update count) into a checkpoint folder, as safetensors."""
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in ema.state_dict().items()},
              os.path.join(folder, EMA_NAME))


def load_ema(ema: AveragedModel, folder: str, net: torch.nn.Module, warn) -> None:
    """Restore the weight average from a checkpoint; one saved without it starts from net's weights."""
    path = os.path.join(folder, EMA_NAME)
    if not os.path.exists(path):
        warn(f"warning: {folder} holds no {EMA_NAME} (saved with train.ema_decay=0): the average starts "
             "from the resumed weights")
        ema.n_averaged.zero_()
        ema.update_parameters(net)  # with nothing averaged yet, this copies the resumed weights
        return
    ema.load_state_dict(load_file(path, device=str(ema.n_averaged.device)))


def _configure_determinism(enabled: bool) -> bool:
    """Switch torch to deterministic kernels; returns the previous setting to restore it later."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return previous


def train(cfg: TrainConfig, *, resume: Optional[str] = None, config_source: str = "<config>") -> TrainResult:
    """Train as configured; returns a TrainResult with exit_code 0 (done) or 75 (stopped on a signal).

    Raises ConfigError, CheckpointError or RunLockError for bad configuration or a run folder in use
    (exit 2) and TrainingError when training cannot continue (exit 1). resume: None (fresh; refuses
    a run folder that has checkpoints), "auto" (newest intact checkpoint, or fresh) or a checkpoint
    folder.
    """
    # Handlers first: a stop request from here on is honoured (saved and exit 75), never lost.
    with StopRequest() as stop:
        manifest = load_data_manifest(cfg, config_source)
        model_config = build_model_config(cfg, manifest, config_source)
        run_dir = cfg.train.run_dir
        # Cheap checks before anything starts (the run lock and the file digests come later; with
        # --resume auto the newest checkpoint may turn out damaged, so its turn comes after them).
        resume_path = resolve_resume(run_dir, resume)
        if resume_path is not None and resume != "auto":
            check_compatible(resume_path, dataclasses.asdict(model_config), manifest.image_info())

        previous_deterministic = _configure_determinism(cfg.train.deterministic)
        try:
            return _train(cfg, manifest, model_config, resume, stop)
        finally:
            torch.use_deterministic_algorithms(previous_deterministic)


def _on_main_then_share(accelerator: Any, work: Any) -> Any:
    """Run work() on the main process and hand its result (or its error) to every rank.

    Raises on every rank what work() raised on the main one (CheckpointError, RunLockError).
    """
    box: list = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", work())
        except (CheckpointError, RunLockError) as err:
            box[0] = (type(err).__name__, str(err))
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    kind, value = box[0]
    if kind == "ok":
        return value
    raise {"CheckpointError": CheckpointError, "RunLockError": RunLockError}[kind](value)


def _data_record(cfg: TrainConfig, manifest: Any) -> dict:
    """What meta.json records of the training data: enough to notice a resume on other data."""
    return {"dir": os.path.abspath(cfg.data.dir), "dataset": manifest.dataset, "seed": manifest.seed,
            "splits": {name: {"samples": split.total, "shards": len(split.shards)}
                       for name, split in manifest.splits.items()}}


def _train(cfg: TrainConfig, manifest: Any, model_config: Any, resume: Optional[str],
           stop: StopRequest) -> TrainResult:
    """The body of train(), after the configuration has been checked."""
    run_dir = cfg.train.run_dir
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                              gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with="tensorboard", project_dir=run_dir)
    lock = RunLock(run_dir)

    def take_lock() -> None:
        lock.acquire()
        if lock.warning:
            accelerator.print(lock.warning)

    # One lock for all ranks and nodes, taken by the main process before anything in the folder changes.
    _on_main_then_share(accelerator, take_lock)
    try:
        return _train_locked(cfg, manifest, model_config, resume, stop, accelerator)
    finally:
        lock.release()


def _train_locked(cfg: TrainConfig, manifest: Any, model_config: Any, resume: Optional[str],
                  stop: StopRequest, accelerator: Any) -> TrainResult:
    """Everything after the run lock: resume, the loop, the final evaluation, checkpoint and export."""


    run_dir = cfg.train.run_dir
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    if device.type == "cpu" and cfg.train.cpu_threads is not None:
        # More threads than free cores makes OpenMP spin: measured 5x slower steps on a busy 2-core box.
        torch.set_num_threads(cfg.train.cpu_threads)
    run_record = {"world_size": world, "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
                  "global_batch": cfg.train.batch_size * cfg.train.grad_accum * world, "seed": cfg.train.seed,
                  "mixed_precision": cfg.train.mixed_precision}
    data_record = _data_record(cfg, manifest)

    def prepare_folder() -> Optional[str]:
        os.makedirs(run_dir, exist_ok=True)
        write_config(cfg, os.path.join(run_dir, "config.yaml"))
        for name in remove_stale_temporaries(run_dir):
            accelerator.print(f"removed {name}: left by an interrupted checkpoint write")
        # Every file of the checkpoint against its size and digest in meta.json, before loading any.
        return choose_checkpoint(run_dir, resume, warn=accelerator.print)

    resume_path = _on_main_then_share(accelerator, prepare_folder)

    # Same seed on every rank for the weights (DDP also broadcasts them), then a per-rank seed so
    # that dropout and condition dropout differ between ranks.
    set_seed(cfg.train.seed)
    net = ImageTransformer(model_config)
    optimizer = build_optimizer(net, cfg, device)
    set_seed(cfg.train.seed + rank)
    model, optimizer = accelerator.prepare(net, optimizer)
    state = TrainState()
    ema = None
    if cfg.train.ema_decay > 0:
        # torch's own averaging; checkpoints hold it as ema.safetensors (no pickle to load back)
        ema = AveragedModel(accelerator.unwrap_model(model), use_buffers=True,
                            multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay))

    max_steps = resolve_max_steps(cfg, manifest, world)
    if resume_path is not None:
        saved = check_compatible(resume_path, dataclasses.asdict(model_config), manifest.image_info())
        accelerator.load_state(resume_path)
        state = TrainState.from_meta(saved, cfg.train.grad_accum)
        # accelerate restores its micro-step counter too, and decides "last micro-batch of the
        # window" from it modulo grad_accum: with another grad_accum than the checkpoint's, the
        # window's end would never come and every optimizer step would be skipped. Each step here
        # runs a whole window, so the count starts again at 0.
        accelerator.step = 0
        if ema is not None:
            load_ema(ema, resume_path, accelerator.unwrap_model(model), warn=accelerator.print)
        accelerator.print(f"resumed from {resume_path} at step {state.step}")
        for line in run_changes(saved, run_record, data_record):
            accelerator.print(f"warning: {resume_path}: {line}")
    elif resume == "auto":
        accelerator.print(f"--resume auto: no complete checkpoint in {run_dir}/checkpoints; fresh start")

    accelerator.init_trackers("logs")
    writer = accelerator.get_tracker("tensorboard", unwrap=True) if accelerator.is_main_process else None
    if writer is not None and state.step == 0:
        writer.add_text("config", "```\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False) + "```", 0)

    def meta() -> dict:
        return {"model_config": dataclasses.asdict(model_config), "image": manifest.image_info(),
                "train_state": dataclasses.asdict(state), "run": run_record, "data": data_record}

    export_path = export_folder(run_dir)
    result = TrainResult(exit_code=0, step=state.step, max_steps=max_steps, run_dir=run_dir)
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * world
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    accelerator.print(f"model: {n_params / 1e6:.2f}M parameters, {model_config.n_layers} layers, "
                      f"attention {model_config.attention}; {world} rank(s), global batch {global_batch}, "
                      f"training steps {state.step} -> {max_steps}, mixed precision {cfg.train.mixed_precision}")

    def checkpoint() -> None:
        with preserved_rng():
            save_checkpoint(accelerator, run_dir, state.step, meta(), cfg.train.keep_checkpoints, evaluated(),
                            extra_files=None if ema is None else lambda folder: save_ema(ema, folder))
            if accelerator.is_main_process:
                evaluated().save_pretrained(export_path, manifest.image_info(), state.step)

    def evaluated() -> torch.nn.Module:
        """The weights that are evaluated, drawn and exported: the EMA when it is on."""
        return net_unwrapped if ema is None else ema.module

    def run_eval(with_samples: bool) -> float:
        with preserved_rng():
            try:
                bits = evaluate(accelerator, evaluated(), cfg, model_config)
            except DataError as err:  # a short or unreadable test shard: never a partial bits/dim
                raise TrainingError(str(err)) from None
            if accelerator.is_main_process:
                writer.add_scalar("eval/bits_per_dim", bits, state.step)
                if with_samples and cfg.train.n_samples > 0:
                    grid = sample_grid(evaluated(), model_config, manifest, cfg.train.n_samples,
                                       cfg.train.seed, device)
                    writer.add_image("samples", grid, state.step)  # CHW
                    save_png(grid, os.path.join(run_dir, "samples", f"step_{state.step:07d}.png"))
                writer.flush()
        result.eval_bits_per_dim.append((state.step, bits))
        accelerator.print(f"step {state.step}: eval {bits:.4f} bits/dim")
        return bits

    net_unwrapped = accelerator.unwrap_model(model)
    last_eval_step = last_checkpoint_step = -1
    if resume_path is not None:
        last_checkpoint_step = state.step
    elif cfg.train.eval_at_start and max_steps > 0:
        run_eval(with_samples=False)  # samples of an untrained model are noise; the baseline number is not
        last_eval_step = state.step

    with preserved_rng():
        batches = iter(train_batches(cfg.data.dir, cfg.train.batch_size, rank=rank, world_size=world,
                                     num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                                     start_batch=state.micro_batches,
                                     shuffle_buffer=cfg.data.shuffle_buffer, read_timeout=cfg.data.read_timeout))

    def next_batch() -> Any:
        failure = None
        with preserved_rng():  # reading never draws from the training RNGs
            try:
                batch = next(batches)
            except DataError as err:  # a short or unreadable shard: one line naming it, exit 1
                failure = str(err)
        if failure is not None:
            raise TrainingError(failure)
        state.micro_batches += 1
        return batch

    accelerator.print(f"training from step {state.step}", flush=True)
    bar = tqdm(total=max_steps, initial=state.step, desc="train", dynamic_ncols=True,
               disable=not (accelerator.is_main_process and cfg.log.progress_bar))
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    stopped_by: Optional[str] = None
    model.train()
    # A stop requested while starting up (or during the first evaluation) is honoured after one step.
    while state.step < max_steps:
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.train.grad_accum):
            batch = next_batch()
            seqs = batch.seqs.to(device, non_blocking=True).long()  # (B, L)
            with accelerator.accumulate(model):
                if accelerator.sync_gradients != (micro == cfg.train.grad_accum - 1):
                    # Never train on with a window that does not end where the step does.
                    raise TrainingError(f"step {state.step}: accelerate's accumulation window is out of "
                                        f"step with train.grad_accum={cfg.train.grad_accum}")
                logits = model(seqs, **_condition_inputs(model_config, batch, device))  # (B, L, head_dim)
                # the head's nll evaluates only the target level (the mixture head never builds
                # its (B, L, bins, K) table here)
                loss = net_unwrapped.head.nll(logits.float(), seqs).mean()  # nats per byte
                accelerator.backward(loss)
            loss_sum += loss.detach() / cfg.train.grad_accum
        # One small collective per step (and one host sync): every rank learns whether any rank
        # saw a non-finite loss or received a stop signal, so that all take the same branch.
        finite = torch.isfinite(loss_sum)
        flags = torch.stack([(~finite).float(), torch.tensor(float(stop.requested), device=device),
                             torch.where(finite, loss_sum, torch.zeros_like(loss_sum))])
        if world > 1:
            flags = accelerator.reduce(flags, reduction="sum")
        count_nonfinite, count_stop, loss_total = flags.tolist()
        any_nonfinite, any_stop, mean_loss = count_nonfinite > 0, count_stop > 0, loss_total / world

        lr = learning_rate(state.step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                           total_steps=max_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
        grad_norm = float("nan")
        if not any_nonfinite:
            grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
            # Gradients are identical on every rank after the all-reduce, so this check agrees
            # everywhere. With a GradScaler (fp16 on a GPU) an inf norm is its ordinary overflow
            # skip, counted below; without one (fp16 on CPU has none) it would be applied.
            if not math.isfinite(grad_norm) and accelerator.scaler is None:
                any_nonfinite = True
        if not any_nonfinite:
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # The scaler skipped the update (overflow): a bad step like any other, so that a run
            # that never steps cannot end with exit 0.
            any_nonfinite = bool(accelerator.optimizer_step_was_skipped)
            if not any_nonfinite:
                if ema is not None:
                    ema.update_parameters(net_unwrapped)
                state.bad_in_a_row = 0
                window_loss += mean_loss
                window_steps += 1
        if any_nonfinite:
            optimizer.zero_grad(set_to_none=True)
            state.bad_in_a_row += 1
            state.bad_total += 1
            accelerator.print(f"step {state.step}: non-finite loss or gradient (or fp16 overflow), update skipped "
                              f"({state.bad_in_a_row} in a row)")
            if state.bad_in_a_row >= cfg.train.max_bad_steps:
                bar.close()
                raise TrainingError(
                    f"stopped at step {state.step}: {state.bad_in_a_row} bad steps in a row (non-finite loss "
                    "or gradient norm, or skipped by the fp16 scaler) "
                    f"(train.max_bad_steps={cfg.train.max_bad_steps}); lower optim.lr, check the data, "
                    "or use train.mixed_precision=bf16 instead of fp16")
        state.step += 1
        state.samples_seen += global_batch
        bar.update(1)

        if state.step % cfg.log.every == 0 or state.step == max_steps:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            n_steps = cfg.log.every if state.step % cfg.log.every == 0 else max(window_steps, 1)
            images_per_s = n_steps * global_batch / elapsed
            if window_steps > 0 and accelerator.is_main_process:
                train_loss = window_loss / window_steps
                accelerator.log({"train/loss": train_loss, "train/bits_per_dim": train_loss / LN2,
                                 "train/lr": lr, "train/grad_norm": grad_norm,
                                 "train/images_per_s": images_per_s,
                                 "train/bytes_per_s": images_per_s * manifest.seq_len,
                                 "train/bad_steps_total": state.bad_total,
                                 "train/samples_seen": state.samples_seen}, step=state.step)
                bar.set_postfix(loss=f"{train_loss:.4f}", bpd=f"{train_loss / LN2:.3f}",
                                img_s=f"{images_per_s:.1f}")
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

        if any_stop:
            stopped_by = stop.signal_name or "a signal on another rank"
            break
        if state.step % cfg.train.eval_every == 0 and state.step < max_steps:
            sample_now = cfg.train.sample_every == 0 or state.step % cfg.train.sample_every == 0
            run_eval(with_samples=sample_now)
            last_eval_step = state.step
        # No checkpoint in the middle of a bad streak: the next good step saves instead.
        due = state.step - max(last_checkpoint_step, 0) >= cfg.train.checkpoint_every or \
            state.step % cfg.train.checkpoint_every == 0
        if due and state.bad_in_a_row == 0 and state.step < max_steps and last_checkpoint_step != state.step:
            checkpoint()
            last_checkpoint_step = state.step
    bar.close()

    if state.bad_in_a_row > 0 and last_checkpoint_step != state.step:
        # Weights that only gave bad steps lately are not saved over (and pruned in place of) good ones.
        message = (f"step {state.step}: {state.bad_in_a_row} bad steps in a row at the end; no checkpoint "
                   f"written, the newest stays step {max(last_checkpoint_step, 0)}")
        if stopped_by is None:
            raise TrainingError(message)
        accelerator.print(message)
        last_checkpoint_step = state.step  # nothing to save
    if stopped_by is not None:
        if last_checkpoint_step != state.step:
            checkpoint()
        accelerator.print(f"stopped by {stopped_by} at step {state.step}; newest checkpoint in "
                          f"{run_dir}/checkpoints; resume with --resume auto (exit {EXIT_STOPPED})")
        result.exit_code = EXIT_STOPPED
    else:
        # A stop request from here on comes too late to matter: the run finishes (exit 0).
        if last_eval_step != state.step:
            run_eval(with_samples=True)
        if last_checkpoint_step != state.step:
            checkpoint()
        elif accelerator.is_main_process and not is_complete(export_path):
            evaluated().save_pretrained(export_path, manifest.image_info(), state.step)

    # Every rank reports its weights' digest; they must agree (DDP keeps replicas in lockstep).
    digest = parameter_digest(net_unwrapped)
    digests = gather_object([digest]) if world > 1 else [digest]
    print(f"rank {rank}/{world}: stopped at step {state.step}, parameter digest {digest[:16]}", flush=True)
    if len(set(digests)) != 1:
        raise TrainingError(f"parameters differ across ranks at step {state.step}: {digests}")
    accelerator.print(f"parameters identical on all {world} rank(s) (sha256 {digest[:16]})")
    result.step, result.bad_total, result.param_digest = state.step, state.bad_total, digest

    # Without both calls, CPU DDP runs sometimes aborted at exit (SIGABRT while tearing down gloo).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
