"""Conditioning works: a briefly trained model draws each class at that class's grey level."""

import torch

from model import ImageTransformer, ModelConfig
from model.generation import SamplingOptions, generate_images
from test_sample_helpers import one_thread  # noqa: F401  (autouse fixture)

LEVELS = [1, 3, 5, 7]  # class c is a flat 4x4 image at grey level LEVELS[c] of 8 bins


def flat_grey_batch(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [B, 16] that are flat images at their class's level, and the labels [B]."""
    labels = torch.randint(0, len(LEVELS), (batch,), generator=generator)
    seqs = torch.tensor(LEVELS)[labels].unsqueeze(1).expand(-1, 16)  # (B, 16)
    return seqs.contiguous(), labels


def test_class_conditional_samples_come_out_at_their_class_level():
    torch.manual_seed(0)
    net = ImageTransformer(ModelConfig(bins=8, seq_len=16, n_layers=2, n_heads=2, d_query=8, d_ff=32,
                                       condition="class", n_classes=len(LEVELS), condition_dropout=0.1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(100):
        seqs, labels = flat_grey_batch(32, generator)
        loss = net.nll(seqs, labels=labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1, f"the toy model did not learn (loss {loss.item():.3f} nats/byte)"

    labels = torch.arange(len(LEVELS)).repeat_interleave(6)  # (24,)
    for mode in ("recurrent", "parallel"):
        out, _ = generate_images(net, len(labels), SamplingOptions(seed=0, mode=mode, progress=False),
                                 labels=labels)
        expected = torch.tensor(LEVELS)[labels].unsqueeze(1)  # (24, 1)
        assert (out == expected).float().mean().item() > 0.95
        per_class = out.float().view(len(LEVELS), -1).mean(dim=1)
        assert torch.allclose(per_class, torch.tensor(LEVELS, dtype=torch.float), atol=0.3)
    # without a label the model mixes the classes: conditioning, not a single memorised image
    unconditional, _ = generate_images(net, 24, SamplingOptions(seed=0, progress=False))
    assert len(set(unconditional[:, 0].tolist())) > 1
