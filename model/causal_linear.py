"""The `causal-linear` attention kind: batch module (any backend) and its recurrent twin."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
    """Per-layer running sums of the recurrent twin, fp32, in one tensor SZ (B, H, Dk, Dv + 1):
    SZ[..., :Dv] = S = sum phi(k) v^T and SZ[..., Dv] = z = sum phi(k). Keeping z as S's last column
    (the outer product of phi(k) with [v, 1]) updates both with one op and reads numerator and
    normaliser with one product: the same memory as two tensors, five fewer ops per byte and layer."""

    SZ: torch.Tensor  # (B, H, Dk, Dv + 1)


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
        return LinearAttentionState(SZ=torch.zeros(batch, heads, d_key, d_value + 1, device=device))

    def fill(self, state: LinearAttentionState, k: torch.Tensor, v: torch.Tensor) -> LinearAttentionState:
        """Replace the sums with those of a whole prefix k (B, H, L, Dk), v (B, H, L, Dv)."""
        with torch.autocast(device_type=k.device.type, enabled=False):
            phi_k = elu_feature_map(k.float())  # (B, H, L, Dk)
            value_one = F.pad(v.float(), (0, 1), value=1.0)  # (B, H, L, Dv + 1)
            state.SZ = torch.einsum("bhld,bhle->bhde", phi_k, value_one)  # (B, H, Dk, Dv + 1)
        return state

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             state: LinearAttentionState) -> tuple[torch.Tensor, LinearAttentionState]:
        """Attend from one new position: q, k (B, H, Dk), v (B, H, Dv) -> (B, H, Dv); state updated in place."""
        # entering an autocast context costs as much as a small kernel: only when autocast is on
        with fp32_region(q.device.type):
            phi_q, phi_k = elu_feature_map(_fp32(q)), elu_feature_map(_fp32(k))
            value_one = F.pad(_fp32(v), (0, 1), value=1.0)  # (B, H, Dv + 1)
            state.SZ.addcmul_(phi_k.unsqueeze(-1), value_one.unsqueeze(-2))  # in place: no new tensor
            if torch.compiler.is_compiling():
                # as a broadcast and a sum, the compiler fuses the update and this read into one
                # pass over SZ (eagerly this would materialise a (B, H, Dk, Dv + 1) product)
                read = (phi_q.unsqueeze(-1) * state.SZ).sum(-2)  # (B, H, Dv + 1)
            else:
                read = (phi_q.unsqueeze(-2) @ state.SZ).squeeze(-2)  # (B, H, Dv + 1)
            out = read[..., :-1] / (read[..., -1:] + self.eps)
        return (out if out.dtype == q.dtype else out.to(q.dtype)), state


register_attention("causal-linear", CausalLinearAttention, RecurrentCausalLinearAttention,
                   {"backend": (str, "auto"), "chunk_size": (int, 64), "eps": (float, 1e-6)})
