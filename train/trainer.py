"""The trainer: `train(cfg)` checks the config against the data, takes the run lock and runs a Trainer.

Trainer reads top to bottom: set_up (run folder, model, resume, trackers), step (one optimizer step,
the loss from the model's own nll), evaluate, checkpoint (checkpoint folder and export), loop, finish.
The CLI (train/run.py) and the tests both call train(). Every rank runs the same code; the main
process alone writes the trackers' logs (log.with), the resolved config, sample grids and the export.
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
from accelerate import Accelerator, PartialState
from accelerate.tracking import TensorBoardTracker, on_main_process
from accelerate.utils import gather_object, parse_flag_from_env, set_seed
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.tensorboard.summary import hparams
from tqdm.auto import tqdm

from common.run_layout import (KERNEL_CACHE, LOGS, RUN_CONFIG, SAMPLES, checkpoint_model, checkpoint_name,
                               checkpoints_folder, export_folder, is_complete)
from data_prep import (DataError, caption_for, decode_sequences, eval_batches, grid_tensor, load_manifest, save_png,
                       shard_file_problems, train_batches)
from model import ImageTransformer, bits_per_dim
from model.precision import resolve_precision
from model.pretrained import load_weights
from train.checkpoint import (CheckpointError, WriteFailure, check_compatible, choose_checkpoint, on_main_then_share,
                              read_meta, remove_stale_temporaries, resolve_resume, run_changes, save_checkpoint,
                              write_failure)
from train.config import ConfigError, TrainConfig, flatten_config, write_config
from train.optimizers import build_optimizers
from train.run_lock import RunLock
from train.schedule import learning_rate
from train.stop_request import EXIT_STOPPED, StopRequest


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
    eval_bits_per_dim: list[tuple[int, float]] = field(default_factory=list)
    bad_total: int = 0
    param_digest: str = ""


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


def check_against_data(cfg: TrainConfig, source: str) -> tuple[TrainConfig, Any]:
    """(cfg with bins, seq_len, n_classes and row_len: auto of the data, the manifest of data.dir); ConfigError naming
    the key when the folder is not usable or a value the config sets disagrees with the data."""
    try:
        manifest = load_manifest(cfg.data.dir)
    except DataError as err:  # a missing folder included: "not a prepared folder ... run python -m data_prep.prepare"
        raise ConfigError(f"{source}: data.dir: {err}") from None
    data = {"bins": manifest.bins, "seq_len": manifest.seq_len, "n_classes": max(1, len(manifest.class_names))}
    for key, value in data.items():
        if f"model.{key}" in cfg.keys_set and getattr(cfg.model, key) != value:
            raise ConfigError(f"{source}: model.{key}={getattr(cfg.model, key)!r} but data.dir {cfg.data.dir!r} "
                              f"has {value} (leave model.{key} out: the data sets it)")
    row = manifest.width * manifest.channels
    if cfg.model.row_len == "auto":  # the data's own row; patch order has no image row to embed
        data["row_len"] = row if manifest.order == "raster" else 0
    elif cfg.model.row_len and manifest.order == "raster" and cfg.model.row_len != row:
        raise ConfigError(f"{source}: model.row_len={cfg.model.row_len} but a row of {cfg.data.dir!r} is {row} bytes "
                          f"(width {manifest.width} x {manifest.channels} channels): set model.row_len={row}, or 0")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **data)), manifest


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


def evaluate(accelerator: Any, net: ImageTransformer, cfg: TrainConfig) -> float:
    """Exact bits/dim over the whole test split: each rank its disjoint part, totals summed over ranks.

    Runs the unwrapped model so that no DDP collective happens inside the loop (ranks may hold
    different numbers of test batches).
    """
    with accelerator.autocast():
        total = net.nll_totals(eval_batches(cfg.data.dir, cfg.train.eval_batch_size, split="test",
                                            rank=accelerator.process_index, world_size=accelerator.num_processes))
    nats, n_bytes, _ = accelerator.reduce(total, reduction="sum").tolist()  # one copy to the host
    if n_bytes == 0:
        raise TrainingError(f"{cfg.data.dir}: the test split is empty; cannot evaluate")
    return bits_per_dim(nats, n_bytes)


def sample_grid(net: ImageTransformer, manifest: Any, n: int, seed: int) -> torch.Tensor:
    """A float grid (3, H', W') of n recurrent samples, one class per column where the data has classes."""
    n_classes = len(manifest.class_names)
    classes = [i % n_classes for i in range(n)] if n_classes else []
    labels = torch.tensor(classes, dtype=torch.long) if classes else None  # unused if unconditional
    rng = random.Random(seed)
    captions = [caption_for(manifest.dataset, manifest.class_names[c], rng) for c in classes] \
        if net.condition.uses_caption else None
    # in eval mode, without gradients; the sampler's per-image streams: `lit-sample --seed` with these
    # labels draws the same images
    seqs = net.generate(n, labels=labels, captions=captions, seed=seed)  # (n, L)
    images = decode_sequences(seqs.cpu(), manifest.height, manifest.width, manifest.channels,
                              manifest.bins, manifest.order)  # (n, H, W, C) uint8
    columns = min(n, n_classes if 0 < n_classes <= 16 else int(math.ceil(math.sqrt(n))))
    return grid_tensor(images, columns)  # (3, H', W') float in [0, 1]


def load_ema(ema: AveragedModel, folder: str, saved: dict, net: torch.nn.Module, warn) -> None:
    """Restore the weight average of a checkpoint: a run that keeps one saves it as the checkpoint's
    model/ (earlier versions also as ema.safetensors); one saved without it starts from net's weights."""
    earlier = os.path.join(folder, "ema.safetensors")
    if os.path.exists(earlier):
        ema.load_state_dict(load_file(earlier, device=str(ema.n_averaged.device)))
    elif (saved.get("run") or {}).get("ema_decay"):
        load_weights(ema.module, checkpoint_model(folder))
        ema.n_averaged.fill_(1)  # the EMA update reads the count only to copy instead of average at 0
    else:
        warn(f"warning: {folder} was saved with train.ema_decay=0: the average starts from the resumed weights")
        ema.n_averaged.zero_()
        ema.update_parameters(net)  # with nothing averaged yet, this copies the resumed weights


