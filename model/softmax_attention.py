"""The `softmax` attention kind (the paper's baseline): causal SDPA and a KV-cache recurrent twin."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.registry import register_attention


@dataclass
class KVCache:
    """Per-layer keys and values preallocated to the full length; `length` of them are filled."""

    keys: torch.Tensor    # (B, H, max_len, Dk)
    values: torch.Tensor  # (B, H, max_len, Dv)
    length: int = 0


class SoftmaxAttention(nn.Module):
    """Causal full attention through torch's scaled_dot_product_attention."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Return (B, H, L, Dv) for q, k, v (B, H, L, D)."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class RecurrentSoftmaxAttention(nn.Module):
    """Recurrent twin of SoftmaxAttention: one position at a time over a KV cache."""

    graph_safe = False  # the cache length is a Python int that changes every step

    def init_state(self, batch: int, heads: int, d_key: int, d_value: int, max_len: int,
                   device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty cache with room for max_len positions."""
        return KVCache(keys=torch.zeros(batch, heads, max_len, d_key, device=device, dtype=dtype),
                       values=torch.zeros(batch, heads, max_len, d_value, device=device, dtype=dtype))

    def fill(self, state: KVCache, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """Replace the cache contents with a whole prefix k (B, H, L, Dk), v (B, H, L, Dv)."""
        length = k.shape[2]
        if length > state.keys.shape[2]:
            raise ValueError(f"prefix of {length} positions does not fit a KV cache of {state.keys.shape[2]}")
        state.keys[:, :, :length] = k
        state.values[:, :, :length] = v
        state.length = length
        return state

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Attend from one new position: q, k (B, H, Dk), v (B, H, Dv) -> (B, H, Dv), new state."""
        n = state.length
        if n >= state.keys.shape[2]:
            raise ValueError(f"KV cache is full ({n} positions)")
        state.keys[:, :, n] = k
        state.values[:, :, n] = v
        state.length = n + 1
        keys, values = state.keys[:, :, : n + 1], state.values[:, :, : n + 1]  # (B, H, n+1, D)
        out = F.scaled_dot_product_attention(q.unsqueeze(2).to(keys.dtype), keys, values)  # (B, H, 1, Dv)
        return out.squeeze(2).to(q.dtype), state


register_attention("softmax", SoftmaxAttention, RecurrentSoftmaxAttention, {})
