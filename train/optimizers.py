"""The optimizers of a run, from the optim section: AdamW, RAdam, or Muon for the blocks' matrices
with AdamW for everything else."""

from __future__ import annotations

import torch
from torch import nn

from train.config import ConfigError, TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer groups: decay for matrices, none for norms, embeddings and biases (norms' and
    biases' parameters are vectors; embeddings are matrices, found by their module)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.ndim < 2 or id(p) in embeddings]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """Muon's share: the weight matrices of the blocks' linear layers (attention, feed-forward and
    the condition projections). The embeddings, the output head and every vector stay with AdamW,
    as Muon's authors advise for the first and last layers and for gains. (The condition projections
    measured the same either way on the demo: 98.0% against 97.8% unguided agreement, 2,300 steps.)"""
    return [module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith("blocks.")]


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """optim.name's optimizers, all following the one learning-rate schedule: [AdamW] (fused where
    the device has it), [RAdam], or [Muon, AdamW], each with decoupled weight decay."""
    groups = parameter_groups(model, cfg.optim.weight_decay)
    common = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    fused = device.type in ("cuda", "cpu")  # one kernel per step instead of a loop over tensors
    if cfg.optim.name == "radam":
        return [torch.optim.RAdam(groups, decoupled_weight_decay=True, **common)]
    if cfg.optim.name == "adamw":
        return [torch.optim.AdamW(groups, fused=fused, **common)]
    if not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"optim.name=muon needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    matrices = {id(p) for p in muon_matrices(model)}
    rest = [dict(group, params=[p for p in group["params"] if id(p) not in matrices]) for group in groups]
    # match_rms_adamw scales each orthogonalised update to AdamW's size (0.2 sqrt(max(rows, cols))),
    # so that optim.lr and optim.weight_decay mean the same for both (Liu et al. 2025, "Muon is scalable")
    muon = torch.optim.Muon([p for p in model.parameters() if id(p) in matrices], lr=cfg.optim.lr,
                            weight_decay=cfg.optim.weight_decay, adjust_lr_fn="match_rms_adamw")
    return [muon, torch.optim.AdamW(rest, fused=fused, **common)]
