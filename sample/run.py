"""Sample images from a trained model: unconditional, per class, per caption, or completions.

    python sample/run.py --checkpoint runs/mnist --out samples.png --n 64
    python sample/run.py --checkpoint runs/mnist/export --out digits.png --classes 0-9 --n 10
    python sample/run.py --checkpoint runs/mnist/checkpoints/step_0005000 --out seven.png \\
        --caption "a handwritten seven"
    python sample/run.py --checkpoint runs/mnist --out completions.png --data data/mnist \\
        --index 0-9 --offset 392 --n 4
    lit-sample ...   (the same, installed as a console script)

Exit codes: 0 done, 1 failure (e.g. a corrupt checkpoint), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from typing import Optional, Sequence

if __package__ in (None, ""):
    # `python sample/run.py` puts sample/ first on sys.path; the packages live one level up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.exits import run_command  # noqa: E402
from data_prep import DataError  # noqa: E402
from sample.errors import SampleUsageError  # noqa: E402
from model.attention_ops import BACKEND_NAMES  # noqa: E402
from model.generation import MODES, SamplingOptions  # noqa: E402
from model.precision import PRECISIONS, sampling_precision  # noqa: E402


def shared_flags() -> argparse.ArgumentParser:
    """The flags lit-sample and lit-eval share, defined once for both (argparse parents=)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--checkpoint", required=True, metavar="RUN_OR_CHECKPOINT",
                        help="a model folder (RUN/export: model.safetensors + config.json), a "
                             "checkpoints/step_N folder (its model/), or a run folder (its export if at "
                             "least as new, else its newest complete checkpoint)")
    shared.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images; default %(default)s)")
    shared.add_argument("--guidance", type=float, default=1.0,
                        help="classifier-free guidance scale S for class/caption models: log p = "
                             "log p(x|none) + S (log p(x|condition) - log p(x|none)), before lit-sample's "
                             "temperature, top-k and top-p. 1 = none (default), > 1 follows the condition more "
                             "closely, 0 ignores it. Costs a second (unconditional) row per image in the same batch")
    shared.add_argument("--batch-size", type=int, default=64,
                        help="images generated (or, for bits/dim, scored) together (default %(default)s)")
    shared.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu; under accelerate "
                             "launch each rank's own)")
    shared.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 where the device computes it natively (a GPU, a CPU with AVX512-BF16 "
                             "or AMX), like train.mixed_precision auto; the recurrent state stays fp32 "
                             "(default %(default)s)")
    shared.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 on CPU: one step's matrices are small, and "
                             "several threads stall each other badly when the cores are shared, e.g. with "
                             "a data loader; on a busy 2-core machine 2 threads ran 10-50x slower)")
    shared.add_argument("--no-progress", action="store_true", help="no progress bars")
    return shared


