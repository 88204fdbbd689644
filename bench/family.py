"""The attention family compared on pixels: every kind at one width, depth and step count, through the
user commands (data_prep.prepare, train/run.py, lit-eval), on the CPU.

    python bench/family.py                               # the three data sets below, every kind
    python bench/family.py --data sklearn --steps 800    # one data set
    python bench/family.py --kinds causal-linear gla     # some kinds

Data sets: the built-in digits (28x28) at 256 and at 8 levels, and scikit-learn's 8x8 handwritten
digits (real pen strokes from 43 writers, bundled inside the scikit-learn package: nothing is
downloaded; the 17 grey levels 0..16 scaled to 0..255), split by a fixed seed into train and a
held-out test set. Each run: configs/digits.yaml with the kind, the sizes and the steps given here,
one CPU thread. Reported per (data, kind): test bits/dim (lit-eval, exact), class agreement (lit-eval:
share of samples the data's classifier takes for the class asked), and the training step (forward and
backward of one batch) and sampling seconds per image (the recurrent sampler, 10 images), both timed
with the kinds taking turns in one process, best of --rounds (--timing-only redoes just these). Writes
bench/results/family-DATE.json and the table between the markers in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.files import atomic_file  # noqa: E402
from model.attention_ops import KINDS  # noqa: E402

MARK_BEGIN, MARK_END = "<!-- family.py begin -->", "<!-- family.py end -->"
DATA_SETS = {"digits256": (784, 256, 28), "digits8": (784, 8, 28), "sklearn": (64, 256, 8)}  # (bytes, levels, row)


def run(command: list, log: Path) -> None:
    """Run one user command with one thread, its output to log; a failure stops the bench naming it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "w") as handle:
        code = subprocess.call([sys.executable, *command], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        raise SystemExit(f"{' '.join(map(str, command[:3]))}... failed with exit code {code}; see {log}")


def sklearn_folders(work: Path, seed: int, test_size: int) -> tuple[Path, Path]:
    """scikit-learn's 8x8 digits as PNG class folders (train, test), split by a seeded permutation."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 -> 0..255
    order = np.random.default_rng(seed).permutation(len(images))
    roots = work / "sklearn-train", work / "sklearn-test"
    for root, indices in zip(roots, (order[test_size:], order[:test_size])):
        for index in indices:
            folder = root / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{index:04d}.png")
    return roots


def prepare(name: str, work: Path, args) -> Path:
    """The prepared folder for data set `name` (built once)."""
    out = work / f"data-{name}"
    if (out / "manifest.json").exists():
        return out
    if name == "sklearn":
        train, test = sklearn_folders(work, args.seed, args.sklearn_test)
        command = ["-m", "data_prep.prepare", "--dataset", "folder", "--root", train, "--test-root", test,
                   "--size", "8x8", "--channels", "1", "--out", out, "--workers", "1", "--no-progress"]
    else:
        command = ["-m", "data_prep.prepare", "--dataset", "digits", "--bins", str(DATA_SETS[name][1]),
                   "--train-size", str(args.train_size), "--test-size", str(args.test_size), "--out", out,
                   "--workers", "1", "--no-progress"]
    run(command, work / f"prepare-{name}.log")
    return out


def interleaved_times(name: str, kinds: list, args) -> dict:
    """kind -> (training step ms, sampling s per image), measured in one process, the kinds taking turns
    in each round and the best round kept: a slow spell of a shared machine then slows every kind alike.
    Random weights of the runs' shape (speed does not depend on the weights), 1 thread."""
    import torch

    from model import ImageTransformer, ModelConfig
    from model.generation import SamplingOptions, generate_images

    torch.set_num_threads(1)
    seq_len, bins, row_len = DATA_SETS[name]
    nets = {kind: ImageTransformer(ModelConfig(bins=bins, seq_len=seq_len, n_layers=args.layers, n_heads=4,
                                               d_query=args.d_query, d_ff=args.d_ff, attention=kind, condition="class",
                                               row_len=row_len), "torch", 32) for kind in kinds}
    seq, labels = torch.randint(0, bins, (args.batch, seq_len)), torch.arange(args.batch) % 10
    options = SamplingOptions(batch_size=10, progress=False)
    best = {kind: [float("inf"), float("inf")] for kind in kinds}
    for _ in range(args.rounds + 1):  # the first round warms up
        for kind, net in nets.items():
            began = time.perf_counter()
            net.train().zero_grad(set_to_none=True)
            net.nll(seq, labels).mean().backward()
            middle = time.perf_counter()
            generate_images(net, 10, options, labels=torch.arange(10))
            end = time.perf_counter()
            best[kind] = [min(best[kind][0], middle - began), min(best[kind][1], (end - middle) / 10)]
    return {kind: (1000 * step, sample) for kind, (step, sample) in best.items()}


def one(name: str, kind: str, work: Path, args) -> dict:
    """Train kind on data set name, evaluate it, time it: one row of the table."""
    data, row_len = prepare(name, work, args), DATA_SETS[name][2]
    run_dir = work / f"run-{name}-{kind}"
    sets = {"data.dir": data, "train.run_dir": run_dir, "model.attention": kind, "model.row_len": row_len,
            "model.n_layers": args.layers, "model.d_query": args.d_query, "model.d_ff": args.d_ff,
            "train.max_steps": args.steps, "train.eval_every": args.steps, "train.checkpoint_every": args.steps,
            "train.n_samples": 0, "train.cpu_threads": 1, "train.seed": args.seed, "train.batch_size": args.batch,
            "optim.warmup_steps": min(50, args.steps // 10), "log.every": max(1, args.steps // 10)}
    began = time.perf_counter()
    run(["train/run.py", "--config", "configs/digits.yaml", *[f"--set={k}={v}" for k, v in sets.items()]],
        work / f"train-{name}-{kind}.log")
    train_seconds = time.perf_counter() - began
    result = work / f"eval-{name}-{kind}.json"
    run(["-m", "sample.evaluate", "--checkpoint", run_dir, "--data", data, "--n-per-class", str(args.n_per_class),
         "--json", result, "--device", "cpu", "--threads", "1", "--no-progress"], work / f"eval-{name}-{kind}.log")
    evaluation = json.loads(result.read_text())
    agreement = evaluation.get("agreement") or {}
    return dict(data=name, kind=kind, steps=args.steps, bits_per_dim=evaluation["bits_per_dim"],
                train_seconds=train_seconds,
                agreement=agreement.get("overall"))


def table(rows: list, args) -> str:
    """The markdown table, one block per data set, and each kind's change against causal-linear."""
    lines = [f"{args.layers} layers, 4 heads x {args.d_query}, feed-forward {args.d_ff}, batch {args.batch}, the same "
             f"steps for every kind of a data set (configs/digits.yaml otherwise: Muon, mixed_precision auto), seed "
             f"{args.seed}, 1 CPU thread per run on a shared 2-core machine (times are indicative).", "",
             "| data | steps | kind | test bits/dim | vs causal-linear | step ms (fwd+bwd) | sampling s/image | class agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = next((r["bits_per_dim"] for r in rows if r["data"] == row["data"] and r["kind"] == "causal-linear"), None)
        change = f"{100 * (row['bits_per_dim'] / base - 1):+.1f}%" if base else "-"
        sample = f"{row['sample_s_per_image']:.3f}"
        agreement = f"{100 * row['agreement']:.0f}%" if row["agreement"] is not None else "-"
        lines.append(f"| {row['data']} | {row['steps']} | {row['kind']} | {row['bits_per_dim']:.4f} | {change} | {row['step_ms']:.0f} "
                     f"| {sample} | {agreement} |")
    return "\n".join(lines)


def write_results(rows: list, args) -> list:
    """Merge rows into bench/results/family-DATE.json (a row per data set and kind: runs of other data
    sets that day are kept) and write the table of all of them between the markers of bench/RESULTS.md."""
    day = datetime.date.today().isoformat()
    stored = REPO / "bench" / "results" / f"family-{day}.json"
    new = {(row["data"], row["kind"]) for row in rows}
    kept = [row for row in (json.loads(stored.read_text())["rows"] if stored.exists() else [])
            if (row["data"], row["kind"]) not in new]
    rows = sorted(kept + rows, key=lambda row: (row["data"], KINDS.index(row["kind"])))
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    with atomic_file(stored) as stream:  # a crash leaves the day's old rows, never half a file
        stream.write((json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n").encode())
    results = REPO / "bench" / "RESULTS.md"
    text = results.read_text()
    block = f"{MARK_BEGIN}\n{table(rows, args)}\n{MARK_END}"
    if MARK_BEGIN in text:
        text = text[:text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text += f"\n## The attention family (bench/family.py, {day})\n\n{block}\n"
    with atomic_file(results) as stream:
        stream.write(text.encode())
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", nargs="+", default=list(DATA_SETS), choices=list(DATA_SETS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-query", type=int, default=16)
    parser.add_argument("--d-ff", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--train-size", type=int, default=4000, help="built-in digits rendered for training")
    parser.add_argument("--test-size", type=int, default=500, help="built-in digits rendered for the test split")
    parser.add_argument("--sklearn-test", type=int, default=297, help="scikit-learn digits held out (of 1,797)")
    parser.add_argument("--n-per-class", type=int, default=10, help="samples per class for class agreement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "family", help="data, runs and logs")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (the best is kept)")
    parser.add_argument("--timing-only", action="store_true",
                        help="time the stored rows of --data again (today's bench/results/family-DATE.json); train nothing")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    stored = REPO / "bench" / "results" / f"family-{datetime.date.today().isoformat()}.json"
    rows = []
    for name in args.data:
        if args.timing_only:
            rows += [row for row in json.loads(stored.read_text())["rows"] if row["data"] == name]
        else:
            for kind in args.kinds:
                rows.append(one(name, kind, args.work, args))
                print(json.dumps(rows[-1]), flush=True)
        times = interleaved_times(name, [row["kind"] for row in rows if row["data"] == name], args)
        for row in rows:
            if row["data"] == name:
                row["step_ms"], row["sample_s_per_image"] = times[row["kind"]]
    print(table(write_results(rows, args), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
