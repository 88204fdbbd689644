"""The one generation path: recurrent twin (prefill, then one step per byte) or parallel re-run.

ImageTransformer.generate (the trainer's sample grids), lit-sample, lit-eval and the benchmarks all
draw through generate_images here: image i of a request takes its uniforms from a stream seeded by
(seed, i), so a seed names the same images at any batch size, in either mode, on any device.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from model.precision import autocast
from model.sampling import filter_logits

MODES = ("recurrent", "parallel")


@dataclass
class SamplingOptions:
    """How to draw bytes: filters, seed, batching, execution mode and precision."""

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0
    batch_size: int = 64
    mode: str = "recurrent"
    precision: str = "fp32"  # or bf16, or auto: bf16 where native (model.precision); the CLIs take auto
    progress: bool = True
    cuda_graph: bool = True  # recurrent mode on CUDA: replay one captured step per byte
    compile: bool = False  # recurrent mode: fuse the step's kernels with torch.compile (slow first call)
    guidance: float = 1.0  # classifier-free guidance scale: 1 none, 0 unconditional, > 1 stronger condition
    backend: str = "auto"  # attention backend of the model's parallel passes (model.attention_ops), set at load


@dataclass
class GenerationStats:
    """What the last line of the CLI reports: seconds = warm_up_seconds + the steady drawing's seconds."""

    images: int
    bytes_generated: int
    seconds: float
    # one-off costs (compilation, Triton autotuning, CUDA-graph capture, first kernel launches): the
    # seconds the run took beyond what its bytes cost at the steady rate
    warm_up_seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images per second at the steady rate (the warm-up left out)."""
        return self.images / max(self.seconds - self.warm_up_seconds, 1e-9)


WARM_UP_BYTES = 4  # the first bytes of a batch: prefill, 2 eager steps, graph capture, first replay


class _WarmUpClock:
    """Times the first WARM_UP_BYTES bytes of each new batch size apart from the rest: they pay the
    one-off costs (a batch size seen before reuses its compiled code, so all of it is steady)."""

    def __init__(self, device: torch.device, bar):
        self.device, self.bar = device, bar
        self.sizes: set[int] = set()
        self.seconds, self.bytes = 0.0, 0  # spent in warm-up bytes

    def start_batch(self, size: int) -> None:
        """A batch of `size` images begins."""
        self.new, self.drawn, self.began = size not in self.sizes, 0, time.perf_counter()
        self.sizes.add(size)

    def advance(self, batch: int) -> None:
        """One byte of every image of the batch is drawn (queued, on a GPU)."""
        self.bar.update(batch)
        self.drawn += 1
        if self.new and self.drawn == WARM_UP_BYTES:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # once per batch size: the warm-up's work is done
            self.seconds += time.perf_counter() - self.began
            self.bytes += WARM_UP_BYTES * batch

    def stats(self, images: int, total_bytes: int, seconds: float) -> GenerationStats:
        """The run's stats, its warm-up the excess over the steady rate of the other bytes."""
        if total_bytes <= self.bytes or seconds <= self.seconds:  # too short to tell: all steady
            return GenerationStats(images, total_bytes, seconds)
        steady_rate = (total_bytes - self.bytes) / (seconds - self.seconds)  # bytes/s
        return GenerationStats(images, total_bytes, seconds, max(0.0, seconds - total_bytes / steady_rate))


def image_uniforms(seed: int, image_indices: list[int], length: int) -> torch.Tensor:
    """One uniform in [0, 1) per (image, byte), drawn from a stream seeded by (seed, image index): keyed
    by the image's place in the request, not by its batch (see the module docstring)."""
    rows = [np.random.default_rng([seed, index]).random(length) for index in image_indices]
    return torch.from_numpy(np.stack(rows))  # (B, L) float64