KERNEL_CACHE_VARIABLES = ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_AUTOTUNING")


@contextlib.contextmanager
def kernel_cache(run_dir: str, enabled: bool) -> Iterator[None]:
    """Point Triton's and inductor's caches into RUN/.kernel-cache where the environment names none
    (train.kernel_cache), for the run; the environment as it was afterwards.

    Entered before the model is built: Triton's autotuner reads TRITON_CACHE_AUTOTUNING when a kernel
    (fla's, imported with the model) is defined; the cache folders are read when kernels compile.
    """
    saved = {name: os.environ.get(name) for name in KERNEL_CACHE_VARIABLES}
    if enabled:
        cache = os.path.abspath(os.path.join(run_dir, KERNEL_CACHE))
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # the benchmarked choices too, not only binaries
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def compile_blocks(net: ImageTransformer, setting: str, device: torch.device) -> bool:
    """torch.compile every block in place as train.compile says (auto: on CUDA); True when compiled.

    One block at a time ("regional compilation"): the blocks share their code and shapes, so one
    compilation serves them all instead of one graph of the whole depth. The weights stay where
    they are: state_dict keys, DDP, checkpoints and the EMA see the same modules.
    """
    if setting == "false" or (setting == "auto" and device.type != "cuda"):
        return False
    for block in net.blocks:
        block.compile()
    return True


