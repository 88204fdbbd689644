"""The trainer end to end on a tiny prepared digits set (CPU): learning, resume, DDP, signals, crashes, errors."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from train.config import load_config
from train.run import main as run_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_PY = os.path.join(REPO, "train", "run.py")
CONFIG = os.path.join(REPO, "configs", "digits.yaml")
# A model of a few thousand parameters: every step takes milliseconds, the behaviour is the real one.
TINY = ["model.n_layers=1", "model.n_heads=2", "model.d_query=8", "model.d_ff=32", "train.batch_size=8",
        "train.eval_batch_size=100", "data.num_workers=1", "data.shuffle_buffer=200", "train.n_samples=2",
        "log.every=5", "log.progress_bar=false", "train.eval_every=1000", "train.checkpoint_every=1000",
        "train.eval_at_start=true", "train.keep_checkpoints=2", "optim.warmup_steps=10"]


@pytest.fixture(scope="module")
def digits16(tmp_path_factory) -> str:
    """A prepared digits folder with 16 levels: 1,000 train / 100 test images."""
    from data_prep.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("train_data") / "digits16"
    prepare(PrepareConfig(dataset="digits", out=str(out), bins=16, train_size=1000, test_size=100,
                          workers=1, progress=False))
    return str(out)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps process-wide singletons; reset them around in-process training runs.

    Also one torch thread: these models are tiny, and two threads on a busy 2-core machine run
    several times slower than one.
    """
    import torch
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


