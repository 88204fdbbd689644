"""Gather the GPU suite's outputs into bench/results/gpu-YYYY-MM-DD.json and check them against the goals.

    python bench/gpu_results.py WORK_DIR OUT.json             # run by bench/gpu_suite.sh
    python bench/gpu_results.py --dry-run WORK_DIR OUT.json   # the suite's CPU dry run: no CUDA needed

WORK_DIR holds what the suite's steps wrote: device.json, user.json (bench/gpu_user.py: the issue's
table through the user commands, entries already named), cuda_checks.jsonl (tests/test_cuda.py's
measured errors), sample.json, train.json, loader.json, precision/precision.json; missing pieces
are reported as not measured, never invented. Every figure becomes one entry {name, value, unit,
config}. When OUT.json already exists (an earlier run the same day, maybe of other steps), its
entries are kept unless this run measured the same name again. The GPU issue's goals are printed
as a table: met, missed (by how much), or not measured.
"""

from __future__ import annotations

import json
import os
import sys


def load(path: str):
    """JSON (or JSON lines for .jsonl) at path, or None when the step did not write it."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        return json.load(handle)


def collect(work: str) -> list[dict]:
    """Every figure the steps in `work` wrote, as entries."""
    entries = list((load(os.path.join(work, "user.json")) or {"entries": []})["entries"])
    for check in load(os.path.join(work, "cuda_checks.jsonl")) or []:
        name = check.pop("check")
        for key in ("max_abs_error", "relative_error", "fraction_equal", "normalized_default_error",
                    "unnormalized_scale1_error"):
            if key in check:
                label = "-".join(str(check[k]) for k in ("attention", "backend", "precision", "dtype", "length",
                                                         "tensor") if k in check)
                entries.append({"name": f"correctness/{name}/{key}" + (f"/{label}" if label else ""),
                                "value": check[key], "unit": "logit" if key == "max_abs_error" else "ratio",
                                "config": check})
    sample = load(os.path.join(work, "sample.json"))
    for cell in (sample or {"cells": []})["cells"]:
        if cell["images_per_s"] is None:
            continue
        config = {k: cell[k] for k in ("shape", "seq_len", "layers", "batch", "method", "note")}
        config["bf16"] = sample["bf16"]
        where = f"{cell['shape']}/{cell['method']}/batch{cell['batch']}"
        entries.append({"name": f"sample/{where}", "value": cell["images_per_s"], "unit": "images/s",
                        "config": config})
        entries.append({"name": f"sample-memory/{where}", "value": cell["mib_per_image"], "unit": "MiB/image",
                        "config": config})
    for row in (load(os.path.join(work, "train.json")) or {"rows": []})["rows"]:
        config = {k: row[k] for k in ("config", "attention", "backend", "precision", "batch", "layers")}
        base = f"train/{row['config']}/{row['attention']}/{row['backend']}"
        entries.append({"name": f"{base}/images_per_s", "value": row["images_per_s"], "unit": "images/s",
                        "config": config})
        entries.append({"name": f"{base}/step_ms", "value": row["step_ms"], "unit": "ms", "config": config})
        if row["mfu"] is not None:
            entries.append({"name": f"{base}/mfu", "value": 100 * row["mfu"], "unit": "%", "config": config})
    for row in (load(os.path.join(work, "loader.json")) or {"rows": []})["rows"]:
        entries.append({"name": f"loader/workers{row['workers']}", "value": row["images_per_s"],
                        "unit": "images/s", "config": {"batch": row["batch"], "data": "digits 28x28, 256 levels"}})
    precision = load(os.path.join(work, "precision", "precision.json"))
    if precision:
        config = {"steps": precision["steps"], "layers": precision["layers"], "batch": precision["batch_size"],
                  "margin": precision["margin"]}
        for key, unit in (("second_half_relative_gap", "ratio"), ("fp32_bits_per_dim", "bits/dim"),
                          ("bf16_bits_per_dim", "bits/dim"), ("bits_per_dim_after_resume", "bits/dim"),
                          ("resumed_step", "step"), ("passed", "bool")):
            entries.append({"name": f"precision/{key}", "value": precision[key], "unit": unit, "config": config})
    return entries


def merge(previous: list[dict], new: list[dict]) -> list[dict]:
    """previous's entries not measured again, then the new ones."""
    names = {entry["name"] for entry in new}
    return [entry for entry in previous if entry["name"] not in names] + new


