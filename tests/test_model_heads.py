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
