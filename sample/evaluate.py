"""Evaluate a trained model: exact bits/dim over a prepared split, and class agreement of its samples.

    lit-eval --checkpoint demo/run --data demo/data/digits
    lit-eval --checkpoint runs/mnist/export --data data/mnist --n-per-class 50 --json eval.json
    python -m sample.evaluate --checkpoint runs/mnist/checkpoints/step_0005000 --data data/mnist
    accelerate launch -m sample.evaluate --checkpoint runs/mnist --data data/mnist   (bits/dim on all ranks)

Bits/dim: the model's negative log-likelihood of every byte of every image of the split, summed in
float64 and divided by the number of bytes and ln 2 (each rank reads a disjoint share of the shards;
the totals are summed over ranks).
Class agreement (class-conditional models only): N samples per class from the project's sampler
(recurrent mode, temperature 1, no filters; the same images as `lit-sample --classes 0-K --n N
--seed S`), each classified by a small CNN; agreement is the share classified as the class asked for.
The CNN is trained on the train split once and cached in DATA/classifier/ with its test accuracy,
which is printed next to the score: agreement cannot be trusted beyond the classifier's accuracy.
Exit codes: 0 done, 1 failure (e.g. a corrupt checkpoint or shard), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from tqdm import tqdm

from common.exits import run_command
from common.files import atomic_file, check_writable, writable_message
from data_prep import DataError, eval_batches
from model import bits_per_dim
from model.generation import SamplingOptions, generate_images
from model.precision import autocast
from sample.classifier import ClassifierSettings, load_or_train, predict, sequences_to_tensor
from sample.errors import SampleFailure, SampleUsageError
from sample.loading import data_manifest, load_for_sampling
from sample.pipeline import pick_device
from sample.request import conditional_request
from sample.run import from_flags, set_threads, shared_flags


@dataclass
class EvalJob:
    """What to evaluate and how; the CLI fills it from flags, tests build it directly."""

    checkpoint: str
    data: str
    split: str = "test"
    n_per_class: int = 50
    batch_size: int = 64
    seed: int = 0
    guidance: float = 1.0
    device: Optional[str] = None
    precision: str = "auto"  # as lit-sample's --precision, for bits/dim and the samples
    classifier_steps: int = 1000
    classifier_dir: Optional[str] = None
    retrain_classifier: bool = False
    progress: bool = True


@dataclass
class Agreement:
    """Class agreement of samples: overall, per class, and what each class's samples were taken for."""

    n_per_class: int
    seed: int
    guidance: float
    overall: float
    per_class: list  # share of class c's samples classified as c
    confusion: list  # confusion[c][k]: samples asked as class c, classified as k
    classifier: dict  # path, test_accuracy, test_images, trained_now
    sample_seconds: float


@dataclass
class EvalResult:
    """Everything lit-eval reports (and writes to --json)."""

    model: str
    step: int
    data: str
    split: str
    images: int
    bytes: int
    bits_per_dim: float
    condition: str
    class_names: list = field(default_factory=list)
    agreement: Optional[Agreement] = None
    seconds: float = 0.0


def class_agreement(net, manifest, job: EvalJob, device, log=print) -> Agreement:
    """Sample n_per_class images of every class and measure how many the classifier names correctly."""
    n_classes = len(manifest.class_names)
    classifier, info, path, trained = load_or_train(job.data, ClassifierSettings(steps=job.classifier_steps), device,
                                                    job.classifier_dir, job.retrain_classifier, job.progress, log)
    request = conditional_request(list(range(n_classes)), None, job.n_per_class, n_classes)
    options = SamplingOptions(seed=job.seed, batch_size=job.batch_size, mode="recurrent",
                              progress=job.progress, guidance=job.guidance, precision=job.precision)
    seqs, stats = generate_images(net, request.n_images, options, labels=request.labels)  # (C * N, L)
    predicted = predict(classifier, sequences_to_tensor(seqs, manifest))  # (C * N,)
    confusion = torch.bincount(request.labels * n_classes + predicted, minlength=n_classes ** 2).view(n_classes, -1)
    per_class = (confusion.diagonal().double() / job.n_per_class).tolist()
    overall = confusion.diagonal().sum().item() / request.n_images
    return Agreement(job.n_per_class, job.seed, job.guidance, overall, per_class, confusion.tolist(),
                     dict(path=str(path), test_accuracy=info.test_accuracy, test_images=info.test_images,
                          trained_now=trained), stats.seconds)


