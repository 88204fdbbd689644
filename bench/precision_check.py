"""bf16 against fp32 training with the real trainer: loss curves side by side, then a resume.

    python bench/precision_check.py --out /tmp/precision                # GPU: 300 steps each
    python bench/precision_check.py --out /tmp/p --steps 20 --layers 1  # a quick look on CPU

Prepares the built-in digits at 256 levels (MNIST's format; no download), then trains
configs/mnist.yaml (sized down by --layers, same seed and data order) twice through train/run.py,
once with train.mixed_precision=bf16 and once with no, and compares the training losses logged to
TensorBoard at every --log-every steps and the exact test bits/dim at the end. Then the bf16 run
resumes from its last checkpoint (--resume auto) for --resume-steps more steps. Prints a table and
writes OUT/precision.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], log_path: str) -> str:
    """Run a command from the repository root; return its output, fail loudly with its tail."""
    began = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    output = result.stdout + result.stderr
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(output)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... exited {result.returncode} after "
                 f"{time.perf_counter() - began:.0f} s; last lines:\n" + "\n".join(output.splitlines()[-15:]))
    return output


def logged_losses(run_dir: str) -> dict[int, float]:
    """step -> train/loss from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        if "train/loss" in events.Tags()["scalars"]:
            losses.update({event.step: event.value for event in events.Scalars("train/loss")})
    return losses


def last_eval(output: str) -> float:
    """The last 'eval X bits/dim' the trainer printed."""
    found = re.findall(r"eval ([0-9.]+) bits/dim", output)
    if not found:
        sys.exit("the trainer printed no eval bits/dim")
    return float(found[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the data, the runs and precision.json")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each run")
    parser.add_argument("--resume-steps", type=int, default=50, help="steps trained after resuming")
    parser.add_argument("--layers", type=int, default=4, help="model.n_layers (mnist.yaml has 8)")
    parser.add_argument("--batch-size", type=int, default=32, help="train.batch_size")
    parser.add_argument("--log-every", type=int, default=10, help="log.every: loss points compared")
    parser.add_argument("--train-size", type=int, default=20000, help="digits rendered for training")
    parser.add_argument("--margin", type=float, default=0.03,
                        help="pass when the mean |bf16 - fp32| loss gap over the second half of the run, "
                             "and the final bits/dim gap, are within this fraction of the fp32 value")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "digits256")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        run([sys.executable, "-m", "data_prep.prepare", "--dataset", "digits", "--out", data, "--bins", "256",
             "--train-size", str(args.train_size), "--test-size", "1000", "--no-progress", "--overwrite"],
            os.path.join(args.out, "prepare.log"))

    def train(precision: str, steps: int, resume: bool) -> tuple[str, float, float]:
        run_dir = os.path.join(args.out, f"run-{precision}")
        sets = {"data.dir": data, "train.run_dir": run_dir, "train.max_steps": steps,
                "model.n_layers": args.layers, "train.batch_size": args.batch_size,
                "train.mixed_precision": precision, "train.eval_every": steps,
                "train.eval_at_start": "false", "train.checkpoint_every": args.steps, "train.n_samples": 0,
                "log.every": args.log_every, "log.progress_bar": "false", "data.num_workers": 2}
        command = [sys.executable, "train/run.py", "--config", "configs/mnist.yaml"]
        for key, value in sets.items():
            command += ["--set", f"{key}={value}"]
        if resume:
            command += ["--resume", "auto"]
        began = time.perf_counter()
        output = run(command, os.path.join(args.out, f"train-{precision}{'-resume' if resume else ''}.log"))
        return output, last_eval(output), time.perf_counter() - began

    fp32_output, fp32_bits, fp32_seconds = train("no", args.steps, resume=False)
    bf16_output, bf16_bits, bf16_seconds = train("bf16", args.steps, resume=False)
    fp32_loss = logged_losses(os.path.join(args.out, "run-no"))
    bf16_loss = logged_losses(os.path.join(args.out, "run-bf16"))
    steps = sorted(set(fp32_loss) & set(bf16_loss))
    if not steps:
        sys.exit("no common logged steps: were the TensorBoard logs written?")
    second_half = [s for s in steps if s > args.steps // 2] or steps
    mean_gap = sum(abs(bf16_loss[s] - fp32_loss[s]) for s in second_half) / len(second_half)
    mean_fp32 = sum(fp32_loss[s] for s in second_half) / len(second_half)
    resume_output, resumed_bits, _ = train("bf16", args.steps + args.resume_steps, resume=True)
    resumed = re.search(r"resumed from \S+ at step (\d+)", resume_output)
    resumed_step = int(resumed.group(1)) if resumed else None
    after_resume = logged_losses(os.path.join(args.out, "run-bf16"))
    continued = sorted(s for s in after_resume if s > args.steps)

    print("| step | fp32 loss | bf16 loss | gap |")
    print("|---:|---:|---:|---:|")
    for s in steps[:: max(1, len(steps) // 10)] + ([steps[-1]] if len(steps) % 10 else []):
        print(f"| {s} | {fp32_loss[s]:.4f} | {bf16_loss[s]:.4f} | {bf16_loss[s] - fp32_loss[s]:+.4f} |")
    relative_gap, bits_gap = mean_gap / mean_fp32, abs(bf16_bits - fp32_bits) / fp32_bits
    print(f"\nsecond half (steps {second_half[0]}-{second_half[-1]}): mean |bf16 - fp32| loss gap "
          f"{mean_gap:.4f} nats = {100 * relative_gap:.2f}% of fp32's {mean_fp32:.4f} (margin {100 * args.margin:.0f}%)")
    print(f"test bits/dim at step {args.steps}: fp32 {fp32_bits:.4f}, bf16 {bf16_bits:.4f} "
          f"({100 * bits_gap:.2f}% apart); wall: fp32 {fp32_seconds:.0f} s, bf16 {bf16_seconds:.0f} s")
    print(f"resume: bf16 run resumed at step {resumed_step}, logged steps {continued[:1]}..{continued[-1:]}, "
          f"test bits/dim {resumed_bits:.4f} at step {args.steps + args.resume_steps}")
    passed = (relative_gap <= args.margin and bits_gap <= args.margin and resumed_step == args.steps
              and continued and continued[-1] == args.steps + args.resume_steps)
    print("PASS" if passed else "FAIL")
    with open(os.path.join(args.out, "precision.json"), "w", encoding="utf-8") as handle:
        json.dump({"steps": args.steps, "layers": args.layers, "batch_size": args.batch_size,
                   "fp32_loss": fp32_loss, "bf16_loss": bf16_loss, "second_half_mean_gap": mean_gap,
                   "second_half_relative_gap": relative_gap, "fp32_bits_per_dim": fp32_bits,
                   "bf16_bits_per_dim": bf16_bits, "resumed_step": resumed_step,
                   "bits_per_dim_after_resume": resumed_bits, "fp32_seconds": fp32_seconds,
                   "bf16_seconds": bf16_seconds, "margin": args.margin, "passed": passed}, handle, indent=1)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