def overrides(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    """--set values for a tiny run of digits.yaml."""
    return [*TINY, f"data.dir={data_dir}", f"train.run_dir={run_dir}", *extra]


def train_in_process(data_dir, run_dir, *extra, resume=None):
    """Run train() in this process with the tiny overrides."""
    from train.trainer import train

    cfg = load_config(CONFIG, overrides(data_dir, run_dir, *extra))
    return train(cfg, resume=resume, config_source=CONFIG)


def cli_args(data_dir, run_dir, *extra) -> list[str]:
    """Command-line arguments of train/run.py for a tiny run."""
    args = ["--config", CONFIG]
    for item in overrides(data_dir, str(run_dir), *extra):
        args += ["--set", item]
    return args


def env() -> dict:
    """Environment of a training subprocess: the repository importable, one thread per rank."""
    return {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def read_scalars(run_dir: str):
    """EventAccumulator over the run's single TensorBoard event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"), recursive=True)
    accumulator = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return files, accumulator


def complete_steps(run_dir) -> list[int]:
    """Steps of the complete checkpoints of a run folder."""
    from common.run_layout import complete_checkpoints

    return [step for step, _ in complete_checkpoints(str(run_dir))]


def wait_for(predicate, process, timeout=120.0, what="condition"):
    """Poll predicate until true; fail if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            pytest.fail(f"process ended (rc {process.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow
def test_one_process_learns(digits16, tmp_path, fresh_accelerate):
    result = train_in_process(digits16, tmp_path / "run", "train.max_steps=200", "optim.lr=3e-3",
                              "optim.warmup_steps=20", "optim.min_lr_ratio=0.1", "train.eval_every=100")
    assert result.exit_code == 0 and result.step == 200
    steps = [step for step, _ in result.eval_bits_per_dim]
    assert steps == [0, 100, 200]
    start, end = result.eval_bits_per_dim[0][1], result.eval_bits_per_dim[-1][1]
    assert start > 3.8  # an untrained model is near uniform over 16 levels: 4 bits
    assert end < start - 1.0, result.eval_bits_per_dim
    run = tmp_path / "run"
    assert complete_steps(run) == [200]
    assert os.path.isfile(run / "export" / "config.json") and os.path.isfile(run / "config.yaml")
    assert os.path.isfile(run / "samples" / "step_0000200.png")
    from model import ImageTransformer
    net = ImageTransformer.from_pretrained(run / "export")
    assert net.trained_steps == 200 and net.image_info["bins"] == 16 and net.config.condition == "class"
    meta = json.loads((run / "checkpoints" / "step_0000200" / "meta.json").read_text())
    assert meta["step"] == 200 and meta["model_config"]["n_layers"] == 1 and meta["image"]["height"] == 28


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # muon: two optimizers, both states restored
def test_resume_equals_uninterrupted(optimizer, digits16, tmp_path, fresh_accelerate):
    # Dropout and condition dropout on, so that restored RNG states matter; constant lr after
    # warmup, so that the schedule does not depend on max_steps.
    extra = ["train.deterministic=true", "model.dropout=0.1", "optim.warmup_steps=5", "optim.min_lr_ratio=1.0",
             "train.eval_at_start=false", f"optim.name={optimizer}"]
    whole = train_in_process(digits16, tmp_path / "whole", *extra, "train.max_steps=24")
    first = train_in_process(digits16, tmp_path / "split", *extra, "train.max_steps=12")
    second = train_in_process(digits16, tmp_path / "split", *extra, "train.max_steps=24", resume="auto")
    assert (first.step, second.step, whole.step) == (12, 24, 24)
    assert first.param_digest != whole.param_digest
    assert second.param_digest == whole.param_digest
    assert second.eval_bits_per_dim == whole.eval_bits_per_dim


@pytest.mark.parametrize("kind", ["retention", "gla", "deltanet", "gated-deltanet", "softmax"])
def test_every_kind_resumes_exactly_exports_and_samples_in_both_modes(kind, digits16, tmp_path, fresh_accelerate):
    # causal-linear is covered by the tests around this one; the other kinds through the same trainer
    extra = ["train.deterministic=true", "optim.warmup_steps=2", "optim.min_lr_ratio=1.0", "train.eval_at_start=false",
             f"model.attention={kind}", "train.chunk_size=16", "train.n_samples=0"]
    whole = train_in_process(digits16, tmp_path / "whole", *extra, "train.max_steps=6")
    train_in_process(digits16, tmp_path / "split", *extra, "train.max_steps=3")
    second = train_in_process(digits16, tmp_path / "split", *extra, "train.max_steps=6", resume="auto")
    assert second.param_digest == whole.param_digest and second.eval_bits_per_dim == whole.eval_bits_per_dim
    import torch

    from model import ImageTransformer
    from model.generation import SamplingOptions, generate_images
    net = ImageTransformer.from_pretrained(tmp_path / "whole" / "export")
    assert net.config.attention == kind and net.trained_steps == 6
    labels = torch.tensor([3, 7])
    drawn = {mode: generate_images(net, 2, SamplingOptions(seed=1, mode=mode, progress=False, guidance=2.0),
                                   labels=labels)[0] for mode in ("recurrent", "parallel")}
    assert (drawn["recurrent"] == drawn["parallel"]).float().mean() > 0.95  # fp32 rounding may flip a draw


def test_ema_is_evaluated_exported_and_resumes_exactly(digits16, tmp_path, fresh_accelerate):
    from model import ImageTransformer
    from train.trainer import parameter_digest

    extra = ["train.deterministic=true", "train.ema_decay=0.9", "optim.min_lr_ratio=1.0", "train.eval_at_start=false"]
    whole = train_in_process(digits16, tmp_path / "whole", *extra, "train.max_steps=24")
    train_in_process(digits16, tmp_path / "split", *extra, "train.max_steps=12")
    second = train_in_process(digits16, tmp_path / "split", *extra, "train.max_steps=24", resume="auto")
    exported = {name: ImageTransformer.from_pretrained(tmp_path / name / "export") for name in ("whole", "split")}
    # the export holds the average, not the raw weights the run ended with
    assert parameter_digest(exported["whole"]) != whole.param_digest
    # the average is part of the checkpoint: resuming gives the same average and the same eval
    assert second.param_digest == whole.param_digest
    assert parameter_digest(exported["split"]) == parameter_digest(exported["whole"])
    assert second.eval_bits_per_dim == whole.eval_bits_per_dim


def test_ema_turned_on_at_resume_starts_from_the_resumed_weights_and_checkpoints_sample_it(
        digits16, tmp_path, fresh_accelerate):
    from model import ImageTransformer
    from sample.loading import load_for_sampling
    from train.trainer import parameter_digest

    extra = ["train.eval_at_start=false", "train.checkpoint_every=4"]
    first = train_in_process(digits16, tmp_path / "run", *extra, "train.max_steps=4")
    # resumed at max_steps: no step is taken, so the average must be the resumed weights themselves
    again = train_in_process(digits16, tmp_path / "run", *extra, "train.max_steps=4", "train.ema_decay=0.9",
                             resume="auto")
    assert again.param_digest == first.param_digest
    assert again.eval_bits_per_dim[-1] == first.eval_bits_per_dim[-1]  # the final eval used the average
    # a run that keeps an average: its checkpoint folders sample the average, as its export does,
    # from their model/ alone (accelerate's files, there to resume exactly, are never read)
    raw = train_in_process(digits16, tmp_path / "ema", *extra, "train.max_steps=8", "train.ema_decay=0.9")
    exported = parameter_digest(ImageTransformer.from_pretrained(tmp_path / "ema" / "export"))
    folder = tmp_path / "ema" / "checkpoints" / "step_0000008"
    assert {"model.safetensors", "optimizer.bin"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "ema.safetensors").exists()  # the average is kept once: model/ serves resume too
    for file in folder.iterdir():
        if file.is_file() and file.name != "meta.json":
            file.unlink()
    sampled = load_for_sampling(str(folder)).net
    assert parameter_digest(sampled) == exported != raw.param_digest
    from sample.run import main as sample_main
    assert sample_main(["--checkpoint", str(folder), "--out", str(tmp_path / "ema.png"), "--n", "2",
                        "--no-progress", "--device", "cpu"]) == 0


def test_ema_of_a_checkpoint_of_an_earlier_version_loads_from_its_ema_safetensors(tmp_path):
    from safetensors.torch import save_file
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from test_sample_helpers import tiny_model
    from train.trainer import load_ema, parameter_digest

    def average(seed):
        return AveragedModel(tiny_model(seed=seed), use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.9))

    saved = average(1)
    saved.n_averaged.fill_(5)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "ema.safetensors"))
    ema = average(2)
    load_ema(ema, str(tmp_path), {"run": {}}, tiny_model(seed=2), warn=print)  # meta.json had no ema_decay
    assert parameter_digest(ema.module) == parameter_digest(saved.module) and ema.n_averaged.item() == 5


