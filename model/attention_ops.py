"""Attention ops of every kind: one parallel function each (torch here, fla's kernel on CUDA) and the steps.

Conventions are flash-linear-attention's, so its kernels drop in: q, k (B, T, H, K) and v (B, T, H, V);
a decay g in log space, <= 0, per head (B, T, H) or per key dimension (B, T, H, K): the state is
multiplied by exp(g_t) before position t writes to it; a write strength beta (B, T, H); the state
(B, H, K, V) fp32; and `scale` multiplies q. Every parallel function is
`(q, k, v, [g], [beta], scale, initial_state, output_final_state) -> (o, final_state)`, o in q's dtype;
each `*_step` function takes one position (q, k (B, H, K), v (B, H, V)) and updates its state in
place without a host sync, so a CUDA graph can capture it.

The recurrences (u_t is what position t writes):
- causal-linear: S_t = S_{t-1} + k_t v_t^T, z_t = z_{t-1} + k_t, o_t = S_t^T q_t / (q_t . z_t + eps)
  (q and k already through the feature map; the 2020 linear transformer)
- retention / gla: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t
- deltanet / gated-deltanet: S_t = exp(g_t) S_{t-1} + k_t u_t^T with
  u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t) (deltanet: g = 0), o_t = scale S_t^T q_t
- softmax: the state is the keys and values so far (a KV cache)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import warnings

import torch
import torch.nn.functional as F

KINDS = ("causal-linear", "retention", "gla", "deltanet", "gated-deltanet", "softmax")
BACKEND_NAMES = ("auto", "torch", "fast-transformers", "fla")
EPS = 1e-6  # causal-linear's normaliser floor
# gla's torch form holds a (C, C, K) decay per chunk: fwd+bwd at L=785, K=16 took 2.9 s at 8, 5.6 s at 16
GLA_MAX_CHUNK = 8
# fla's kernel for each kind (module, function) and which of g / beta it takes
FLA_KERNELS = {"retention": ("fla.ops.simple_gla", "chunk_simple_gla"), "gla": ("fla.ops.gla", "chunk_gla"),
               "deltanet": ("fla.ops.delta_rule", "chunk_delta_rule"),
               "gated-deltanet": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")}


def fp32_region(device_type: str):
    """A context with autocast off (the recurrent sums stay fp32); a no-op where autocast is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32; no dispatch at all when it already is (the common case, once per byte and layer)."""
    return x if x.dtype == torch.float32 else x.float()


# ---------------------------------------------------------------- backends
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


def check_backend(name: str, kind: str = "causal-linear") -> None:
    """Raise ValueError with an install hint when backend `name` is unknown, not installed or not for `kind`."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")
    if name == "fast-transformers" and kind != "causal-linear":
        raise ValueError(f"backend 'fast-transformers' implements causal-linear only, not {kind!r}; "
                         "use backend 'auto' or 'torch'")
    if not backend_available(name):
        hint = {"fast-transformers": "run scripts/install_fast_transformers.sh",
                "fla": "pip install flash-linear-attention (needs a CUDA GPU and triton)"}[name]
        raise ValueError(f"attention backend {name!r} is not installed here; {hint}, "
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


def _parallel_backend(name: str, q: torch.Tensor) -> str:
    """resolve_backend's choice for a parallel op on q (B, T, H, D), but torch where T < H: fla's format
    check takes that for a head-first layout and rejects it (short prefills)."""
    name = resolve_backend(name, q.device)
    return "torch" if name == "fla" and q.shape[1] < q.shape[2] else name


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _fla_function(module: str, name: str):
    """fla's `name` from `module` and whether it still takes the (deprecated) head_first flag."""
    function = getattr(importlib.import_module(module), name)
    return function, "head_first" in inspect.signature(function).parameters


def _fla_call(module: str, name: str, *args, **kwargs):
    """Call an fla kernel with our (B, T, H, D) layout, on any release (older ones default to head-first)."""
    function, has_head_first = _fla_function(module, name)
    if has_head_first:
        kwargs["head_first"] = False
    return function(*args, **kwargs)


# ---------------------------------------------------------------- causal-linear
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
                        eps: float = EPS, initial_state=None) -> torch.Tensor:
    """Chunk-parallel causal linear attention in plain PyTorch, q k v (B, H, L, D); memory linear in L."""
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
        if initial_state is not None:  # sums carried in from before the sequence
            state_kv = state_kv + initial_state[0].float().unsqueeze(2)
            state_k = state_k + initial_state[1].float().unsqueeze(2)
        num = intra_num.float() + q32 @ state_kv  # (B, H, N, C, Dv)
        den = intra_den.float() + (q32 * state_k.unsqueeze(3)).sum(-1)  # (B, H, N, C)
        out = num / (den.unsqueeze(-1) + eps)
    return out.reshape(batch, heads, n_chunks * chunk_size, d_value)[:, :, :length].to(q.dtype)


