"""The GPU issue's "Done when" table, measured through the commands users run, each in a fresh process.

    python bench/gpu_user.py --work DIR                  # on the GPU (bench/gpu_suite.sh runs it)
    python bench/gpu_user.py --work DIR --device cpu     # dry run: tiny models, a few steps and images

Prepares synthetic data with data_prep.prepare (random images in CIFAR-10's and ImageNet 64x64's
file formats, and the built-in digits at 8 and at 256 levels, MNIST's shape: speed does not depend
on the pixels), then runs
  train/run.py --config configs/cifar10.yaml     causal-linear, then softmax (same batch), then the
                                                 linear run resumed (a restart, caches on disk)
  train/run.py --config configs/imagenet64.yaml  causal-linear and softmax, a few steps
  train/run.py --config configs/digits.yaml      as shipped, fewer steps
  train/run.py --config configs/mnist.yaml       0 steps: an export of the MNIST model's shape
  lit-sample (sample/run.py)                     4,096 images from the CIFAR-10 (16 layers) and the
                                                 MNIST (8 layers) exports, its own printed figure
and writes DIR/user.json: one entry {name, value, unit, config} per row of the table, under the
table's names (ENTRIES), each from the commands' own figures: TensorBoard's train/images_per_s
(median over the logged windows), the trainer's printed warm-up, lit-sample's printed images/s.
Each command's whole output is in DIR/user-logs/NAME.log; a command that fails or runs out of time
leaves its entries out (gpu_results.py reports them as not measured), and the others still run.
Sizes (steps, batch, images) come from SIZES; LIT_CIFAR_BATCH and LIT_SAMPLE_ARGS change them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.gpu_results import GOALS  # noqa: E402
from bench.prep_speed import write_synthetic_cifar  # noqa: E402
from common.run_layout import RUN_CONFIG  # noqa: E402

ENTRIES = {name: unit for name, (_, _, unit, _) in GOALS.items()}  # the table: name -> unit
# Sized for about 6 minutes on one H200 (each command's start-up, compilation and autotuning included);
# cpu: a dry run that checks every entry comes out, in a few minutes on 2 cores.
SIZES = {
    "cuda": dict(cifar_train=4096, imagenet_train=512, digits_train=4000, test=200, imagenet_test=25,
                 cifar_batch=64, cifar_steps=40, cifar_every=5, restart_steps=10, imagenet_steps=8,
                 imagenet_every=2, digits_steps=400, digits_every=25, sample_images=4096, model=[],
                 train=[], limit=1.0),
    "cpu": dict(cifar_train=64, imagenet_train=20, digits_train=64, test=8, imagenet_test=4,
                cifar_batch=2, cifar_steps=4, cifar_every=1, restart_steps=2, imagenet_steps=3,
                imagenet_every=1, digits_steps=4, digits_every=1, sample_images=4,
                model=["model.n_layers=2", "model.n_heads=2", "model.d_query=8", "model.d_ff=32"],
                train=["train.backend=torch", "train.mixed_precision=no", "data.num_workers=0",
                       "train.eval_batch_size=4",
                       "train.grad_accum=1", "train.batch_size=2", "train.cpu_threads=1"], limit=3.0),
}
QUIET = ["train.eval_at_start=false", "train.eval_every=1000000", "train.checkpoint_every=1000000",
         "train.n_samples=0", "log.progress_bar=false", "log.with=tensorboard"]


def run(work: str, name: str, argv: list[str], limit: float) -> str | None:
    """Run one command in a fresh process with a time limit; its output, or None when it failed."""
    os.makedirs(os.path.join(work, "user-logs"), exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    began = time.perf_counter()
    print(f"== {name} (limit {limit:.0f} s): {' '.join(argv)}", flush=True)
    try:
        done = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=limit)
        output, code = done.stdout, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout or ""
        code = "timeout"
    with open(os.path.join(work, "user-logs", f"{name}.log"), "w", encoding="utf-8") as log:
        log.write(output)
    shown = [line for line in output.splitlines()
             if re.search(r"warm-up|images/s|error|Error|model:|eval ", line)][-6:]
    print("\n".join("   " + line for line in shown))
    print(f"== {name}: exit {code} after {time.perf_counter() - began:.0f} s", flush=True)
    return output if code == 0 else None


def write_synthetic_imagenet(root: str, side: int, n_train: int, n_test: int, seed: int = 0) -> None:
    """Random images in the npz batches of downsampled ImageNet: 10 train batches and val_data.npz."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    sizes = [("val_data.npz", n_test)] + [(f"train_data_batch_{i + 1}.npz", max(1, n_train // 10)) for i in range(10)]
    for name, count in sizes:
        np.savez(os.path.join(root, name), data=rng.integers(0, 256, (count, 3 * side * side), dtype=np.uint8),
                 labels=rng.integers(1, 1001, count).tolist())


