"""Causal linear attention kernels: out_t = phi(q_t) S_t / (phi(q_t) . z_t + eps), all backends.

S_t = sum_{s<=t} phi(k_s) v_s^T and z_t = sum_{s<=t} phi(k_s). Every function here takes q and k
already passed through the feature map, all tensors (B, H, L, D), and returns (B, H, L, Dv) in
q's dtype. The running sums are kept in fp32 whatever the input dtype (fp16 sums overflow).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings

import torch
import torch.nn.functional as F

BACKEND_NAMES = ("auto", "torch", "fast-transformers", "fla")


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 written as exp(min(x, 0)) + max(x, 0): the same values (within an ulp), but ATen's
    CPU elu is about 7x slower than its exp (measured: 3.7 ms against 0.5 ms on a (16, 4, 785, 16)
    tensor, 2 threads)."""
    return torch.exp(x.clamp(max=0)).add_(x.clamp(min=0))


class _EluPlusOne(torch.autograd.Function):
    """phi with a one-op backward: phi'(x) = min(phi(x), 1) (1 where x > 0, exp(x) = phi(x) elsewhere),
    so only the output is saved (autograd through the three ops above costs 4x more)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        phi = _elu_plus_one(x)
        ctx.save_for_backward(phi)
        return phi

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (phi,) = ctx.saved_tensors
        return grad * phi.clamp(max=1)


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """The paper's feature map phi(x) = elu(x) + 1 (positive, so the normaliser never vanishes)."""
    if x.device.type != "cpu":
        return F.elu(x) + 1  # fused and fast on GPUs; the CPU form would add kernels there
    if torch.is_grad_enabled() and x.requires_grad:
        return _EluPlusOne.apply(x)
    return _elu_plus_one(x)


def causal_linear_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int,
                        eps: float) -> torch.Tensor:
    """Chunk-parallel causal linear attention in plain PyTorch; memory linear in L."""
    batch, heads, length, d_key = q.shape
    d_value = v.shape[-1]
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    if pad:
        # zero keys and values after the feature map add nothing to any sum
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    with torch.autocast(device_type=q.device.type, enabled=False):
        q_chunks = q.reshape(batch, heads, n_chunks, chunk_size, d_key)  # (B, H, N, C, Dk)
        k_chunks = k.reshape(batch, heads, n_chunks, chunk_size, d_key)
        v_chunks = v.reshape(batch, heads, n_chunks, chunk_size, d_value)  # (B, H, N, C, Dv)

        # inside a chunk: the quadratic form, masked, in the input dtype
        # in place: the matmul's backward needs only its inputs, so no second (C, C) copy
        scores = (q_chunks @ k_chunks.transpose(-1, -2)).tril_()  # (B, H, N, C, C)
        intra_num = scores @ v_chunks  # (B, H, N, C, Dv)
        intra_den = scores.sum(-1)  # (B, H, N, C)

        # between chunks: fp32 sums of everything before the chunk (exclusive prefix over chunks)
        k32, q32 = k_chunks.float(), q_chunks.float()
        chunk_kv = k32.transpose(-1, -2) @ v_chunks.float()  # (B, H, N, Dk, Dv)
        state_kv = F.pad(chunk_kv.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n_chunks]  # (B, H, N, Dk, Dv)
        chunk_k = k32.sum(3)  # (B, H, N, Dk)
        state_k = F.pad(chunk_k.cumsum(2), (0, 0, 1, 0))[:, :, :n_chunks]  # (B, H, N, Dk)
        num = intra_num.float() + q32 @ state_kv  # (B, H, N, C, Dv)
        den = intra_den.float() + (q32 * state_k.unsqueeze(3)).sum(-1)  # (B, H, N, C)
        out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(batch, heads, n_chunks * chunk_size, d_value)[:, :, :length].to(q.dtype)


