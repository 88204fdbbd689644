"""ImageTransformer: recurrent twin == parallel forward, causality, state size, generate, conditioning."""

import math

import pytest
import torch

from model import ImageTransformer, ModelConfig

BINS, LENGTH, CAPTION_LEN = 16, 21, 6
KINDS = [("causal-linear", "torch"), ("causal-linear", "fast-transformers"), ("softmax", "auto"),
         ("retention", "torch"), ("gla", "torch"), ("deltanet", "torch"), ("gated-deltanet", "torch")]
CONDITIONS = ["none", "class", "caption", "both"]


def tiny(attention="causal-linear", backend="torch", head="categorical", condition="none", **overrides):
    """A d=8, depth-2 model built with a fixed seed, in eval mode."""
    if backend == "fast-transformers":
        pytest.importorskip("fast_transformers.causal_product", reason="pytorch-fast-transformers not installed")
    values = dict(bins=BINS, seq_len=LENGTH, n_layers=2, n_heads=2, d_query=4, d_ff=16, attention=attention,
                  head=head, mixtures=3, condition=condition, n_classes=3, caption_len=CAPTION_LEN,
                  condition_dropout=0.0)
    values.update(overrides)
    torch.manual_seed(0)
    net = ImageTransformer(ModelConfig(**values), backend, chunk_size=8).eval()
    with torch.no_grad():  # the per-block condition projections and the byte convolution start at
        for name, parameter in net.named_parameters():  # zero: give them weight
            if "condition_projection" in name or "byte_conv" in name or name.startswith(("row_", "column_")):
                parameter.normal_(0.0, 0.5)
    return net


def batch_inputs(batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, BINS, (batch, LENGTH), generator=generator)
    labels = torch.arange(batch) % 3
    captions = ["a 0", "héllo", "seven"][:batch]
    return seq, labels, captions


@pytest.mark.parametrize("given", [0, 1, 6])
@pytest.mark.parametrize("condition", CONDITIONS)
@pytest.mark.parametrize("head", ["categorical", "logistic-mixture"])
@pytest.mark.parametrize("attention,backend", KINDS)
def test_recurrent_twin_matches_parallel_forward(attention, backend, head, condition, given):
    net = tiny(attention, backend, head, condition)
    seq, labels, captions = batch_inputs()
    logits = net(seq, labels, captions)  # (B, L, head_dim)
    with torch.no_grad():  # as the sampler runs it
        state = net.init_state(3)
        step_logits, state = net.prefill(state, labels, captions, seq[:, :given] if given else None)
        assert (step_logits - logits[:, given]).abs().max() < 1e-4
        for t in range(given, LENGTH - 1):
            step_logits, state = net.step(seq[:, t], state)
            assert (step_logits - logits[:, t + 1]).abs().max() < 1e-4, t


@pytest.mark.parametrize("attention,backend", KINDS)
def test_recurrent_step_with_gradients_equals_the_no_grad_step_and_reaches_every_projection(attention, backend):
    net = tiny(attention, backend)
    seq, _, _ = batch_inputs()
    with torch.no_grad():
        fast, fast_state = net.prefill(net.init_state(3), prefix=seq[:, :3])
        fast, _ = net.step(seq[:, 3], fast_state)
    slow, state = net.prefill(net.init_state(3), prefix=seq[:, :3])
    slow, _ = net.step(seq[:, 3], state)
    assert (fast - slow).abs().max() < 1e-5
    slow.sum().backward()
    layer = net.blocks[-1].attention
    projections = [name for name, _ in layer.named_children()]
    assert {"query_projection", "key_projection", "value_projection"} <= set(projections)
    for name in projections:  # the gates too, where the kind has them
        assert getattr(layer, name).weight.grad.abs().sum() > 0, name


