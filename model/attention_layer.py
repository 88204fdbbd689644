"""AttentionLayer: the projections and gates of every attention kind around model.attention_ops.

Per kind, following flash-linear-attention's layers:
- causal-linear: q, k through elu + 1, normalised by q . sum k (parameter names match fast-transformers'
  AttentionLayer, so its weights load there and back);
- retention: a decay per head and position, g = logsigmoid(W_g x) / 16 (fla's gate normaliser: the
  decay starts near 0.96 per byte and learns where to forget);
- gla: the same decay per key dimension;
- deltanet: q, k through silu and L2 normalisation, a write strength beta = sigmoid(W_b x) per head;
- gated-deltanet: deltanet with retention's decay;
- softmax: scaled dot-product attention over a KV cache.
The four newer kinds end with a per-head RMSNorm and a swish output gate, as fla's layers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from model import attention_ops as ops

DECAYED = ("retention", "gla", "gated-deltanet")
DELTA = ("deltanet", "gated-deltanet")
GATE_NORMALISER = 16.0


@dataclass
class LinearState:
    """A linear kind's recurrent state, fp32: S (B, H, K, V), and causal-linear's key sum z (B, H, K)."""

    S: torch.Tensor
    z: Optional[torch.Tensor] = None


@dataclass
class KVCache:
    """softmax's keys and values (B, H, max_len, D) preallocated to the full length; `length` are filled."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0


class AttentionLayer(nn.Module):
    """Multi-head attention of kind `attention`; backend and chunk_size say how it runs, not what it is."""

    def __init__(self, d_model: int, n_heads: int, d_query: int, d_value: int, attention: str,
                 backend: str = "auto", chunk_size: int = 64):
        super().__init__()
        if attention not in ops.KINDS:
            raise ValueError(f"unknown attention kind {attention!r} (choose from {', '.join(ops.KINDS)})")
        ops.check_backend(backend, attention)
        self.kind, self.backend, self.chunk_size = attention, backend, chunk_size
        self.n_heads, self.d_query, self.d_value = n_heads, d_query, d_value
        self.scale = 1.0 if attention == "causal-linear" else d_query ** -0.5
        self.query_projection = nn.Linear(d_model, n_heads * d_query)
        self.key_projection = nn.Linear(d_model, n_heads * d_query)
        self.value_projection = nn.Linear(d_model, n_heads * d_value)
        self.out_projection = nn.Linear(n_heads * d_value, d_model)
        if attention in DECAYED:
            self.gate_projection = nn.Linear(d_model, n_heads * (d_query if attention == "gla" else 1))
        if attention in DELTA:
            self.beta_projection = nn.Linear(d_model, n_heads)
        if attention not in ("causal-linear", "softmax"):
            self.output_norm = nn.RMSNorm(d_value, eps=1e-5)
            self.output_gate = nn.Linear(d_model, n_heads * d_value)

    def _project(self, x: torch.Tensor) -> tuple:
        """x (..., d_model) -> q, k (through the kind's feature map), v (..., H, K or V) and the gates g
        (..., H[, K]) and beta (..., H), None where the kind has none."""
        # functional calls on the same weights: at sampling's small batches a module call's own
        # overhead costs as much as the product
        shape = (*x.shape[:-1], self.n_heads)
        q, k, v = (F.linear(x, projection.weight, projection.bias).view(*shape, -1)
                   for projection in (self.query_projection, self.key_projection, self.value_projection))
        if self.kind == "causal-linear":
            q, k = ops.elu_feature_map(q), ops.elu_feature_map(k)
        elif self.kind in DELTA:  # unit keys keep the delta rule's write a projection (fla: silu, then L2)
            q, k = (F.normalize(F.silu(t), dim=-1, eps=1e-6) for t in (q, k))
        g = beta = None
        if self.kind in DECAYED:
            g = (F.logsigmoid(F.linear(x, self.gate_projection.weight, self.gate_projection.bias).float())
                 / GATE_NORMALISER).view(*shape, -1)
            g = g if self.kind == "gla" else g.squeeze(-1)
        if self.kind in DELTA:
            beta = torch.sigmoid(F.linear(x, self.beta_projection.weight, self.beta_projection.bias).float())
            beta = beta.view(shape)
        return q, k, v, g, beta

    def _output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Heads (..., H, V) -> the layer's output (..., d_model), through the norm and gate where the kind has them."""
        if self.kind not in ("causal-linear", "softmax"):
            gate = F.silu(F.linear(x, self.output_gate.weight, self.output_gate.bias))
            o = self.output_norm(o) * gate.view_as(o)
        return F.linear(o.flatten(-2), self.out_projection.weight, self.out_projection.bias)

    def forward(self, x: torch.Tensor, state=None):
        """Attend over x (B, L, d_model); when a layer state is given, it is set to the state after x."""
        q, k, v, g, beta = self._project(x)  # (B, L, H, K or V), gates (B, L, H[, K])
        keep = state is not None
        if self.kind == "causal-linear":
            o, final = ops.causal_linear_attn(q, k, v, self.scale, None, keep, self.backend, self.chunk_size)
        elif self.kind == "softmax":
            o, final = ops.softmax_attn(q, k, v, None, None, keep)
        else:
            o, final = ops.linear_recurrence(self.kind, q, k, v, g, beta, self.scale, None, keep, self.backend,
                                             self.chunk_size)
        if keep:
            self._load_state(state, final)
        return self._output(o, x), state

    def _load_state(self, state, final) -> None:
        """Copy the parallel pass's final state into `state` in place (its buffers stay where they are)."""
        if isinstance(state, KVCache):
            keys, values = final  # (B, H, L, D); L < max_len: prefill() leaves a byte to predict
            state.keys[:, :, :keys.shape[2]] = keys
            state.values[:, :, :keys.shape[2]] = values
            state.length = keys.shape[2]
        elif self.kind == "causal-linear":
            state.S.copy_(final[0])
            state.z.copy_(final[1])
        else:
            state.S.copy_(final)

    def init_state(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        """An empty recurrent state for this layer (linear kinds: fp32 and constant in max_len)."""
        heads, d_key, d_value = self.n_heads, self.d_query, self.d_value
        if self.kind == "softmax":
            return KVCache(keys=torch.zeros(batch, heads, max_len, d_key, device=device, dtype=dtype),
                           values=torch.zeros(batch, heads, max_len, d_value, device=device, dtype=dtype))
        return LinearState(S=torch.zeros(batch, heads, d_key, d_value, device=device),
                           z=torch.zeros(batch, heads, d_key, device=device) if self.kind == "causal-linear" else None)

    def step(self, x: torch.Tensor, state):
        """One position x (B, d_model) through the recurrent form -> (B, d_model), state (updated in place)."""
        q, k, v, g, beta = self._project(x)  # (B, H, K or V), gates (B, H[, K])
        if self.kind == "causal-linear":
            o = ops.causal_linear_step(q, k, v, (state.S, state.z))
        elif self.kind == "softmax":
            o = ops.softmax_step(q, k, v, state.keys, state.values, state.length)
            state.length += 1
        else:
            o = ops.recurrent_step(q, k, v, state.S, g, beta, self.scale)
        return self._output(o if o.dtype == x.dtype else o.to(x.dtype), x), state