def prepare_data(work: str, size: dict, limit: float) -> dict[str, str]:
    """The prepared folders (name -> path) that could be made, through python -m data_prep.prepare."""
    src, data = os.path.join(work, "src"), os.path.join(work, "data")
    write_synthetic_cifar(os.path.join(src, "cifar10"), size["cifar_train"], size["test"])
    write_synthetic_imagenet(os.path.join(src, "imagenet64"), 64, size["imagenet_train"], size["imagenet_test"])
    jobs = {"cifar10": ["--dataset", "cifar10", "--root", os.path.join(src, "cifar10")],
            "imagenet64": ["--dataset", "imagenet64", "--root", os.path.join(src, "imagenet64")],
            "digits8": ["--dataset", "digits", "--bins", "8", "--train-size", str(size["digits_train"]),
                        "--test-size", str(size["test"])],
            "digits256": ["--dataset", "digits", "--train-size", str(size["test"]), "--test-size", str(size["test"])]}
    folders = {}
    for name, args in jobs.items():
        out = os.path.join(data, name)
        if run(work, f"prepare-{name}", [sys.executable, "-m", "data_prep.prepare", *args, "--out", out,
                                          "--overwrite", "--no-progress"], 120 * size["limit"]) is not None:
            folders[name] = out
    return folders


def train(work: str, name: str, config: str, data: str, sets: list[str], limit: float,
          resume: bool = False) -> str | None:
    """train/run.py on config with data.dir, a run folder under work and the --set values; its output."""
    argv = [sys.executable, "train/run.py", "--config", f"configs/{config}.yaml"]
    for item in [f"data.dir={data}", f"train.run_dir={os.path.join(work, 'runs', name.split('@')[0])}", *sets]:
        argv += ["--set", item]
    return run(work, name, argv + (["--resume", "auto"] if resume else []), limit)


def global_batch(run_dir: str) -> int:
    """Images per optimizer step of a one-process run: train.batch_size x grad_accum of RUN/config.yaml."""
    with open(os.path.join(run_dir, RUN_CONFIG), encoding="utf-8") as handle:
        section = yaml.safe_load(handle)["train"]
    return section["batch_size"] * section["grad_accum"]


def median_images_per_s(run_dir: str) -> tuple[float, int]:
    """(median of TensorBoard's train/images_per_s, number of windows) of a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for path in glob.glob(os.path.join(run_dir, "logs", "**", "events.out.tfevents.*"), recursive=True):
        accumulator = EventAccumulator(path, size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/images_per_s" in accumulator.Tags()["scalars"]:
            values += [event.value for event in accumulator.Scalars("train/images_per_s")]
    if not values:
        raise ValueError(f"{run_dir}: no train/images_per_s logged")
    return statistics.median(values), len(values)


def warm_up(output: str) -> float:
    """The trainer's printed warm-up: seconds from "training from step N" to its first step done."""
    return float(re.search(r"step \d+: warm-up ([0-9.]+) s", output).group(1))


def sample(work: str, name: str, export: str, images: int, extra: list[str], limit: float) -> dict | None:
    """lit-sample's own printed figures for `images` images in one batch, or None when it failed."""
    argv = [sys.executable, "sample/run.py", "--checkpoint", export, "--out", os.path.join(work, f"{name}.png"),
            "--n", str(images), "--batch-size", str(images), "--no-progress", *extra]
    output = run(work, name, argv, limit)
    found = output and re.search(r"in ([0-9.]+) s = warm-up ([0-9.]+) s .* at ([0-9.]+) images/s", output)
    if not found:
        return None
    return {"images": images, "seconds": float(found.group(1)), "warm_up_s": float(found.group(2)),
            "images_per_s": float(found.group(3)), "args": extra, "line": found.group(0)}