def test_recurrent_step_sees_weights_changed_in_place_after_it_ran():
    # the step reads the projection weights directly: an optimizer step or load_state_dict between
    # two generations must show in the next one (a weight cache in the step would break this)
    net = tiny()
    seq, _, _ = batch_inputs()
    with torch.no_grad():
        net.step(seq[:, 1], net.prefill(net.init_state(3), prefix=seq[:, :1])[1])
        net.blocks[0].attention.key_projection.weight.mul_(3.0)
        net.load_state_dict({**net.state_dict(), "blocks.1.attention.value_projection.bias":
                             torch.ones_like(net.blocks[1].attention.value_projection.bias)})
        logits = net(seq)
        stepped, _ = net.step(seq[:, 1], net.prefill(net.init_state(3), prefix=seq[:, :1])[1])
    assert (stepped - logits[:, 2]).abs().max() < 1e-4


@pytest.mark.parametrize("attention,backend", KINDS)
def test_recurrent_twin_matches_with_value_size_unlike_query_size(attention, backend):
    net = tiny(attention, backend, d_value=3, n_heads=3)
    seq, _, _ = batch_inputs()
    logits = net(seq)
    step_logits, state = net.prefill(net.init_state(3), prefix=seq[:, :2])
    for t in range(2, LENGTH - 1):
        step_logits, state = net.step(seq[:, t], state)
        assert (step_logits - logits[:, t + 1]).abs().max() < 1e-4, t


@pytest.mark.parametrize("attention,backend", KINDS)
def test_prefill_equals_stepping_byte_by_byte(attention, backend):
    net = tiny(attention, backend, condition="both")
    seq, labels, captions = batch_inputs()
    prefilled, _ = net.prefill(net.init_state(3), labels, captions, seq[:, :9])
    stepped, state = net.prefill(net.init_state(3), labels, captions)
    for t in range(9):
        stepped, state = net.step(seq[:, t], state)
    assert (prefilled - stepped).abs().max() < 1e-4


@pytest.mark.parametrize("condition", ["none", "both"])
@pytest.mark.parametrize("attention,backend", KINDS)
def test_no_logit_sees_its_own_or_a_later_byte(attention, backend, condition):
    net = tiny(attention, backend, condition=condition)
    seq, labels, captions = batch_inputs()
    logits = net(seq, labels, captions)
    for t in (0, 5, 7, 8, 15, LENGTH - 1):
        changed = seq.clone()
        changed[:, t] = (changed[:, t] + 1) % BINS
        changed_logits = net(changed, labels, captions)
        assert torch.allclose(logits[:, : t + 1], changed_logits[:, : t + 1], atol=1e-6), t
        if t + 1 < LENGTH:
            assert not torch.allclose(logits[:, t + 1], changed_logits[:, t + 1]), t


@pytest.mark.parametrize("given", [0, 1, 6])
@pytest.mark.parametrize("extra", [{"conv_kernel": 5}, {"row_len": 5}], ids=["byte-convolution", "rows"])
@pytest.mark.parametrize("attention,backend", KINDS)
def test_recurrent_twin_matches_parallel_with_the_byte_convolution_or_rows(attention, backend, extra, given):
    net = tiny(attention, backend, condition="class", **extra)
    seq, labels, _ = batch_inputs()
    logits = net(seq, labels)
    step_logits, state = net.prefill(net.init_state(3), labels, prefix=seq[:, :given] if given else None)
    assert (step_logits - logits[:, given]).abs().max() < 1e-4
    for t in range(given, LENGTH - 1):
        step_logits, state = net.step(seq[:, t], state)
        assert (step_logits - logits[:, t + 1]).abs().max() < 1e-4, t