def evaluate(job: EvalJob, log=print) -> Optional[EvalResult]:
    """Run the evaluation; the result on the main process, None on the others (a damaged shard: DataError)."""
    for flag, value, least in (("--n-per-class", job.n_per_class, 0), ("--batch-size", job.batch_size, 1),
                               ("--classifier-steps", job.classifier_steps, 1), ("--guidance", job.guidance, 0)):
        if not value >= least:  # a NaN guidance fails too
            raise SampleUsageError(f"{flag} {value}: must be >= {least}")
    began = time.perf_counter()
    state = PartialState(cpu=job.device == "cpu")  # one process, or each rank under accelerate launch
    device = pick_device(job.device) if job.device else state.device  # the sampler's checks: one line, exit 2
    loaded = load_for_sampling(job.checkpoint, device)
    manifest = data_manifest(loaded, job.data, job.split)
    net, condition = loaded.net, loaded.net.config.condition
    if net.condition.uses_class and net.config.n_classes != len(manifest.class_names):
        raise SampleUsageError(f"--data {job.data}: {len(manifest.class_names)} classes, the model has "
                               f"{net.config.n_classes}")
    batches = eval_batches(job.data, job.batch_size, split=job.split, rank=state.process_index,
                           world_size=state.num_processes)
    with autocast(device, job.precision):
        totals = net.nll_totals(tqdm(batches, desc=f"bits/dim ({job.split})", unit="batch", leave=False,
                                     disable=not (job.progress and state.is_main_process)))
    totals = reduce(totals, reduction="sum")  # every rank read a disjoint share of the shards
    nats, n_bytes, images = totals.tolist()
    if n_bytes == 0:
        raise SampleFailure(f"{job.data}: split {job.split!r} is empty; nothing to evaluate")
    if not state.is_main_process:
        return None  # sampling is keyed by position in one request: the main process draws them all
    result = EvalResult(str(loaded.source), loaded.step, str(job.data), job.split, int(images), int(n_bytes),
                        bits_per_dim(nats, n_bytes), condition, list(manifest.class_names))
    if net.condition.uses_class and job.n_per_class > 0:
        result.agreement = class_agreement(net, manifest, job, device, log)
    result.seconds = time.perf_counter() - began
    return result


def format_table(result: EvalResult) -> str:
    """The human-readable report."""
    lines = [f"model            {result.model} (step {result.step})",
             f"data             {result.data} split {result.split}: {result.images:,} images, "
             f"{result.bytes:,} bytes",
             f"bits/dim         {result.bits_per_dim:.4f}"]
    agreement = result.agreement
    if agreement is None:
        why = ("--n-per-class 0" if result.condition in ("class", "both")
               else f"not class-conditional (condition={result.condition})")
        lines.append(f"class agreement  -  ({why})")
    else:
        classifier = agreement.classifier
        lines.append(f"class agreement  {agreement.overall:.1%}  ({agreement.n_per_class} samples per class, "
                     f"seed {agreement.seed}, guidance {agreement.guidance:g}; classifier test accuracy "
                     f"{classifier['test_accuracy']:.1%} on {classifier['test_images']:,} images)")
        lines += ["", f"{'class':<16} {'agreement':>9}  most often taken for (count)"]
        for index, (name, share, row) in enumerate(zip(result.class_names, agreement.per_class,
                                                       agreement.confusion)):
            others = [(count, k) for k, count in enumerate(row) if k != index and count]
            count, k = max(others, default=(0, 0))  # the class most often named instead
            taken = f"{result.class_names[k]} ({count})" if others else ""
            lines.append(f"{index:>2} {name:<13} {share:>9.1%}  {taken}".rstrip())
    lines.append(f"took {result.seconds:.1f} s")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """lit-eval's flags, each with its help text."""
    parser = argparse.ArgumentParser(prog="lit-eval", description=__doc__.split("\n\n")[0], parents=[shared_flags()],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="the prepared folder (python -m data_prep.prepare) the model was trained on")
    parser.add_argument("--split", default="test", help="split for bits/dim (default %(default)s)")
    parser.add_argument("--n-per-class", type=int, default=50, metavar="N",
                        help="class-conditional models: samples per class for class agreement; 0 skips "
                             "it (default %(default)s)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON")
    parser.add_argument("--classifier-steps", type=int, default=1000,
                        help="training steps of the agreement classifier (default %(default)s); a cache "
                             "trained with other steps is retrained")
    parser.add_argument("--classifier-dir", default=None, metavar="DIR",
                        help="where to cache the classifier (default DATA/classifier)")
    parser.add_argument("--retrain-classifier", action="store_true", help="retrain even if a cache fits")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse flags, evaluate, print the table, write --json; returns the exit code."""
    args = build_parser().parse_args(argv)

    def work() -> None:
        set_threads(args.threads)
        if args.json and not Path(args.json).resolve().parent.is_dir():
            raise SampleUsageError(f"--json {args.json}: its folder does not exist")
        try:  # found now, not after the evaluation
            if args.json:
                check_writable(Path(args.json).resolve().parent)
        except OSError as err:
            raise SampleUsageError(writable_message("--json", args.json, err)) from None
        result = evaluate(from_flags(EvalJob, args, progress=not args.no_progress))
        if result is None:  # not the main process
            return
        print(format_table(result))
        if args.json:
            try:
                with atomic_file(args.json) as stream:  # a failed write keeps the earlier results
                    stream.write((json.dumps(asdict(result), indent=2) + "\n").encode())
            except OSError as err:
                raise SampleFailure(f"--json {args.json}: {err.strerror}") from None
            print(f"wrote: {args.json}")

    # a damaged shard (of bits/dim's split or of the classifier's data) is a failure, exit 1, as in lit-sample
    return run_command("lit-eval", work, failure=(DataError,))[1]


if __name__ == "__main__":
    sys.exit(main())