def causal_linear_fast_transformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    eps: float = EPS) -> torch.Tensor:
    """Causal linear attention through fast-transformers' causal_dot_product kernel (fp32 only), (B, H, L, D)."""
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


def causal_linear_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Causal linear attention through fla's chunk_linear_attn (CUDA only), q k v (B, H, L, D)."""
    # fla applies no feature map (ours is already applied), scales q by 1/sqrt(K) unless told
    # scale=1.0, and its own normaliser uses a different eps: we normalise ourselves in fp32.
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q_t, k_t, v_t = (t.to(dtype).transpose(1, 2).contiguous() for t in (q, k, v))  # (B, L, H, D)
    num, _ = _fla_call("fla.ops.linear_attn", "chunk_linear_attn", q_t, k_t, v_t, scale=1.0,
                       initial_state=None, output_final_state=False, normalize=False)  # (B, L, H, Dv)
    with torch.autocast(device_type=q.device.type, enabled=False):
        den = (q.float() * k.float().cumsum(2)).sum(-1)  # (B, H, L)
        out = num.transpose(1, 2).float() / (den.unsqueeze(-1) + eps)
    return out.to(q.dtype)


def causal_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                       initial_state=None, output_final_state: bool = False, backend: str = "auto",
                       chunk_size: int = 64):
    """causal-linear over whole sequences: q, k (feature-mapped) (B, T, H, K), v (B, T, H, V) -> (o, (S, z)).

    The state is (S (B, H, K, V), z (B, H, K)), fp32; scale multiplies q (it cancels in the ratio).
    """
    name = _parallel_backend(backend, q)
    q, k, v = (t.transpose(1, 2) for t in (q * scale if scale != 1 else q, k, v))  # (B, H, T, D) views
    if name == "torch" or initial_state is not None:  # only the torch form carries a state in
        out = causal_linear_torch(q, k, v, chunk_size, EPS, initial_state)
    elif name == "fast-transformers":
        out = causal_linear_fast_transformers(q, k, v)
    else:
        out = causal_linear_fla(q, k, v)
    final = None
    if output_final_state:
        with torch.autocast(device_type=q.device.type, enabled=False):
            k32 = k.float()
            final = (torch.einsum("bhld,bhle->bhde", k32, v.float()), k32.sum(2))  # (B, H, K, V), (B, H, K)
            if initial_state is not None:
                final = (final[0] + initial_state[0], final[1] + initial_state[1])
    return out.transpose(1, 2), final


def causal_linear_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state) -> torch.Tensor:
    """One position of causal-linear: phi(q), phi(k) (B, H, K), v (B, H, V) -> (B, H, V); (S, z) updated in place."""
    S, z = state
    # entering an autocast context costs as much as a small kernel: only when autocast is on
    with fp32_region(q.device.type):
        q, k = _fp32(q), _fp32(k)
        S.addcmul_(k.unsqueeze(-1), _fp32(v).unsqueeze(-2))  # (B, H, K, V), no new tensor
        z.add_(k)  # (B, H, K)
        num = _read(q, S)
        den = (q * z).sum(-1, keepdim=True)  # (B, H, 1)
        return num / (den + EPS)