def test_row_and_column_embeddings_follow_the_image_layout():
    # Token prefix_len + t predicts byte t: bytes one row apart share a column vector, bytes in one
    # row share a row vector, and the table has a row for a last, partial row (21 bytes, rows of 5).
    net = tiny(condition="class", row_len=5)
    assert net.row_embedding.num_embeddings == 5
    with torch.no_grad():
        net.position_embedding.weight.zero_()
        net.row_embedding.weight.zero_()
        net.column_embedding.weight.normal_()
        columns = net._position_vectors(torch.arange(net.max_len))[net.prefix_len:]  # (21, d), byte order
        net.column_embedding.weight.zero_()
        net.row_embedding.weight.normal_()
        rows = net._position_vectors(torch.arange(net.max_len))[net.prefix_len:]
    assert torch.equal(columns[3], columns[8]) and torch.equal(columns[3], columns[18])
    assert not torch.equal(columns[3], columns[4])
    assert torch.equal(rows[5], rows[9]) and not torch.equal(rows[4], rows[5])
    assert torch.equal(rows[20], net.row_embedding.weight[4])


@pytest.mark.parametrize("kernel", [1, 5])
def test_byte_convolution_reaches_exactly_its_window_and_stays_causal(kernel):
    # With every attention output cut, the logits at t see only the convolution's window: bytes
    # t - kernel .. t - 1 (the input token at t is byte t - 1); never byte t or later.
    net = tiny(conv_kernel=kernel)
    with torch.no_grad():
        for block in net.blocks:
            block.attention.out_projection.weight.zero_()
            block.attention.out_projection.bias.zero_()
    seq, _, _ = batch_inputs()
    logits = net(seq)
    t = 12
    for back in range(0, kernel + 3):
        changed = seq.clone()
        changed[:, t - back] = (changed[:, t - back] + 1) % BINS
        moved = bool((net(changed)[:, t] - logits[:, t]).abs().max() > 1e-6)
        assert moved == (1 <= back <= kernel), back


@pytest.mark.parametrize("inject", ["prefix", "input", "blocks", "film"])
@pytest.mark.parametrize("condition", ["class", "caption", "both"])
def test_recurrent_twin_matches_parallel_for_each_condition_injection(condition, inject):
    net = tiny(condition=condition, condition_inject=inject, head="logistic-mixture")
    seq, labels, captions = batch_inputs()
    logits = net(seq, labels, captions)
    step_logits, state = net.prefill(net.init_state(3), labels, captions, seq[:, :4])
    assert (step_logits - logits[:, 4]).abs().max() < 1e-4
    for t in range(4, LENGTH - 1):
        step_logits, state = net.step(seq[:, t], state)
        assert (step_logits - logits[:, t + 1]).abs().max() < 1e-4, t


@pytest.mark.parametrize("inject,direct", [("prefix", False), ("input", True), ("blocks", True), ("film", True)])
def test_condition_is_injected_at_every_position_not_only_through_attention(inject, direct):
    # With every attention output cut, a position sees nothing but itself: the class can then change
    # its logits only if it is injected there directly (input embedding or per-block bias).
    net = tiny(condition="class", condition_inject=inject)
    with torch.no_grad():
        for block in net.blocks:
            block.attention.out_projection.weight.zero_()
            block.attention.out_projection.bias.zero_()
    seq, labels, _ = batch_inputs()
    changed = (net(seq, labels) - net(seq, (labels + 1) % 3)).abs().amax(-1)  # (B, L)
    assert bool((changed > 1e-6).all()) == direct


@pytest.mark.parametrize("attention,backend", KINDS)
def test_condition_reaches_every_position(attention, backend):
    net = tiny(attention, backend, condition="both")
    seq, labels, captions = batch_inputs()
    base = net(seq, labels, captions)
    other_labels = net(seq, (labels + 1) % 3, captions)
    other_captions = net(seq, labels, ["x", "y", "z"])
    for other in (other_labels, other_captions):
        assert ((base - other).abs().amax(-1) > 1e-6).all()


def test_state_size_is_constant_in_position_and_length_for_causal_linear():
    sizes = []
    for seq_len in (LENGTH, 4 * LENGTH):
        net = tiny(seq_len=seq_len)
        seq = torch.randint(0, BINS, (2, seq_len))
        _, state = net.prefill(net.init_state(2), prefix=seq[:, :1])
        sizes.append(state.nbytes())
        for t in range(1, seq_len - 1):
            _, state = net.step(seq[:, t], state)
            assert state.nbytes() == sizes[-1]
    assert sizes[0] == sizes[1]
    # per layer S (B, H, Dk, Dv) and Z (B, H, Dk) in fp32
    assert sizes[0] == 2 * 4 * (2 * 2 * 4 * 4 + 2 * 2 * 4)