def test_bf16_on_cpu_trains_with_finite_loss(digits16, tmp_path, fresh_accelerate):
    result = train_in_process(digits16, tmp_path / "run", "train.mixed_precision=bf16", "train.max_steps=20",
                              "optim.lr=3e-3")
    assert result.exit_code == 0 and result.bad_total == 0
    assert all(math.isfinite(bits) for _, bits in result.eval_bits_per_dim)
    assert result.eval_bits_per_dim[-1][1] < result.eval_bits_per_dim[0][1]
    _, accumulator = read_scalars(str(tmp_path / "run"))
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_in_bf16_only_where_the_cpu_runs_it_natively(native, digits16, tmp_path,
                                                                            fresh_accelerate, monkeypatch, capsys):
    import torch

    from model import ImageTransformer

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # this machine's answer, replaced
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    autocast_seen = []
    forward = ImageTransformer.forward

    def spying_forward(self, *args, **kwargs):
        autocast_seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ImageTransformer, "forward", spying_forward)
    result = train_in_process(digits16, tmp_path / "run", "train.mixed_precision=auto", "train.max_steps=2",
                              "train.eval_at_start=false", "train.n_samples=0")
    expected = "bf16" if native else "no"
    assert result.exit_code == 0 and f"mixed precision {expected}" in capsys.readouterr().out
    assert autocast_seen and all(seen == native for seen in autocast_seen[:2])  # the two training steps
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["run"]["mixed_precision"] == expected


