"""Causal linear-attention image transformer with a recurrent twin for O(1)-per-byte sampling."""

from model.config import ModelConfig
from model.transformer import ImageTransformer, RecurrentState, bits_per_dim

__all__ = ["ModelConfig", "ImageTransformer", "RecurrentState", "bits_per_dim"]
