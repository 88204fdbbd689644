"""Causal linear attention: chunked torch backend vs a naive reference, other backends, fast-transformers."""

import pytest
import torch

import model.attention_ops as ops
from model.attention_layer import AttentionLayer
from model.attention_ops import causal_linear_attn, causal_linear_fla, causal_linear_torch, elu_feature_map

EPS = 1e-6


def naive_causal_linear(q, k, v, eps=EPS):
    """Quadratic masked reference: phi(q_t).phi(k_s) weights over s <= t, normalised."""
    phi_q, phi_k = elu_feature_map(q), elu_feature_map(k)
    scores = phi_q @ phi_k.transpose(-1, -2)  # (B, H, L, L)
    mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, 0)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_feature_map_is_elu_plus_one_with_its_gradient(dtype):
    # the CPU form exp(min(x, 0)) + max(x, 0) and its one-op backward, against ATen's elu
    x = torch.cat([torch.linspace(-30, 30, 601), torch.zeros(3), torch.randn(200)]).to(dtype)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    ours, reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    phi = elu_feature_map(ours)
    expected = torch.nn.functional.elu(reference) + 1
    assert torch.allclose(phi, expected, rtol=tolerance, atol=tolerance)
    weights = torch.randn(x.shape).to(dtype)
    (phi * weights).sum().backward()
    (expected * weights).sum().backward()
    assert torch.allclose(ours.grad, reference.grad, rtol=tolerance, atol=tolerance)
    with torch.no_grad():  # the sampler's path, without autograd
        assert torch.allclose(elu_feature_map(x), expected.detach(), rtol=tolerance, atol=tolerance)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(elu_feature_map, (torch.randn(20, dtype=dtype, requires_grad=True),))


def causal_linear(q, k, v, backend, chunk_size, eps=EPS):
    """causal_linear_attn (fla's (B, T, H, D) layout) on this file's (B, H, L, D) tensors."""
    assert eps == ops.EPS
    out, _ = causal_linear_attn(*(t.transpose(1, 2) for t in (q, k, v)), backend=backend, chunk_size=chunk_size)
    return out.transpose(1, 2)


def random_qkv(length, batch=2, heads=3, d_key=4, d_value=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, d, generator=generator, requires_grad=True)
            for d in (d_key, d_key, d_value)]


def forward_and_grads(function, q, k, v, seed=1):
    out = function(q, k, v)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return (out,) + torch.autograd.grad((out * weights).sum(), (q, k, v))


@pytest.mark.parametrize("length", [1, 5, 8, 13, 24, 37])
def test_torch_backend_matches_naive_reference_forward_and_gradients(length):
    q, k, v = random_qkv(length)
    ours = forward_and_grads(
        lambda q, k, v: causal_linear_torch(elu_feature_map(q), elu_feature_map(k), v, 8, EPS), q, k, v)
    reference = forward_and_grads(naive_causal_linear, q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
        assert (a - b).abs().max() < 1e-5, name


def test_torch_backend_under_bf16_autocast_keeps_fp32_sums():
    q, k, v = (t.detach() for t in random_qkv(200, d_key=8, d_value=8))
    reference = naive_causal_linear(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_linear(elu_feature_map(q.bfloat16()), elu_feature_map(k.bfloat16()), v.bfloat16(),
                            "torch", 16, EPS)
    assert out.dtype == torch.bfloat16
    assert (out.float() - reference).abs().max() < 5e-2


@pytest.mark.parametrize("backend", ["torch", "fast-transformers"])
def test_attention_layer_is_causal(backend):
    if backend == "fast-transformers":
        pytest.importorskip("fast_transformers.causal_product", reason="pytorch-fast-transformers not installed")
    torch.manual_seed(0)
    layer = AttentionLayer(8, 2, 4, 4, "causal-linear", backend=backend, chunk_size=4)
    x = torch.randn(2, 11, 8)
    out, _ = layer(x)
    for t in (0, 3, 4, 7, 10):
        changed = x.clone()
        changed[:, t] += 1.0
        out_changed, _ = layer(changed)
        assert torch.allclose(out[:, :t], out_changed[:, :t], atol=1e-6), t
        assert not torch.allclose(out[:, t], out_changed[:, t])


def fake_fla_chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False,
                               normalize=True, head_first=False):
    """fla's documented semantics in plain torch: [B, T, H, K] layout, q scaled, optional normalise."""
    assert not head_first
    if scale is None:
        scale = k.shape[-1] ** -0.5
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = (q * scale) @ k.transpose(-1, -2)
    scores = scores.masked_fill(~torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril(), 0)
    out = scores @ v
    if normalize:
        out = out / (scores.sum(-1, keepdim=True) + 1e-10)
    return out.transpose(1, 2), None


def test_fla_glue_passes_layout_scale_and_normaliser_right(monkeypatch):
    # fla needs CUDA; this checks our wrapper against fla's documented defaults on CPU
    monkeypatch.setattr(ops, "_fla_function", lambda module, name: (fake_fla_chunk_linear_attn, True))
    q, k, v = (t.detach() for t in random_qkv(19))
    out = causal_linear_fla(elu_feature_map(q), elu_feature_map(k), v, EPS)
    assert (out - naive_causal_linear(q, k, v)).abs().max() < 1e-5


def test_fla_on_cpu_falls_back_to_torch_with_a_warning():
    with pytest.warns(RuntimeWarning, match="needs CUDA"):
        assert ops.resolve_backend("fla", torch.device("cpu")) == "torch"


# ---------------------------------------------------------------- against fast-transformers itself
@pytest.mark.parametrize("length", [5, 24, 37])
def test_fast_transformers_backend_matches_torch_backend(length):
    pytest.importorskip("fast_transformers.causal_product", reason="pytorch-fast-transformers not installed")
    q, k, v = random_qkv(length)
    fast = forward_and_grads(
        lambda q, k, v: causal_linear(elu_feature_map(q), elu_feature_map(k), v, "fast-transformers", 8, EPS),
        q, k, v)
    chunked = forward_and_grads(
        lambda q, k, v: causal_linear(elu_feature_map(q), elu_feature_map(k), v, "torch", 8, EPS), q, k, v)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, chunked):
        assert (a - b).abs().max() < 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "fast-transformers"])
