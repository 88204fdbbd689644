"""Train an autoregressive byte-level image model: parse the command line, build the config, train.

One process (CPU, or one GPU):
    python train/run.py --config configs/digits.yaml
    python train/run.py --config configs/mnist.yaml --set data.dir=data/mnist --set train.run_dir=runs/mnist

Two CPU ranks with gloo on one machine (`accelerate launch --cpu --num_processes 2` starts only ONE
process: accelerate's CPU multi-process path wants MPI; this form gives real DDP on CPU):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no train/run.py --config configs/digits.yaml
    (or: ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 train/run.py --config ...)

All GPUs of one node (mixed precision comes from train.mixed_precision in the config):
    accelerate launch --multi_gpu --num_processes 8 --num_machines 1 --dynamo_backend no \
        train/run.py --config configs/cifar10.yaml --resume auto

Two nodes of 8 GPUs (run on each node, with its own --machine_rank; the first node's address):
    accelerate launch --multi_gpu --num_processes 16 --num_machines 2 --machine_rank $NODE_RANK \
        --main_process_ip $MASTER_ADDR --main_process_port 29500 --dynamo_backend no \
        train/run.py --config configs/cifar10.yaml --resume auto

Overrides: `--set section.key=value` (repeatable), e.g. `--set optim.lr=1e-4 --set train.max_steps=2000`.
`--resume auto` continues from the newest complete checkpoint in train.run_dir (a fresh start, said
so, if there is none); `--resume RUN/checkpoints/step_0000500` from that one. Without --resume a run
folder that already holds checkpoints is refused rather than overwritten; with or without it, so is
one whose export/ holds a model but whose checkpoints are gone.

Exit codes: 0 done; 1 training failed (a short or damaged shard, a checkpoint the disk refused
included); 2 bad usage or configuration, a damaged --resume PATH, or a run folder locked by another
trainer (RUN/lock names it); 75 stopped by SIGUSR1/SIGTERM after saving a checkpoint (requeue the
job and pass --resume auto). Under `accelerate launch` the launcher itself reports a non-zero worker
exit as 1; the ranks' own message names the cause.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

if __package__ in (None, ""):
    # `python train/run.py` puts train/ first on sys.path; the packages live one level up.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of the trainer."""
    parser = argparse.ArgumentParser(
        prog="train/run.py", description="Train a linear-attention image transformer on prepared shards.",
        epilog="Launch commands for CPU ranks, one GPU node and several nodes: see the top of train/run.py.")
    parser.add_argument("--config", required=True, help="YAML file with sections data, model, optim, train, log")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set optim.lr=1e-4")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="'auto': newest complete checkpoint of train.run_dir (fresh start if none, and no export); "
                             "PATH: that checkpoint folder (an error if missing or incomplete)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `lit-train` and `python train/run.py`; returns the exit code."""
    args = build_parser().parse_args(argv)
    from common.exits import run_command
    from data_prep import DataError
    from train.checkpoint import CheckpointError
    from train.config import ConfigError, load_config
    from train.run_lock import RunLockError
    from train.trainer import TrainingError, train

    # OSError: a file the run cannot write or read (a read-only or full disk, a file where a folder goes)
    result, code = run_command(None, lambda: train(load_config(args.config, args.overrides), resume=args.resume,
                                                   config_source=args.config),
                               usage=(ConfigError, CheckpointError, DataError, RunLockError),
                               failure=(TrainingError, OSError))
    return code if result is None else result.exit_code


if __name__ == "__main__":
    sys.exit(main())
