"""Turn --classes / --caption / --index values into the list of images to generate and their layout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from sample.errors import SampleUsageError

DEFAULT_UNCONDITIONAL = 16  # images in an unconditional grid when --n is not given
DEFAULT_PER_ROW = 10  # images per class / per caption / per completed image when --n is not given


def parse_int_ranges(text: str, flag: str, names: Sequence[str] = ()) -> list[int]:
    """Parse '0-9', '1,3,5-7' or class names ('cat,dog') into a list of ints, in the order given."""
    values: list[int] = []
    lookup = {name.lower(): i for i, name in enumerate(names)}
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise SampleUsageError(f"{flag} {text!r}: empty item (expected e.g. 0-9 or 1,3,5-7)")
        if part.lower() in lookup:
            values.append(lookup[part.lower()])
            continue
        low, sep, high = part.partition("-")
        try:
            start = int(low)
            stop = int(high) if sep else start
        except ValueError:
            known = f" or one of {', '.join(names)}" if names else ""
            raise SampleUsageError(
                f"{flag} {text!r}: {part!r} is not an integer or range A-B{known}") from None
        if stop < start:
            raise SampleUsageError(f"{flag} {text!r}: range {part!r} ends before it starts")
        values.extend(range(start, stop + 1))  # inclusive, like 0-9 meaning ten digits
    return values


@dataclass
class SampleRequest:
    """What to generate: one entry per image, plus how the grid lays them out."""

    n_images: int
    columns: int
    labels: Optional[torch.Tensor] = None  # LongTensor [n] or None (null condition)
    captions: Optional[list[str]] = None  # n strings or None
    prefix: Optional[torch.Tensor] = None  # LongTensor [n, K] kept bytes (completion) or None
    names: list[str] = field(default_factory=list)  # file stem per image for --per-image
    # completion only: the real sequences [rows, L] shown in the first column of each row
    real: Optional[torch.Tensor] = None
    real_names: list[str] = field(default_factory=list)


def unconditional_request(n: Optional[int], columns: Optional[int]) -> SampleRequest:
    """n images with the null condition, laid out in a near-square grid."""
    n = DEFAULT_UNCONDITIONAL if n is None else n
    columns = columns or math.ceil(math.sqrt(n))
    return SampleRequest(n_images=n, columns=columns, names=[f"{i:04d}" for i in range(n)])


def conditional_request(classes: Optional[list[int]], captions: Optional[list[str]],
                        n_per_row: Optional[int], n_classes: int) -> SampleRequest:
    """One grid row per class (each with the caption, if one) or per caption; n_per_row images each."""
    n_per_row = DEFAULT_PER_ROW if n_per_row is None else n_per_row
    labels, rows = None, [f"caption{r}" for r in range(len(captions or []))]
    if classes is not None:
        for label in classes:
            if not 0 <= label < n_classes:
                raise SampleUsageError(
                    f"--classes: class {label} is outside this model's classes 0-{n_classes - 1}")
        if captions is not None and len(captions) > 1:
            raise SampleUsageError("--caption may be given once together with --classes")
        labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n_per_row)  # (rows * n,)
        captions = None if captions is None else captions * len(classes)  # the one caption on every row
        rows = [f"class{c}" for c in classes]
    row_captions = None if captions is None else [c for c in captions for _ in range(n_per_row)]
    names = [f"{row}_{j:03d}" for row in rows for j in range(n_per_row)]
    return SampleRequest(n_images=len(names), columns=n_per_row, labels=labels, captions=row_captions, names=names)


def completion_request(real: torch.Tensor, labels: Optional[torch.Tensor],
                       captions: Optional[list[str]], indices: list[int], offset: int,
                       n_per_row: Optional[int]) -> SampleRequest:
    """n_per_row completions of each real sequence [rows, L] from its first `offset` bytes."""
    n_per_row = DEFAULT_PER_ROW if n_per_row is None else n_per_row
    seq_len = real.shape[1]
    if not 0 <= offset < seq_len:
        raise SampleUsageError(
            f"--offset {offset}: must be in 0..{seq_len - 1} (the sequence has {seq_len} bytes)")
    prefix = real[:, :offset].long().repeat_interleave(n_per_row, dim=0)  # (rows * n, K)
    rep_labels = None if labels is None else labels.long().repeat_interleave(n_per_row)
    rep_captions = None if captions is None else [c for c in captions for _ in range(n_per_row)]
    names = [f"index{i}_completion{j:03d}" for i in indices for j in range(n_per_row)]
    return SampleRequest(n_images=len(indices) * n_per_row, columns=n_per_row, labels=rep_labels,
                         captions=rep_captions, prefix=prefix, names=names, real=real.long(),
                         real_names=[f"index{i}_real" for i in indices])