def _read(q: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """S^T q for q (B, H, K), S (B, H, K, V) -> (B, H, V)."""
    if torch.compiler.is_compiling():
        # as a broadcast and a sum, the compiler fuses the update and this read into one pass over S
        # (eagerly this would materialise a (B, H, K, V) product)
        return (q.unsqueeze(-1) * S).sum(-2)
    batch, heads, d_key, d_value = S.shape
    return torch.bmm(q.reshape(batch * heads, 1, d_key), S.view(batch * heads, d_key, d_value)).view(
        batch, heads, d_value)


# ---------------------------------------------------------------- decaying and delta-rule kinds
def chunked_recurrence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g=None, beta=None,
                       scale: float = 1.0, initial_state=None, output_final_state: bool = False,
                       chunk_size: int = 64):
    """The torch form of retention, gla, deltanet and gated-deltanet (see the module docstring).

    Chunks of C positions run as matrix products; a loop over chunks carries the state (L / C
    iterations). Every exponent is of a difference b_t - b_s with s <= t of cumulative log decays
    inside one chunk, so nothing overflows whatever g is. The delta rule's writes u inside a chunk
    solve a unit lower-triangular system (the WY form of fla's chunked kernel).
    """
    batch, length, heads, d_key = q.shape
    d_value, dtype = v.shape[-1], q.dtype
    per_dim = g is not None and g.dim() == 4
    if per_dim:
        chunk_size = min(chunk_size, GLA_MAX_CHUNK)
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    with torch.autocast(device_type=q.device.type, enabled=False):
        def chunks(t, width):  # (B, T, H[, D]) -> (B, H, N, C[, D]) fp32, zero-padded (no write, no decay)
            t = t.float().transpose(1, 2)
            t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
            return t.reshape(batch, heads, n_chunks, chunk_size, *([width] if width else []))

        q, k, v = chunks(q * scale, d_key), chunks(k, d_key), chunks(v, d_value)
        log_decay = (torch.zeros(batch, heads, n_chunks, chunk_size, 1, device=q.device) if g is None
                     else chunks(g, d_key if per_dim else 1)).cumsum(3)  # b: (B, H, N, C, K or 1)
        rows = torch.arange(chunk_size, device=q.device)
        gaps = log_decay.unsqueeze(4) - log_decay.unsqueeze(3)  # b_t - b_s (B, H, N, C, C, K or 1)

        def decays(reads):  # exp(b_t - b_s) where position t reads s (C, C), else 0: (B, H, N, C, C, K or 1)
            return gaps.masked_fill(~reads.unsqueeze(-1), float("-inf")).exp()

        causal = rows.unsqueeze(1) >= rows  # (C, C): position t reads s <= t
        scores = (torch.einsum("bhntd,bhnsd,bhntsd->bhnts", q, k, decays(causal)) if per_dim
                  else (q @ k.transpose(-1, -2)) * decays(causal).squeeze(-1))
        last = log_decay[:, :, :, -1:]  # (B, H, N, 1, K or 1)
        q_in, k_out, carry = q * log_decay.exp(), k * (last - log_decay).exp(), last.transpose(-1, -2).exp()
        if beta is not None:  # (I + diag(beta) strict_tril(K K^T * decay)) U = beta (V - decay K S0)
            beta = chunks(beta, 0).unsqueeze(-1)  # (B, H, N, C, 1)
            system = torch.eye(chunk_size, device=q.device) + beta * (
                (k @ k.transpose(-1, -2)) * decays(rows.unsqueeze(1) > rows).squeeze(-1))
            # k * exp(b) is q_in's decay on k: scalar only (fla's delta kernels take no per-dim g)
            solved = torch.linalg.solve_triangular(system, beta * torch.cat([v, k * log_decay.exp()], -1),
                                                   upper=False, unitriangular=True)
            writes_v, writes_k = solved.split([d_value, d_key], dim=-1)  # U = writes_v - writes_k S0
        state = (torch.zeros(batch, heads, d_key, d_value, device=q.device) if initial_state is None
                 else initial_state.float())
        outs = []
        for n in range(n_chunks):
            u = v[:, :, n] if beta is None else writes_v[:, :, n] - writes_k[:, :, n] @ state  # (B, H, C, V)
            outs.append(q_in[:, :, n] @ state + scores[:, :, n] @ u)
            state = state * carry[:, :, n] + k_out[:, :, n].transpose(-1, -2) @ u
        out = torch.stack(outs, 2).reshape(batch, heads, n_chunks * chunk_size, d_value)[:, :, :length]
    return out.transpose(1, 2).to(dtype), (state if output_final_state else None)


def recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, g=None,
                   beta=None, scale: float = 1.0) -> torch.Tensor:
    """One position of retention/gla/deltanet/gated-deltanet: q, k (B, H, K), v (B, H, V), g (B, H) or
    (B, H, K), beta (B, H) -> o (B, H, V); the state (B, H, K, V) is updated in place."""
    with fp32_region(q.device.type):
        q, k, v = _fp32(q), _fp32(k), _fp32(v)
        if g is not None:
            decay = _fp32(g).exp()
            state.mul_(decay.unsqueeze(-1) if decay.dim() == 3 else decay[..., None, None])
        if beta is not None:  # write beta (v - what the state already holds for k)
            # under autograd the read keeps its own copy: the write below changes the state in place
            held = state.clone() if state.requires_grad and torch.is_grad_enabled() else state
            v = _fp32(beta).unsqueeze(-1) * (v - _read(k, held))
        state.addcmul_(k.unsqueeze(-1), v.unsqueeze(-2))
        return _read(q * scale, state)


def linear_recurrence(kind: str, q, k, v, g=None, beta=None, scale: float = 1.0, initial_state=None,
                      output_final_state: bool = False, backend: str = "auto", chunk_size: int = 64):
    """retention/gla/deltanet/gated-deltanet over whole sequences: fla's kernel where it runs, else torch."""
    if _parallel_backend(backend, q) == "fla":
        module, name = FLA_KERNELS[kind]
        gates = dict(g=g) if beta is None else dict(beta=beta) if g is None else dict(g=g, beta=beta)
        return _fla_call(module, name, q, k, v, **gates, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state)
    return chunked_recurrence(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)


# ---------------------------------------------------------------- softmax
def softmax_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale=None, initial_state=None,
                 output_final_state: bool = False):
    """Causal softmax attention, (B, T, H, D); the state is (keys, values) (B, H, P, D) read before q."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if initial_state is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:  # query t reads the P cached positions and its own first t + 1
        k, v = torch.cat([initial_state[0].to(k.dtype), k], 2), torch.cat([initial_state[1].to(v.dtype), v], 2)
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2), ((k, v) if output_final_state else None)


def softmax_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 length: int) -> torch.Tensor:
    """One position of softmax over a KV cache (B, H, max_len, D) holding `length` positions: writes k, v
    at `length` and returns (B, H, V). Not graph-safe: the length is a Python int that moves. (A full cache
    is ImageTransformer.step's error: the image is complete.)"""
    keys[:, :, length] = k
    values[:, :, length] = v
    out = F.scaled_dot_product_attention(q.unsqueeze(2).to(keys.dtype), keys[:, :, :length + 1],
                                         values[:, :, :length + 1])  # (B, H, 1, V)
    return out.squeeze(2).to(q.dtype)