def test_non_finite_losses_are_skipped_then_stop(digits16, tmp_path, fresh_accelerate, monkeypatch):
    from model import ImageTransformer
    from train.trainer import TrainingError

    forward = ImageTransformer.forward
    monkeypatch.setattr(ImageTransformer, "forward",
                        lambda self, *a, **k: forward(self, *a, **k) * float("nan"))
    with pytest.raises(TrainingError, match="3 bad steps in a row"):
        train_in_process(digits16, tmp_path / "run", "train.max_bad_steps=3", "train.max_steps=10",
                         "train.eval_at_start=false")
    assert complete_steps(tmp_path / "run") == []


def test_images_per_s_leaves_out_the_first_step_evaluations_and_checkpoints(digits16, tmp_path, fresh_accelerate,
                                                                              monkeypatch, capsys):
    from train.trainer import Trainer

    step, checkpoint = Trainer.step, Trainer.checkpoint
    slow_first = iter([True])

    def first_step_slow(self):  # the one-off costs of a GPU's first step: compilation, autotuning
        if next(slow_first, False):
            time.sleep(1.5)
        return step(self)

    def slow_checkpoint(self, *args, **kwargs):
        time.sleep(1.5)
        return checkpoint(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "step", first_step_slow)
    monkeypatch.setattr(Trainer, "checkpoint", slow_checkpoint)
    result = train_in_process(digits16, tmp_path / "run", "train.max_steps=10", "train.eval_at_start=false",
                              "train.checkpoint_every=5")
    assert result.exit_code == 0
    warm_up = re.search(r"step 1: warm-up ([0-9.]+) s \(this process's first step", capsys.readouterr().out)
    assert warm_up and float(warm_up.group(1)) >= 1.5
    _, accumulator = read_scalars(str(tmp_path / "run"))
    assert [e.value >= 1.5 for e in accumulator.Scalars("train/first_step_s")] == [True]
    # 4 timed steps (2-5), then 5 (6-10; the checkpoint after step 5 is not one of them): a figure that
    # counted a 1.5 s pause would be below 5 x 8 images / 1.5 s = 27 images/s
    rates = [(e.step, e.value) for e in accumulator.Scalars("train/images_per_s")]
    assert [s for s, _ in rates] == [5, 10] and min(v for _, v in rates) > 27, rates


