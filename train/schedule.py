"""Learning rate as a plain function of the global step: linear warmup, then cosine decay."""

from __future__ import annotations

import math


def learning_rate(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup to base_lr, cosine to base_lr*min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1) so that the very first update already moves the weights.
        return base_lr * (step + 1) / warmup_steps
    min_lr = base_lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
