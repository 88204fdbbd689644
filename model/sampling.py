"""Logit filters: temperature, top-k, top-p (model.generation draws from what they leave)."""

from __future__ import annotations

from typing import Optional

import torch


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of the last dimension; the others become -inf."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k={k!r} must be an integer >= 1")
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely values whose probability reaches p (nucleus sampling)."""
    if not 0 < p <= 1:
        raise ValueError(f"top_p={p!r} must be in (0, 1]")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # drop a value when the values strictly more likely than it already reach p; the first stays
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Temperature (lower is greedier), then top-k, then top-p, on logits or log-probabilities (..., V)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (0, greedy, is handled by the caller)")
    if temperature != 1:  # 1: no op at all (this runs once per byte)
        logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits
