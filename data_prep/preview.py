"""preview.png: a 10 x 10 grid of prepared samples, decoded from their byte sequences."""

from __future__ import annotations

import numpy as np

from data_prep.codec import decode_sequences


def pick_preview(labels: np.ndarray, n_classes: int, per_class: int = 10, total: int = 100) -> np.ndarray:
    """Indices for the grid: one row per class (first `per_class` of each) when every class has enough
    samples and there are 10 classes, else simply the first `total`."""
    rows = [np.flatnonzero(labels == c)[:per_class] for c in range(n_classes)]
    if n_classes * per_class == total and all(len(r) == per_class for r in rows):
        return np.concatenate(rows)
    return np.arange(min(total, len(labels)))


class PreviewSamples:
    """Keeps, from a split streamed in chunks, the few samples pick_preview can choose: the first `total`
    and the first `per_class` of each class (all that it looks at), in stream order."""

    def __init__(self, n_classes: int, per_class: int = 10, total: int = 100):
        self.n_classes, self.per_class, self.total = n_classes, per_class, total
        self.per_class_seen = np.zeros(n_classes, dtype=np.int64)
        self.seen = 0
        self.seqs: list[np.ndarray] = []
        self.labels: list[int] = []

    def add(self, seqs: np.ndarray, labels: np.ndarray) -> None:
        """Look at the next chunk of the split."""
        by_class = self.n_classes * self.per_class == self.total
        for index, label in enumerate(labels.tolist()):
            keep = self.seen < self.total
            if by_class and 0 <= label < self.n_classes:
                keep = keep or self.per_class_seen[label] < self.per_class
                self.per_class_seen[label] += 1
            if keep:
                self.seqs.append(np.array(seqs[index]))  # a copy: the chunk itself is let go
                self.labels.append(label)
            self.seen += 1

    def write(self, path: str, height: int, width: int, channels: int, bins: int, order: str) -> None:
        """Decode the 100 chosen sequences (what the model will see, after quantization) into preview.png."""
        chosen = pick_preview(np.asarray(self.labels, dtype=np.int64), self.n_classes, self.per_class, self.total)
        images = decode_sequences(np.stack(self.seqs)[chosen], height, width, channels, bins, order)
        # Imported here: the grid writer needs torch, which prepare otherwise loads only for sources read through
        # torchvision; imported after the training split is written, it does not add to the peak of writing it.
        from data_prep.grids import save_grid

        save_grid(images, path, columns=10, scale=2)
