"""Attention registry: each kind registers a batch module and its recurrent twin under one name.

A kind's parameters are declared once; each module receives those its constructor names (the
recurrent twin of causal-linear needs eps, not the batch backend or chunk size). Neither holds
weights of its own (the projections live in AttentionLayer), so weights trained through the batch
module serve the recurrent one unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class AttentionKind:
    """One registered attention: its batch module, recurrent twin and accepted parameters."""

    name: str
    batch: Callable[..., Any]      # module: forward(q, k, v) -> out, q/k/v (B, H, L, D)
    recurrent: Callable[..., Any]  # module: init_state / fill / step
    params: dict                   # parameter name -> (type, default)


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def register_attention(name: str, batch, recurrent, params: dict) -> None:
    """Register an attention kind under `name` with its typed parameters {name: (type, default)}."""
    if name in ATTENTION_KINDS:
        raise ValueError(f"attention kind {name!r} is already registered")
    ATTENTION_KINDS[name] = AttentionKind(name, batch, recurrent, dict(params))


def build_attention(name: str, **params):
    """Return (batch_module, recurrent_module) of kind `name`; unknown or mistyped params raise."""
    if name not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention kind {name!r} (registered: {', '.join(sorted(ATTENTION_KINDS))})")
    kind = ATTENTION_KINDS[name]
    resolved = {}
    for key, value in params.items():
        if key not in kind.params:
            raise ValueError(f"attention {name!r}: unknown parameter {key!r} "
                             f"(accepted: {', '.join(sorted(kind.params)) or 'none'})")
        expected, _ = kind.params[key]
        if not isinstance(value, expected) or isinstance(value, bool) and expected is not bool:
            raise ValueError(f"attention {name!r}: parameter {key}={value!r} must be {expected.__name__}")
        resolved[key] = value
    for key, (_, default) in kind.params.items():
        resolved.setdefault(key, default)
    return kind.batch(**_accepted(kind.batch, resolved)), kind.recurrent(**_accepted(kind.recurrent, resolved))


def _accepted(constructor: Callable[..., Any], params: dict) -> dict:
    """The params that constructor's signature names."""
    names = inspect.signature(constructor).parameters
    return {key: value for key, value in params.items() if key in names}