def measure(work: str, device: str) -> list[dict]:
    """Every entry of the table that could be measured here."""
    size = SIZES[device]
    limit = size["limit"]
    folders = prepare_data(work, size, limit)
    entries = []

    def entry(name: str, value: float, **config) -> None:
        entries.append({"name": name, "value": value, "unit": ENTRIES[name], "config": {"device": device, **config}})
        print(f"-> {name} = {value:.4g} {ENTRIES[name]}", flush=True)
        with open(os.path.join(work, "user.json"), "w", encoding="utf-8") as handle:  # a later kill keeps these
            json.dump({"entries": entries}, handle, indent=1)

    batch = int(os.environ.get("LIT_CIFAR_BATCH", size["cifar_batch"]))
    common = [*QUIET, *size["model"], *size["train"]]
    speeds = {}
    if "cifar10" in folders:
        for attention in ("causal-linear", "softmax"):
            sets = [*common, f"model.attention={attention}", f"train.batch_size={batch}",
                    f"train.max_steps={size['cifar_steps']}", f"log.every={size['cifar_every']}"]
            output = train(work, f"cifar10-{attention}", "cifar10", folders["cifar10"], sets, 240 * limit)
            if output is None:
                continue
            speeds[attention] = median_images_per_s(os.path.join(work, "runs", f"cifar10-{attention}"))
            if attention == "causal-linear":
                config = dict(batch=batch, precision="bf16" if device == "cuda" else "no", steps=size["cifar_steps"],
                              windows=speeds[attention][1], command=f"train/run.py --config configs/cifar10.yaml "
                              f"--set train.batch_size={batch}")
                entry("trainer/cifar10/causal-linear/images_per_s", speeds[attention][0], **config)
                restart = train(work, "cifar10-causal-linear@restart", "cifar10", folders["cifar10"],
                                sets[:-2] + [f"train.max_steps={size['cifar_steps'] + size['restart_steps']}",
                                             f"log.every={size['cifar_every']}"], 180 * limit, resume=True)
                entry("trainer/cifar10/first_step_s", warm_up(output), batch=batch,
                      note="fresh process, fresh run folder (nothing cached); after_restart_s: the same run "
                           "resumed in another fresh process (the run folder's caches kept)",
                      after_restart_s=warm_up(restart) if restart else None)
        if len(speeds) == 2:
            entry("trainer/cifar10/linear_over_softmax", speeds["causal-linear"][0] / speeds["softmax"][0],
                  batch=batch, linear_images_per_s=speeds["causal-linear"][0],
                  softmax_images_per_s=speeds["softmax"][0])
    if "digits8" in folders:
        # digits.yaml as shipped but for the length of the run (and, dry, the tiny sizes)
        sets = [*QUIET, *size["train"], f"train.max_steps={size['digits_steps']}", f"log.every={size['digits_every']}"]
        if train(work, "digits", "digits", folders["digits8"], sets, 150 * limit):
            rate, windows = median_images_per_s(os.path.join(work, "runs", "digits"))
            digits_batch = global_batch(os.path.join(work, "runs", "digits"))  # the config's, not a copy of it
            entry("trainer/digits/steps_per_s", rate / digits_batch, batch=digits_batch, windows=windows)
    extra = os.environ.get("LIT_SAMPLE_ARGS", "").split()
    if device == "cpu":
        extra += ["--device", "cpu"]
    exports = {"cifar10": os.path.join(work, "runs", "cifar10-causal-linear", "export")}
    if "digits256" in folders and train(work, "mnist-export", "mnist", folders["digits256"],
                                        [*common, "train.max_steps=0"], 120 * limit):
        exports["mnist"] = os.path.join(work, "runs", "mnist-export", "export")
    for shape, layers in (("cifar10", 16), ("mnist", 8)):
        if os.path.isdir(exports.get(shape, "")):
            figures = sample(work, f"sample-{shape}", exports[shape], size["sample_images"], extra, 150 * limit)
            if figures:
                entry(f"sample/{shape}/cli_images_per_s", figures["images_per_s"], layers=layers if device == "cuda"
                      else 2, **figures)
    # last: the longest pair (L = 12,288), so that a run short of time loses the fewest entries
    if "imagenet64" in folders:
        rates = {}
        for attention in ("causal-linear", "softmax"):
            sets = [*common, f"model.attention={attention}", f"train.max_steps={size['imagenet_steps']}",
                    f"log.every={size['imagenet_every']}"]
            if train(work, f"imagenet64-{attention}", "imagenet64", folders["imagenet64"], sets, 240 * limit):
                rates[attention] = median_images_per_s(os.path.join(work, "runs", f"imagenet64-{attention}"))[0]
        if len(rates) == 2:
            entry("trainer/imagenet64/linear_over_softmax", rates["causal-linear"] / rates["softmax"],
                  linear_images_per_s=rates["causal-linear"], softmax_images_per_s=rates["softmax"],
                  batch="configs/imagenet64.yaml's (8 x grad_accum 2)" if device == "cuda" else 2,
                  steps=size["imagenet_steps"])
    return entries


def main(argv=None) -> int:
    """Measure, write WORK/user.json, print which entries are missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for data, runs, logs and user.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a dry run with tiny models (checks the entries come out, not the speed)")
    args = parser.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    # the suite's time limit ends this process with SIGTERM: exit through subprocess.run, which then
    # kills the command running, so that no orphan keeps the GPU busy for the next step
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the trainer's device, even where a GPU is present
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    entries = measure(args.work, args.device)
    missing = [name for name in ENTRIES if name not in {e["name"] for e in entries}]
    print(f"{len(entries)} of {len(ENTRIES)} entries measured" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
