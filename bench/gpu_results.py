"""Gather the GPU suite's outputs into bench/results/gpu-YYYY-MM-DD.json and check them against the goals.

    python bench/gpu_results.py WORK_DIR OUT.json     # run by bench/gpu_suite.sh

WORK_DIR holds what the suite's steps wrote: device.json, cuda_checks.jsonl (tests/test_cuda.py's
measured errors), sample.json, train.json, loader.json, precision/precision.json. Missing pieces
are reported as missing, never invented. Every figure becomes one entry {name, value, unit, config};
the goals of the GPU issue are printed as a table (met / missed by how much / not measured).
"""

from __future__ import annotations

import json
import os
import sys

MNIST_IMAGES, MNIST_EPOCHS = 60_000, 250


def load(path: str):
    """JSON (or JSON lines for .jsonl) at path, or None when the step did not write it."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        return json.load(handle)


def entries_and_goals(work: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
    """All figures as entries, and (goal, measured, status) rows."""
    entries, goals = [], []
    checks = load(os.path.join(work, "cuda_checks.jsonl")) or []
    for check in checks:
        name = check.pop("check")
        for key in ("max_abs_error", "relative_error", "fraction_equal", "normalized_default_error",
                    "unnormalized_scale1_error"):
            if key in check:
                entries.append({"name": f"correctness/{name}/{key}", "value": check[key], "unit": "ratio"
                                if key != "max_abs_error" else "logit", "config": check})
    sample = load(os.path.join(work, "sample.json"))
    best = {}
    if sample:
        for cell in sample["cells"]:
            if cell["images_per_s"] is None:
                continue
            config = {k: cell[k] for k in ("shape", "seq_len", "layers", "batch", "method")}
            config["bf16"] = sample["bf16"]
            entries.append({"name": f"sample/{cell['shape']}/{cell['method']}/batch{cell['batch']}",
                            "value": cell["images_per_s"], "unit": "images/s", "config": config})
            entries.append({"name": f"sample-memory/{cell['shape']}/{cell['method']}/batch{cell['batch']}",
                            "value": cell["mib_per_image"], "unit": "MiB/image", "config": config})
            key = (cell["shape"], cell["method"])
            if key not in best or cell["images_per_s"] > best[key]["images_per_s"]:
                best[key] = cell
    for shape, goal in (("cifar10", 500.0), ("mnist", 3500.0)):
        cell = best.get((shape, "recurrent-linear"))
        goals.append(status(f"sampling {shape} >= {goal:g} images/s", cell and cell["images_per_s"], goal,
                            "images/s", f" (batch {cell['batch']})" if cell else ""))
    cifar = [c for c in (sample or {"cells": []})["cells"]
             if c["shape"] == "cifar10" and c["method"] == "recurrent-linear" and c["mib_per_image"]]
    smallest = min((c["mib_per_image"] for c in cifar), default=None)
    goals.append(status("CIFAR-10 sampling memory <= 0.6 MB (0.572 MiB) per image",
                        smallest, 0.6e6 / 2**20, "MiB/image", "", lower_is_better=True))
    linear, softmax = best.get(("cifar10", "recurrent-linear")), best.get(("cifar10", "softmax-kv-cache"))
    goals.append(status("sampling at L=3072: linear >= 10x softmax with a KV cache (best batch each)",
                        linear and softmax and linear["images_per_s"] / softmax["images_per_s"], 10.0, "x", ""))

    train = load(os.path.join(work, "train.json"))
    rows = (train or {"rows": []})["rows"]
    for row in rows:
        config = {k: row[k] for k in ("config", "attention", "backend", "precision", "batch", "layers")}
        base = f"train/{row['config']}/{row['attention']}/{row['backend']}"
        entries.append({"name": f"{base}/images_per_s", "value": row["images_per_s"], "unit": "images/s",
                        "config": config})
        entries.append({"name": f"{base}/step_ms", "value": row["step_ms"], "unit": "ms", "config": config})
        if row["mfu"] is not None:
            entries.append({"name": f"{base}/mfu", "value": 100 * row["mfu"], "unit": "%", "config": config})
    cifar_linear = [r for r in rows if r["config"] == "cifar10" and r["attention"] == "causal-linear"]
    best_mfu = max(cifar_linear, key=lambda r: r["mfu"] or 0, default=None)
    goals.append(status("training CIFAR-10 config, bf16, MFU >= 35%", best_mfu and 100 * (best_mfu["mfu"] or 0),
                        35.0, "%", f" ({best_mfu['backend']}, batch {best_mfu['batch']})" if best_mfu else ""))
    mnist_linear = max((r for r in rows if r["config"] == "mnist" and r["attention"] == "causal-linear"),
                       key=lambda r: r["images_per_s"], default=None)
    hours = mnist_linear and MNIST_IMAGES * MNIST_EPOCHS / mnist_linear["images_per_s"] / 3600
    if hours:
        entries.append({"name": "train/mnist/250-epochs-projected", "value": hours, "unit": "GPU-hours",
                        "config": {"backend": mnist_linear["backend"], "batch": mnist_linear["batch"]}})
    goals.append(status("MNIST recipe (250 epochs x 60k images) < 1 GPU-hour", hours, 1.0, "GPU-hours",
                        f" ({mnist_linear['backend']}, {mnist_linear['images_per_s']:.0f} images/s)"
                        if mnist_linear else "", lower_is_better=True))
    softmax_step = next((r for r in rows if r["config"] == "cifar10" and r["attention"] == "softmax"), None)
    fastest = min(cifar_linear, key=lambda r: r["step_ms"], default=None)
    goals.append(status("training step at L=3072: linear >= 3x faster than softmax",
                        fastest and softmax_step and softmax_step["step_ms"] / fastest["step_ms"], 3.0, "x",
                        f" ({fastest['backend']})" if fastest else ""))

    loader = load(os.path.join(work, "loader.json"))
    if loader:
        for row in loader["rows"]:
            entries.append({"name": f"loader/workers{row['workers']}", "value": row["images_per_s"],
                            "unit": "images/s", "config": {"batch": row["batch"], "data": "digits 28x28 256 levels"}})
        fastest_loader = max(row["images_per_s"] for row in loader["rows"])
        need = mnist_linear and mnist_linear["images_per_s"]
        goals.append(status("loader alone faster than MNIST training consumes", need and fastest_loader / need,
                            1.0, "x", f" ({fastest_loader:,.0f} vs {need:,.0f} images/s)" if need else ""))

    precision = load(os.path.join(work, "precision", "precision.json"))
    if precision:
        for key, unit in (("second_half_relative_gap", "ratio"), ("fp32_bits_per_dim", "bits/dim"),
                          ("bf16_bits_per_dim", "bits/dim"), ("bits_per_dim_after_resume", "bits/dim")):
            entries.append({"name": f"precision/{key}", "value": precision[key], "unit": unit,
                            "config": {"steps": precision["steps"], "layers": precision["layers"],
                                       "batch": precision["batch_size"]}})
        goals.append(("bf16 loss curve tracks fp32 within "
                      f"{100 * precision['margin']:.0f}%, checkpoint resumes",
                      f"{100 * precision['second_half_relative_gap']:.2f}% gap, resumed at step "
                      f"{precision['resumed_step']}", "met" if precision["passed"] else "MISSED"))
    else:
        goals.append(("bf16 loss curve tracks fp32, checkpoint resumes", "-", "not measured"))
    failed = [c for c in checks if c.get("tolerance") is not None
              and c.get("max_abs_error", c.get("relative_error", 0)) >= c["tolerance"]]
    goals.insert(0, ("correctness checks on CUDA (tests/test_cuda.py)", f"{len(checks)} figures recorded",
                     "not measured" if not checks else ("MISSED" if failed else "met")))
    return entries, goals


def status(goal: str, value, target: float, unit: str, detail: str, lower_is_better: bool = False):
    """One goal row: met, or missed with the ratio to the target."""
    if value is None or value is False:
        return goal, "-", "not measured"
    met = value <= target if lower_is_better else value >= target
    shortfall = "" if met else f" ({value / target:.2f}x the target)"
    return goal, f"{value:,.3g} {unit}{detail}", "met" if met else "MISSED" + shortfall


def main(argv=None) -> int:
    work, out = (argv or sys.argv[1:])[:2]
    device = load(os.path.join(work, "device.json")) or {}
    entries, goals = entries_and_goals(work)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({**device, "entries": entries}, handle, indent=1)
    print(f"device: {device.get('device', '?')}; torch {device.get('torch')}, triton {device.get('triton')}, "
          f"fla {device.get('fla')}; {device.get('date')}")
    print("| goal | measured | status |")
    print("|---|---|---|")
    for goal, measured, state in goals:
        print(f"| {goal} | {measured} | {state} |")
    print(f"\n{len(entries)} figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
