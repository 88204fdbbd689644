"""AttentionLayer: the q/k/v/out projections around a registered attention kind and its twin."""

from __future__ import annotations

import torch
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

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, d_model) -> q, k (B, H, L, Dk) and v (B, H, L, Dv)."""
        batch, length, _ = x.shape
        q = self.query_projection(x).view(batch, length, self.n_heads, self.d_query).transpose(1, 2)
        k = self.key_projection(x).view(batch, length, self.n_heads, self.d_query).transpose(1, 2)
        v = self.value_projection(x).view(batch, length, self.n_heads, self.d_value).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, state=None):
        """Attend over x (B, L, d_model); when a layer state is given, also fill it from this pass."""
        q, k, v = self._project(x)
        out = self.inner_attention(q, k, v)  # (B, H, L, Dv)
        if state is not None:
            state = self.recurrent_attention.fill(state, k, v)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.n_heads * self.d_value)
        return self.out_projection(out), state

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        """An empty recurrent state for this layer."""
        return self.recurrent_attention.init_state(batch, self.n_heads, self.d_query, self.d_value,
                                                   max_len, device, dtype)

    def _fused_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The q, k, v projections stacked into one (weight, bias), rebuilt whenever a weight changes.

        One (B, d) x (d, 3 d) product per byte instead of three: at sampling's small batches each
        product costs mostly its fixed overhead."""
        parts = (self.query_projection, self.key_projection, self.value_projection)
        version = tuple((p.weight._version, p.weight.data_ptr(), p.bias._version, p.bias.data_ptr()) for p in parts)
        if getattr(self, "_fused_version", None) != version:
            with torch.no_grad():
                self._fused = (torch.cat([p.weight for p in parts]), torch.cat([p.bias for p in parts]))
            self._fused_version = version
        return self._fused

    def step(self, x: torch.Tensor, state):
        """One position x (B, d_model) through the recurrent twin -> (B, d_model), new state."""
        batch, heads = x.shape[0], self.n_heads
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            q, k, v = (t.squeeze(2) for t in self._project(x.unsqueeze(1)))  # (B, H, D)
        else:
            weight, bias = self._fused_projection()
            q, k, v = nn.functional.linear(x, weight, bias).split(
                [heads * self.d_query, heads * self.d_query, heads * self.d_value], dim=-1)
            q, k, v = q.view(batch, heads, -1), k.view(batch, heads, -1), v.view(batch, heads, -1)
        out, state = self.recurrent_attention.step(q, k, v, state)  # (B, H, Dv)
        return self.out_projection(out.reshape(batch, heads * self.d_value)), state


def attention_params(attention: str, config) -> dict:
    """The parameters of attention kind `attention` that `config` sets (fields of the same name)."""
    return {name: getattr(config, name) for name in ATTENTION_KINDS[attention].params
            if hasattr(config, name)}
