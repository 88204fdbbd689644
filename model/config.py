"""ModelConfig: every hyperparameter of ImageTransformer, validated, round-tripping through a dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from model.attention_ops import KINDS

HEADS = ("categorical", "logistic-mixture")
CONDITIONS = ("none", "class", "caption", "both")
# How the condition reaches the image beyond its prefix tokens: "prefix" not at all; "input" added
# to every position's input embedding; "blocks" added to the residual stream before every block,
# through a learned projection per block; "film" also scales and shifts both normalised inputs of
# every block (FiLM / adaptive LayerNorm). film was measured best on the demo (bench/RESULTS.md).
CONDITION_INJECTIONS = ("prefix", "input", "blocks", "film")


@dataclass
class ModelConfig:
    """Hyperparameters of ImageTransformer; the `model.*` config keys plus bins/seq_len/n_classes."""

    bins: int = 256
    seq_len: int = 784
    n_layers: int = 8
    n_heads: int = 8
    d_query: int = 32
    d_value: Optional[int] = None  # None means d_query; resolved in __post_init__
    d_ff: int = 1024
    dropout: float = 0.0
    attention: str = "causal-linear"  # one of model.attention_ops.KINDS
    head: str = "categorical"
    mixtures: int = 10
    condition: str = "none"
    n_classes: int = 10
    caption_len: int = 48
    condition_dropout: float = 0.1
    condition_inject: str = "film"
    # Width in bytes of a causal depthwise convolution over the byte embeddings (0: none): every
    # position then sees its last conv_kernel bytes directly, e.g. the byte above it when the kernel
    # spans an image row, which positive-feature linear attention cannot single out.
    conv_kernel: int = 0
    # Bytes per image row (width x channels in raster order; 0: none): each byte's position also gets
    # a learned row and column embedding, shared across rows and columns, so the model need not learn
    # the image's 2-D layout one absolute position at a time. "auto" (the trainer's default) is the
    # data's own row, which the trainer resolves from the manifest before it builds the model.
    row_len: Union[int, str] = 0

    def __post_init__(self) -> None:
        """Resolve d_value and validate every field: a ValueError naming the first bad key."""
        if self.d_value is None:
            self.d_value = self.d_query

        def fail(name: str, why: str) -> None:
            raise ValueError(f"model.{name}={getattr(self, name)!r} {why}")

        int_minimums = {"bins": 2, "seq_len": 1, "n_layers": 1, "n_heads": 1, "d_query": 1,
                        "d_value": 1, "d_ff": 1, "mixtures": 1, "n_classes": 1,
                        "caption_len": 1, "conv_kernel": 0, **({} if self.row_len == "auto" else {"row_len": 0})}
        for name, minimum in int_minimums.items():
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is a typo, not a number
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
            if value < minimum:
                fail(name, f"must be >= {minimum}")
        for name in ("dropout", "condition_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                fail(name, "must be a number")
            if not 0.0 <= value <= 1.0:
                fail(name, "must be in [0, 1]")
            setattr(self, name, float(value))
        for name, choices in (("attention", KINDS), ("head", HEADS),
                              ("condition", CONDITIONS), ("condition_inject", CONDITION_INJECTIONS)):
            if getattr(self, name) not in choices:
                fail(name, f"must be one of {', '.join(choices)}")
        if self.dropout >= 1.0:
            fail("dropout", "must be < 1")

    @property
    def d_model(self) -> int:
        """Width of the residual stream: n_heads * d_query."""
        return self.n_heads * self.d_query

    @property
    def head_dim(self) -> int:
        """Size of the last dimension of the logits: bins, or 3 * mixtures for the logistic mixture."""
        return self.bins if self.head == "categorical" else 3 * self.mixtures

    @property
    def prefix_len(self) -> int:
        """Number of conditioning tokens in front of the begin token."""
        return {"none": 0, "class": 1, "caption": self.caption_len, "both": 1 + self.caption_len}[
            self.condition]

    @classmethod
    def from_dict(cls, values: Any) -> "ModelConfig":
        """Build from a plain dict; unknown keys or bad values raise ValueError naming the key."""
        if not isinstance(values, dict):
            raise ValueError(f"model config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        # exports and checkpoints written before condition_inject existed hold prefix-only models
        values = {"condition_inject": "prefix", **values}
        # backend and chunk_size were stored until they became run-time options (train.backend,
        # lit-sample --backend): they never changed the weights, so older folders still load
        values = {key: value for key, value in values.items() if key not in ("backend", "chunk_size")}
        for key in values:
            if key not in known:
                raise ValueError(f"model config: unknown key {key!r} (known: {', '.join(sorted(known))})")
        return cls(**values)
