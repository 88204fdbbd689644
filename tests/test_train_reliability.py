"""A run never silently goes wrong: resume with another allocation, short shards, two trainers on one
run folder, damaged checkpoints, stop signals outside the loop, fp16 without a scaler, rank failures.

Tiny 1-layer models on the digits16 set of test_train_run; each test runs a few steps.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from test_train_run import (RUN_PY, cli_args, complete_steps, digits16, env, free_port,  # noqa: F401
                            fresh_accelerate, start, train_in_process, wait_for)
from train.run import main as run_main


def truncate_before_last_sample(shard: str, zero_fill: bool = False) -> None:
    """Cut a tar shard at the start of its last sample (a clean member boundary, no end-of-archive);
    with zero_fill, zeros from there on, the size unchanged (it then reads as a shorter archive)."""
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    last_key = members[-1].name.split(".")[0]
    first_of_last = min(m.offset for m in members if m.name.split(".")[0] == last_key)
    size = os.path.getsize(shard)
    with open(shard, "r+b") as stream:
        stream.truncate(first_of_last)
        if zero_fill:
            stream.truncate(size)


def copy_data(data_dir: str, tmp_path) -> str:
    """A private copy of a prepared folder, to damage."""
    copy = str(tmp_path / "data")
    shutil.copytree(data_dir, copy)
    return copy


# 1. grad_accum changed on resume --------------------------------------------------------------

def test_resume_with_another_grad_accum_keeps_learning(digits16, tmp_path, fresh_accelerate, capsys, monkeypatch):
    run = tmp_path / "run"
    extra = ["train.eval_at_start=false", "optim.warmup_steps=1"]
    # 7 steps: accelerate's saved micro-step count (7) is not a multiple of the new grad_accum.
    first = train_in_process(digits16, run, *extra, "train.max_steps=7")
    # Resuming must not unpickle anything with weights_only=False (our counters live in meta.json).
    unsafe_loads = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        if kwargs.get("weights_only") is False:
            unsafe_loads.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    second = train_in_process(digits16, run, *extra, "train.max_steps=13", "train.grad_accum=3", resume="auto")
    out = capsys.readouterr().out
    assert (first.step, second.step) == (7, 13)
    assert second.param_digest != first.param_digest, "the weights did not move after the resume"
    assert second.bad_total == 0
    assert unsafe_loads == []
    assert "grad_accum 1 -> 3: global batch 8 -> 24" in out, out
    meta = json.loads((run / "checkpoints" / "step_0000013" / "meta.json").read_text())
    # 7 steps of 1 micro-batch, then 6 of 3: the data stream goes on from where it stopped.
    assert meta["train_state"]["micro_batches"] == 7 + 6 * 3
    assert meta["train_state"]["samples_seen"] == 7 * 8 + 6 * 24
    assert meta["run"]["grad_accum"] == 3 and meta["run"]["global_batch"] == 24


# 2. short shards -------------------------------------------------------------------------------

def test_reader_names_a_shard_with_fewer_samples_than_the_manifest(digits16, tmp_path):
    from data_prep.errors import DataError
    from data_prep.reader import eval_batches, train_batches

    data = copy_data(digits16, tmp_path)
    truncate_before_last_sample(os.path.join(data, "test-000003.tar"))
    with pytest.raises(DataError, match=r"test-000003.tar: \d+ samples, the manifest says \d+"):
        list(eval_batches(data, 16))
    with pytest.raises(DataError, match=r"test-000003.tar: \d+ samples") as caught:
        list(eval_batches(data, 16, num_workers=2))
    assert "Traceback" not in str(caught.value)  # the worker's message, not torch's wrapper
    for name in os.listdir(data):
        if name.startswith("train-"):
            truncate_before_last_sample(os.path.join(data, name))
    with pytest.raises(DataError, match=r"train-\d+.tar: \d+ samples, the manifest says") as caught:
        for _ in train_batches(data, 8, num_workers=1, shuffle_buffer=10):
            pass
    assert "Traceback" not in str(caught.value)


@pytest.mark.parametrize("split", ["test", "train"])
def test_truncated_shard_stops_the_run_with_one_line(split, digits16, tmp_path):
    data = copy_data(digits16, tmp_path)
    shards = sorted(name for name in os.listdir(data) if name.startswith(f"{split}-"))
    for name in shards if split == "train" else shards[:1]:
        # zero-filled, not cut: a shorter file is refused before training (the next test)
        truncate_before_last_sample(os.path.join(data, name), zero_fill=True)
    # The command line in a process of its own: it must also exit (reader workers left waiting once
    # made a run that had printed its error hang at exit).
    done = subprocess.run([sys.executable, RUN_PY, *cli_args(data, tmp_path / "run", "train.max_steps=30",
                                                             f"train.eval_at_start={split == 'test'}")],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(errors) == 1 and f"{split}-0000" in errors[0] and "the manifest says" in errors[0], done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert complete_steps(tmp_path / "run") == []


@pytest.mark.parametrize("damage", ["missing test shard", "truncated train shard"])
def test_a_missing_or_short_shard_of_either_split_is_found_before_any_step(damage, digits16, tmp_path,
                                                                           fresh_accelerate, capsys):
    data = copy_data(digits16, tmp_path)
    if damage == "missing test shard":
        os.remove(os.path.join(data, "test-000002.tar"))
        words = ["test-000002.tar: shard listed in the manifest is missing"]
    else:
        truncate_before_last_sample(os.path.join(data, "train-000005.tar"))
        words = ["train-000005.tar: ", "too short for the manifest's", "truncated"]
    # the first evaluation would come after 1,000 steps: the shard is found before the first one
    assert run_main(cli_args(data, tmp_path / "run", "train.max_steps=2000", "train.eval_at_start=false")) == 1
    captured = capsys.readouterr()
    assert "training from step" not in captured.out and not (tmp_path / "run").exists(), captured.out
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "python -m data_prep.verify" in err, err
    for word in words:
        assert word in err, err


# 3. two trainers on one run folder -------------------------------------------------------------

def test_second_trainer_exits_2_naming_the_holder_and_a_dead_holder_never_blocks(digits16, tmp_path,
                                                                                fresh_accelerate, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, RUN_PY, *cli_args(digits16, run, "train.max_steps=100000",
                                                                "train.eval_at_start=false")],
                             env={**env(), "SLURM_JOB_ID": "4242"}, cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        for line in first.stdout:
            if line.startswith("training from step 0"):
                break
        code = run_main(cli_args(digits16, run, "train.max_steps=3") + ["--resume", "auto"])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1, err
        for word in (str(run / "lock"), f"pid {first.pid}", socket.gethostname(), "Slurm job 4242"):
            assert word in err, err
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.kill()
        first.communicate(timeout=30)
    # kill -9 leaves the lock file but not the lock: a restart goes ahead at once.
    assert (run / "lock").exists()
    code = run_main(cli_args(digits16, run, "train.max_steps=3", "train.eval_at_start=false") + ["--resume", "auto"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "lock").read_text())["pid"] == os.getpid()


# 4. damaged checkpoints ------------------------------------------------------------------------

def flip_one_bit(path) -> None:
    """Invert one bit in the middle of a file."""
    with open(path, "r+b") as stream:
        stream.seek(os.path.getsize(path) // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0x10]))


def test_damaged_checkpoint_is_refused_by_path_and_skipped_by_auto(digits16, tmp_path, fresh_accelerate, capsys):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    args = ["train.checkpoint_every=4", "train.eval_at_start=false"]
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=8")) == 0
    assert complete_steps(run) == [4, 8]
    flip_one_bit(ckpt / "step_0000008" / "model.safetensors")
    capsys.readouterr()
    # --resume PATH: one line naming the file, exit 2.
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=10") + ["--resume", str(ckpt / "step_0000008")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_0000008/model.safetensors" in err and "damaged" in err, err
    # --resume auto: a warning naming the file, then the previous complete checkpoint.
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=10") + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipping damaged checkpoint" in out and "step_0000008/model.safetensors" in out, out
    assert f"resumed from {ckpt}/step_0000004 at step 4" in out, out
    assert complete_steps(run) == [8, 10]
    assert len([name for name in os.listdir(ckpt) if name.startswith("step_0000008.damaged-")]) == 1
    # A truncated file: found by its size, the older checkpoint is tried instead of a traceback.
    optimizer_file = ckpt / "step_0000010" / "optimizer.bin"
    with open(optimizer_file, "r+b") as stream:
        stream.truncate(os.path.getsize(optimizer_file) // 2)
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=11") + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "step_0000010/optimizer.bin" in out and "truncated" in out, out
    assert f"resumed from {ckpt}/step_0000008 at step 8" in out, out
    # An unreadable meta.json is damage too, not a reason to stop.
    (ckpt / "step_0000011" / "meta.json").write_text('{"step": 11, "model_con')
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=12") + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "step_0000011/meta.json: unreadable" in out and f"resumed from {ckpt}/step_0000008" in out, out


def test_every_checkpoint_damaged_is_refused_not_a_fresh_start(digits16, tmp_path, fresh_accelerate, capsys):
    run = tmp_path / "run"
    assert run_main(cli_args(digits16, run, "train.max_steps=2", "train.eval_at_start=false")) == 0
    flip_one_bit(run / "checkpoints" / "step_0000002" / "model.safetensors")
    capsys.readouterr()
    for _ in range(2):  # and again after the damaged one was moved aside
        assert run_main(cli_args(digits16, run, "train.max_steps=4") + ["--resume", "auto"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "no intact checkpoint" in err and "step_0000002.damaged-" in err, err


def test_a_checkpoint_folder_without_meta_json_is_moved_aside_not_replaced(digits16, tmp_path, fresh_accelerate,
                                                                        capsys):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    args = ["train.checkpoint_every=2", "train.eval_at_start=false"]
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=4")) == 0
    os.remove(ckpt / "step_0000004" / "meta.json")
    weights = (ckpt / "step_0000004" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=6") + ["--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert "warning: skipping damaged checkpoint" in out and "step_0000004/meta.json: missing" in out, out
    assert f"resumed from {ckpt}/step_0000002 at step 2" in out, out
    aside = [name for name in os.listdir(ckpt) if name.startswith("step_0000004.damaged-")]
    assert len(aside) == 1 and (ckpt / aside[0] / "model.safetensors").read_bytes() == weights  # kept as it was
    assert complete_steps(run) == [4, 6]


@pytest.mark.parametrize("resume", [["--resume", "auto"], []])
def test_an_export_without_checkpoints_is_not_trained_over(resume, digits16, tmp_path, fresh_accelerate, capsys):
    run = tmp_path / "run"
    assert run_main(cli_args(digits16, run, "train.max_steps=6", "train.eval_at_start=false")) == 0
    shutil.rmtree(run / "checkpoints")  # a clean-up script, a quota purge; export/ stays
    exported = (run / "export" / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert run_main(cli_args(digits16, run, "train.max_steps=3") + resume) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for words in ("export/ holds a model trained for 6 steps", "no checkpoint", "--resume PATH", "train.run_dir",
                  f"move {run / 'export'} away"):
        assert words in err, err
    assert (run / "export" / "model.safetensors").read_bytes() == exported
    assert not (run / "checkpoints").exists()


# A full disk --------------------------------------------------------------------------------------

def test_a_full_disk_while_saving_names_the_file_and_leaves_no_half_checkpoint(digits16, tmp_path, fresh_accelerate,
                                                                               capsys, monkeypatch):
    run = tmp_path / "run"
    args = ["train.checkpoint_every=2", "train.eval_at_start=false"]
    assert run_main(cli_args(digits16, run, *args, "train.max_steps=2")) == 0
    capsys.readouterr()
    # The kernel refuses every byte past 100 kB of a file (write(2) fails, as on a full disk): the model
    # (74 kB) is written, the optimizer state (133 kB) is not, and torch.save says only "unexpected pos".
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
    try:
        code = run_main(cli_args(digits16, run, *args, "train.max_steps=4") + ["--resume", "auto"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert re.search(r"^error: checkpoint of step 4 not saved: \S+/step_0000004\.tmp-\w+/optimizer\w*\.bin: "
                     r"No space left on device$", err), err
    assert os.listdir(run / "checkpoints") == ["step_0000002"]  # the older one untouched, no .tmp- left


@pytest.mark.parametrize("where", ["meta.json", "model folder", "export"])
def test_a_full_disk_in_the_other_writes_of_a_checkpoint(where, digits16, tmp_path, fresh_accelerate, capsys,
                                                         monkeypatch):
    import safetensors

    import model.pretrained
    import train.checkpoint

    def full(path, *args, **kwargs):
        if where == "meta.json":  # Python's own form: an OSError with errno and file name
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "meta.json"))
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    if where == "meta.json":
        monkeypatch.setattr(train.checkpoint, "_write_meta", full)
    else:  # safetensors' form of the same: no file name, the errno in the text; the first save or the second
        calls, real = [], model.pretrained.save_model
        monkeypatch.setattr(model.pretrained, "save_model", lambda net, path, **kwargs: calls.append(path) or (
            full(path) if len(calls) == (1 if where == "model folder" else 2) else real(net, path, **kwargs)))
    run = tmp_path / "run"
    assert run_main(cli_args(digits16, run, "train.max_steps=2", "train.eval_at_start=false")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    if where != "export":
        name = "meta.json" if where == "meta.json" else "model"
        assert re.search(rf"step 2 not saved: \S+/step_0000002\.tmp-\w+/{name}: No space left on device$", err), err
        assert os.listdir(run / "checkpoints") == []
    else:
        assert err.endswith(f"export of step 2 not saved: {run / 'export'}: No space left on device"), err
        assert complete_steps(run) == [2] and sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "lock",
                                                                          "logs", "samples"]


def test_a_full_disk_at_a_later_export_does_not_blame_the_intact_one(digits16, tmp_path, fresh_accelerate, capsys,
                                                                  monkeypatch):
    import safetensors

    import model.pretrained

    run = tmp_path / "run"
    assert run_main(cli_args(digits16, run, "train.max_steps=2", "train.eval_at_start=false")) == 0
    capsys.readouterr()
    real = model.pretrained.save_model

    def full_at_export(net, path, **kwargs):
        if os.path.basename(os.path.dirname(path)).startswith("export.tmp-"):  # not a checkpoint's model/
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(net, path, **kwargs)

    monkeypatch.setattr(model.pretrained, "save_model", full_at_export)
    assert run_main(cli_args(digits16, run, "train.max_steps=4", "train.eval_at_start=false") + ["--resume", "auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"export of step 4 not saved: {run / 'export'}: No space left on device"), err


@pytest.mark.parametrize("in_the_way", ["run folder", "logs folder"])
def test_a_run_folder_that_cannot_be_written_is_one_line(in_the_way, digits16, tmp_path, fresh_accelerate, capsys):
    # A file where a folder must go (as root, the test's user, a read-only folder would still be written).
    blocked = tmp_path / "file" if in_the_way == "run folder" else tmp_path / "run" / "logs"
    blocked.parent.mkdir(exist_ok=True)
    blocked.write_text("not a folder")
    run = tmp_path / "file" / "run" if in_the_way == "run folder" else tmp_path / "run"
    assert run_main(cli_args(digits16, run, "train.max_steps=2", "train.eval_at_start=false")) == 1
    err = capsys.readouterr().err.strip()
    reason = "Not a directory" if in_the_way == "run folder" else "File exists"
    assert err.splitlines() == [f"error: {run if in_the_way == 'run folder' else blocked}: {reason}"], err


# Resume on other data ---------------------------------------------------------------------------

def test_resume_on_data_of_another_order_is_refused(digits16, tmp_path, fresh_accelerate, capsys):
    from data_prep.prepare import PrepareConfig, prepare

    run = tmp_path / "run"
    assert run_main(cli_args(digits16, run, "train.max_steps=2", "train.eval_at_start=false")) == 0
    other = tmp_path / "patches"
    prepare(PrepareConfig(dataset="digits", out=str(other), bins=16, order="patch:4", train_size=200,
                          test_size=20, workers=1, progress=False))
    capsys.readouterr()
    assert run_main(cli_args(str(other), run, "train.max_steps=4") + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "order: checkpoint 'raster' != data.dir 'patch:4'" in err, err


# Stop signals outside the loop -----------------------------------------------------------------

# Runs train.run.main with the evaluation at one step announcing itself and taking a second, so
# that the test can signal the process while that evaluation runs.
SLOW_EVAL = """
import os, sys, time
import train.trainer as trainer
from train.run import main
real = trainer.evaluate
calls = []
def slow(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["SIGNAL_AT_EVAL"]):
        open(os.environ["EVAL_SENTINEL"], "w").close()
        time.sleep(1.0)
    return real(*args, **kwargs)