def build_parser() -> argparse.ArgumentParser:
    """The sampler's flags, each with its help text."""
    parser = argparse.ArgumentParser(
        prog="lit-sample", description=__doc__.split("\n\n")[0], parents=[shared_flags()],
        epilog="Same --seed, same images: each image draws from its own random stream keyed by "
               "(seed, its position in the request), so batch size and --mode do not change them.")
    what = parser.add_argument_group("output")
    what.add_argument("--out", required=True, metavar="FILE.png", help="the grid PNG to write")
    what.add_argument("--per-image", action="store_true",
                      help="also write one PNG per image into a folder named after --out without .png")
    what.add_argument("--npz", action="store_true",
                      help="also write the raw bytes (uint8 [N, L]) with labels and captions to "
                           "--out with .npz instead of .png")
    what.add_argument("--columns", type=int, default=None,
                      help="images per grid row for unconditional samples (default: a near-square grid)")
    what.add_argument("--padding", type=int, default=2, help="pixels between grid cells (default %(default)s)")
    cond = parser.add_argument_group("what to generate")
    cond.add_argument("--n", type=int, default=None,
                      help="unconditional: number of images (default 16); with --classes or --caption: "
                           "images PER class or caption, one grid row each (default 10); with --index: "
                           "completions per real image (default 10)")
    cond.add_argument("--classes", metavar="LIST", default=None,
                      help="class-conditional: one grid row per class, e.g. 0-9, 1,3,5-7 or class names "
                           "(ranges include both ends); needs a model trained with condition class/both")
    cond.add_argument("--caption", metavar="TEXT", action="append", default=None,
                      help="caption-conditional; repeat for one grid row per caption, or combine once "
                           "with --classes; needs a model trained with condition caption/both")
    cond.add_argument("--index", metavar="A-B", default=None,
                      help="completion: take these images of the --split of --data (ranges include both "
                           "ends), keep their first --offset bytes and generate the rest; each grid row "
                           "is [real image, kept part (rest grey), completions...]")
    cond.add_argument("--offset", type=int, default=None, metavar="K",
                      help="completion: bytes of each real image to keep (0 <= K < sequence length)")
    cond.add_argument("--data", metavar="DIR", default=None,
                      help="prepared data folder for --index (an export records the image format, "
                           "not where the data is)")
    cond.add_argument("--split", default="test", choices=("test", "train"), help="split for --index (default %(default)s)")
    how = parser.add_argument_group("sampling")
    how.add_argument("--temperature", type=float, default=1.0,
                     help="divide log-probabilities by this; lower is more conservative, 0 is greedy. At 1 "
                          "without top-k, top-p or guidance a logistic-mixture model draws from its mixture "
                          "directly (the same distribution, fast at large batches) (default %(default)s)")
    how.add_argument("--top-k", type=int, default=None, help="keep only the K most likely byte values")
    how.add_argument("--top-p", type=float, default=None,
                     help="keep the smallest set of byte values whose probability reaches P (nucleus)")
    how.add_argument("--mode", choices=MODES, default="recurrent",
                     help="recurrent: the RNN twin, O(1) work per byte; parallel: re-run the whole "
                          "prefix at every byte, O(L^2), only to compare speed and results (default %(default)s)")
    how.add_argument("--backend", choices=BACKEND_NAMES, default="auto",
                     help="attention kernels of the prefill and --mode parallel: auto is fla's on CUDA "
                          "where installed, else torch (default %(default)s)")
    how.add_argument("--compile", action="store_true",
                     help="recurrent mode: fuse each step's kernels with torch.compile (a one-off "
                          "compilation per batch size: ~15 s on a GPU, then 1.5-1.8x the images/s on an "
                          "H200; 5-13 s on a 2-core CPU, then about 2x; worth it for a few hundred images "
                          "or more). Bytes may differ from the uncompiled run where fused arithmetic "
                          "rounds differently")
    how.add_argument("--no-cuda-graph", action="store_true",
                     help="recurrent mode on CUDA: launch each step's kernels one by one instead of "
                          "replaying one captured CUDA graph per byte (4-5x slower; for debugging)")
    return parser


def from_flags(cls, args: argparse.Namespace, **others):
    """A dataclass whose every field not in `others` is the flag of the same name (lit-sample's, lit-eval's jobs)."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in others}, **others)


def set_threads(threads: Optional[int]) -> None:
    """torch's CPU threads from the shared --threads flag (default 1: see its help), checked first."""
    import torch

    if threads is not None and threads < 1:
        raise SampleUsageError(f"--threads {threads}: must be >= 1")
    torch.set_num_threads(threads or 1)  # GPU runs need no intra-op CPU threads either


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, run the job, print where the files are and the speed; returns the exit code."""
    args = build_parser().parse_args(argv)
    from sample.pipeline import SampleJob, run_job

    def work():
        set_threads(args.threads)
        options = from_flags(SamplingOptions, args, progress=not args.no_progress, cuda_graph=not args.no_cuda_graph)
        return run_job(from_flags(SampleJob, args, captions=args.caption, options=options))

    # a damaged shard (--index's real images) is a failure, exit 1, as in lit-eval
    result, code = run_command("lit-sample", work, failure=(DataError,))
    if code:
        return code
    stats, loaded = result.stats, result.loaded
    print(f"model: {loaded.source} (step {loaded.step})")
    height, width = result.grid_size
    print(f"grid: {result.grid_path} ({width}x{height} px)")
    for path in result.written[1:]:
        print(f"wrote: {path}")
    steady, device = max(stats.seconds - stats.warm_up_seconds, 1e-9), next(loaded.net.parameters()).device
    print(f"{stats.images} images, {stats.bytes_generated} bytes in {stats.seconds:.2f} s = warm-up "
          f"{stats.warm_up_seconds:.2f} s (compilation, autotuning, graph capture, first bytes) + {steady:.2f} s at "
          f"{stats.images_per_s:.2f} images/s, {stats.bytes_generated / steady:,.0f} bytes/s "
          f"({args.mode}, {device}, batch {args.batch_size}, {sampling_precision(args.precision, device)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