def test_softmax_kv_cache_is_preallocated_and_does_not_grow():
    net = tiny("softmax")
    seq = torch.randint(0, BINS, (2, LENGTH))
    _, state = net.prefill(net.init_state(2), prefix=seq[:, :3])
    size = state.nbytes()
    for t in range(3, LENGTH - 1):
        _, state = net.step(seq[:, t], state)
    assert state.nbytes() == size
    with pytest.raises(ValueError, match="complete"):
        net.step(seq[:, 0], state)


def test_nll_is_per_byte_nats_and_matches_log_probs():
    for head in ("categorical", "logistic-mixture"):
        net = tiny(head=head, condition="class")
        seq, labels, _ = batch_inputs()
        nll = net.nll(seq, labels)
        assert nll.shape == (3, LENGTH) and nll.dtype == torch.float32
        assert torch.equal(net(seq, labels, return_nll=True), nll)  # the trainer's loss, through forward
        gathered = -net.log_probs(net(seq, labels)).gather(-1, seq.unsqueeze(-1)).squeeze(-1)
        assert (nll - gathered).abs().max() < 1e-5
        # an untrained model is close to uniform: roughly log(bins) nats
        assert 0.5 * math.log(BINS) < nll.mean() < 2 * math.log(BINS)


def test_nll_trains_down():
    net = tiny(head="logistic-mixture").train()
    seq, _, _ = batch_inputs()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = net.nll(seq).mean().item()
    for _ in range(15):
        optimizer.zero_grad()
        net.nll(seq).mean().backward()
        optimizer.step()
    assert net.nll(seq).mean().item() < first - 0.3


@pytest.mark.parametrize("attention,backend", [KINDS[0], KINDS[2]])
def test_generate_keeps_prefix_is_reproducible_and_restores_train_mode(attention, backend):
    net = tiny(attention, backend, condition="both").train()
    seq, labels, captions = batch_inputs()
    prefix = seq[:, :5]

    def draw(seed, **kwargs):
        return net.generate(3, labels=labels, captions=captions, prefix=prefix,
                            generator=torch.Generator().manual_seed(seed), **kwargs)

    first = draw(0, top_k=5, top_p=0.9, temperature=0.8)
    assert net.training
    assert first.shape == (3, LENGTH) and first.dtype == torch.long
    assert ((first >= 0) & (first < BINS)).all()
    assert torch.equal(first[:, :5], prefix)
    assert torch.equal(first, draw(0, top_k=5, top_p=0.9, temperature=0.8))
    assert not torch.equal(draw(0), draw(1))
    assert draw(0, batch_size=2).shape == (3, LENGTH)


@pytest.mark.parametrize("head", ["categorical", "logistic-mixture"])
def test_greedy_generate_agrees_with_parallel_argmax(head):
    net = tiny(head=head, condition="class")
    labels = torch.tensor([0, 2])
    out = net.generate(2, labels=labels, temperature=0, batch_size=1)
    expected = net.log_probs(net(out, labels)).argmax(-1)
    assert torch.equal(out, expected)


def test_generate_with_full_prefix_returns_it():
    net = tiny()
    seq, _, _ = batch_inputs()
    assert torch.equal(net.generate(3, prefix=seq), seq)


def test_condition_dropout_in_train_mode_only():
    net = tiny(condition="both", condition_dropout=1.0)
    seq, labels, captions = batch_inputs()
    null = net(seq)
    assert not torch.allclose(net(seq, labels, captions), null)  # eval: condition kept
    net.train()
    assert torch.allclose(net(seq, labels, captions), null, atol=1e-6)  # train, p=1: always dropped


