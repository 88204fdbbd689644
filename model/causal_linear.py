"""The `causal-linear` attention kind: batch module (any backend) and its recurrent twin."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from model.linear_backends import causal_linear, check_backend, elu_feature_map
from model.registry import register_attention


def fp32_region(device_type: str):
    """A context with autocast off (the recurrent sums stay fp32); a no-op where autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32; no dispatch at all when it already is (the common case, once per byte and layer)."""
    return x if x.dtype == torch.float32 else x.float()


@dataclass
class LinearAttentionState:
    """Per-layer running sums of the recurrent twin, fp32: S = sum phi(k) v^T, Z = sum phi(k)."""

    S: torch.Tensor  # (B, H, Dk, Dv)
    Z: torch.Tensor  # (B, H, Dk)


class CausalLinearAttention(nn.Module):
    """Causal linear attention over whole sequences; q, k, v (B, H, L, D) are raw projections."""

    def __init__(self, backend: str = "auto", chunk_size: int = 64, eps: float = 1e-6):
        super().__init__()
        check_backend(backend)
        self.backend, self.chunk_size, self.eps = backend, chunk_size, eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Return (B, H, L, Dv): position t attends to positions <= t."""
        return causal_linear(elu_feature_map(q), elu_feature_map(k), v, self.backend, self.chunk_size,
                             self.eps)


class RecurrentCausalLinearAttention(nn.Module):
    """Recurrent twin of CausalLinearAttention: one position at a time, constant memory in L."""

    # step() mutates the state in place and never syncs with the host, so a CUDA graph can capture
    # it (model.generation replays one captured step per byte)
    graph_safe = True

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def init_state(self, batch: int, heads: int, d_key: int, d_value: int, max_len: int,
                   device: torch.device, dtype: torch.dtype) -> LinearAttentionState:
        """Empty sums (max_len and dtype are unused: the sums are fp32 and do not grow)."""
        return LinearAttentionState(S=torch.zeros(batch, heads, d_key, d_value, device=device),
                                    Z=torch.zeros(batch, heads, d_key, device=device))

    def fill(self, state: LinearAttentionState, k: torch.Tensor, v: torch.Tensor) -> LinearAttentionState:
        """Replace the sums with those of a whole prefix k (B, H, L, Dk), v (B, H, L, Dv)."""
        with torch.autocast(device_type=k.device.type, enabled=False):
            phi_k = elu_feature_map(k.float())  # (B, H, L, Dk)
            state.S = torch.einsum("bhld,bhle->bhde", phi_k, v.float())  # (B, H, Dk, Dv)
            state.Z = phi_k.sum(2)  # (B, H, Dk)
        return state

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: LinearAttentionState) -> tuple[torch.Tensor, LinearAttentionState]:
        """Attend from one new position: q, k (B, H, Dk), v (B, H, Dv) -> (B, H, Dv); state updated in place."""
        # entering an autocast context costs as much as a small kernel: only when autocast is on
        with fp32_region(q.device.type):
            phi_q, phi_k = elu_feature_map(_fp32(q)), elu_feature_map(_fp32(k))
            state.S.addcmul_(phi_k.unsqueeze(-1), _fp32(v).unsqueeze(-2))  # (B, H, Dk, Dv), no new tensor
            state.Z.add_(phi_k)  # (B, H, Dk)
            if torch.compiler.is_compiling():
                # as a broadcast and a sum, the compiler fuses the update and this read into one
                # pass over S (eagerly this would materialise a (B, H, Dk, Dv) product)
                num = (phi_q.unsqueeze(-1) * state.S).sum(-2)  # (B, H, Dv)
            else:
                batch, heads, d_key, d_value = state.S.shape
                num = torch.bmm(phi_q.reshape(batch * heads, 1, d_key),
                                state.S.view(batch * heads, d_key, d_value)).view(batch, heads, d_value)
            den = (phi_q * state.Z).sum(-1, keepdim=True)  # (B, H, 1)
            out = num / (den + self.eps)
        return (out if out.dtype == q.dtype else out.to(q.dtype)), state


register_attention("causal-linear", CausalLinearAttention, RecurrentCausalLinearAttention,
                   {"backend": (str, "auto"), "chunk_size": (int, 64), "eps": (float, 1e-6)})