trainer.evaluate = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("when", ["first evaluation", "final evaluation"])
def test_stop_signal_outside_the_loop_is_honoured(when, digits16, tmp_path):
    run = tmp_path / "run"
    sentinel = tmp_path / "evaluating"
    os.environ.update(SIGNAL_AT_EVAL="1" if when == "first evaluation" else "2", EVAL_SENTINEL=str(sentinel))
    try:
        process = start(cli_args(digits16, run, "train.max_steps=4", "train.eval_at_start=true"), tmp_path,
                        wrapper=SLOW_EVAL)
    finally:
        del os.environ["SIGNAL_AT_EVAL"], os.environ["EVAL_SENTINEL"]
    wait_for(sentinel.exists, process, what=f"the {when}")
    process.send_signal(signal.SIGUSR1)
    out, _ = process.communicate(timeout=120)
    if when == "first evaluation":
        # One step is trained, saved, and the run stops for a requeue.
        assert process.returncode == 75, out[-3000:]
        assert complete_steps(run) == [1]
    else:
        # Too late to matter: the run finishes its last evaluation, checkpoint and export.
        assert process.returncode == 0, out[-3000:]
        assert complete_steps(run) == [4] and os.path.isfile(run / "export" / "config.json")


# fp16 without a GradScaler -------------------------------------------------------------------------

