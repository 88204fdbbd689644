"""Sampling speed: recurrent linear attention vs softmax with a KV cache vs re-running the prefix.

    python bench/sample_speed.py                      # CPU: estimated rates, a few minutes
    python bench/sample_speed.py --device cuda --full # GPU: whole images, timed end to end

For each shape (MNIST: 784 bytes, 8 layers; CIFAR-10: 3,072 bytes, 16 layers; 8 heads x 32) and batch
size, three ways of drawing bytes with the same sampling function (model.generation.next_byte):
  recurrent-linear  causal-linear model, its recurrent twin: O(1) work and memory per byte (on CUDA,
                    whole-image mode: one captured CUDA graph replayed per byte)
  recurrent-256-levels  the same drawn through the 256-level log-probabilities and an inverse CDF (what
                    temperature != 1, top-k, top-p and guidance use; top-k 256 changes nothing else),
                    instead of from the logistic mixture directly
  recurrent-compiled  the same with the step's kernels fused by torch.compile (then captured)
  recurrent-eager   the same without the CUDA graph (a few hundred kernel launches per byte)
  softmax-kv-cache  softmax model, one step per byte over a KV cache: O(t) work at byte t, O(L) memory
  parallel-rerun    causal-linear model re-run over the whole prefix at every byte: O(t) work at byte t
Estimated mode (default): at --positions evenly spaced byte positions p, time --bytes consecutive
bytes (a state fast-forwarded to p: cache length and position are set, their contents do not change
the time); per-image time = L x mean per-byte time / batch (midpoint rule, exact when cost is linear
in t). Peak memory per image: the state (RecurrentState.nbytes) plus the peak extra memory while
drawing the last bytes measured (CUDA: max_memory_allocated; CPU: the process's peak RSS, reset
through /proc/self/clear_refs after malloc_trim), divided by the batch size.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model import ImageTransformer, ModelConfig  # noqa: E402
from model.generation import SamplingOptions, generate_images, image_uniforms, next_byte  # noqa: E402

METHODS = ("recurrent-linear", "recurrent-256-levels", "recurrent-compiled", "recurrent-eager", "softmax-kv-cache",
           "parallel-rerun")


@dataclass
class Shape:
    """A benchmark model shape."""

    name: str
    seq_len: int
    n_layers: int
    n_heads: int = 8
    d_query: int = 32
    d_ff: int = 1024
    head: str = "logistic-mixture"  # as configs/mnist.yaml and configs/cifar10.yaml
    mixtures: int = 10


SHAPES = {"mnist": Shape("mnist", 784, 8), "cifar10": Shape("cifar10", 3072, 16)}


@dataclass
class Cell:
    """One measurement: images/s and peak bytes per image (None when skipped)."""

    images_per_s: Optional[float]
    bytes_per_image: Optional[float]
    note: str = ""
    images: Optional[torch.Tensor] = None  # whole-image mode: what was drawn (same seed in every method)


def build_model(shape: Shape, attention: str, device: torch.device) -> ImageTransformer:
    """An untrained model of the shape (speed does not depend on the weights)."""
    torch.manual_seed(0)
    config = ModelConfig(bins=256, seq_len=shape.seq_len, n_layers=shape.n_layers, n_heads=shape.n_heads,
                         d_query=shape.d_query, d_ff=shape.d_ff, head=shape.head, mixtures=shape.mixtures,
                         attention=attention, condition="none")
    return ImageTransformer(config).to(device).eval()


class PeakMemory:
    """Peak extra memory over a region: CUDA allocator stats, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0

    def _rss(self, field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise OSError(f"/proc/self/status has no {field}")

    def start(self) -> None:
        """Forget earlier peaks and remember the current usage."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back so RSS tracks live memory
        except OSError:
            pass
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        self.base = self._rss("VmRSS:")

    def peak(self) -> int:
        """Peak extra bytes since start()."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, self._rss("VmHWM:") - self.base)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window_starts(seq_len: int, count: int, width: int) -> list[int]:
    """Starts of `count` windows of `width` bytes centred on the midpoints of equal parts of the sequence."""
    starts = []
    for j in range(count):
        centre = int((j + 0.5) * seq_len / count)
        starts.append(min(max(1, centre - width // 2), seq_len - width - 1))
    return starts


@torch.no_grad()
def measure_stepping(net: ImageTransformer, batch: int, starts: list[int], width: int,
                     options: SamplingOptions, device: torch.device) -> tuple[float, int]:
    """Mean seconds per byte stepping the recurrent twin at each start, and peak bytes at the last."""
    memory, peak, per_byte = PeakMemory(device), 0, []
    uniforms = image_uniforms(0, list(range(batch)), width + 1).to(device)  # (B, width + 1)
    for index, start in enumerate(starts):
        state = net.init_state(batch)
        logits, state = net.prefill(state)  # condition + begin token
        # fast-forward: the cost of a step depends on how many positions the state holds, not on them
        state.position += start
        for layer in state.layers:
            if hasattr(layer, "length"):
                layer.length = start
        byte = next_byte(net, logits, uniforms[:, 0], options)
        logits, state = net.step(byte, state)  # warm-up, untimed
        last = index == len(starts) - 1
        if last:
            memory.start()
        sync(device)
        began = time.perf_counter()
        for i in range(width):
            byte = next_byte(net, logits, uniforms[:, i + 1], options)
            logits, state = net.step(byte, state)
        sync(device)
        per_byte.append((time.perf_counter() - began) / width)
        if last:
            peak = memory.peak() + state.nbytes()
    return sum(per_byte) / len(per_byte), peak


@torch.no_grad()
def measure_rerun(net: ImageTransformer, batch: int, starts: list[int], width: int,
                  options: SamplingOptions, device: torch.device) -> tuple[float, int]:
    """Mean seconds per byte re-running the whole prefix at each start, and peak bytes at the last."""
    memory, peak, per_byte = PeakMemory(device), 0, []
    seq = torch.zeros(batch, net.config.seq_len, dtype=torch.long, device=device)  # (B, L)
    uniforms = image_uniforms(0, list(range(batch)), width).to(device)
    net(seq[:, :2])  # warm-up
    for index, start in enumerate(starts):
        last = index == len(starts) - 1
        if last:
            memory.start()
        sync(device)
        began = time.perf_counter()
        for i in range(width):
            t = start + i
            logits = net(seq[:, : t + 1])[:, t]  # (B, head_dim): the whole prefix again
            seq[:, t] = next_byte(net, logits, uniforms[:, i], options)
        sync(device)
        per_byte.append((time.perf_counter() - began) / width)
        if last:
            peak = memory.peak()
    return sum(per_byte) / len(per_byte), peak


def measure_full(net: ImageTransformer, batch: int, mode: str, device: torch.device, cuda_graph: bool,
                 bf16: bool, compile: bool = False, top_k=None) -> tuple[float, int, torch.Tensor]:
    """Seconds per image generating whole images with the sampler's own loop, peak bytes, the images."""
    options = SamplingOptions(batch_size=batch, mode=mode, progress=False, cuda_graph=cuda_graph,
                              precision="bf16" if bf16 else "fp32", compile=compile, top_k=top_k)
    # warm-up (kernels, cuBLAS handles, allocator, graph capture, compilation) on the last bytes: the
    # given prefix is read in one parallel pass, so keep its activations (~B x K x d_ff floats) near 4 GB
    given = min(net.config.seq_len - 4, int(4e9 / (batch * net.config.d_ff * 4 * 2)))
    generate_images(net, batch, options, prefix=torch.zeros(batch, given, dtype=torch.long))
    memory = PeakMemory(device)
    memory.start()
    images, stats = generate_images(net, batch, options)
    return stats.seconds / batch, memory.peak(), images


def run_cell(shape: Shape, method: str, batch: int, args, device: torch.device, nets: dict) -> Cell:
    """Measure one (shape, method, batch) cell."""
    parallel = method == "parallel-rerun"
    if method not in args.methods:
        return Cell(None, None, "skipped: not in --methods")
    if parallel and args.max_parallel_batch and batch > args.max_parallel_batch:
        return Cell(None, None, f"skipped: batch > --max-parallel-batch {args.max_parallel_batch}")
    if method == "recurrent-eager" and not (args.full and device.type == "cuda"):
        return Cell(None, None, "skipped: same as recurrent-linear off CUDA or in estimated mode")
    if method == "recurrent-compiled" and not args.full:
        return Cell(None, None, "skipped: whole-image mode only")
    if method == "recurrent-compiled" and args.compile_batches and batch not in args.compile_batches:
        return Cell(None, None, "skipped: batch not in --compile-batches")
    if method == "recurrent-eager" and args.max_eager_batch and batch > args.max_eager_batch:
        return Cell(None, None, f"skipped: batch > --max-eager-batch {args.max_eager_batch}")
    if method == "softmax-kv-cache" and args.max_softmax_batch and batch > args.max_softmax_batch:
        return Cell(None, None, f"skipped: batch > --max-softmax-batch {args.max_softmax_batch}")
    attention = "softmax" if method == "softmax-kv-cache" else "causal-linear"
    top_k = 256 if method == "recurrent-256-levels" else None  # no filter, the 256-level path
    key = (shape.name, attention)
    if key not in nets:
        nets.clear()  # one shape's models at a time
        nets[key] = build_model(shape, attention, device)
    net = nets[key]
    if args.full:
        seconds, peak, images = measure_full(net, batch, "parallel" if parallel else "recurrent", device,
                                             cuda_graph=method != "recurrent-eager", bf16=args.bf16,
                                             compile=method == "recurrent-compiled", top_k=top_k)
        return Cell(1.0 / seconds, peak / batch, images=images)
    width = args.parallel_bytes if parallel else args.bytes
    starts = window_starts(shape.seq_len, args.positions, width)
    measure = measure_rerun if parallel else measure_stepping
    per_byte, peak = measure(net, batch, starts, width, SamplingOptions(progress=False, top_k=top_k), device)
    seconds_per_image = shape.seq_len * per_byte / batch
    return Cell(1.0 / seconds_per_image, peak / batch)


def format_rate(cell: Cell) -> str:
    """images/s with three significant digits, or a dash."""
    return "—" if cell.images_per_s is None else f"{cell.images_per_s:.3g}"


def format_memory(cell: Cell) -> str:
    """MiB per image, or a dash."""
    return "—" if cell.bytes_per_image is None else f"{cell.bytes_per_image / 2**20:.3g}"


def ratio(a: Cell, b: Cell, digits: int = 0) -> str:
    """a's rate over b's, or a dash."""
    if a.images_per_s is None or b.images_per_s is None:
        return "—"
    return f"{a.images_per_s / b.images_per_s:.{digits}f}x"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    """Run every (shape, batch, method) and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="mnist,cifar10", help="comma-separated: mnist, cifar10")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated (default: 1,8,32 on CPU, 1,16,64,256 on GPU)")
    parser.add_argument("--full", action="store_true",
                        help="time whole images end to end instead of estimating from a few bytes")
    parser.add_argument("--positions", type=int, default=4, help="estimated mode: positions sampled")
    parser.add_argument("--bytes", type=int, default=8,
                        help="estimated mode: consecutive bytes timed per position (recurrent, KV cache)")
    parser.add_argument("--parallel-bytes", type=int, default=1,
                        help="estimated mode: bytes timed per position for parallel-rerun")
    parser.add_argument("--max-parallel-batch", type=int, default=None,
                        help="skip parallel-rerun above this batch size (its cost per image hardly "
                             "depends on the batch; the slowest cell of the default CPU run is "
                             "parallel-rerun at CIFAR-10 shape, batch 32: about 3 minutes)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: "
                        + ", ".join(METHODS) + " (recurrent-eager differs from recurrent-linear only "
                        "on CUDA in --full mode)")
    parser.add_argument("--max-softmax-batch", type=int, default=None,
                        help="skip softmax-kv-cache above this batch size (its cache holds 2 x layers x "
                             "L x d_model values per image: about 96 MiB at the CIFAR-10 shape in fp32)")
    parser.add_argument("--compile-batches", default=None,
                        help="comma-separated batch sizes for recurrent-compiled (each compiles anew)")
    parser.add_argument("--max-eager-batch", type=int, default=None,
                        help="skip recurrent-eager above this batch size")
    parser.add_argument("--bf16", action="store_true", help="--full mode: sample under bf16 autocast "
                        "(the recurrent sums stay fp32)")
    parser.add_argument("--json", default=None, help="also write every cell to this JSON file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for every method (1: on a shared 2-core machine two "
                             "threads stall each other and make small steps 10-50x slower)")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.compile_batches = [int(b) for b in args.compile_batches.split(",")] if args.compile_batches else None
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    on_cpu = device.type == "cpu"
    batches = [int(b) for b in (args.batch_sizes or ("1,8,32" if on_cpu else "1,16,64,256")).split(",")]
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    how = ("whole images" if args.full else
           f"estimated: {args.bytes} bytes (parallel-rerun: {args.parallel_bytes}) at each of "
           f"{args.positions} positions, per-image = L x mean per-byte time / batch")
    print(f"device {device} ({torch.get_num_threads()} CPU threads), torch {torch.__version__}; {how}")
    nets: dict = {}
    rows = []
    for shape in shapes:
        for batch in batches:
            cells = {}
            for method in METHODS:
                began = time.perf_counter()
                cells[method] = run_cell(shape, method, batch, args, device, nets)
                print(f"  {shape.name} L={shape.seq_len} batch {batch} {method}: "
                      f"{format_rate(cells[method])} images/s, {format_memory(cells[method])} MiB/image "
                      f"{cells[method].note} ({time.perf_counter() - began:.1f} s)", flush=True)
            reference = cells["recurrent-linear"].images
            for other in ("recurrent-compiled", "recurrent-eager"):
                if reference is not None and cells[other].images is not None:
                    same = (cells[other].images == reference).float().mean().item()
                    cells[other].note += f"{100 * same:.2f}% of bytes equal to recurrent-linear's"
                    print(f"    {other}: {100 * same:.2f}% of bytes equal to recurrent-linear's (same seed)")
            for cell in cells.values():
                cell.images = None  # compared above; do not hold every row's images
            rows.append((shape, batch, cells))
    header = ["shape", "L", "layers", "batch"]
    for method in METHODS:
        header += [f"{method} img/s", f"{method} MiB/img"]
    header += ["recurrent / parallel", "recurrent / softmax-kv", "graph / eager", "compiled / graph",
               "direct / 256-level draw"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for shape, batch, cells in rows:
        values = [shape.name, str(shape.seq_len), str(shape.n_layers), str(batch)]
        for method in METHODS:
            values += [format_rate(cells[method]), format_memory(cells[method])]
        values += [ratio(cells["recurrent-linear"], cells["parallel-rerun"]),
                   ratio(cells["recurrent-linear"], cells["softmax-kv-cache"]),
                   ratio(cells["recurrent-linear"], cells["recurrent-eager"], digits=1),
                   ratio(cells["recurrent-compiled"], cells["recurrent-linear"], digits=2),
                   ratio(cells["recurrent-linear"], cells["recurrent-256-levels"], digits=2)]
        print("| " + " | ".join(values) + " |")
    print()
    for shape in shapes:
        best = {}
        for method in METHODS:
            rates = [(cells[method].images_per_s, batch) for s, batch, cells in rows
                     if s is shape and cells[method].images_per_s is not None]
            best[method] = max(rates) if rates else None
        if best["recurrent-linear"]:
            linear, lb = best["recurrent-linear"]
            line = f"{shape.name}: best recurrent-linear {linear:.4g} images/s (batch {lb})"
            for other in ("recurrent-256-levels", "recurrent-compiled", "recurrent-eager", "softmax-kv-cache",
                          "parallel-rerun"):
                if best[other]:
                    rate, b = best[other]
                    line += f"; {linear / rate:.1f}x the best {other} ({rate:.3g}, batch {b})"
            print(line)
    if args.json:
        entries = [{"shape": shape.name, "seq_len": shape.seq_len, "layers": shape.n_layers, "batch": batch,
                    "method": method, "images_per_s": cell.images_per_s,
                    "mib_per_image": None if cell.bytes_per_image is None else cell.bytes_per_image / 2**20,
                    "note": cell.note}
                   for shape, batch, cells in rows for method, cell in cells.items()]
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"device": device_name(device), "torch": torch.__version__, "full": args.full,
                       "bf16": args.bf16, "cells": entries}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
