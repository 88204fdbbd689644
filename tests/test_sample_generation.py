"""The generation loop: modes agree, seeds reproduce, completions keep their prefix, filters hold."""

import pytest
import torch

from model.generation import SamplingOptions, draw, generate_images, image_uniforms
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)
from test_sample_helpers import tiny_model


def options(**overrides) -> SamplingOptions:
    return SamplingOptions(progress=False, **overrides)


@pytest.mark.parametrize("attention", ["causal-linear", "softmax"])
def test_recurrent_and_parallel_give_the_same_images(attention):
    net = tiny_model(attention=attention)
    labels = torch.tensor([0, 1, 2, 0, 1])
    captions = ["a", "bb", "", "ccc", "a"]
    recurrent, _ = generate_images(net, 5, options(seed=3, mode="recurrent"), labels=labels,
                                   captions=captions)
    parallel, _ = generate_images(net, 5, options(seed=3, mode="parallel"), labels=labels,
                                  captions=captions)
    assert recurrent.shape == (5, 36)
    assert torch.equal(recurrent, parallel)
    assert len({tuple(row.tolist()) for row in recurrent}) == 5  # random weights: varied images


def test_same_seed_same_images_whatever_the_batch_size():
    net = tiny_model()
    whole, _ = generate_images(net, 7, options(seed=11, batch_size=7))
    split, _ = generate_images(net, 7, options(seed=11, batch_size=3))
    other, _ = generate_images(net, 7, options(seed=12, batch_size=7))
    assert torch.equal(whole, split)
    assert not torch.equal(whole, other)


def test_completion_keeps_the_first_k_bytes_exactly():
    net = tiny_model()
    torch.manual_seed(5)
    prefix = torch.randint(0, 16, (4, 13))
    for mode in ("recurrent", "parallel"):
        out, stats = generate_images(net, 4, options(seed=1, mode=mode), prefix=prefix)
        assert torch.equal(out[:, :13], prefix)
        assert stats.bytes_generated == 4 * (36 - 13)


def test_top_k_one_and_temperature_zero_are_greedy():
    net = tiny_model()
    greedy, _ = generate_images(net, 3, options(seed=0, temperature=0))
    top1, _ = generate_images(net, 3, options(seed=99, top_k=1))
    assert torch.equal(greedy, top1)


def test_draw_follows_the_distribution_and_never_picks_a_filtered_value():
    log_probs = torch.log(torch.tensor([[0.0, 0.25, 0.0, 0.75]])).expand(4000, -1)  # (N, 4)
    uniforms = image_uniforms(0, list(range(4000)), 1)[:, 0]
    picks = draw(log_probs, uniforms)
    assert set(picks.tolist()) == {1, 3}
    assert abs((picks == 3).float().mean().item() - 0.75) < 0.03


def test_generation_leaves_the_model_in_its_mode():
    net = tiny_model().train()
    generate_images(net, 1, options())
    assert net.training


def test_bf16_autocast_samples_valid_bytes():
    net = tiny_model()
    out, _ = generate_images(net, 2, options(seed=0, precision="bf16"), labels=torch.tensor([0, 1]))
    assert out.shape == (2, 36) and 0 <= out.min() and out.max() < 16


@pytest.mark.parametrize("precision", ["no", "fp16", "BF16"])
def test_a_precision_the_sampler_does_not_know_is_refused_not_run_as_bf16(precision):
    with pytest.raises(ValueError, match=f"precision '{precision}': must be one of auto, bf16, fp32"):
        generate_images(tiny_model(), 1, options(precision=precision))


