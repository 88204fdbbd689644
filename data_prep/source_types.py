"""A source dataset as prepare reads it, whichever loader made it (sources, folders, imagenet)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np


@dataclass
class SourceSplit:
    """One split of a source dataset: uint8 images [N, H, W, C] and int64 labels [N] in memory, or a stream.

    captions: one per image from a captions file, None where the class-name templates should fill in
    (None for the whole split: templates for all).
    stream: for sources too large to hold (ImageNet, image folders), a function chunk_size -> iterator of
    (images, labels, captions or None) chunks of at most chunk_size images; images and labels are then
    None and `size` says how many images the stream will give (at most: unreadable files may be skipped).
    """

    images: np.ndarray | None
    labels: np.ndarray | None
    captions: list | None = None
    size: int | None = None
    stream: Callable[[int], Iterator[tuple]] | None = None

    def __len__(self) -> int:
        return len(self.labels) if self.stream is None else self.size

    def chunks(self, chunk_size: int) -> Iterator[tuple]:
        """(images, labels, captions or None) in chunks of at most chunk_size images, in split order."""
        if self.stream is not None:
            yield from self.stream(chunk_size)
            return
        for start in range(0, len(self.labels), chunk_size):
            stop = start + chunk_size
            yield (self.images[start:stop], self.labels[start:stop],
                   None if self.captions is None else self.captions[start:stop])


@dataclass
class Source:
    """A loaded source dataset."""

    name: str
    class_names: list[str]
    splits: dict[str, SourceSplit]
    info: dict = field(default_factory=dict)
