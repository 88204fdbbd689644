"""The one-command demo: prepare the built-in digits, train configs/digits.yaml, draw digits 0-9.

    lit-demo                    (or: python -m sample.demo)
    lit-demo --out-dir demo --max-steps 500

Each stage runs the real command line in a subprocess, as the README shows it:
    python -m data_prep.prepare --dataset digits --out DEMO/data/digits --bins 8 --train-size 20000 --test-size 2000
    python train/run.py --config configs/digits.yaml --set data.dir=... --set train.run_dir=... --resume auto
    python sample/run.py --checkpoint DEMO/run --out DEMO/digits.png --classes 0-9 --n 10 --guidance 2
About 10 minutes on 2 CPU cores. Running it again reuses the prepared data, skips training when the
run's export has reached max_steps (else the trainer resumes from its newest checkpoint), and redraws
the grid.
Exit codes: 0 done; otherwise the exit code of the stage that failed (1 failure, 2 bad usage).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from common.exits import UsageError, run_command

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "digits.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags."""
    parser = argparse.ArgumentParser(prog="lit-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default="demo",
                        help="folder for everything the demo writes: data/digits, run/, digits.png "
                             "(default %(default)s)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="training steps (default: train.max_steps of the config, sized for 2 cores "
                             "with native bf16; where the trainer prints 'mixed precision no', each step takes "
                             "about 1.5x longer, and --max-steps 1500 keeps the demo near 10 minutes)")
    parser.add_argument("--skip-prepare", action="store_true",
                        help="do not prepare the digits (OUT_DIR/data/digits must already be prepared)")
    parser.add_argument("--train-size", type=int, default=20000,
                        help="digits to render for training (fewer than the full 60,000 keeps "
                             "preparation to about a minute; default %(default)s)")
    parser.add_argument("--test-size", type=int, default=2000, help="digits to render for testing (default %(default)s)")
    parser.add_argument("--bins", type=int, default=8,
                        help="quantization levels of the digits (default %(default)s: the strokes are "
                             "near-binary, and 8 levels keep their anti-aliased edges while the "
                             "per-byte prediction stays easy enough to learn in minutes on a CPU)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: configs/digits.yaml of this checkout)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for the grid (default %(default)s)")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="classifier-free guidance of the grid (default %(default)s: on the demo model "
                             "100%% of samples show the digit asked for, against 98%% unguided, --guidance 1; "
                             "measured with lit-eval, see bench/RESULTS.md)")
    return parser


def run_stage(name: str, command: list[str]) -> int:
    """Run one stage's command line, echoing it; returns its exit code."""
    print(f"\n== {name}: {shlex.join(command)}", flush=True)
    began = time.perf_counter()
    try:
        code = subprocess.call(command, cwd=REPO)
    except KeyboardInterrupt:  # the stage got the same Ctrl-C and stops (the trainer saves first)
        code = 130
    if code < 0:  # killed by a signal: report it the way a shell does
        code = 128 - code
    print(f"== {name}: {'done' if code == 0 else f'failed (exit code {code})'} "
          f"in {time.perf_counter() - began:.0f} s", flush=True)
    return code


def is_prepared(folder: Path, bins: int) -> bool:
    """Whether folder already holds the digits prepared at `bins` levels (manifest.json is written last)."""
    from data_prep import DataError, load_manifest

    try:
        manifest = load_manifest(folder)
    except DataError:
        return False
    return manifest.dataset == "digits" and manifest.bins == bins


def trained_steps(args: argparse.Namespace, run: Path) -> Optional[tuple[int, int]]:
    """(step of the run's export, train.max_steps: --max-steps, else the config's), or None if either is unknown."""
    from common.run_layout import export_folder
    from model.pretrained import read_config

    try:
        done = read_config(export_folder(run))["step"]
        if args.max_steps is not None:
            return done, args.max_steps
        return done, int(yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))["train"]["max_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None  # no export (or none that loads) yet, or a broken config, which the trainer reports itself


def stages(args: argparse.Namespace, out_dir: Path) -> list[tuple[str, list[str]]]:
    """The commands the demo runs, in order (skipping preparation when it is already done)."""
    data, run, grid = out_dir / "data" / "digits", out_dir / "run", out_dir / "digits.png"
    python = sys.executable
    commands = []
    if not args.skip_prepare and not is_prepared(data, args.bins):
        # --overwrite: the folder is the demo's own; a different --bins replaces it.
        commands.append(("prepare", [python, "-m", "data_prep.prepare", "--dataset", "digits",
                                     "--out", str(data), "--bins", str(args.bins), "--overwrite",
                                     "--train-size", str(args.train_size), "--test-size", str(args.test_size)]))
    train = [python, str(REPO / "train" / "run.py"), "--config", str(Path(args.config).resolve()),
             "--set", f"data.dir={data}", "--set", f"train.run_dir={run}", "--resume", "auto"]
    if args.max_steps is not None:
        train += ["--set", f"train.max_steps={args.max_steps}"]
    steps = trained_steps(args, run)
    if steps is not None and steps[0] >= steps[1]:
        print(f"== train: {run} already holds an export at step {steps[0]} (of {steps[1]}); not training again")
    else:
        commands.append(("train", train))
    commands.append(("sample", [python, str(REPO / "sample" / "run.py"), "--checkpoint", str(run),
                                "--out", str(grid), "--classes", "0-9", "--n", "10",
                                "--seed", str(args.seed), "--guidance", str(args.guidance)]))
    return commands


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the stages; print where the grid, the run and the TensorBoard logs are."""
    args = build_parser().parse_args(argv)
    out_dir = Path(args.out_dir).resolve()

    def check() -> None:
        if not Path(args.config).is_file():
            raise UsageError(f"--config {args.config}: no such file (the demo runs from a source checkout: pip install -e .)")
        if args.skip_prepare and not is_prepared(out_dir / "data" / "digits", args.bins):
            raise UsageError(f"--skip-prepare, but {out_dir / 'data' / 'digits'} is not a prepared digits folder")

    if run_command("lit-demo", check)[1]:
        return 2
    began = time.perf_counter()
    for name, command in stages(args, out_dir):
        code = run_stage(name, command)
        if code != 0:
            print(f"lit-demo: the {name} stage failed with exit code {code}", file=sys.stderr)
            return code
    run = out_dir / "run"
    print(f"\nDemo finished in {time.perf_counter() - began:.0f} s.")
    print(f"  grid (rows: digits 0-9): {out_dir / 'digits.png'}")
    print(f"  run folder:              {run}  (export/, checkpoints/, config.yaml)")
    print(f"  TensorBoard logs:        {run / 'logs'}")
    print(f"  view them with:          tensorboard --logdir {run / 'logs'}")
    print(f"  more samples:            python sample/run.py --checkpoint {run} --out more.png "
          "--classes 0-9 --n 10 --seed 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
