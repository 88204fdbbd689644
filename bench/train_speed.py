"""Training throughput of the mnist and cifar10 configs: bytes/s, images/s and model FLOPs utilisation.

    python bench/train_speed.py                                  # both configs, every attention/backend here
    python bench/train_speed.py --configs configs/cifar10.yaml --batch-size 64 --steps 20
    python bench/train_speed.py --batch-size 2 --steps 2 --warmup 1 --layers 2   # a quick look on CPU

Each row times full training steps (forward, loss, backward, clipping, optimizer) on random bytes
after warm-up steps, one process. FLOPs are counted analytically from the model config (matmuls
only; 3x the forward pass for forward + backward), so MFU = achieved FLOP/s / the device's peak.
The peak is known for a few GPUs (dense bf16 / tf32 tensor-core numbers); elsewhere pass
--peak-tflops or MFU reads n/a.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# Dense peak TFLOP/s per GPU (no sparsity): (bf16, fp32 via tf32). H100/H200 SXM figures.
PEAK_TFLOPS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0),
               "L4": (121.0, 60.0), "A10": (125.0, 62.5), "V100": (125.0, 15.7)}


def forward_flops_per_byte(model_config) -> float:
    """Matmul FLOPs of one forward pass per predicted byte (2 per multiply-add)."""
    c = model_config
    d, h, dk, dv, length = c.d_model, c.n_heads, c.d_query, c.d_value, c.seq_len + c.prefix_len
    projections = 2 * d * h * (2 * dk + dv) + 2 * h * dv * d  # q, k, v in; out
    feed_forward = 2 * 2 * d * c.d_ff
    if c.attention == "causal-linear":
        mixing = 2 * 2 * h * dk * dv + 2 * 2 * h * dk  # k v^T into the state, q against it; normaliser
    else:
        mixing = 2 * h * (dk + dv) * length / 2  # q k^T and a v over the causal half, on average
    head = 2 * d * c.head_dim
    return c.n_layers * (projections + feed_forward + mixing) + head


def device_peak(device: torch.device, bf16: bool, override: Optional[float]) -> Optional[float]:
    """Peak FLOP/s of the device, or None when unknown."""
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (peak_bf16, peak_tf32) in PEAK_TFLOPS.items():
        if key in name:
            return (peak_bf16 if bf16 else peak_tf32) * 1e12
    return None


def bench_one(cfg, attention: str, backend: str, args, device: torch.device, bf16: bool) -> dict:
    """Time a few training steps of one (config, attention, backend) on random bytes."""
    from model import ImageTransformer, ModelConfig

    from train.optimizers import build_optimizers

    section = dataclasses.replace(cfg.model, attention=attention)
    if args.layers:
        section = dataclasses.replace(section, n_layers=args.layers)
    values = dataclasses.asdict(section)
    seq_len = {"mnist": 28 * 28, "cifar10": 32 * 32 * 3}[args.dataset_of[id(cfg)]]
    row = {"mnist": 28, "cifar10": 32 * 3}[args.dataset_of[id(cfg)]] if values["row_len"] == "auto" else values["row_len"]
    model_config = ModelConfig.from_dict({**values, "bins": 256, "seq_len": seq_len, "n_classes": 10, "row_len": row})
    torch.manual_seed(0)
    net = ImageTransformer(model_config, backend, cfg.train.chunk_size).to(device)
    optimizers = build_optimizers(net, cfg, device)
    batch = args.batch_size or cfg.train.batch_size
    seqs = torch.randint(0, 256, (batch, seq_len), device=device)  # (B, L)
    labels = torch.randint(0, 10, (batch,), device=device)
    kwargs = {"labels": labels} if model_config.condition in ("class", "both") else {}
    if model_config.condition in ("caption", "both"):
        kwargs["captions"] = ["a handwritten seven"] * batch

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = net.nll(seqs, **kwargs).mean()  # as the trainer: only the target level is evaluated
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    images_per_s = args.steps * batch / elapsed
    flops_per_s = 3 * forward_flops_per_byte(model_config) * seq_len * images_per_s
    peak = device_peak(device, bf16, args.peak_tflops)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"images_per_s": images_per_s, "bytes_per_s": images_per_s * seq_len, "tflops": flops_per_s / 1e12,
            "mfu": flops_per_s / peak if peak else None, "step_ms": 1000 * elapsed / args.steps,
            "batch": batch, "layers": model_config.n_layers, "memory_gib": memory}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark grid and print a table."""
    from model.attention_ops import backend_available

    from train.config import load_config
    from model.precision import native_bf16

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=[os.path.join(repo, "configs", "mnist.yaml"),
                                                         os.path.join(repo, "configs", "cifar10.yaml")])
    parser.add_argument("--attention", nargs="+", default=["causal-linear", "softmax"])
    parser.add_argument("--backends", nargs="+", default=["torch", "fast-transformers", "fla"],
                        help="causal-linear backends to try (unavailable ones are listed as skipped)")
    parser.add_argument("--batch-size", type=int, default=None, help="per step (default: the config's)")
    parser.add_argument("--layers", type=int, default=None, help="override n_layers (quick looks on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 where the device runs it natively (as train.mixed_precision: auto), "
                             "fp32 otherwise")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, if not known")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write every row to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16(device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; precision: {'bf16 autocast' if bf16 else 'fp32'}; "
          f"{args.warmup} warm-up + {args.steps} timed steps per row; torch {torch.__version__}")
    header = (f"{'config':8} {'attention':13} {'backend':17} {'layers':>6} {'batch':>5} {'step ms':>9} "
              f"{'images/s':>9} {'bytes/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'mem GiB':>7}")
    print(header)
    print("-" * len(header))
    args.dataset_of = {}
    results = []
    for path in args.configs:
        cfg = load_config(path)
        dataset = os.path.splitext(os.path.basename(path))[0]
        if dataset not in ("mnist", "cifar10"):
            parser.error(f"{path}: the benchmark knows the image sizes of mnist.yaml and cifar10.yaml only")
        args.dataset_of[id(cfg)] = dataset
        rows = [(attention, backend) for attention in args.attention
                for backend in (args.backends if attention == "causal-linear" else ["torch"])]
        for attention, backend in rows:
            label = f"{dataset:8} {attention:13} {backend:17}"
            if attention == "causal-linear" and not backend_available(backend):
                print(f"{label} skipped: backend not installed here")
                continue
            if backend == "fla" and device.type != "cuda":
                print(f"{label} skipped: needs CUDA")
                continue
            try:
                r = bench_one(cfg, attention, backend, args, device, bf16)
            except (RuntimeError, ValueError) as err:  # e.g. out of memory for softmax at long sequences
                print(f"{label} failed: {str(err).splitlines()[0][:80]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            results.append({"config": dataset, "attention": attention, "backend": backend,
                            "precision": "bf16" if bf16 else "fp32", **r})
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
            print(f"{label} {r['layers']:6d} {r['batch']:5d} {r['step_ms']:9.1f} {r['images_per_s']:9.1f} "
                  f"{r['bytes_per_s']:10.3g} {r['tflops']:8.3f} {mfu:>6} {r['memory_gib']:7.2f}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": name, "torch": torch.__version__, "rows": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
