"""One sampling job, from checkpoint to files: what the CLI calls and what tests call directly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from common.files import check_writable, writable_message
from data_prep import read_samples, save_grid
from model.generation import GenerationStats, SamplingOptions, generate_images
from sample.errors import SampleFailure, SampleUsageError
from sample.grids import decode, save_npz, save_per_image
from sample.loading import LoadedModel, data_manifest, load_for_sampling
from sample.request import (SampleRequest, completion_request, conditional_request, parse_int_ranges,
                            unconditional_request)


@dataclass
class SampleJob:
    """Everything one run of the sampler needs (the CLI flags, parsed)."""

    checkpoint: str
    out: str
    n: Optional[int] = None
    columns: Optional[int] = None
    classes: Optional[str] = None  # '0-9', '1,3,5-7' or class names
    captions: Optional[list[str]] = None
    index: Optional[str] = None  # test-set indices for completion, '0-10'
    offset: Optional[int] = None
    data: Optional[str] = None
    split: str = "test"
    options: SamplingOptions = field(default_factory=SamplingOptions)
    device: Optional[str] = None
    padding: int = 2
    per_image: bool = False
    npz: bool = False


@dataclass
class SampleResult:
    """What a job produced."""

    sequences: torch.Tensor  # LongTensor [n, L]
    grid_path: Path
    grid_size: tuple[int, int]  # (height, width) in pixels
    stats: GenerationStats
    loaded: LoadedModel
    written: list[Path]


def pick_device(name: Optional[str]) -> torch.device:
    """The requested device, or cuda when present; a clear error for cuda on a machine without it."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SampleUsageError(f"--device {name}: no CUDA device on this machine (use --device cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SampleUsageError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SampleUsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_flags(job: SampleJob) -> None:
    """Reject sampling, grid and output flags that could only fail later, before loading anything."""
    options = job.options
    if options.temperature < 0:
        raise SampleUsageError(f"--temperature {options.temperature}: must be >= 0 (0 = greedy)")
    if options.top_k is not None and options.top_k < 1:
        raise SampleUsageError(f"--top-k {options.top_k}: must be >= 1")
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise SampleUsageError(f"--top-p {options.top_p}: must be in (0, 1]")
    if options.batch_size < 1:
        raise SampleUsageError(f"--batch-size {options.batch_size}: must be >= 1")
    if not options.guidance >= 0:
        raise SampleUsageError(f"--guidance {options.guidance}: must be >= 0 (1 = none, 0 = unconditional)")
    if job.padding < 0:
        raise SampleUsageError(f"--padding {job.padding}: must be >= 0")
    if job.columns is not None and job.columns < 1:
        raise SampleUsageError(f"--columns {job.columns}: must be >= 1")
    out = Path(job.out)
    if out.suffix.lower() != ".png":
        raise SampleUsageError(f"--out {out}: must name a .png file")
    if out.is_dir():
        raise SampleUsageError(f"--out {out}: is a folder; name the grid's .png file")
    if job.per_image and out.with_suffix("").exists() and not out.with_suffix("").is_dir():
        raise SampleUsageError(f"--per-image: {out.with_suffix('')} exists and is not a folder")
    try:  # found now, not after the images are drawn
        check_writable(out.parent)
    except OSError as err:
        raise SampleUsageError(writable_message("--out", out, err)) from None


def _completion(job: SampleJob, loaded: LoadedModel) -> SampleRequest:
    """Read the real test images named by --index and ask for completions of their first K bytes."""
    if job.offset is None:
        raise SampleUsageError("--index needs --offset K (how many bytes of each real image to keep)")
    if job.data is None:
        raise SampleUsageError("--index needs --data DIR, the prepared folder to take the real images "
                               "from (a model export records the image format, not the data path)")
    if job.classes is not None or job.captions is not None:
        raise SampleUsageError("--index completes real images under their own label and caption; "
                               "drop --classes / --caption")
    indices = parse_int_ranges(job.index, "--index")
    total = data_manifest(loaded, job.data, job.split).splits[job.split].total
    wrong = [index for index in indices if not 0 <= index < total]
    if wrong:
        raise SampleUsageError(f"--index {wrong[0]}: out of range for split {job.split!r} of {job.data} (0..{total - 1})")
    batch = read_samples(job.data, indices, split=job.split)  # a damaged shard: DataError, exit 1 (run.main)
    labels = batch.labels if loaded.net.condition.uses_class else None
    captions = list(batch.captions) if loaded.net.condition.uses_caption else None
    return completion_request(batch.seqs, labels, captions, indices, job.offset, job.n)


def build_request(job: SampleJob, loaded: LoadedModel) -> SampleRequest:
    """Check the conditioning flags against the model and lay out what to generate."""
    config, condition = loaded.net.config, loaded.net.condition
    if job.n is not None and job.n < 1:
        raise SampleUsageError(f"--n {job.n}: must be >= 1")
    if job.offset is not None and job.index is None:
        raise SampleUsageError("--offset applies to completion: give --index too")
    if job.options.guidance != 1 and config.condition == "none":
        raise SampleUsageError(f"--guidance {job.options.guidance:g}: the model is unconditional "
                               "(guidance needs model.condition class, caption or both)")
    if job.index is not None:
        return _completion(job, loaded)
    if job.classes is not None and not condition.uses_class:
        raise SampleUsageError(f"--classes: this model is not class-conditional (condition={config.condition!r})")
    if job.captions is not None and not condition.uses_caption:
        raise SampleUsageError(f"--caption: this model is not caption-conditional (condition={config.condition!r})")
    for caption in job.captions or []:
        if len(caption.encode("utf-8")) > config.caption_len:
            raise SampleUsageError(f"--caption {caption!r} is {len(caption.encode('utf-8'))} bytes of UTF-8; "
                                   f"this model takes at most {config.caption_len}")
    if job.classes is None and job.captions is None:
        return unconditional_request(job.n, job.columns)
    classes = None if job.classes is None else \
        parse_int_ranges(job.classes, "--classes", loaded.image.get("class_names") or ())
    return conditional_request(classes, job.captions, job.n, config.n_classes)


def _grid_rows(request: SampleRequest, seqs: torch.Tensor, bins: int) -> tuple[torch.Tensor, int]:
    """The grid's sequences and columns: for completions, rows of [real, kept prefix (rest grey), completions...]."""
    if request.real is None:
        return seqs, request.columns
    rows, seq_len = request.real.shape
    per_row = request.n_images // rows
    offset = request.prefix.shape[1]
    shown = torch.full_like(request.real, bins // 2)  # unknown bytes drawn as mid grey
    shown[:, :offset] = request.real[:, :offset]
    completions = seqs.view(rows, per_row, seq_len)
    table = torch.cat([request.real[:, None], shown[:, None], completions], dim=1)  # (rows, 2+n, L)
    return table.reshape(-1, seq_len), per_row + 2


def run_job(job: SampleJob) -> SampleResult:
    """Load, generate and write the grid (plus per-image PNGs and .npz on request)."""
    check_flags(job)
    out = Path(job.out)
    device = pick_device(job.device)
    loaded = load_for_sampling(job.checkpoint, device, job.options.backend)
    request = build_request(job, loaded)
    try:
        seqs, stats = generate_images(loaded.net, request.n_images, job.options, labels=request.labels,
                                      captions=request.captions, prefix=request.prefix)
    except ValueError as err:  # the model rejects an input the checks above did not foresee
        raise SampleFailure(f"{loaded.source}: {err}") from None
    grid_seqs, columns = _grid_rows(request, seqs, loaded.image["bins"])
    try:  # a full disk or a folder removed meanwhile: one line, the files written so far stay whole
        grid_size = save_grid(decode(grid_seqs, loaded.image), out, columns, job.padding)
        written = [out]
        if job.per_image:
            folder = out.with_suffix("")
            save_per_image(decode(seqs, loaded.image), folder, request.names)
            if request.real is not None:
                save_per_image(decode(request.real, loaded.image), folder, request.real_names)
            written.append(folder)
        if job.npz:
            npz_path = out.with_suffix(".npz")
            save_npz(npz_path, seqs, loaded.image, request.labels, request.captions, request.names)
            written.append(npz_path)
    except OSError as err:
        raise SampleFailure(writable_message("--out", out, err)) from None
    return SampleResult(seqs, out, grid_size, stats, loaded, written)
