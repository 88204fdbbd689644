"""AttentionLayer: the q/k/v/out projections around a registered attention kind and its twin."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import model.causal_linear  # noqa: F401  (registers "causal-linear")
import model.softmax_attention  # noqa: F401  (registers "softmax")
from model.registry import ATTENTION_KINDS, build_attention


class AttentionLayer(nn.Module):
    """Multi-head attention of a registered kind; parameter names match fast-transformers' layer."""

    def __init__(self, d_model: int, n_heads: int, d_query: int, d_value: int, attention: str,
                 **params):
        super().__init__()
        self.n_heads, self.d_query, self.d_value = n_heads, d_query, d_value
        self.query_projection = nn.Linear(d_model, n_heads * d_query)
        self.key_projection = nn.Linear(d_model, n_heads * d_query)
        self.value_projection = nn.Linear(d_model, n_heads * d_value)
        self.out_projection = nn.Linear(n_heads * d_value, d_model)
        self.inner_attention, self.recurrent_attention = build_attention(attention, **params)

    def forward(self, x: torch.Tensor, state=None):
        """Attend over x (B, L, d_model); when a layer state is given, also fill it from this pass."""
        batch, length, heads = x.shape[0], x.shape[1], self.n_heads
        q, k, v = (projection(x).view(batch, length, heads, -1).transpose(1, 2)  # (B, H, L, Dk or Dv)
                   for projection in (self.query_projection, self.key_projection, self.value_projection))
        out = self.inner_attention(q, k, v)  # (B, H, L, Dv)
        if state is not None:
            state = self.recurrent_attention.fill(state, k, v)
        out = out.transpose(1, 2).reshape(batch, length, heads * self.d_value)
        return self.out_projection(out), state

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        """An empty recurrent state for this layer."""
        return self.recurrent_attention.init_state(batch, self.n_heads, self.d_query, self.d_value,
                                                   max_len, device, dtype)

    def step(self, x: torch.Tensor, state):
        """One position x (B, d_model) through the recurrent twin -> (B, d_model), new state."""
        # functional calls on the same weights: at sampling's small batches a module call's own
        # overhead costs as much as the product
        batch, heads = x.shape[0], self.n_heads
        q, k, v = (F.linear(x, projection.weight, projection.bias).view(batch, heads, -1)
                   for projection in (self.query_projection, self.key_projection, self.value_projection))
        out, state = self.recurrent_attention.step(q, k, v, state)  # (B, H, Dv)
        return F.linear(out.reshape(batch, heads * self.d_value), self.out_projection.weight,
                        self.out_projection.bias), state


def attention_params(attention: str, config) -> dict:
    """The parameters of attention kind `attention` that `config` sets (fields of the same name)."""
    return {name: getattr(config, name) for name in ATTENTION_KINDS[attention].params
            if hasattr(config, name)}