def test_matches_fast_transformers_causal_linear_attention_layer(backend):
    pytest.importorskip("fast_transformers.attention", reason="pytorch-fast-transformers not installed")
    from fast_transformers.attention import AttentionLayer as ReferenceLayer
    from fast_transformers.builders import AttentionBuilder
    from fast_transformers.masking import LengthMask, TriangularCausalMask

    torch.manual_seed(0)
    batch, length, d_model, heads, d_query, d_value = 2, 29, 12, 3, 4, 5
    ours = AttentionLayer(d_model, heads, d_query, d_value, "causal-linear", backend=backend, chunk_size=8)
    inner = AttentionBuilder.from_kwargs(query_dimensions=d_query).get("causal-linear")
    reference = ReferenceLayer(inner, d_model, heads, d_keys=d_query, d_values=d_value)
    reference.load_state_dict(ours.state_dict())  # same parameter names, strict
    x = torch.randn(batch, length, d_model)
    lengths = LengthMask(torch.full((batch,), length, dtype=torch.long), max_len=length)
    expected = reference(x, x, x, TriangularCausalMask(length), lengths, lengths)
    out, _ = ours(x)
    assert (out - expected).abs().max() < 1e-5


def test_recurrent_twin_matches_fast_transformers_recurrent_layer():
    pytest.importorskip("fast_transformers.recurrent.attention", reason="pytorch-fast-transformers not installed")
    from fast_transformers.recurrent.attention import RecurrentAttentionLayer, RecurrentLinearAttention

    torch.manual_seed(0)
    ours = AttentionLayer(8, 2, 4, 3, "causal-linear", backend="torch")
    reference = RecurrentAttentionLayer(RecurrentLinearAttention(4), 8, 2, d_keys=4, d_values=3)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(10, 2, 8)  # (steps, B, d_model)
    state, reference_state = ours.init_state(2, 10, x.device, x.dtype), None
    for t in range(10):
        out, state = ours.step(x[t], state)
        expected, reference_state = reference(x[t], x[t], x[t], state=reference_state)
        assert (out - expected).abs().max() < 1e-5, t


@pytest.mark.parametrize("kind", ["causal-linear", "softmax"])
def test_parallel_op_carries_a_state_in_and_out_like_one_longer_pass(kind):
    # fla's signature: the state one pass ends with is the initial_state the next one starts from
    q, k, v = (t.detach().transpose(1, 2) for t in random_qkv(23))  # (B, T, H, D)
    if kind == "causal-linear":
        q, k = elu_feature_map(q), elu_feature_map(k)
        op = lambda q, k, v, state: causal_linear_attn(q, k, v, 1.0, state, True, "torch", 8)  # noqa: E731
    else:
        op = lambda q, k, v, state: ops.softmax_attn(q, k, v, None, state, True)  # noqa: E731
    whole, final = op(q, k, v, None)
    first, state = op(q[:, :9], k[:, :9], v[:, :9], None)
    rest, carried = op(q[:, 9:], k[:, 9:], v[:, 9:], state)
    assert (torch.cat([first, rest], 1) - whole).abs().max() < 1e-5
    for a, b in zip(carried, final):
        assert (a - b).abs().max() < 1e-5
