"""ImageTransformer: a causal transformer over image bytes, trained in parallel, sampled as an RNN.

Input sequence: [condition prefix (P tokens)] [begin] [byte 0] ... [byte L-2]; the output at the
begin token predicts byte 0 and the output at byte t-1 predicts byte t, so logits[:, t] predicts
seq[:, t] for every t and bits/dim covers all L bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch
from torch import nn

from model.attention_layer import AttentionLayer
from model.conditioning import ConditionEmbedding, check_range
from model.config import ModelConfig
from model.heads import build_head
from model.pretrained import PretrainedMixin


@dataclass
class RecurrentState:
    """Everything the recurrent twin carries between steps: per-layer states and the position."""

    layers: list          # one LinearState or KVCache per layer
    position: int         # index in the full sequence of the next token step() consumes
    batch_size: int
    # what the condition adds at every position, set by prefill(): to the input embedding
    # (B, d_model), and before each block (one (B, d_model) per block); None where not used
    condition_input: Optional[torch.Tensor] = None
    condition_biases: Optional[list] = None
    # the last conv_kernel byte-token embeddings (B, conv_kernel, d_model), oldest first; None without
    # the byte convolution
    recent_embeddings: Optional[torch.Tensor] = None

    def nbytes(self) -> int:
        """Memory held by the state's tensors, in bytes."""
        held = [getattr(layer, f.name) for layer in self.layers for f in fields(layer)]
        held += [self.condition_input, self.recent_embeddings, *(self.condition_biases or [])]
        return sum(t.nbytes for t in held if isinstance(t, torch.Tensor))


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x) without the module call's overhead (the recurrent step runs it twice per layer per byte)."""
    return nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: ModelConfig, backend: str, chunk_size: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.d_model)
        self.attention = AttentionLayer(cfg.d_model, cfg.n_heads, cfg.d_query, cfg.d_value, cfg.attention,
                                        backend, chunk_size)
        self.feed_forward_norm = nn.LayerNorm(cfg.d_model)
        # the condition's share of this block, "blocks" or "film" (model.config.CONDITION_INJECTIONS says how)
        width = {"blocks": 1, "film": 5}.get(cfg.condition_inject, 0)
        self.film = cfg.condition_inject == "film"
        self.condition_projection = (nn.Linear(cfg.d_model, width * cfg.d_model)
                                     if cfg.condition != "none" and width else None)
        self.feed_forward = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                          nn.Linear(cfg.d_ff, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    @staticmethod
    def _film(normed: torch.Tensor, modulation: Optional[list]) -> torch.Tensor:
        """normed * (1 + scale) + shift where FiLM is on."""
        return normed if modulation is None else torch.addcmul(modulation[1], normed, 1 + modulation[0])

    def forward(self, x: torch.Tensor, state=None, bias: Optional[torch.Tensor] = None):
        """x (B, L, d_model) -> (B, L, d_model); fills the layer state when one is given."""
        return self._residual(x, self.attention, state, None if bias is None else bias.unsqueeze(1))

    def step(self, x: torch.Tensor, state, bias: Optional[torch.Tensor] = None):
        """One position x (B, d_model) through the recurrent twin."""
        return self._residual(x, self.attention.step, state, bias)

    def _residual(self, x: torch.Tensor, attend, state, bias: Optional[torch.Tensor]):
        """The block around attend (the attention's parallel or recurrent form), for either path's shapes."""
        attention_film = feed_forward_film = None  # (scale, shift) of each normalised input under FiLM
        if bias is not None and self.film:
            bias, *modulation = bias.chunk(5, dim=-1)
            attention_film, feed_forward_film = modulation[:2], modulation[2:]
        if bias is not None:
            x = x + bias
        attended, state = attend(self._film(_layer_norm(self.attention_norm, x), attention_film), state)
        x = x + (self.dropout(attended) if self.training else attended)  # eval: spare two module calls
        out = self.feed_forward(self._film(_layer_norm(self.feed_forward_norm, x), feed_forward_film))
        return x + (self.dropout(out) if self.training else out), state


LN2 = math.log(2.0)  # nats per bit


def bits_per_dim(nats: float, n_bytes: float = 1.0) -> float:
    """Bits per byte of `nats` summed over `n_bytes` (nll_totals' first two entries, or a mean loss)."""
    return float(nats) / float(n_bytes) / LN2


class ImageTransformer(PretrainedMixin, nn.Module):
    """Autoregressive model of byte sequences with an optional class/caption conditioning prefix.

    backend and chunk_size say how the attention runs (model.attention_ops), not what the model is:
    they are not part of cfg and not saved with the weights.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto", chunk_size: int = 64):
        super().__init__()
        if cfg.row_len == "auto":
            raise ValueError("model.row_len='auto' is the data's row: resolve it to a number (the trainer does)")
        self.config = cfg
        # kept with the weights by save_pretrained: the data's image format, optimizer steps trained
        self.image_info: Optional[dict] = None
        self.trained_steps = 0
        d_model = cfg.d_model
        self.condition = ConditionEmbedding(cfg.condition, d_model, cfg.n_classes, cfg.caption_len,
                                            cfg.condition_dropout)
        self.prefix_len = cfg.prefix_len
        self.byte_embedding = nn.Embedding(cfg.bins + 1, d_model)  # index `bins` is the begin token
        self.position_embedding = nn.Embedding(self.prefix_len + cfg.seq_len, d_model)
        if cfg.row_len:
            self.row_embedding = nn.Embedding(-(-cfg.seq_len // cfg.row_len), d_model)
            self.column_embedding = nn.Embedding(cfg.row_len, d_model)
        # depthwise: each embedding channel learns its own weights over the last conv_kernel bytes
        self.byte_conv = (nn.Conv1d(d_model, d_model, cfg.conv_kernel, groups=d_model, bias=False)
                          if cfg.conv_kernel else None)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, backend, chunk_size) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = build_head(cfg.head, d_model, cfg.bins, cfg.mixtures)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by depth
        for name, parameter in self.named_parameters():
            if name.endswith("out_projection.weight") or name.endswith("feed_forward.2.weight"):
                nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * cfg.n_layers))
            if "condition_projection" in name or name == "byte_conv.weight":
                nn.init.zeros_(parameter)  # added paths start closed: a fresh model is the plain one

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # ---------------------------------------------------------------- parallel (training) path
    def check_bytes(self, seq: torch.Tensor, name: str) -> torch.Tensor:
        """Validate an integer tensor [B, K] of bytes in [0, bins) (conditioning.check_range) and return it as long."""
        if seq.dim() != 2 or seq.dtype.is_floating_point or seq.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor [B, K], got {tuple(seq.shape)} {seq.dtype}")
        seq = seq.long()  # first: a uint8 batch compared with bins=256 in its own dtype wraps around
        check_range(seq, self.config.bins, f"{name} values")
        return seq

    def _embed(self, tokens: torch.Tensor, labels, captions, drop_condition=None):
        """[prefix] + [begin] + tokens (B, K) -> input embeddings (B, P + 1 + K, d_model), and the
        condition vector (B, d_model) or None."""
        batch = tokens.shape[0]
        begin = torch.full((batch, 1), self.config.bins, dtype=torch.long, device=tokens.device)
        x = self.byte_embedding(torch.cat([begin, tokens], dim=1))  # (B, 1 + K, d)
        if self.byte_conv is not None:  # causal: position t sees tokens t - conv_kernel + 1 .. t
            padded = nn.functional.pad(x.transpose(1, 2), (self.config.conv_kernel - 1, 0))
            with torch.autocast(device_type=x.device.type, enabled=False):  # fp32, as the step sums it
                x = x + self.byte_conv(padded.float()).transpose(1, 2)
        prefix, condition = self.condition(batch, labels, captions, tokens.device, drop_condition)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # (B, P + 1 + K, d)
        if condition is not None and self.config.condition_inject == "input":
            x = x + condition.unsqueeze(1)
        positions = torch.arange(x.shape[1], device=x.device)
        return self.dropout(x + self._position_vectors(positions)), condition

    def _position_vectors(self, positions: torch.Tensor) -> torch.Tensor:
        """Token positions (T,) -> (T, d_model); token prefix_len + t predicts byte t of the image."""
        x = self.position_embedding(positions)
        if self.config.row_len:
            byte = (positions - self.prefix_len).clamp(min=0)  # the prefix shares byte 0's row and column
            x = x + self.row_embedding(byte // self.config.row_len) + self.column_embedding(byte % self.config.row_len)
        return x

    def _condition_biases(self, condition: Optional[torch.Tensor]) -> Optional[list]:
        """What each block adds at every position for condition vector (B, d_model): a (B, d_model)
        per block, or None where the condition does not enter the blocks."""
        if condition is None or self.blocks[0].condition_projection is None:
            return None
        return [block.condition_projection(condition) for block in self.blocks]

    def _trunk(self, x: torch.Tensor, biases: Optional[list], states: Optional[list] = None) -> torch.Tensor:
        """Run the blocks and the final norm over (B, T, d_model); fill the layer states in place when given."""
        for index, block in enumerate(self.blocks):
            x, _ = block(x, None if states is None else states[index], None if biases is None else biases[index])
        return self.final_norm(x)

    def forward(self, seq: torch.Tensor, labels: Optional[torch.Tensor] = None,
                captions: Optional[Sequence[str]] = None, drop_condition: Optional[torch.Tensor] = None,
                return_nll: bool = False) -> torch.Tensor:
        """Logits [B, L, head_dim]; logits[:, t] predicts seq[:, t] from seq[:, :t] and the condition
        (the null condition in rows where drop_condition (B,) bool is true). With return_nll, nll()'s
        [B, L] instead: a DDP-wrapped model computes its loss through its own forward this way."""
        seq = self.check_bytes(seq, "seq")
        if seq.shape[1] > self.config.seq_len:
            raise ValueError(f"seq has {seq.shape[1]} bytes, more than seq_len={self.config.seq_len}")
        x, condition = self._embed(seq[:, :-1], labels, captions, drop_condition)
        hidden = self._trunk(x, self._condition_biases(condition))
        logits = self.head(hidden[:, self.prefix_len:])  # (B, L, head_dim)
        # the head's nll evaluates only the target level (the mixture never builds (B, L, bins, K))
        return self.head.nll(logits, seq) if return_nll else logits

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalized log-probabilities [..., bins] (fp32) from logits of either head."""
        return self.head.log_probs(logits)

    def nll(self, seq: torch.Tensor, labels: Optional[torch.Tensor] = None,
            captions: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Negative log-likelihood [B, L] in nats per byte, fp32 (divide the mean by ln 2 for bits/dim)."""
        return self(seq, labels, captions, return_nll=True)

    @torch.no_grad()
    def nll_totals(self, batches) -> torch.Tensor:
        """float64 [nats, bytes, images] summed over batches (each with .seqs, .labels, .captions), in
        eval mode: nats / bytes / ln 2 is the exact bits/dim of every byte they hold."""
        was_training, device = self.training, self.byte_embedding.weight.device
        self.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        for batch in batches:
            seqs = batch.seqs.to(device, non_blocking=True).long()  # (B, L)
            # the model takes the labels and captions its condition uses and ignores the others
            nll = self.nll(seqs, batch.labels.to(device), batch.captions)  # (B, L) nats
            totals += torch.stack([nll.double().sum(), totals.new_tensor(seqs.numel()),
                                   totals.new_tensor(len(seqs))])
        self.train(was_training)
        return totals

    # ---------------------------------------------------------------- recurrent (sampling) path
    @property
    def max_len(self) -> int:
        """Longest token sequence the model reads: the prefix, the begin token and L-1 bytes."""
        return self.prefix_len + self.config.seq_len

    def init_state(self, batch_size: int) -> RecurrentState:
        """An empty recurrent state for batch_size sequences, on the model's device."""
        parameter = self.byte_embedding.weight
        layers = [block.attention.init_state(batch_size, self.max_len, parameter.device, parameter.dtype)
                  for block in self.blocks]
        return RecurrentState(layers=layers, position=0, batch_size=batch_size)

    def prefill(self, state: RecurrentState, labels: Optional[torch.Tensor] = None,
                captions: Optional[Sequence[str]] = None, prefix: Optional[torch.Tensor] = None,
                drop_condition: Optional[torch.Tensor] = None):
        """Read the condition, the begin token and K given bytes in one parallel pass; return logits
        [B, head_dim] predicting byte K, and the state ready for step()."""
        batch = state.batch_size
        device = self.byte_embedding.weight.device
        if prefix is None:
            prefix = torch.zeros(batch, 0, dtype=torch.long, device=device)
        prefix = self.check_bytes(prefix, "prefix").to(device)  # checked where it was given: a clear error
        if prefix.shape[0] != batch:
            raise ValueError(f"prefix has {prefix.shape[0]} rows for a state of batch {batch}")
        if prefix.shape[1] >= self.config.seq_len:
            raise ValueError(f"prefix has {prefix.shape[1]} bytes; at most seq_len-1="
                             f"{self.config.seq_len - 1} leave a byte to predict")
        x, condition = self._embed(prefix, labels, captions, drop_condition)
        biases = self._condition_biases(condition)  # once: the prefix pass and every later step use them
        hidden = self._trunk(x, biases, state.layers)
        state.position = hidden.shape[1]
        state.condition_biases = biases
        if self.byte_conv is not None:
            tokens = torch.cat([torch.full((batch, 1), self.config.bins, device=device), prefix], dim=1)
            recent = self.byte_embedding(tokens[:, -self.config.conv_kernel:])  # (B, <= k, d)
            state.recent_embeddings = nn.functional.pad(recent, (0, 0, self.config.conv_kernel - recent.shape[1], 0))
        if condition is not None and self.config.condition_inject == "input":
            state.condition_input = condition
        return self.head(hidden[:, -1]), state

    def step(self, byte: torch.Tensor, state: RecurrentState):
        """Feed one byte [B] at state.position; return logits [B, head_dim] for the next byte."""
        if state.position >= self.max_len:
            raise ValueError(f"the recurrent state is at position {state.position}: the image is complete")
        # No value check here: it would cost two device->host syncs per byte, and the bytes fed back
        # by generate() come from the model itself. User-given bytes are checked once, in prefill().
        position = torch.arange(state.position, state.position + 1, device=byte.device)  # no host copy
        logits = self.step_at(byte.reshape(-1).long(), position, state)
        state.position += 1
        return logits, state

    def step_at(self, byte: torch.Tensor, position: torch.Tensor, state: RecurrentState) -> torch.Tensor:
        """step() for CUDA graphs: byte [B] long at token `position` (a 0-dim long tensor on the model's
        device) -> logits [B, head_dim]. No checks and no host sync; the layer states are updated in
        place and state.position is left for the caller to keep."""
        x = self.byte_embedding(byte)  # (B, d)
        if self.byte_conv is not None:
            recent = torch.cat([state.recent_embeddings[:, 1:], x.unsqueeze(1)], dim=1)  # (B, k, d)
            state.recent_embeddings.copy_(recent)  # in place: a CUDA graph replays on this buffer
            x = x + (recent * self.byte_conv.weight.squeeze(1).t()).sum(1)
        x = x + self._position_vectors(position)
        if state.condition_input is not None:
            x = x + state.condition_input
        layers, biases = state.layers, state.condition_biases
        for index, block in enumerate(self.blocks):
            x, layers[index] = block.step(x, layers[index], None if biases is None else biases[index])
        return self.head(self.final_norm(x))

    @property
    def graph_safe(self) -> bool:
        """Whether step_at() may be captured in a CUDA graph: every kind's but softmax's, whose cache length moves."""
        return self.config.attention != "softmax"

    def generate(self, n: int, labels: Optional[torch.Tensor] = None, captions: Optional[Sequence[str]] = None,
                 prefix: Optional[torch.Tensor] = None, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 batch_size: Optional[int] = None, seed: Optional[int] = None, guidance: float = 1.0) -> torch.Tensor:
        """Sample n sequences LongTensor [n, L] (on the model's device); given prefix bytes are kept. The one
        generation path (model.generation.generate_images, no_grad): a seed gives the same images at any
        batch size, here, in the trainer's grids and from lit-sample; no seed: one drawn from `generator` (else 0)."""
        from model.generation import SamplingOptions, generate_images  # generation calls back into this class

        if seed is None:
            seed = 0 if generator is None else int(torch.randint(2**31 - 1, (), generator=generator))
        device = self.byte_embedding.weight.device
        if prefix is not None:
            prefix = prefix.long().cpu()
            prefix = prefix.unsqueeze(0).expand(n, -1) if prefix.dim() == 1 else prefix
        if labels is not None:
            labels = torch.as_tensor(labels).long().reshape(-1).cpu()
            labels = labels.expand(n) if labels.numel() == 1 else labels
        options = SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  batch_size=batch_size or max(n, 1), guidance=guidance, progress=False)
        seqs, _ = generate_images(self, n, options, labels=labels, captions=captions, prefix=prefix)
        return seqs.to(device)