def _configure_determinism(enabled: bool) -> bool:
    """Switch torch to deterministic kernels; returns the previous setting to restore it later."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        # cuBLAS needs a fixed workspace for deterministic matmuls; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return previous


def with_stored_row_len(cfg: TrainConfig, checkpoint: str) -> TrainConfig:
    """cfg with the checkpoint's own row_len: `auto` continues a run as it was built (one saved before
    `auto` became the default has 0, no row embeddings), never as a different model."""
    with contextlib.suppress(CheckpointError, AttributeError):  # damage is named when the checkpoint is chosen
        saved = read_meta(checkpoint)["model_config"].get("row_len", 0)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, row_len=saved))
    return cfg


def train(cfg: TrainConfig, *, resume: Optional[str] = None, config_source: str = "<config>") -> TrainResult:
    """Train as configured; returns a TrainResult with exit_code 0 (done) or 75 (stopped on a signal).

    Raises ConfigError, CheckpointError or RunLockError for bad configuration or a run folder in use
    (exit 2), TrainingError when training cannot continue and WriteFailure (an OSError) for a checkpoint
    or export the disk refused (exit 1). resume: None (fresh; refuses
    a run folder that has checkpoints, or an export without them), "auto" (newest intact checkpoint,
    or fresh where the folder holds no export) or a checkpoint folder.
    """
    # Handlers first: a stop request from here on is honoured (saved and exit 75), never lost.
    with StopRequest() as stop:
        row_from_data = cfg.model.row_len == "auto"
        cfg, manifest = check_against_data(cfg, config_source)
        # Every shard of both splits is there and long enough before any step: a test shard is read
        # first at the first evaluation, which may come hours (and an unsaved checkpoint) later.
        problems = shard_file_problems(cfg.data.dir, manifest)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise TrainingError(f"{problems[0]}{more}; run python -m data_prep.verify {cfg.data.dir}")
        run_dir = cfg.train.run_dir
        # Cheap checks before anything starts (the run lock and the file digests come later; with
        # --resume auto the newest checkpoint may turn out damaged, so its turn comes after them).
        resume_path = resolve_resume(run_dir, resume)
        if row_from_data and resume_path is not None:
            cfg = with_stored_row_len(cfg, resume_path)
        if resume_path is not None and resume != "auto":
            check_compatible(resume_path, dataclasses.asdict(cfg.model), manifest.image_info(), cfg.optim.name)

        previous_deterministic = _configure_determinism(cfg.train.deterministic)
        lock = RunLock(run_dir)
        try:
            # log.with: TensorBoard ours (events in RUN/logs), the other trackers by their accelerate name
            trackers = [TensorBoardOneFile(LOGS, run_dir) if name == "tensorboard" else name for name in cfg.log.with_]
            # the process state Accelerator would build (it reads ACCELERATE_USE_CPU itself), for its device
            state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
            precision = resolve_precision(cfg.train.mixed_precision, state.device)
            accelerator = Accelerator(mixed_precision=precision, log_with=trackers,
                                      gradient_accumulation_steps=cfg.train.grad_accum, project_dir=run_dir)
            # One lock for all ranks and nodes, taken by the main process before anything in the folder changes.
            on_main_then_share(accelerator, lambda: lock.acquire(warn=accelerator.print))
            with kernel_cache(run_dir, cfg.train.kernel_cache):
                return Trainer(cfg, manifest, accelerator, stop).run(resume)
        finally:
            lock.release()  # a no-op on the ranks that do not hold it
            torch.use_deterministic_algorithms(previous_deterministic)


class TensorBoardOneFile(TensorBoardTracker):
    """accelerate's TensorBoard tracker with the hyperparameters in the run's one event file (its
    add_hparams would write a second file in a subfolder, which TensorBoard shows as another run)."""

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        """Record values (flat: numbers, strings, booleans, None) in the hparams dashboard."""
        for summary in hparams(values, metric_dict={}):  # experiment, session start, session end
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()


class Trainer:
    """One run on this rank, after the run lock: set_up, then loop over step, evaluate and
    checkpoint, then finish. cfg.model is the model config, bins/seq_len/n_classes from the data."""

    def __init__(self, cfg: TrainConfig, manifest: Any, accelerator: Any, stop: StopRequest):
        self.cfg, self.manifest, self.accelerator, self.stop = cfg, manifest, accelerator, stop
        self.run_dir, self.device = cfg.train.run_dir, accelerator.device
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.global_batch = cfg.train.batch_size * cfg.train.grad_accum * self.world
        self.max_steps = resolve_max_steps(cfg, manifest, self.world)
        self.run_record = {"world_size": self.world, "batch_size": cfg.train.batch_size,
                           "grad_accum": cfg.train.grad_accum, "global_batch": self.global_batch,
                           "seed": cfg.train.seed, "mixed_precision": accelerator.mixed_precision, "optimizer": cfg.optim.name,
                           "ema_decay": cfg.train.ema_decay}  # > 0: model/ holds the average
        # what meta.json records of the data: enough to notice a resume on other data
        self.data_record = {"dir": os.path.abspath(cfg.data.dir), "dataset": manifest.dataset, "seed": manifest.seed,
                            "splits": {name: {"samples": split.total, "shards": len(split.shards)}
                                       for name, split in manifest.splits.items()}}
        self.state = TrainState()
        self.eval_bits_per_dim: list[tuple[int, float]] = []
        self.last_checkpoint_step = -1
        # this window of log.every steps: summed loss and good steps (the loss), then the steps timed
        # and their seconds (the speed: neither the process's first step nor evaluations and checkpoints)
        self.window_loss, self.window_steps = 0.0, 0
        self.window_timed, self.window_seconds, self.clock_start = 0, 0.0, None

    def set_up(self, resume: Optional[str]) -> None:
        """Run folder, model, optimizer and EMA, the resumed state, trackers; the baseline evaluation."""
        cfg, accelerator = self.cfg, self.accelerator
        if self.device.type == "cpu" and cfg.train.cpu_threads is not None:
            # More threads than free cores makes OpenMP spin: measured 5x slower steps on a busy 2-core box.
            torch.set_num_threads(cfg.train.cpu_threads)
        resume_path = on_main_then_share(accelerator, lambda: self.prepare_folder(resume))
        # Same seed on every rank for the weights (DDP also broadcasts them), then a per-rank seed so
        # that dropout and condition dropout differ between ranks.
        set_seed(cfg.train.seed)
        net = ImageTransformer(cfg.model, cfg.train.backend, cfg.train.chunk_size)
        optimizers = build_optimizers(net, cfg, self.device)
        set_seed(cfg.train.seed + self.rank)
        self.model, *self.optimizers = accelerator.prepare(net, *optimizers)
        self.net = accelerator.unwrap_model(self.model)  # the same module, for EMA, evaluation and digests
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # torch's own averaging; checkpoints hold it once, as their model/ (the weights evaluated)
        self.ema = AveragedModel(self.net, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(
            cfg.train.ema_decay)) if cfg.train.ema_decay > 0 else None
        self.evaluated = self.net if self.ema is None else self.ema.module  # evaluated, drawn and exported
        if resume_path is not None:
            self.resume_from(resume_path)
        elif resume == "auto":
            accelerator.print(f"--resume auto: no complete checkpoint in {checkpoints_folder(self.run_dir)}; fresh start")
        compiled = compile_blocks(self.net, cfg.train.compile, self.device)  # after the EMA's copy of the net
        accelerator.init_trackers(os.path.basename(os.path.abspath(self.run_dir)), config=flatten_config(cfg),
                                  init_kwargs={"wandb": {"dir": os.path.join(self.run_dir, LOGS)}})
        accelerator.print(f"model: {sum(p.numel() for p in self.params) / 1e6:.2f}M parameters, "
                          f"{cfg.model.n_layers} layers, attention {cfg.model.attention}; {self.world} rank(s), "
                          f"global batch {self.global_batch}, training steps {self.state.step} -> {self.max_steps}, "
                          f"mixed precision {accelerator.mixed_precision}, blocks compiled: {'yes' if compiled else 'no'}")
        if resume_path is None and cfg.train.eval_at_start and self.max_steps > 0:
            # samples of an untrained model are noise; the baseline number is not
            self.evaluate_and_log(with_samples=False)

    def prepare_folder(self, resume: Optional[str]) -> Optional[str]:
        """On the main process: the resolved config, no stale temporaries; the checkpoint to resume, if any."""
        os.makedirs(os.path.join(self.run_dir, LOGS), exist_ok=True)  # the trackers' files (wandb: RUN/logs/wandb)
        write_config(self.cfg, os.path.join(self.run_dir, RUN_CONFIG))
        for name in remove_stale_temporaries(self.run_dir):
            self.accelerator.print(f"removed {name}: left by an interrupted checkpoint write")
        # Every file of the checkpoint against its size and digest in meta.json, before loading any.
        return choose_checkpoint(self.run_dir, resume, warn=self.accelerator.print)

    def resume_from(self, path: str) -> None:
        """Weights, optimizer, RNG states, counters and EMA of the checkpoint folder at path."""
        accelerator = self.accelerator
        saved = check_compatible(path, dataclasses.asdict(self.cfg.model), self.manifest.image_info(),
                                 self.cfg.optim.name)
        accelerator.load_state(path)
        self.state = TrainState.from_meta(saved, self.cfg.train.grad_accum)
        # accelerate restores its micro-step counter too, and decides "last micro-batch of the
        # window" from it modulo grad_accum: with another grad_accum than the checkpoint's, the
        # window's end would never come and every optimizer step would be skipped. Each step here
        # runs a whole window, so the count starts again at 0.
        accelerator.step = 0
        if self.ema is not None:
            load_ema(self.ema, path, saved, self.net, warn=accelerator.print)
        self.last_checkpoint_step = self.state.step  # the resumed checkpoint is this step's
        accelerator.print(f"resumed from {path} at step {self.state.step}")
        for line in run_changes(saved, self.run_record, self.data_record):
            accelerator.print(f"warning: {path}: {line}")

    def next_batch(self) -> Any:
        """This rank's next training batch; a short or unreadable shard is a TrainingError naming it."""
        with preserved_rng():  # reading never draws from the training RNGs
            try:
                batch = next(self.batches)
            except DataError as err:
                raise TrainingError(str(err)) from None
        self.state.micro_batches += 1
        return batch

    def step(self) -> tuple[bool, float, float]:
        """One optimizer step over train.grad_accum micro-batches -> (stop requested on any rank, lr, grad norm)."""
        cfg, accelerator = self.cfg, self.accelerator
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.train.grad_accum):
            batch = self.next_batch()
            seqs = batch.seqs.to(self.device, non_blocking=True).long()  # (B, L)
            with accelerator.accumulate(self.model):
                if accelerator.sync_gradients != (micro == cfg.train.grad_accum - 1):
                    # Never train on with a window that does not end where the step does.
                    raise TrainingError(f"step {self.state.step}: accelerate's accumulation window is out of "
                                        f"step with train.grad_accum={cfg.train.grad_accum}")
                # the model's own nll, through the wrapped forward so that DDP reduces the gradients
                # the labels stay on the host, where the model checks their range without waiting for the device
                loss = self.model(seqs, batch.labels, batch.captions, return_nll=True).mean()  # nats per byte
                accelerator.backward(loss)
            loss_sum += loss.detach() / cfg.train.grad_accum
        # One small collective per step and the step's one host sync: every rank learns whether any
        # rank saw a non-finite loss or received a stop signal, so that all take the same branch; the
        # loss and the gradient norm come back with it. Under a loss scaler (fp16 on a GPU) clipping
        # waits for the answer: the scaler unscales only for a step that will be taken.
        norm = self.clip() if accelerator.scaler is None else torch.full((), float("nan"), device=self.device)
        finite = torch.isfinite(loss_sum)
        stop_requested = float(self.stop.signal_name is not None)
        flags = torch.stack([(~finite).float(), torch.tensor(stop_requested, device=self.device),
                             torch.where(finite, loss_sum, torch.zeros_like(loss_sum)), norm.float()])
        flags = accelerator.reduce(flags, reduction="sum")  # a copy in a single process
        count_nonfinite, count_stop, loss_total, norm_total = flags.tolist()
        lr = learning_rate(self.state.step, base_lr=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
                           total_steps=self.max_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
        # every rank holds the same (all-reduced) gradients, hence the same norm: the sum over ranks / world
        grad_norm = self.update(count_nonfinite > 0, lr, loss_total / self.world, norm_total / self.world)
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        return count_stop > 0, lr, grad_norm

    def clip(self) -> torch.Tensor:
        """Clip the summed gradients to optim.grad_clip (0: not at all); their norm, on the device."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return self.accelerator.clip_grad_norm_(self.params, max_norm)

    def update(self, nonfinite: bool, lr: float, mean_loss: float, grad_norm: float) -> float:
        """Apply the summed gradients (clipped first under a loss scaler: step clipped them otherwise and
        measured grad_norm) unless anything is non-finite; returns the gradient norm."""
        accelerator, state = self.accelerator, self.state
        if not nonfinite:
            if accelerator.scaler is not None:
                grad_norm = float(self.clip())
            # Gradients are identical on every rank after the all-reduce, so this check agrees
            # everywhere. With a GradScaler (fp16 on a GPU) an inf norm is its ordinary overflow
            # skip, counted below; without one (fp16 on CPU has none) it would be applied.
            nonfinite = not math.isfinite(grad_norm) and accelerator.scaler is None
        if not nonfinite:
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
            # The scaler skipped the update (overflow): a bad step like any other, so that a run
            # that never steps cannot end with exit 0.
            nonfinite = bool(accelerator.optimizer_step_was_skipped)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if not nonfinite:
            if self.ema is not None:
                self.ema.update_parameters(self.net)
            state.bad_in_a_row = 0
            self.window_loss += mean_loss
            self.window_steps += 1
        else:
            state.bad_in_a_row += 1
            state.bad_total += 1
            accelerator.print(f"step {state.step}: non-finite loss or gradient (or fp16 overflow), update skipped "
                              f"({state.bad_in_a_row} in a row)")
            if state.bad_in_a_row >= self.cfg.train.max_bad_steps:
                raise TrainingError(
                    f"stopped at step {state.step}: {state.bad_in_a_row} bad steps in a row (non-finite loss "
                    "or gradient norm, or skipped by the fp16 scaler) "
                    f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); lower optim.lr, check the data, "
                    "or use train.mixed_precision=bf16 instead of fp16")
        return grad_norm

    def clock(self, running: bool) -> float:
        """Start (running) or stop the images/s clock: what runs while it is stopped (the process's
        first step with its compilation and autotuning, evaluations, checkpoints) is not in the figure.
        Returns the time it read (time.perf_counter)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # queued steps belong to the segment that queued them
        now = time.perf_counter()
        if self.clock_start is not None:
            self.window_seconds += now - self.clock_start
        self.clock_start = now if running else None
        return now

    def report_first_step(self, began: float) -> None:
        """Start the clock; print and log the seconds from "training from step N" to the first step done."""
        seconds = self.clock(True) - began
        self.accelerator.print(f"step {self.state.step}: warm-up {seconds:.1f} s (this process's first step: "
                               "compilation, autotuning, first batch; left out of images/s)", flush=True)
        self.accelerator.log({"train/first_step_s": seconds}, step=self.state.step)

    def log_window(self, lr: float, grad_norm: float) -> None:
        """The train/* scalars of the steps since the last call, to every tracker and the progress bar."""
        state = self.state
        self.clock(True)  # closes the running segment
        speed = {}
        if self.window_timed > 0:  # none when the window held only the process's first step
            images_per_s = self.window_timed * self.global_batch / max(self.window_seconds, 1e-9)
            speed = {"train/images_per_s": images_per_s, "train/bytes_per_s": images_per_s * self.manifest.seq_len}
        if self.window_steps > 0 and self.accelerator.is_main_process:
            train_loss = self.window_loss / self.window_steps
            self.accelerator.log({"train/loss": train_loss, "train/bits_per_dim": bits_per_dim(train_loss),
                                  "train/lr": lr, "train/grad_norm": grad_norm, **speed,
                                  "train/bad_steps_total": state.bad_total,
                                  "train/samples_seen": state.samples_seen}, step=state.step)
            self.bar.set_postfix(loss=f"{train_loss:.4f}", bpd=f"{bits_per_dim(train_loss):.3f}",
                                 **({"img_s": f"{speed['train/images_per_s']:.1f}"} if speed else {}))
        self.window_loss, self.window_steps, self.window_timed, self.window_seconds = 0.0, 0, 0, 0.0

    def evaluate_and_log(self, with_samples: bool) -> None:
        """Exact test bits/dim (and a sample grid) of the evaluated weights, to every tracker."""
        cfg, accelerator, step = self.cfg, self.accelerator, self.state.step
        with preserved_rng():
            try:
                bits = evaluate(accelerator, self.evaluated, cfg)
            except DataError as err:  # a short or unreadable test shard: never a partial bits/dim
                raise TrainingError(str(err)) from None
            if accelerator.is_main_process and with_samples and cfg.train.n_samples > 0:
                grid = sample_grid(self.evaluated, self.manifest, cfg.train.n_samples, cfg.train.seed)  # (3, H', W')
                for tracker in accelerator.trackers:
                    if hasattr(tracker, "log_images"):  # the trackers that take images
                        tracker.log_images({"samples": grid.unsqueeze(0)}, step=step)
                save_png(grid, os.path.join(self.run_dir, SAMPLES, f"{checkpoint_name(step)}.png"))
            accelerator.log({"eval/bits_per_dim": bits}, step=step)
        self.eval_bits_per_dim.append((step, bits))
        accelerator.print(f"step {step}: eval {bits:.4f} bits/dim")

    def checkpoint(self, export_only: bool = False) -> None:
        """A checkpoint folder of this step (every rank) and the export (main process); with
        export_only, the export alone and only where it is missing."""
        export_path = export_folder(self.run_dir)
        with preserved_rng():
            if not export_only:
                meta = {"model_config": dataclasses.asdict(self.cfg.model), "image": self.manifest.image_info(),
                        "train_state": dataclasses.asdict(self.state), "run": self.run_record, "data": self.data_record}
                save_checkpoint(self.accelerator, self.run_dir, self.state.step, meta,
                                self.cfg.train.keep_checkpoints, self.evaluated)
                self.last_checkpoint_step = self.state.step
            if self.accelerator.is_main_process and not (export_only and is_complete(export_path)):
                try:
                    self.evaluated.save_pretrained(export_path, self.manifest.image_info(), self.state.step)
                except Exception as err:  # save_pretrained has removed its temporary folder
                    failure = write_failure(err, export_path, walk=False)  # export/ holds the old, intact model
                    if failure is None:
                        raise
                    raise WriteFailure(f"export of step {self.state.step} not saved: {failure}") from None

    def loop(self) -> Optional[str]:
        """Steps until max_steps or a stop request, evaluating and checkpointing when due; returns
        what stopped it (a signal's name), or None when max_steps was reached."""
        cfg, state = self.cfg, self.state
        with preserved_rng():
            self.batches = iter(train_batches(
                cfg.data.dir, cfg.train.batch_size, rank=self.rank, world_size=self.world,
                num_workers=cfg.data.num_workers, seed=cfg.train.seed, start_batch=state.micro_batches,
                shuffle_buffer=cfg.data.shuffle_buffer, read_timeout=cfg.data.read_timeout))
        self.accelerator.print(f"training from step {state.step}", flush=True)
        self.bar = tqdm(total=self.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                        disable=not (self.accelerator.is_main_process and cfg.log.progress_bar))
        began = time.perf_counter()
        self.model.train()
        # A stop requested while starting up (or during the first evaluation) is honoured after one step.
        with contextlib.closing(self.bar):
            while state.step < self.max_steps:
                any_stop, lr, grad_norm = self.step()
                if self.clock_start is None:  # the process's first step: the clock has not started yet
                    self.report_first_step(began)
                else:
                    self.window_timed += 1
                self.bar.update(1)
                if state.step % cfg.log.every == 0 or state.step == self.max_steps:
                    self.log_window(lr, grad_norm)
                if any_stop:
                    return self.stop.signal_name or "a signal on another rank"
                if state.step % cfg.train.eval_every == 0 and state.step < self.max_steps:
                    every = cfg.train.sample_every
                    self.clock(False)
                    self.evaluate_and_log(with_samples=every == 0 or state.step % every == 0)
                    self.clock(True)
                # No checkpoint in the middle of a bad streak: the next good step saves instead.
                due = state.step - max(self.last_checkpoint_step, 0) >= cfg.train.checkpoint_every or \
                    state.step % cfg.train.checkpoint_every == 0
                if due and state.bad_in_a_row == 0 and state.step < self.max_steps and \
                        self.last_checkpoint_step != state.step:
                    self.clock(False)
                    self.checkpoint()
                    self.clock(True)
        return None

    def finish(self, stopped_by: Optional[str]) -> int:
        """The last checkpoint, evaluation and export after the loop; returns the exit code (0 or 75)."""
        state, accelerator = self.state, self.accelerator
        if state.bad_in_a_row > 0 and self.last_checkpoint_step != state.step:
            # Weights that only gave bad steps lately are not saved over (and pruned in place of) good ones.
            message = (f"step {state.step}: {state.bad_in_a_row} bad steps in a row at the end; no checkpoint "
                       f"written, the newest stays step {max(self.last_checkpoint_step, 0)}")
            if stopped_by is None:
                raise TrainingError(message)
            accelerator.print(message)
            self.last_checkpoint_step = state.step  # nothing to save
        if stopped_by is not None:
            if self.last_checkpoint_step != state.step:
                self.checkpoint()
            accelerator.print(f"stopped by {stopped_by} at step {state.step}; newest checkpoint in "
                              f"{checkpoints_folder(self.run_dir)}; resume with --resume auto (exit {EXIT_STOPPED})")
            return EXIT_STOPPED
        # A stop request from here on comes too late to matter: the run finishes (exit 0).
        if state.step not in dict(self.eval_bits_per_dim):  # not evaluated at this step yet
            self.evaluate_and_log(with_samples=True)
        self.checkpoint(export_only=self.last_checkpoint_step == state.step)
        return 0

    def check_replicas(self) -> str:
        """This rank's parameter digest, after checking that every rank holds the same weights."""
        digest = parameter_digest(self.net)
        digests = gather_object([digest])
        print(f"rank {self.rank}/{self.world}: stopped at step {self.state.step}, parameter digest {digest[:16]}",
              flush=True)
        if len(set(digests)) != 1:
            raise TrainingError(f"parameters differ across ranks at step {self.state.step}: {digests}")
        self.accelerator.print(f"parameters identical on all {self.world} rank(s) (sha256 {digest[:16]})")
        return digest

    def run(self, resume: Optional[str]) -> TrainResult:
        """set_up, loop, finish; the result once every rank agrees on the weights."""
        self.set_up(resume)
        exit_code = self.finish(self.loop())
        digest = self.check_replicas()
        # Without both calls, CPU DDP runs sometimes aborted at exit (SIGABRT while tearing down gloo).
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return TrainResult(exit_code=exit_code, step=self.state.step, eval_bits_per_dim=self.eval_bits_per_dim,
                           bad_total=self.state.bad_total, param_digest=digest)
