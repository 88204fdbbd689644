"""This project against the paper's reference implementation, fast-transformers, on the CPU.

    python bench/peer.py                      # L=784 batch 8 and L=3072 batch 32, 2 threads
    python bench/peer.py --sizes 784x8 --threads 2 --repeats 2

Same model size on both sides (4 layers, 4 heads x 32, feed-forward 512, categorical head over 256
values, random weights and bytes, fp32): fast-transformers' TransformerEncoderBuilder for the
training step (forward, cross-entropy, backward) and RecurrentEncoderBuilder for sampling (one
recurrent step per byte, torch.multinomial), against ImageTransformer's nll + backward and
model.generation (the project's recurrent sampler: inverse-CDF draw from per-image streams), eager
and with --compile (torch.compile's C++ kernels for the step; its one-off build is reported, not timed).
Each figure is the best of --repeats rounds after one warm-up, both sides in this one process, the
rounds alternating between the sides. Ratio =
ours / theirs (below 1: we are faster). fast-transformers comes from
scripts/install_fast_transformers.sh; without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from model import ImageTransformer, ModelConfig  # noqa: E402
from model.generation import SamplingOptions, generate_images  # noqa: E402

LAYERS, HEADS, D_HEAD, D_FF, BINS = 4, 4, 32, 512, 256


class ReferenceModel(nn.Module):
    """fast-transformers' encoders with the same embedding, positions and head as ours."""

    def __init__(self, seq_len: int):
        super().__init__()
        from fast_transformers.builders import RecurrentEncoderBuilder, TransformerEncoderBuilder

        d_model = HEADS * D_HEAD
        sizes = dict(n_layers=LAYERS, n_heads=HEADS, query_dimensions=D_HEAD, value_dimensions=D_HEAD,
                     feed_forward_dimensions=D_FF, attention_type="causal-linear", activation="gelu")
        self.embedding = nn.Embedding(BINS + 1, d_model)
        self.positions = nn.Embedding(seq_len, d_model)
        self.encoder = TransformerEncoderBuilder.from_kwargs(**sizes).get()
        self.recurrent = RecurrentEncoderBuilder.from_kwargs(**sizes).get()
        self.recurrent.load_state_dict(self.encoder.state_dict())  # same weights, as the library intends
        self.head = nn.Linear(d_model, BINS)

    def loss(self, seq: torch.Tensor) -> torch.Tensor:
        from fast_transformers.masking import TriangularCausalMask

        begin = torch.full((seq.shape[0], 1), BINS, dtype=torch.long)
        tokens = torch.cat([begin, seq[:, :-1]], 1)  # (B, L)
        x = self.embedding(tokens) + self.positions.weight[: seq.shape[1]]
        hidden = self.encoder(x, attn_mask=TriangularCausalMask(seq.shape[1]))
        return F.cross_entropy(self.head(hidden).flatten(0, 1), seq.flatten())

    @torch.no_grad()
    def sample(self, batch: int, seq_len: int) -> torch.Tensor:
        out = torch.empty(batch, seq_len, dtype=torch.long)
        byte, state = torch.full((batch,), BINS, dtype=torch.long), None
        for t in range(seq_len):
            x = self.embedding(byte) + self.positions.weight[t]
            hidden, state = self.recurrent(x, state=state)
            byte = torch.multinomial(torch.softmax(self.head(hidden), -1), 1).squeeze(-1)
            out[:, t] = byte
        return out


def ours(seq_len: int) -> ImageTransformer:
    config = ModelConfig(bins=BINS, seq_len=seq_len, n_layers=LAYERS, n_heads=HEADS, d_query=D_HEAD,
                         d_ff=D_FF, head="categorical", condition="none")
    return ImageTransformer(config, backend="torch")


def best_times(functions: dict, repeats: int) -> dict:
    """Best wall time of each function over `repeats` rounds, after one warm-up call each (its time
    also returned, as "NAME warm-up"). The rounds interleave the functions, so a slow spell of a
    shared machine slows every side alike instead of one."""
    times = {name: [] for name in functions}
    warmups = {}
    for name, function in functions.items():
        began = time.perf_counter()
        function()
        warmups[f"{name} warm-up"] = time.perf_counter() - began
    for _ in range(repeats):
        for name, function in functions.items():
            began = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - began)
    return {**{name: min(values) for name, values in times.items()}, **warmups}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sizes", default="784x8,3072x32", help="comma-separated LENGTHxBATCH")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per figure (best is kept)")
    parser.add_argument("--only", choices=["train", "sample"], default=None, help="one of the two figures")
    args = parser.parse_args(argv)
    try:
        import fast_transformers.builders  # noqa: F401
    except Exception as error:  # not installed, or a broken build
        print(f"fast-transformers is not importable here ({type(error).__name__}: {error}); install it with "
              "scripts/install_fast_transformers.sh. Nothing to compare.")
        return 0
    torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; {LAYERS} layers, {HEADS} heads x "
          f"{D_HEAD}, feed-forward {D_FF}, categorical head; best of {args.repeats} after a warm-up")
    rows = []
    for size in args.sizes.split(","):
        seq_len, batch = (int(part) for part in size.split("x"))
        torch.manual_seed(0)
        net, reference = ours(seq_len), ReferenceModel(seq_len)
        seq = torch.randint(0, BINS, (batch, seq_len))
        if args.only in (None, "train"):
            def train_ours():
                net.zero_grad(set_to_none=True)
                net.nll(seq).mean().backward()

            def train_reference():
                reference.zero_grad(set_to_none=True)
                reference.loss(seq).backward()

            best = best_times({"ours": train_ours, "theirs": train_reference}, args.repeats)
            rows.append((f"training step (fwd + bwd), L={seq_len}, batch {batch}", best["ours"], best["theirs"]))
        if args.only in (None, "sample"):
            net.eval()
            eager = SamplingOptions(batch_size=batch, progress=False)
            compiled = SamplingOptions(batch_size=batch, progress=False, compile=True)
            best = best_times({"theirs": lambda: reference.sample(batch, seq_len),
                               "eager": lambda: generate_images(net, batch, eager),
                               "compiled": lambda: generate_images(net, batch, compiled)}, args.repeats)
            name = f"sample {batch} images x {seq_len} bytes, recurrent"
            rows.append((name, best["eager"], best["theirs"]))
            # the compiled step's warm-up call also builds it (once per process and shape)
            rows.append((f"{name}, --compile (first call {best['compiled warm-up']:.0f} s)", best["compiled"],
                         best["theirs"]))
            net.train()
        print(f"  {size} done", flush=True)
    print()
    print("| | this project s | fast-transformers s | ratio |")
    print("|---|---:|---:|---:|")
    for name, mine, theirs in rows:
        print(f"| {name} | {mine:.3f} | {theirs:.3f} | {mine / theirs:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
