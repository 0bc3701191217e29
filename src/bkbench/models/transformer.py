"""Causal Transformer language model: the O(N^2) baseline.

Pre-LayerNorm blocks (x + Attn(LN(x)), x + MLP(LN(x))), causal self-attention through
``scaled_dot_product_attention(is_causal=True)``, a GELU MLP of width 4·d, learned position
embeddings, dropout, optional weight tying. The block and the model around the mixer
(:class:`PreLNBlock`, :class:`PreLNLM`) are shared with the GLA peer (``models/gla.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import LanguageModel
from .dropout import KeyedDropout


@dataclass
class TransformerConfig:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_seq: int = 128
    dropout: float = 0.1
    tie_weights: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model ({cfg.d_model}) must be divisible by n_heads ({cfg.n_heads})")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.attn_dropout = KeyedDropout(cfg.dropout)
        self.resid_dropout = KeyedDropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (u.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for u in (q, k, v))
        if self.training and self.dropout > 0:
            # attention dropout with keyed masks (see models/dropout.py), so the probabilities
            # are formed explicitly; SDPA would draw its masks from the RNG stream
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = self.attn_dropout(att.masked_fill(causal, float("-inf")).softmax(dim=-1))
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.dropout = KeyedDropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class PreLNBlock(nn.Module):
    """x + mixer(LN(x)), then x + MLP(LN(x)). ``make_mixer()`` builds the token mixer (causal
    self-attention, GLA, ...): the one part in which the pre-LN models differ."""

    def __init__(self, cfg, make_mixer: Callable[[], nn.Module]):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model)
        self.attn = make_mixer()
        self.ln_mlp = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class PreLNLM(LanguageModel):
    """Token + learned position embeddings, dropout, n_layers pre-LN blocks, LayerNorm, LM head
    (tied or not); every Linear and Embedding weight ~ N(0, 0.02), biases 0. ``cfg`` needs
    vocab_size, d_model, n_layers, n_seq, dropout and tie_weights."""

    # module-name pattern -> cost component, used by parameter and FLOP breakdowns
    COMPONENTS = {
        "embedding": ("tok_emb", "pos_emb"),
        "mixer": ("attn", "ln_attn"),
        "feed_forward": ("mlp", "ln_mlp"),
        "lm_head": ("ln_f", "lm_head"),
    }

    def __init__(self, cfg, make_mixer: Callable[[], nn.Module]):
        super().__init__()
        self.config = cfg
        self.n_seq = cfg.n_seq
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.n_seq, cfg.d_model)
        self.drop = KeyedDropout(cfg.dropout)
        self.blocks = nn.ModuleList(PreLNBlock(cfg, make_mixer) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self.init_weights)

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        T = self.check_input(idx)
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


class TransformerLM(PreLNLM):
    def __init__(self, cfg: TransformerConfig):
        super().__init__(cfg, lambda: CausalSelfAttention(cfg))
