"""Gather the GPU suite's outputs into bench/results/gpu-YYYY-MM-DD.json and check them against the goals.

    python bench/gpu_results.py WORK_DIR OUT.json     # run by bench/gpu_suite.sh

WORK_DIR holds what the suite's steps wrote: device.json, cuda_checks.jsonl (tests/test_cuda.py's
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

MNIST_IMAGES, MNIST_EPOCHS = 60_000, 250
GRAPH_METHODS = ("recurrent-linear", "recurrent-compiled")  # the sampler's recurrent paths on CUDA


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
    entries = []
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


def goals(entries: list[dict]) -> list[tuple[str, str, str]]:
    """The GPU issue's goals, from the entries."""
    def matching(prefix, suffix=""):
        return [e for e in entries if e["name"].startswith(prefix) and e["name"].endswith(suffix)]

    def best(items, key=max):
        return key(items, key=lambda e: e["value"]) if items else None

    rows = []
    checks = [e for e in matching("correctness/") if "tolerance" in e["config"]]
    failed = [e["name"] for e in checks if not e["value"] < e["config"]["tolerance"]]
    rows.append(("correctness on CUDA within stated tolerances (tests/test_cuda.py)",
                 f"{len(checks) - len(failed)} of {len(checks)} figures within tolerance",
                 "not measured" if not checks else ("met" if not failed else "MISSED: " + ", ".join(failed))))
    linear_best = {}
    for shape, target in (("cifar10", 500.0), ("mnist", 3500.0)):
        top = best([e for method in GRAPH_METHODS for e in matching(f"sample/{shape}/{method}/")])
        linear_best[shape] = top
        rows.append(status(f"sampling {shape} >= {target:g} images/s", top and top["value"], target, "images/s",
                           top and f" ({top['config']['method']}, batch {top['config']['batch']})" or ""))
    memory = best([e for method in GRAPH_METHODS for e in matching(f"sample-memory/cifar10/{method}/")], min)
    rows.append(status("sampling memory per CIFAR-10 image <= 0.6 MB (0.572 MiB)", memory and memory["value"],
                       0.6e6 / 2**20, "MiB", memory and f" (batch {memory['config']['batch']})" or "",
                       lower_is_better=True))
    softmax = best(matching("sample/cifar10/softmax-kv-cache/"))
    top = linear_best["cifar10"]
    rows.append(status("sampling at L=3072: linear >= 10x softmax with a KV cache (best batch each)",
                       top and softmax and top["value"] / softmax["value"], 10.0, "x",
                       softmax and f" (softmax best {softmax['value']:.3g} images/s, batch "
                       f"{softmax['config']['batch']})" or ""))
    mfu = best(matching("train/cifar10/causal-linear/", "/mfu"))
    rows.append(status("training, CIFAR-10 config in bf16: MFU >= 35%", mfu and mfu["value"], 35.0, "%",
                       mfu and f" ({mfu['config']['backend']}, batch {mfu['config']['batch']})" or ""))
    mnist = best(matching("train/mnist/causal-linear/", "/images_per_s"))
    hours = mnist and MNIST_IMAGES * MNIST_EPOCHS / mnist["value"] / 3600
    rows.append(status("MNIST recipe (250 epochs x 60k images) < 1 GPU-hour", hours, 1.0, "GPU-hours",
                       mnist and f" ({mnist['config']['backend']}, {mnist['value']:,.0f} images/s)" or "",
                       lower_is_better=True))
    fastest = best(matching("train/cifar10/causal-linear/", "/step_ms"), min)
    softmax_step = best(matching("train/cifar10/softmax/", "/step_ms"), min)
    rows.append(status("training step at L=3072: linear >= 3x faster than softmax",
                       fastest and softmax_step and softmax_step["value"] / fastest["value"], 3.0, "x",
                       fastest and f" ({fastest['config']['backend']})" or ""))
    loader = best(matching("loader/"))
    rows.append(status("loader alone faster than MNIST training consumes",
                       loader and mnist and loader["value"] / mnist["value"], 1.0, "x",
                       loader and mnist and f" ({loader['value']:,.0f} vs {mnist['value']:,.0f} images/s)" or ""))
    passed = matching("precision/passed")
    gap = matching("precision/second_half_relative_gap")
    resumed = matching("precision/resumed_step")
    rows.append(("bf16 training tracks fp32 (loss gap within the margin), checkpoint resumes",
                 f"{100 * gap[0]['value']:.2f}% mean loss gap (margin {100 * gap[0]['config']['margin']:.0f}%), "
                 f"resumed at step {resumed[0]['value']}" if gap and resumed else "-",
                 "not measured" if not passed else ("met" if passed[0]["value"] else "MISSED")))
    return rows


def main(argv=None) -> int:
    work, out = (argv or sys.argv[1:])[:2]
    device = load(os.path.join(work, "device.json")) or {}
    if "cuda" not in device or device.get("cuda") is None or "no CUDA" in device.get("device", "no CUDA"):
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
