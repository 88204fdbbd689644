"""Output heads: categorical over bins, and the discretized mixture of logistics (PixelCNN++)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CategoricalHead(nn.Module):
    """A softmax over the `bins` levels."""

    def __init__(self, d_model: int, bins: int):
        super().__init__()
        self.bins = bins
        self.projection = nn.Linear(d_model, bins)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> logits (..., bins)."""
        return self.projection(h)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalized log-probabilities (..., bins), fp32."""
        return F.log_softmax(logits.float(), dim=-1)

    def nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats of target (...) under logits (..., bins), fp32."""
        return -self.log_probs(logits).gather(-1, target.long().unsqueeze(-1)).squeeze(-1)


class LogisticMixtureHead(nn.Module):
    """A mixture of K logistics discretized over the levels 0..bins-1 mapped onto [-1, 1].

    The logits are (..., 3K): mixture weights, means and log-scales. Level i covers
    [x_i - 1/(bins-1), x_i + 1/(bins-1)], except that the end levels extend to -inf and +inf,
    so the probabilities of all levels sum to one exactly.
    """

    min_log_scale = -7.0  # as PixelCNN++: keeps the bins from collapsing to zero width

    def __init__(self, d_model: int, bins: int, mixtures: int):
        super().__init__()
        self.bins, self.mixtures = bins, mixtures
        self.projection = nn.Linear(d_model, 3 * mixtures)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> mixture parameters (..., 3K)."""
        return self.projection(h)

    def _log_prob_of(self, logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Log-probability of integer `levels` (..., M), broadcast against logits (..., 3K) -> (..., M)."""
        weights, means, log_scales = logits.float().unsqueeze(-2).chunk(3, dim=-1)  # (..., 1, K) each
        log_scales = log_scales.clamp(min=self.min_log_scale)
        half_width = 1.0 / (self.bins - 1)
        x = (2.0 * levels.float() / (self.bins - 1) - 1.0).unsqueeze(-1)  # (..., M, 1)
        inv_scale = torch.exp(-log_scales)
        upper = inv_scale * (x - means + half_width)  # (..., M, K)
        lower = inv_scale * (x - means - half_width)
        log_first = F.logsigmoid(upper)   # CDF(upper) - CDF(-inf)
        log_last = F.logsigmoid(-lower)   # CDF(+inf) - CDF(lower)
        # sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))): no cancellation
        log_middle = log_first + log_last + torch.log(-torch.expm1(-2.0 * half_width * inv_scale))
        levels = levels.unsqueeze(-1)
        log_component = torch.where(levels == 0, log_first,
                                    torch.where(levels == self.bins - 1, log_last, log_middle))
        return torch.logsumexp(F.log_softmax(weights, dim=-1) + log_component, dim=-1)  # (..., M)

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalized log-probabilities over all levels (..., bins), fp32."""
        return self._log_prob_of(logits, torch.arange(self.bins, device=logits.device))

    def sample(self, logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        """One level per row of logits (B, 3K) from one uniform per row (B,) in [0, 1): exactly the
        distribution log_probs gives, drawn without evaluating the bins levels.

        The uniform picks a component by the mixture weights; where it fell inside that component's
        share is itself uniform, and through the logistic's inverse CDF it gives x, rounded to the
        nearest level and clamped (the end levels reach to -inf and +inf, as in log_probs).
        """
        weights, means, log_scales = logits.double().chunk(3, dim=-1)  # (B, K) each
        cdf = torch.softmax(weights, dim=-1).cumsum(-1)  # (B, K)
        target = uniforms.double().unsqueeze(-1) * cdf[:, -1:]  # (B, 1)
        component = torch.searchsorted(cdf, target, right=True).clamp_(max=self.mixtures - 1)  # (B, 1)
        below = torch.where(component > 0, cdf.gather(-1, (component - 1).clamp(min=0)), 0.0)
        within = (target - below) / (cdf.gather(-1, component) - below)  # (B, 1) uniform in [0, 1)
        scale = log_scales.gather(-1, component).clamp(min=self.min_log_scale).exp()
        x = means.gather(-1, component) + scale * (torch.log(within) - torch.log1p(-within))  # (B, 1)
        level = torch.round((x + 1.0) * (self.bins - 1) / 2.0).clamp_(0, self.bins - 1)
        return level.squeeze(-1).long()

    def nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats of target (...) under logits (..., 3K), fp32."""
        # only the target level is evaluated: (..., 1) instead of (..., bins, K)
        return -self._log_prob_of(logits, target.long().unsqueeze(-1)).squeeze(-1)


def build_head(head: str, d_model: int, bins: int, mixtures: int) -> nn.Module:
    """The head named `head` ('categorical' or 'logistic-mixture'; ModelConfig checked the name)."""
    return CategoricalHead(d_model, bins) if head == "categorical" else LogisticMixtureHead(d_model, bins, mixtures)