def test_condition_dropout_drops_some_samples():
    net = tiny(condition="class", condition_dropout=0.5)
    seq = torch.randint(0, BINS, (1, LENGTH)).expand(64, -1)
    labels = torch.ones(64, dtype=torch.long)
    kept, null = net(seq, labels)[:, 0], net(seq)[:, 0]
    net.train()
    torch.manual_seed(3)
    mixed = net(seq, labels)[:, 0]
    is_kept = (mixed - kept).abs().amax(-1) < 1e-6
    is_null = (mixed - null).abs().amax(-1) < 1e-6
    assert (is_kept ^ is_null).all()
    assert 10 < is_null.sum() < 54


def test_bad_inputs_raise_value_errors():
    net = tiny(condition="both")
    seq, labels, captions = batch_inputs()
    with pytest.raises(ValueError, match="longer than caption_len"):
        net(seq, labels, ["a", "b", "much too long"])
    with pytest.raises(ValueError, match="labels must be in"):
        net(seq, torch.tensor([0, 1, 3]), captions)
    with pytest.raises(ValueError, match="seq values"):
        net(seq + BINS, labels, captions)
    with pytest.raises(ValueError, match="more than seq_len"):
        net(torch.zeros(1, LENGTH + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="leave a byte"):
        net.prefill(net.init_state(3), labels, captions, seq)


@pytest.mark.parametrize("attention,backend", KINDS)
def test_bf16_autocast_training_step_is_finite_and_close_to_fp32(attention, backend):
    net = tiny(attention, backend, condition="class").train()
    seq, labels, _ = batch_inputs()
    reference = net.nll(seq, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll = net.nll(seq, labels)
    assert nll.dtype == torch.float32
    nll.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert (nll - reference).abs().max() < 0.1


@pytest.mark.parametrize("attention", ["causal-linear", "retention", "gla", "deltanet", "gated-deltanet", "softmax"])
def test_only_the_linear_recurrent_twins_are_graph_safe(attention):
    # model.generation captures step_at() in a CUDA graph only when every layer allows it: the
    # softmax twin's KV-cache length is a Python int that a replayed graph would not advance
    net = ImageTransformer(ModelConfig(bins=4, seq_len=8, n_layers=2, n_heads=2, d_query=4, d_ff=8,
                                       attention=attention))
    assert net.graph_safe == (attention != "softmax")


def test_step_at_with_a_position_tensor_equals_step():
    torch.manual_seed(0)
    net = ImageTransformer(ModelConfig(bins=16, seq_len=12, n_layers=2, n_heads=2, d_query=4, d_ff=8,
                                       condition="class", n_classes=3)).eval()
    seq = torch.randint(0, 16, (3, 12))
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        _, state = net.prefill(net.init_state(3), labels=labels)
        _, twin = net.prefill(net.init_state(3), labels=labels)
        for t in range(11):
            expected, state = net.step(seq[:, t], state)
            got = net.step_at(seq[:, t], torch.tensor([net.prefix_len + 1 + t]), twin)
            assert torch.equal(got, expected), t


def test_uint8_bytes_are_taken_at_256_bins_as_the_reader_gives_them():
    # data_prep's batches and --index prefixes are uint8; comparing them with 256 in their own dtype
    # wrapped around and called every valid byte out of range
    net = tiny(bins=256)
    seq = torch.randint(0, 256, (3, LENGTH), generator=torch.Generator().manual_seed(2))
    seq[0, 0] = 255
    as_bytes = seq.to(torch.uint8)
    assert torch.equal(net(as_bytes), net(seq))
    assert torch.equal(net.generate(3, prefix=as_bytes[:, :5], seed=1), net.generate(3, prefix=seq[:, :5], seed=1))
    assert torch.equal(net.generate(3, prefix=as_bytes), seq)
    with pytest.raises(ValueError, match=r"seq values must be in \[0, 16\), got 0\.\.200"):
        tiny()(torch.tensor([[0, 200]], dtype=torch.uint8))
