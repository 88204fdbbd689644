"""Training-step cost of causal-linear attention (each available backend) against softmax.

Times forward + backward of the whole ImageTransformer's nll and records peak memory, for each
sequence length, every configuration in a fresh process (so one run's memory cannot leak into the
next), and prints one markdown table with ratios against softmax at the same length.

    python bench/attention.py                                  # CPU: small defaults, a few minutes
    python bench/attention.py --device cuda --dtype bf16       # GPU: paper-sized model, batch 8
    python bench/attention.py --lengths 784,3072 --batch 4 --layers 2

Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the rise of the process's peak
resident set size (ru_maxrss) over the step, after the model and inputs exist.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; sizes default to small on CPU and to the paper's model on CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="784,3072,12288", help="comma-separated sequence lengths")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="autocast dtype of the step (the linear-attention sums stay fp32)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default: 1 on CPU, 8 on CUDA)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--d-query", type=int, default=32, help="query/value size per head")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk of the torch backend")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 2 CPU, 10 CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each run")
    args = parser.parse_args(argv)
    try:
        args.lengths = [int(value) for value in args.lengths.split(",") if value]
    except ValueError:
        parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    return args


def available_kinds(device: str) -> list[tuple[str, str]]:
    """(attention, backend) pairs that can run on `device`, softmax first."""
    from model.attention_ops import backend_available

    kinds = [("softmax", "-"), ("causal-linear", "torch")]
    if backend_available("fast-transformers"):
        from fast_transformers import causal_product
        if device == "cpu" or getattr(causal_product, "causal_dot_product_cuda", None) is not None:
            kinds.append(("causal-linear", "fast-transformers"))
    if device == "cuda" and backend_available("fla"):
        kinds.append(("causal-linear", "fla"))
    return kinds


def measure(job: dict) -> dict:
    """Run in a fresh process: time forward+backward of one configuration, return ms and peak MiB."""
    import torch

    from model import ImageTransformer, ModelConfig

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device, length = torch.device(job["device"]), job["length"]
    dtype = getattr(torch, DTYPES[job["dtype"]])
    backend = "auto" if job["backend"] == "-" else job["backend"]
    cfg = ModelConfig(bins=256, seq_len=length, n_layers=job["layers"], n_heads=job["heads"],
                      d_query=job["d_query"], d_ff=4 * job["heads"] * job["d_query"],
                      attention=job["attention"])
    torch.manual_seed(0)
    net = ImageTransformer(cfg, backend, job["chunk_size"]).to(device).train()
    seq = torch.randint(0, 256, (job["batch"], length), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net.nll(seq).mean()
        loss.backward()
        net.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()  # warm-up (kernel selection, allocator); also the memory measurement on CPU
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        times = []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        return {**job, "error": "out of memory"}
    except RuntimeError as error:
        return {**job, "error": str(error).splitlines()[0][:60]}
    return {**job, "ms": 1000 * statistics.median(times), "mib": peak / 2 ** 20}


def format_table(results: list[dict]) -> str:
    """A markdown table with time and memory ratios against softmax at the same length."""
    lines = ["| L | attention | backend | fwd+bwd ms | peak MiB | speed-up vs softmax | memory vs softmax |",
             "|---:|---|---|---:|---:|---:|---:|"]
    softmax = {r["length"]: r for r in results if r["attention"] == "softmax" and "ms" in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['length']} | {r['attention']} | {r['backend']} | {r['error']} | | | |")
            continue
        base = softmax.get(r["length"])
        speed = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        memory = f"{r['mib'] / base['mib']:.2f}x" if base and base["mib"] > 0 else "-"
        lines.append(f"| {r['length']} | {r['attention']} | {r['backend']} | {r['ms']:.1f} | {r['mib']:.1f} "
                     f"| {speed} | {memory} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run every (length, attention, backend) configuration and print the table."""
    import torch

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench/attention.py: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    on_gpu = device == "cuda"
    common = dict(device=device, dtype=args.dtype, batch=args.batch or (8 if on_gpu else 1),
                  layers=args.layers or (8 if on_gpu else 1), heads=args.heads, d_query=args.d_query,
                  chunk_size=args.chunk_size, repeats=args.repeats or (10 if on_gpu else 2),
                  threads=args.threads)
    name = torch.cuda.get_device_name() if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(f"# {name}, torch {torch.__version__}, dtype {args.dtype}, batch {common['batch']}, "
          f"layers {common['layers']}, heads {args.heads} x {args.d_query}, chunk {args.chunk_size}, "
          f"median of {common['repeats']} steps")
    jobs = [dict(common, length=length, attention=attention, backend=backend)
            for length in args.lengths for attention, backend in available_kinds(device)]
    results = []
    context = multiprocessing.get_context("spawn")  # a fresh process per configuration
    for job in jobs:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                result = pool.submit(measure, job).result()
            except concurrent.futures.process.BrokenProcessPool:  # killed, e.g. by the OOM killer
                result = {**job, "error": "process died (out of memory?)"}
        results.append(result)
        outcome = result["error"] if "error" in result else f"{result['ms']:.1f} ms, {result['mib']:.1f} MiB"
        print(f"  L={job['length']} {job['attention']} {job['backend']}: {outcome}", file=sys.stderr, flush=True)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
    sys.exit(main())