def test_the_model_is_built_with_the_kernel_cache_under_the_run_folder(digits16, tmp_path, fresh_accelerate,
                                                                      monkeypatch):
    # Triton's autotuner reads TRITON_CACHE_AUTOTUNING when fla's kernels are defined: with the model
    from model import ImageTransformer
    from train.trainer import KERNEL_CACHE_VARIABLES

    for name in KERNEL_CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen, build = [], ImageTransformer.__init__

    def spying_init(self, *args, **kwargs):
        seen.append({name: os.environ.get(name) for name in KERNEL_CACHE_VARIABLES})
        build(self, *args, **kwargs)

    monkeypatch.setattr(ImageTransformer, "__init__", spying_init)
    assert train_in_process(digits16, tmp_path / "run", "train.max_steps=1", "train.eval_at_start=false").exit_code == 0
    cache = str(tmp_path / "run" / ".kernel-cache")
    assert seen[0] == {"TRITON_CACHE_DIR": os.path.join(cache, "triton"), "TRITON_CACHE_AUTOTUNING": "1",
                       "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
    assert not any(name in os.environ for name in KERNEL_CACHE_VARIABLES)  # the run's alone


def test_a_training_step_reads_from_the_device_once(digits16, tmp_path, fresh_accelerate, monkeypatch):
    """The one host sync of a step is the flags' read (stop, non-finite, loss, gradient norm): on a GPU
    nothing else in our code waits for the device, logging included (it uses what that read returned)."""
    import torch

    from train.trainer import Trainer

    ours = (os.path.join(REPO, "train") + os.sep, os.path.join(REPO, "model") + os.sep)
    reads, inside = [], []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            frame = sys._getframe(1)
            if inside and frame.f_code.co_filename.startswith(ours):
                code = frame.f_code
                reads.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{frame.f_lineno} {name}")
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        counted(name)
    step = Trainer.step

    def watched_step(self):
        inside.append(True)
        try:
            return step(self)
        finally:
            inside.pop()
            steps.append(reads[:])
            reads.clear()

    steps = []
    monkeypatch.setattr(Trainer, "step", watched_step)
    assert train_in_process(digits16, tmp_path / "run", "train.max_steps=3", "train.eval_at_start=false",
                            "log.every=1").exit_code == 0
    # the range checks of the bytes and labels read host tensors only on the host (on a GPU they assert
    # on the device; the trainer leaves the labels on the host): here they cannot be told from a sync
    steps = [[read for read in found if not read.startswith("conditioning.py:check_range:")] for found in steps]
    assert len(steps) == 3 and all(len(found) == 1 and found[0].endswith(" tolist") for found in steps), steps


def test_tensorboard_gets_scalars_hyperparameters_and_images_in_one_event_file(digits16, tmp_path,
                                                                               fresh_accelerate):
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    # model.bins set to the data's own value is accepted; the others come from the manifest
    result = train_in_process(digits16, tmp_path / "run", "train.max_steps=5", "model.bins=16")
    assert result.exit_code == 0
    files, accumulator = read_scalars(str(tmp_path / "run"))
    assert len(files) == 1, files
    tags = accumulator.Tags()
    assert {"train/loss", "train/lr", "eval/bits_per_dim"} <= set(tags["scalars"]) and tags["images"] == ["samples"]
    assert [event.step for event in accumulator.Scalars("eval/bits_per_dim")] == [0, 5]
    metadata = accumulator.SummaryMetadata("_hparams_/session_start_info")
    hparams = HParamsPluginData.FromString(metadata.plugin_data.content).session_start_info.hparams
    assert hparams["train.max_steps"].number_value == 5 and hparams["optim.warmup_steps"].number_value == 10
    assert (hparams["model.bins"].number_value, hparams["model.seq_len"].number_value) == (16, 28 * 28)
    assert hparams["log.with"].string_value == "['tensorboard']"


def test_wandb_offline_next_to_tensorboard(digits16, tmp_path, fresh_accelerate, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb): log.with=wandb is untested")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    result = train_in_process(digits16, run, "train.max_steps=2", "log.every=1", "log.with=[tensorboard,wandb]")
    assert result.exit_code == 0
    offline = glob.glob(str(run / "logs" / "wandb" / "offline-run-*"))
    assert len(offline) == 1, os.listdir(run / "logs")
    records = glob.glob(os.path.join(offline[0], "run-*.wandb"))
    assert len(records) == 1
    data = open(records[0], "rb").read()  # protobuf records: keys and strings are stored as they are
    for key in (b"train/loss", b"eval/bits_per_dim", b"optim.lr", b"model.bins"):
        assert key in data, key
    assert glob.glob(os.path.join(offline[0], "files", "media", "images", "samples_*.png"))
    files, _ = read_scalars(str(run))
    assert len(files) == 1, files


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_ranks_train_in_lockstep(digits16, tmp_path):
    run = tmp_path / "ddp"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               RUN_PY, *cli_args(digits16, run, "train.max_steps=20", "train.eval_every=10",
                                 "train.checkpoint_every=10")]
    done = subprocess.run(command, env={**env(), "ACCELERATE_USE_CPU": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # two processes share the pipe, so one's line may run into the other's: match the digests themselves
    reported = re.findall(r"parameter digest ([0-9a-f]{16})", output)
    assert len(reported) == 2, output[-2000:]  # one per rank
    digests = set(reported)
    assert "rank 0/2: stopped at step 20" in output and "rank 1/2: stopped at step 20" in output
    assert len(digests) == 1, output[-2000:]
    assert "parameters identical on all 2 rank(s)" in output
    assert complete_steps(run) == [10, 20]
    assert sorted(os.listdir(run / "checkpoints" / "step_0000020")) == [
        "meta.json", "model", "model.safetensors", "optimizer.bin", "optimizer_1.bin",  # the config's Muon, then AdamW
        "random_states_0.pkl", "random_states_1.pkl"]
    assert sorted(os.listdir(run / "checkpoints" / "step_0000020" / "model")) == ["config.json", "model.safetensors"]
    files, accumulator = read_scalars(str(run))
    assert len(files) == 1, files
    tags = accumulator.Tags()
    for tag in ("train/loss", "train/bits_per_dim", "train/lr", "train/grad_norm", "train/images_per_s",
                "train/bytes_per_s", "eval/bits_per_dim"):
        assert tag in tags["scalars"], tags
    assert "samples" in tags["images"]
    assert [event.step for event in accumulator.Scalars("eval/bits_per_dim")] == [0, 10, 20]
    assert [event.step for event in accumulator.Scalars("train/loss")] == [5, 10, 15, 20]


def start(args, tmp_path, wrapper=None) -> subprocess.Popen:
    """Start python train/run.py (or a wrapper program around train.run.main) with merged output."""
    program = [sys.executable, RUN_PY, *args] if wrapper is None else [sys.executable, "-c", wrapper, *args]
    return subprocess.Popen(program, env=env(), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigusr1_saves_a_checkpoint_and_exits_75(digits16, tmp_path):
    run = tmp_path / "run"
    process = start(cli_args(digits16, run, "train.max_steps=100000", "train.eval_at_start=false"), tmp_path)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("training from step 0"):
            break
    time.sleep(0.5)
    process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=120)
    output = "".join(lines) + out
    assert process.returncode == 75, output[-3000:]
    assert "stopped by SIGUSR1" in output
    steps = complete_steps(run)
    assert len(steps) == 1 and 0 < steps[0] < 100000
    assert os.path.isfile(run / "export" / "config.json")
    # The checkpoint continues: a resumed run starts where the stop left off.
    resumed = subprocess.run([sys.executable, RUN_PY, *cli_args(digits16, run, f"train.max_steps={steps[0] + 5}"),
                              "--resume", "auto"], env=env(), cwd=tmp_path, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step_{steps[0]:07d} at step {steps[0]}" in resumed.stdout
    assert complete_steps(run)[-1] == steps[0] + 5


# Runs train.run.main with the meta.json write of one checkpoint replaced by "announce, then hang",
# so that the test can kill -9 the process while that checkpoint is being written.
HANG_IN_CHECKPOINT = """
import os, sys, time
import train.checkpoint as checkpoint
from train.run import main
real = checkpoint._write_meta
def hang(path, payload):
    if payload["step"] == int(os.environ["HANG_AT_STEP"]):
        open(os.environ["HANG_SENTINEL"], "w").close()
        time.sleep(600)
    real(path, payload)
checkpoint._write_meta = hang
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_leaves_the_previous_checkpoint_and_resume_continues(digits16, tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    args = cli_args(digits16, run, "train.max_steps=40", "train.checkpoint_every=10", "train.eval_at_start=false")
    # 1. Killed while step 20's checkpoint is half written: step 10 stays complete, 20 never appears.
    sentinel = tmp_path / "hanging"
    os.environ.update(HANG_AT_STEP="20", HANG_SENTINEL=str(sentinel))
    try:
        process = start(args, tmp_path, wrapper=HANG_IN_CHECKPOINT)
    finally:
        del os.environ["HANG_AT_STEP"], os.environ["HANG_SENTINEL"]
    wait_for(sentinel.exists, process, what="the checkpoint write of step 20")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert complete_steps(run) == [10]
    leftovers = [name for name in os.listdir(ckpt) if name.startswith("step_0000020")]
    assert len(leftovers) == 1 and ".tmp-" in leftovers[0]
    assert os.path.isfile(ckpt / leftovers[0] / "model.safetensors")  # written, but never completed
    assert not os.path.exists(ckpt / leftovers[0] / "meta.json")
    # 2. Resumed from step 10, then killed in the middle of the run (after checkpoint 30).
    process = start([*args, "--resume", "auto"], tmp_path)
    wait_for(lambda: 30 in complete_steps(run), process, what="checkpoint 30")
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    out, _ = process.communicate(timeout=30)
    assert f"resumed from {ckpt}/step_0000010 at step 10" in out
    assert "removed step_0000020.tmp-" in out
    assert complete_steps(run)[-1] == 30
    # 3. Resumed again: continues from 30 and finishes.
    done = subprocess.run([sys.executable, RUN_PY, *args, "--resume", "auto"], env=env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {ckpt}/step_0000030 at step 30" in done.stdout
    assert complete_steps(run) == [30, 40]  # keep_checkpoints=2
    assert not [name for name in os.listdir(ckpt) if ".tmp-" in name]


@pytest.fixture(scope="module")
def finished_run(digits16, tmp_path_factory):
    """A run folder with one complete checkpoint at step 4 (trained in a subprocess)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    done = subprocess.run([sys.executable, RUN_PY, *cli_args(digits16, run, "train.max_steps=4",
                                                             "train.eval_at_start=false")],
                          env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing data folder", "resume path missing",
                                  "resume path incomplete", "model config mismatch", "existing run without resume",
                                  "ema decay of one", "negative read timeout", "bad model value",
                                  "bins not the data's", "row length not the data's", "another optimizer"])
def test_bad_configs_exit_2_with_one_line(case, digits16, finished_run, tmp_path, capsys):
    run = str(finished_run)
    step4 = os.path.join(run, "checkpoints", "step_0000004")
    incomplete = tmp_path / "step_0000009"
    incomplete.mkdir()
    argv, words = {
        "unknown key": (cli_args(digits16, run, "train.colour=red"), ["train.colour", "unknown key"]),
        "wrong type": (cli_args(digits16, run, "train.max_steps=lots"), ["train.max_steps", "'lots'"]),
        "ema decay of one": (cli_args(digits16, run, "train.ema_decay=1.0"), ["train.ema_decay", "[0, 1)"]),
        "negative read timeout": (cli_args(digits16, run, "data.read_timeout=-5"), ["data.read_timeout", "-5"]),
        "bad model value": (cli_args(digits16, run, "model.n_layers=0"), ["--set model.n_layers=0: model.n_layers=0 must be >= 1"]),
        "bins not the data's": (cli_args(digits16, run, "model.bins=256"),
                                ["model.bins=256", "has 16", "leave model.bins out"]),
        "row length not the data's": (cli_args(digits16, run, "model.row_len=27"),
                                      ["model.row_len=27", "is 28 bytes", "width 28 x 1 channels"]),
        "missing data folder": (cli_args(str(tmp_path / "nowhere"), run), ["digits.yaml", "data.dir", "nowhere"]),
        "resume path missing": (cli_args(digits16, run) + ["--resume", str(tmp_path / "step_0000123")],
                                ["step_0000123", "no such checkpoint"]),
        "resume path incomplete": (cli_args(digits16, run) + ["--resume", str(incomplete)],
                                   ["step_0000009", "incomplete"]),
        "model config mismatch": (cli_args(digits16, run, "model.n_layers=2", "model.d_ff=64") + ["--resume", step4],
                                  ["step_0000004", "n_layers: checkpoint 1 != config 2",
                                   "d_ff: checkpoint 32 != config 64"]),
        "existing run without resume": (cli_args(digits16, run), ["already has checkpoints", "--resume auto"]),
        "another optimizer": (cli_args(digits16, run, "optim.name=adamw") + ["--resume", step4],  # trained: muon
                              ["step_0000004", "trained with optim.name=muon", "this run has optim.name=adamw"]),
    }[case]
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_row_len_auto_resumes_a_run_saved_without_row_embeddings(digits16, tmp_path, fresh_accelerate):
    """A run saved with row_len 0 (as every run before `auto` became the default) goes on under the
    default `auto` as the model it was, not refused as a different one (a Slurm requeue must resume)."""
    run = tmp_path / "run"
    assert train_in_process(digits16, run, "train.max_steps=2", "model.row_len=0").exit_code == 0
    result = train_in_process(digits16, run, "train.max_steps=4", resume="auto")
    assert result.exit_code == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["row_len"] == 0
