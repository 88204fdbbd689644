"""The conditioning prefix: a class token and/or a caption's UTF-8 bytes, with a null condition."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

CAPTION_PAD = 256   # after the 256 byte values
CAPTION_NULL = 257  # every position of a dropped or absent caption


def check_range(values: torch.Tensor, upper: int, what: str) -> None:
    """Check integer values lie in [0, upper): on an accelerator asserted on the device (no host sync per
    training step; a bad value fails a later call there), on the host a ValueError."""
    if values.device.type != "cpu":
        torch._assert_async(((values >= 0) & (values < upper)).all(), f"{what} must be in [0, {upper})")
    elif values.numel() and (values.min() < 0 or values.max() >= upper):
        raise ValueError(f"{what} must be in [0, {upper}), got {values.min().item()}..{values.max().item()}")


def encode_captions(captions: Sequence[str], caption_len: int) -> torch.Tensor:
    """UTF-8 bytes of each caption padded to caption_len -> LongTensor [B, caption_len]."""
    out = torch.full((len(captions), caption_len), CAPTION_PAD, dtype=torch.long)
    for row, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"caption {row} must be a str, got {type(caption).__name__}")
        data = caption.encode("utf-8")
        if len(data) > caption_len:
            raise ValueError(f"caption {caption!r} is {len(data)} UTF-8 bytes, longer than "
                             f"caption_len={caption_len}")
        out[row, : len(data)] = torch.tensor(list(data), dtype=torch.long)
    return out


class ConditionEmbedding(nn.Module):
    """Embeds labels and captions into the prefix tokens (B, P, d_model) that precede the image.

    A missing condition (labels or captions None) is the "null" condition: class index n_classes,
    caption all CAPTION_NULL. In train mode each condition of each sample is replaced by the null
    one with probability condition_dropout, so one model samples with and without it. Labels or
    captions that the configured condition does not use are ignored.
    """

    def __init__(self, condition: str, d_model: int, n_classes: int, caption_len: int,
                 condition_dropout: float):
        super().__init__()
        self.condition, self.n_classes = condition, n_classes
        self.caption_len, self.condition_dropout = caption_len, condition_dropout
        self.uses_class = condition in ("class", "both")
        self.uses_caption = condition in ("caption", "both")
        if self.uses_class:
            self.class_embedding = nn.Embedding(n_classes + 1, d_model)  # last row: null class
        if self.uses_caption:
            self.caption_embedding = nn.Embedding(258, d_model)  # bytes, pad, null

    def _dropped(self, batch: int, device: torch.device, drop: Optional[torch.Tensor]) -> torch.Tensor:
        """Which samples lose this condition now: (B,) bool; condition dropout in train mode only,
        plus the rows `drop` asks for (the unconditional rows of classifier-free guidance)."""
        dropped = torch.zeros(batch, dtype=torch.bool, device=device)
        if self.training and self.condition_dropout > 0:
            dropped = torch.rand(batch, device=device) < self.condition_dropout
        if drop is not None:
            dropped = dropped | drop.to(device=device, dtype=torch.bool).reshape(batch)
        return dropped

    def forward(self, batch: int, labels: Optional[torch.Tensor], captions: Optional[Sequence[str]],
                device: torch.device, drop: Optional[torch.Tensor] = None
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The condition twice: prefix tokens (B, P, d_model) and one vector (B, d_model), the class
        embedding plus the mean of the caption's byte embeddings; (None, None) when unconditional.
        Rows where `drop` (B,) is true get the null condition."""
        parts, vectors = [], []
        if self.uses_class:
            if labels is None:
                classes = torch.full((batch,), self.n_classes, dtype=torch.long, device=device)
            else:
                classes = torch.as_tensor(labels).long().reshape(-1)
                if classes.shape[0] != batch:
                    raise ValueError(f"labels has {classes.shape[0]} entries for a batch of {batch}")
                check_range(classes, self.n_classes, "labels")
                classes = classes.to(device, non_blocking=True)  # a blocking copy would sync the stream
                classes = classes.masked_fill(self._dropped(batch, device, drop), self.n_classes)
            embedded = self.class_embedding(classes)  # (B, d)
            parts.append(embedded.unsqueeze(1))
            vectors.append(embedded)
        if self.uses_caption:
            if captions is None:
                tokens = torch.full((batch, self.caption_len), CAPTION_NULL, dtype=torch.long, device=device)
            else:
                if len(captions) != batch:
                    raise ValueError(f"captions has {len(captions)} entries for a batch of {batch}")
                tokens = encode_captions(captions, self.caption_len).to(device, non_blocking=True)
                tokens = tokens.masked_fill(self._dropped(batch, device, drop).unsqueeze(1), CAPTION_NULL)
            embedded = self.caption_embedding(tokens)  # (B, caption_len, d)
            parts.append(embedded)
            present = (tokens != CAPTION_PAD).unsqueeze(-1).to(embedded.dtype)  # (B, caption_len, 1)
            vectors.append((embedded * present).sum(1) / present.sum(1).clamp_min(1.0))  # (B, d)
        if not parts:
            return None, None
        return torch.cat(parts, dim=1), sum(vectors)