@pytest.mark.parametrize("head", ["categorical", "logistic-mixture"])
def test_compiled_step_draws_the_same_images(monkeypatch, head):
    # --compile traces the recurrent step (in-place state, position and byte counters as tensors)
    # with torch.compile; "aot_eager" runs that same trace without generating C++/Triton code, which
    # on a 2-core CPU would cost ~25 s per model. The code generation is torch's; the trace is ours.
    import model.generation as generation

    monkeypatch.setattr(generation, "COMPILE_BACKEND", "aot_eager")
    generation._compiled_step.cache_clear()
    torch._dynamo.reset()
    try:
        net = tiny_model(head=head)
        labels = torch.tensor([0, 1, 2, 0])
        compiled, _ = generate_images(net, 4, options(seed=2, compile=True, top_k=5), labels=labels)
        eager, _ = generate_images(net, 4, options(seed=2, top_k=5), labels=labels)
        prefix = compiled[:, :10]
        completed, _ = generate_images(net, 4, options(seed=2, compile=True, top_k=5), labels=labels,
                                       prefix=prefix)
    finally:
        generation._compiled_step.cache_clear()
    assert torch.equal(compiled, eager)
    assert torch.equal(completed, compiled)  # same uniforms, same prefix: the same continuation


def test_guidance_one_is_exactly_unguided_and_zero_is_exactly_unconditional():
    net = tiny_model()
    labels = torch.tensor([0, 1, 2, 0, 1])
    plain, _ = generate_images(net, 5, options(seed=7), labels=labels)
    one, _ = generate_images(net, 5, options(seed=7, guidance=1.0), labels=labels)
    zero, _ = generate_images(net, 5, options(seed=7, guidance=0.0), labels=labels)
    unconditional, _ = generate_images(net, 5, options(seed=7))  # the null class
    guided, _ = generate_images(net, 5, options(seed=7, guidance=3.0), labels=labels)
    assert torch.equal(one, plain)
    assert torch.equal(zero, unconditional) and not torch.equal(zero, plain)
    assert not torch.equal(guided, plain)


@pytest.mark.parametrize("condition", ["class", "caption", "both"])
def test_guided_sampling_recurrent_equals_parallel_and_the_seed_reproduces(condition):
    net = tiny_model(condition=condition)
    labels = torch.tensor([0, 1, 2, 0])
    captions = ["a", "bb", "", "ccc"]
    common = dict(seed=5, guidance=2.5, top_p=0.9)
    recurrent, _ = generate_images(net, 4, options(mode="recurrent", batch_size=4, **common), labels=labels,
                                   captions=captions)
    split, _ = generate_images(net, 4, options(mode="recurrent", batch_size=3, **common), labels=labels,
                               captions=captions)
    parallel, _ = generate_images(net, 4, options(mode="parallel", **common), labels=labels, captions=captions)
    assert torch.equal(recurrent, parallel) and torch.equal(recurrent, split)


def test_guidance_needs_a_condition_and_a_sane_scale():
    with pytest.raises(ValueError, match="needs a class- or caption-conditioned model"):
        generate_images(tiny_model(condition="none"), 2, options(guidance=2.0))
    with pytest.raises(ValueError, match="must be >= 0"):
        generate_images(tiny_model(), 2, options(guidance=-1.0))


def test_model_generate_is_the_sampler_same_seed_same_images():
    # the trainer's TensorBoard grids call net.generate; lit-sample calls generate_images: one path
    net = tiny_model()
    labels = torch.tensor([2, 0, 1, 1])
    from_model = net.generate(4, labels=labels, seed=9, top_k=6, batch_size=3)
    from_sampler, _ = generate_images(net, 4, options(seed=9, top_k=6, batch_size=4), labels=labels)
    assert torch.equal(from_model, from_sampler)


@pytest.mark.parametrize("native", [True, False])
def test_sampler_and_evaluator_default_to_bf16_only_where_the_device_runs_it_natively(monkeypatch, native):
    from model.precision import autocast, sampling_precision
    from sample.evaluate import build_parser as eval_parser
    from sample.run import build_parser as sample_parser

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # this machine's answer, replaced
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    assert sample_parser().parse_args(["--checkpoint", "r", "--out", "x.png"]).precision == "auto"
    assert eval_parser().parse_args(["--checkpoint", "r", "--data", "d"]).precision == "auto"
    cpu = torch.device("cpu")
    assert sampling_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert sampling_precision("fp32", cpu) == "fp32" and sampling_precision("bf16", cpu) == "bf16"
    with autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") == native