def status(goal: str, value, target: float, unit: str, detail: str = "", lower_is_better: bool = False):
    """One goal row: met, or missed with the ratio to the target."""
    if value is None:
        return goal, "-", "not measured"
    met = value <= target if lower_is_better else value >= target
    return goal, f"{value:,.3g} {unit}{detail}", "met" if met else f"MISSED ({value / target:.2f}x the target)"


# the GPU issue's "Done when" table: entry name -> (goal, target, unit, lower is better); bench/gpu_user.py
# measures these entries (its ENTRIES come from here)
GOALS = {
    "trainer/cifar10/causal-linear/images_per_s": ("trainer, CIFAR-10 config, bf16: >= 600 images/s", 600.0,
                                                   "images/s", False),
    "trainer/cifar10/linear_over_softmax": ("trainer, CIFAR-10: linear >= 1.3x softmax (same batch)", 1.3, "x", False),
    "trainer/imagenet64/linear_over_softmax": ("trainer, ImageNet 64 (L = 12,288): linear >= 3x softmax", 3.0, "x",
                                               False),
    "trainer/cifar10/first_step_s": ("trainer, CIFAR-10: first step <= 10 s in a fresh process", 10.0, "s", True),
    "trainer/digits/steps_per_s": ("trainer, digits config on the GPU: >= 100 steps/s", 100.0, "steps/s", False),
    "sample/cifar10/cli_images_per_s": ("lit-sample, CIFAR-10 (4,096 images, 16 layers): >= 500 images/s", 500.0,
                                        "images/s", False),
    "sample/mnist/cli_images_per_s": ("lit-sample, MNIST (8 layers): >= 3,500 images/s", 3500.0, "images/s", False),
}


def goals(entries: list[dict]) -> list[tuple[str, str, str]]:
    """The GPU issue's goals, from the entries."""
    by_name = {entry["name"]: entry for entry in entries}
    rows = []
    for name, (goal, target, unit, lower) in GOALS.items():
        entry = by_name.get(name)
        detail = f" ({entry['config'].get('device', '')}, run {entry['config'].get('run')})" if entry else ""
        rows.append(status(goal, entry and entry["value"], target, unit, detail, lower))
    return rows


def main(argv=None) -> int:
    """Merge WORK's figures into OUT.json and print the goals table."""
    args = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in args
    work, out = [arg for arg in args if arg != "--dry-run"][:2]
    device = load(os.path.join(work, "device.json")) or {}
    if not dry and ("cuda" not in device or device.get("cuda") is None or "no CUDA" in device.get("device", "no CUDA")):
        sys.exit(f"{work}/device.json names no CUDA device: GPU figures come only from a GPU run")
    previous = load(out) or {}
    runs = previous.get("runs", [])
    run = len(runs) + 1
    new = collect(work)
    for entry in new:
        entry["config"]["run"] = run
    entries = merge(previous.get("entries", []), new)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({**previous, **device, "runs": runs + [{**device, "run": run, "figures": len(new)}],
                   "entries": entries}, handle, indent=1)
    print(f"device: {device.get('device', '?')}; torch {device.get('torch')}, triton {device.get('triton')}, "
          f"fla {device.get('fla')}; {device.get('date')}")
    print("| goal | measured | status |")
    print("|---|---|---|")
    for goal, measured, state in goals(entries):
        print(f"| {goal} | {measured} | {state} |")
    print(f"\n{len(entries)} figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