def test_fp16_without_a_scaler_never_applies_a_non_finite_gradient(digits16, tmp_path, fresh_accelerate,
                                                                   monkeypatch, capsys):
    from model import ImageTransformer

    forward = ImageTransformer.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        logits = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1 and torch.is_grad_enabled():  # the first training step: finite loss, inf gradient
            logits.register_hook(lambda grad: grad * float("inf"))
        return logits

    monkeypatch.setattr(ImageTransformer, "forward", poisoned)
    result = train_in_process(digits16, tmp_path / "run", "train.mixed_precision=fp16", "optim.name=adamw",
                              "train.max_steps=6", "train.max_bad_steps=3", "train.eval_at_start=false")
    assert "step 0: non-finite loss or gradient" in capsys.readouterr().out
    assert result.exit_code == 0 and result.bad_total == 1
    net = ImageTransformer.from_pretrained(tmp_path / "run" / "export")
    assert all(torch.isfinite(p).all() for p in net.parameters())


# One rank fails ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_with_its_message_once(digits16, tmp_path):
    data = copy_data(digits16, tmp_path)
    truncate_before_last_sample(os.path.join(data, "test-000001.tar"), zero_fill=True)  # read by rank 1 of 2 only
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               RUN_PY, *cli_args(data, tmp_path / "run", "train.max_steps=20", "train.eval_at_start=true")]
    began = time.monotonic()
    done = subprocess.run(command, env={**env(), "ACCELERATE_USE_CPU": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - began
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert elapsed < 60, f"{elapsed:.0f} s"
    lines = [line for line in output.splitlines() if line.startswith("error: ") and "test-000001.tar" in line]
    assert len(lines) == 1, output[-4000:]
    assert complete_steps(tmp_path / "run") == []


# A hung read --------------------------------------------------------------------------------------

def test_a_hung_shard_read_ends_the_run_after_data_read_timeout(digits16, tmp_path):
    data = copy_data(digits16, tmp_path)
    for name in os.listdir(data):
        if name.startswith("train-"):
            os.remove(os.path.join(data, name))
            os.mkfifo(os.path.join(data, name))  # opening it for reading blocks: a stuck file system
    began = time.monotonic()
    done = subprocess.run([sys.executable, RUN_PY, *cli_args(data, tmp_path / "run", "train.max_steps=5",
                                                             "train.eval_at_start=false", "data.read_timeout=3")],
                          env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no batch from the reader workers in 3 s" in errors[0], done.stderr[-3000:]
    assert time.monotonic() - began < 60


@pytest.mark.slow
def test_resume_on_two_ranks_from_a_one_rank_checkpoint(digits16, tmp_path):
    run = tmp_path / "run"
    first = subprocess.run([sys.executable, RUN_PY, *cli_args(digits16, run, "train.max_steps=5",
                                                              "train.eval_at_start=false")],
                           env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               RUN_PY, *cli_args(digits16, run, "train.max_steps=10"), "--resume", "auto"]
    done = subprocess.run(command, env={**env(), "ACCELERATE_USE_CPU": "1"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "world_size 1 -> 2: global batch 8 -> 16" in output, output[-3000:]
    assert "parameters identical on all 2 rank(s)" in output
    meta = json.loads((run / "checkpoints" / "step_0000010" / "meta.json").read_text())
    assert meta["train_state"]["samples_seen"] == 5 * 8 + 5 * 16 and meta["run"]["world_size"] == 2
