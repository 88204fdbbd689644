"""Output heads and sampling filters."""

import pytest
import torch

from model.heads import CategoricalHead, LogisticMixtureHead
from model.sampling import filter_logits, top_k_filter, top_p_filter


@pytest.mark.parametrize("bins", [2, 16, 256])
def test_logistic_mixture_probabilities_sum_to_one(bins):
    head = LogisticMixtureHead(8, bins, mixtures=10)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 30, generator=generator) * 3
    logits[:8, 20:] = -20.0  # scales at the clamp: very sharp
    logits[8:16, 20:] = 6.0  # very wide
    logits[16:24, 10:20] = 5.0  # means far beyond the last level
    probs = head.log_probs(logits).exp()
    assert probs.shape == (64, bins)
    assert torch.isfinite(head.log_probs(logits)).all()
    assert (probs.sum(-1) - 1).abs().max() < 1e-5


def test_logistic_mixture_nll_gathers_log_probs_and_peaks_at_the_mean():
    head = LogisticMixtureHead(8, 256, mixtures=2)
    logits = torch.tensor([[5.0, -5.0, 0.0, 0.9, -3.0, -3.0]])  # component 0: mean 0 -> level ~127.5
    log_probs = head.log_probs(logits)
    assert log_probs.argmax(-1).item() in (127, 128)
    target = torch.tensor([0, 50, 127, 255])
    nll = head.nll(logits.expand(4, -1), target)
    assert torch.allclose(nll, -log_probs[0, target], atol=1e-5)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value of counts against probs, levels of expected count < 5 pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    degrees = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(degrees / 2, dtype=torch.float64), statistic / 2))


MIXTURES = {  # (weights, means on [-1, 1], log-scales) of K components
    "random": None,
    "edges": ([0.0, 0.5, -1.0], [-1.05, 0.98, 0.0], [-3.5, -4.0, -1.0]),  # much of the mass on levels 0 and 255
    "sharp": ([2.0, 0.0], [0.3, -0.5], [-7.5, -6.5]),  # scales at the clamp: a few levels
    "wide": ([0.0], [0.2], [1.5]),  # wider than [-1, 1]: both end levels heavy
}


@pytest.mark.parametrize("name", MIXTURES)
def test_direct_mixture_draws_follow_the_256_level_probabilities(name):
    generator = torch.Generator().manual_seed(sorted(MIXTURES).index(name))
    if MIXTURES[name] is None:
        logits = torch.cat([torch.randn(10, generator=generator) * 2, torch.rand(10, generator=generator) * 2 - 1,
                            torch.rand(10, generator=generator) * 3 - 5])
    else:
        logits = torch.tensor([value for part in MIXTURES[name] for value in part])
    head = LogisticMixtureHead(8, 256, mixtures=logits.numel() // 3)
    probs = head.log_probs(logits.unsqueeze(0).double()).exp().squeeze(0)  # what the inverse-CDF path draws from
    draws = 200_000
    uniforms = torch.rand(draws, generator=generator, dtype=torch.float64)
    levels = head.sample(logits.unsqueeze(0).expand(draws, -1), uniforms)
    assert levels.dtype == torch.long and levels.min() >= 0 and levels.max() <= 255
    counts = torch.bincount(levels, minlength=256)
    if name == "edges":
        assert probs[0] > 0.1 and probs[255] > 0.1 and counts[0] > 0 and counts[255] > 0
    assert chi_square_p_value(counts, probs) > 1e-3


def test_chi_square_check_would_catch_an_off_by_one_level():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 0.1, -3.0])  # one component, a few levels wide
    head = LogisticMixtureHead(8, 256, mixtures=1)
    probs = head.log_probs(logits.unsqueeze(0)).exp().squeeze(0)
    levels = head.sample(logits.unsqueeze(0).expand(50_000, -1), torch.rand(50_000, generator=generator,
                                                                            dtype=torch.float64))
    shifted = torch.bincount((levels + 1).clamp(max=255), minlength=256)
    assert chi_square_p_value(shifted, probs) < 1e-6


def test_sampler_draws_mixture_directly_only_when_nothing_reshapes_the_distribution(monkeypatch):
    from model.generation import SamplingOptions, next_byte

    head = LogisticMixtureHead(8, 256, mixtures=2)
    calls = []
    monkeypatch.setattr(head, "sample", lambda logits, uniforms: calls.append(1) or torch.zeros(2, dtype=torch.long))
    net = torch.nn.Module()
    net.head, net.log_probs = head, head.log_probs
    logits, uniforms = torch.randn(2, 6), torch.rand(2, dtype=torch.float64)
    next_byte(net, logits, uniforms, SamplingOptions())
    assert calls == [1]
    for options in (SamplingOptions(temperature=0.8), SamplingOptions(top_k=5), SamplingOptions(top_p=0.9),
                    SamplingOptions(temperature=0)):
        drawn = next_byte(net, logits, uniforms, options)
        assert calls == [1] and drawn.shape == (2,)  # the 256-level path


def test_categorical_head_normalizes():
    head = CategoricalHead(8, 16)
    logits = head(torch.randn(5, 8))
    assert (head.log_probs(logits).exp().sum(-1) - 1).abs().max() < 1e-6


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    filtered = top_k_filter(logits, 2)
    assert torch.isinf(filtered).tolist() == [[True, False, True, False]]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    assert torch.isfinite(top_p_filter(logits, 0.7)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.1)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_filters_validate_arguments():
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=1.5)