def draw(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample one byte per row of filtered log-probs [B, bins] with uniforms [B]."""
    probs = torch.softmax(log_probs.double(), dim=-1)  # (B, bins); filtered bins are exactly 0
    cdf = torch.cumsum(probs, dim=-1)  # (B, bins)
    target = uniforms.unsqueeze(-1) * cdf[:, -1:]  # (B, 1)
    # right=True: the first bin whose cdf exceeds the target, so a zero-probability bin is never drawn
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (B,)
    return index.clamp_(max=probs.shape[-1] - 1)


def next_byte(net: torch.nn.Module, logits: torch.Tensor, uniforms: torch.Tensor,
              options: SamplingOptions) -> torch.Tensor:
    """The one sampling function both modes share: head logits [R, head_dim] -> bytes [B] (R = 2B
    under guidance: conditional rows, then unconditional ones).

    With nothing to change in the distribution (temperature 1, no top-k, top-p or guidance), a
    head that draws by itself (the logistic mixture: a component, then a logistic) does so: the
    same distribution without its bins log-probabilities, though other bytes for a seed than the
    inverse CDF below. Any other temperature T sharpens (T < 1) or flattens (T > 1) the bins-level
    distribution itself, p^(1/T) renormalised, for either head.
    """
    direct = getattr(net.head, "sample", None)
    if direct is not None and options.temperature == 1 and options.guidance == 1 and \
            options.top_k is None and options.top_p is None:
        return direct(logits, uniforms)
    log_probs = net.log_probs(logits.float())  # (B, bins) normalized for either head
    if options.guidance != 1:
        # the model's rows are [conditional; unconditional] (see _condition_rows): guide, renormalise
        conditional, unconditional = log_probs.chunk(2)
        log_probs = torch.log_softmax(unconditional + options.guidance * (conditional - unconditional), -1)
    if options.temperature == 0:
        return log_probs.argmax(dim=-1)  # greedy
    filtered = filter_logits(log_probs, temperature=options.temperature, top_k=options.top_k,
                             top_p=options.top_p)
    return draw(filtered, uniforms)


def _recurrent_step(net, state, byte: torch.Tensor, t: torch.Tensor, token_offset: int, out: torch.Tensor,
                    uniforms: torch.Tensor, options: SamplingOptions) -> None:
    """One byte: step the twin with byte (B,) at token t + token_offset, draw out[:, t], advance t."""
    logits = net.step_at(byte, t + token_offset, state)  # (B, head_dim)
    drawn = next_byte(net, logits, uniforms.index_select(1, t).squeeze(1), options)  # (B,)
    out.index_copy_(1, t, drawn.unsqueeze(1))
    copies = byte.shape[0] // drawn.shape[0]
    byte.copy_(drawn if copies == 1 else drawn.repeat(copies))  # both halves read it under guidance
    t.add_(1)


COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager": the same tracing, no C++/Triton code generation


@functools.lru_cache(maxsize=None)
def _compiled_step():
    """_recurrent_step through torch.compile, built once: recompiles only for new shapes or options."""
    return torch.compile(_recurrent_step, backend=COMPILE_BACKEND, dynamic=False)


def _condition_rows(labels, captions, batch: int, guidance: float) -> tuple[dict, int]:
    """The model's keyword arguments for one batch and its rows per image: under guidance every image
    has a conditional row and, after all of those, an unconditional one."""
    if guidance == 1:
        return dict(labels=labels, captions=captions), 1
    drop = torch.cat([torch.zeros(batch, dtype=torch.bool), torch.ones(batch, dtype=torch.bool)])
    return dict(labels=None if labels is None else labels.repeat(2), drop_condition=drop,
                captions=None if captions is None else captions * 2), 2


def _generate_recurrent(net, out, start, condition, copies, uniforms, options, advance):
    """Fill out[:, start:] with the recurrent twin: prefill the prefix, then one step per byte.

    The step has no host sync and allocates nothing that outlives it, so on CUDA (for models whose
    recurrent twin is graph-safe) one step is captured in a CUDA graph and replayed for every byte:
    one launch per byte instead of a few hundred, which is what limits sampling at these model
    sizes. Elsewhere the same step runs eagerly, so CPU tests cover it.
    """
    batch, seq_len = out.shape
    state = net.init_state(batch * copies)
    prefix = out[:, :start].repeat(copies, 1) if start > 0 else None
    logits, state = net.prefill(state, prefix=prefix, **condition)
    out[:, start] = next_byte(net, logits, uniforms[:, start], options)  # (B,)
    advance(batch)
    count = seq_len - start - 1  # O(1) work per byte from here on, whatever the position
    byte = out[:, start].repeat(copies)  # (R,) the byte the next step reads
    t = torch.tensor([start + 1], device=out.device)  # index of the byte drawn next, (1,)
    # byte t - 1 sits at token position prefix_len + t
    step = functools.partial(_compiled_step() if options.compile else _recurrent_step,
                             net, state, byte, t, net.prefix_len, out, uniforms, options)
    if count == 0 or not (options.cuda_graph and out.is_cuda and net.graph_safe):
        for _ in range(count):
            step()
            advance(batch)
        return
    # Eager warm-up steps on a side stream (as torch.cuda.graph asks): real bytes, and they settle
    # cuBLAS workspaces and the allocator before capture.
    warmup = min(count, 2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
            advance(batch)
    torch.cuda.current_stream().wait_stream(side)
    if count == warmup:
        return
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records one step; runs nothing, so the state does not move
        step()
    for _ in range(count - warmup):
        graph.replay()
        advance(batch)


def _generate_parallel(net, out, start, condition, copies, uniforms, options, advance):
    """Fill out[:, start:] by re-running the whole prefix at every byte (O(L^2); for comparison)."""
    batch, seq_len = out.shape
    for t in range(start, seq_len):
        # logits[:, t] sees only bytes < t, so out[:, t] (not yet drawn) is an ignored placeholder
        logits = net(out[:, : t + 1].repeat(copies, 1), **condition)[:, t]  # (R, head_dim)
        out[:, t] = next_byte(net, logits, uniforms[:, t], options)
        advance(batch)


@torch.no_grad()
def generate_images(net: torch.nn.Module, n_images: int, options: SamplingOptions,
                    labels: Optional[torch.Tensor] = None, captions: Optional[list[str]] = None,
                    prefix: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, GenerationStats]:
    """Generate n_images sequences [n, L] in batches; prefix bytes [n, K] are kept as given."""
    if options.mode not in MODES:
        raise ValueError(f"mode {options.mode!r} must be one of {', '.join(MODES)}")
    if not options.guidance >= 0:
        raise ValueError(f"guidance={options.guidance!r} must be >= 0 (1: none, 0: unconditional)")
    if options.guidance != 1 and not (net.condition.uses_class or net.condition.uses_caption):
        raise ValueError(f"guidance={options.guidance:g} needs a class- or caption-conditioned model; this "
                         f"one has condition {net.config.condition!r}")
    seq_len = net.config.seq_len
    device = next(net.parameters()).device
    for name, given in (("labels", labels), ("captions", captions)):
        if given is not None and len(given) != n_images:
            raise ValueError(f"{name} has {len(given)} entries for {n_images} images")
    if prefix is not None and (prefix.dim() != 2 or prefix.shape[0] != n_images or prefix.shape[1] > seq_len):
        raise ValueError(f"prefix shape {tuple(prefix.shape)} does not fit {n_images} images of {seq_len} bytes")
    start = 0 if prefix is None else prefix.shape[1]
    if start == seq_len:  # nothing left to draw
        return net.check_bytes(prefix, "prefix").cpu().clone(), GenerationStats(n_images, 0, 0.0)
    was_training = net.training
    net.eval()  # no dropout, no condition dropout while sampling
    run = _generate_recurrent if options.mode == "recurrent" else _generate_parallel
    result = torch.empty(n_images, seq_len, dtype=torch.long)
    bar = tqdm(total=n_images * (seq_len - start), unit="B", unit_scale=True, desc="sampling",
               disable=not options.progress, leave=False)
    clock = _WarmUpClock(device, bar)
    began = time.perf_counter()
    try:
        for first in range(0, n_images, options.batch_size):
            rows = list(range(first, min(first + options.batch_size, n_images)))
            clock.start_batch(len(rows))
            out = torch.zeros(len(rows), seq_len, dtype=torch.long, device=device)  # (B, L)
            if prefix is not None:
                out[:, :start] = prefix[rows].to(device)
            batch_labels = None if labels is None else labels[rows].to(device)
            batch_captions = None if captions is None else [captions[i] for i in rows]
            uniforms = image_uniforms(options.seed, rows, seq_len).to(device)  # (B, L)
            condition, copies = _condition_rows(batch_labels, batch_captions, len(rows), options.guidance)
            # inference mode: no version counters or view tracking, about 9% less overhead per byte on
            # a CPU; `out` is copied into the ordinary `result` below, so callers get a normal tensor
            with torch.inference_mode(), autocast(device, options.precision):
                run(net, out, start, condition, copies, uniforms, options, clock.advance)
            result[rows] = out.cpu()
    finally:
        bar.close()
        net.train(was_training)
    return result, clock.stats(n_images, n_images * (seq_len - start), time.perf_counter() - began)