def causal_linear_fast_transformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    eps: float) -> torch.Tensor:
    """Causal linear attention through fast-transformers' causal_dot_product kernel (fp32 only)."""
    from fast_transformers import causal_product

    if q.is_cuda and getattr(causal_product, "causal_dot_product_cuda", None) is None:
        raise RuntimeError("backend 'fast-transformers': this build of pytorch-fast-transformers has no "
                           "CUDA kernels; rebuild it on the GPU machine (scripts/install_fast_transformers.sh)")
    with torch.autocast(device_type=q.device.type, enabled=False):
        q32, k32, v32 = (t.float().contiguous() for t in (q, k, v))
        num = causal_product.causal_dot_product(q32, k32, v32)  # (B, H, L, Dv)
        den = (q32 * k32.cumsum(2)).sum(-1)  # (B, H, L)
        out = num / (den.unsqueeze(-1) + eps)
    return out.to(q.dtype)


@functools.lru_cache(maxsize=None)
def _fla_chunk_linear_attn():
    """fla's chunk_linear_attn and whether it still takes the (deprecated) head_first flag."""
    function = importlib.import_module("fla.ops.linear_attn").chunk_linear_attn
    return function, "head_first" in inspect.signature(function).parameters


def causal_linear_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Causal linear attention through flash-linear-attention's chunked Triton kernel (CUDA only)."""
    chunk_linear_attn, has_head_first = _fla_chunk_linear_attn()
    # fla applies no feature map (ours is already applied), scales q by 1/sqrt(K) unless told
    # scale=1.0, and its own normaliser uses a different eps: we normalise ourselves in fp32.
    kwargs = dict(scale=1.0, initial_state=None, output_final_state=False, normalize=False)
    if has_head_first:
        kwargs["head_first"] = False  # older releases default to (B, H, T, D)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q_t, k_t, v_t = (t.to(dtype).transpose(1, 2).contiguous() for t in (q, k, v))  # (B, L, H, D)
    num, _ = chunk_linear_attn(q_t, k_t, v_t, **kwargs)  # (B, L, H, Dv)
    with torch.autocast(device_type=q.device.type, enabled=False):
        den = (q.float() * k.float().cumsum(2)).sum(-1)  # (B, H, L)
        out = num.transpose(1, 2).float() / (den.unsqueeze(-1) + eps)
    return out.to(q.dtype)


@functools.lru_cache(maxsize=None)
def backend_available(name: str) -> bool:
    """Whether backend `name` can be imported here (auto and torch always can)."""
    if name in ("auto", "torch"):
        return True
    module = {"fast-transformers": "fast_transformers.causal_product", "fla": "fla.ops.linear_attn"}[name]
    try:
        importlib.import_module(module)
    except Exception:  # a broken build raises more than ImportError (undefined symbols, OSError)
        return False
    return True


def check_backend(name: str) -> None:
    """Raise ValueError with an install hint when backend `name` is unknown or not installed."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown causal-linear backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")
    if not backend_available(name):
        hint = {"fast-transformers": "run scripts/install_fast_transformers.sh",
                "fla": "pip install flash-linear-attention (needs a CUDA GPU and triton)"}[name]
        raise ValueError(f"causal-linear backend {name!r} is not installed here; {hint}, "
                         f"or use backend 'auto' or 'torch'")


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs for tensors on `device`: auto -> fla on CUDA if installed, else torch."""
    if name == "auto":
        return "fla" if device.type == "cuda" and backend_available("fla") else "torch"
    if name == "fla" and device.type != "cuda":
        _warn_once("backend 'fla' needs CUDA tensors; running the identical 'torch' backend on "
                   f"{device.type} instead")
        return "torch"
    return name


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def causal_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, chunk_size: int,
                  eps: float) -> torch.Tensor:
    """Dispatch feature-mapped q, k and v (B, H, L, D) to the resolved backend."""
    name = resolve_backend(backend, q.device)
    if name == "fla" and q.shape[2] < q.shape[1]:
        # fla's format check rejects T < H (it takes it for a head-first layout): short prefills
        name = "torch"
    if name == "torch":
        return causal_linear_torch(q, k, v, chunk_size, eps)
    if name == "fast-transformers":
        return causal_linear_fast_transformers(q, k, v, eps)
    return causal_linear_fla(q, k, v, eps)
