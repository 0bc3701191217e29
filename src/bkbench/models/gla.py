"""Gated Linear Attention language model: the modern O(N) peer with data-dependent decay.

GLA (Yang, Wang, Shen, Panda, Kim 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training") replaces softmax attention by a linear-attention state that
decays per key channel by a gate computed from the token itself. It was chosen over Mamba-2's
SSD because it drops into the Transformer's block unchanged -- pre-norm, then the same GELU
MLP -- so the only difference from the baseline is the mixer; an SSD block brings its own
convolution and expansion and no MLP, which would change two things at once. Its chunkwise
form is also matrix products, the other half of the comparison with ResNet-BK's scan.

The model is the Transformer baseline with the attention swapped out: token + learned
position embeddings, dropout, n_layers x [x + GLA(LN(x)), x + MLP(LN(x))], LayerNorm, LM head
(tied or not); the block and model are the Transformer's own (``PreLNLM``). The mixer, per the paper and
flash-linear-attention's layer (its defaults):

    q = W_q x, k = W_k x  (key width d/2 = expand_k * d),   v = W_v x  (value width d)
    log-decay g = logsigmoid(W_2 W_1 x + b) / 16           (low-rank gate, rank 16)
    o = GLA(q, k, v, g)  per head                           (bkbench.ops.gla)
    out = W_o (RMSNorm_head(o) * silu(W_r x))               (output gate)

Parameters at d = 64 (no biases but the gate's): q, k 2 x 64 x 32, v, r, o 3 x 64 x 64,
gate 64 x 16 + 16 x 32 + 32, RMSNorm 16 -- 17,968 per mixer against the Transformer's
16,640 (qkv and output projection with biases). The whole model has 1,977,024 parameters
against the Transformer's 1,971,712 at the default sizes with the proxy vocabulary of 13,777
(+0.27%), 4,473,152 against 4,467,840 with WikiText-2's 33,278 (+0.12%; tests/test_peers.py).

Initialisation as the Transformer: every Linear and Embedding weight ~ N(0, 0.02), biases 0
(so every channel starts with alpha = sigmoid(0)^(1/16) = 0.958).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.gla import BACKENDS, gated_linear_attention
from .dropout import KeyedDropout
from .transformer import PreLNLM, TransformerConfig


@dataclass
class GLAConfig(TransformerConfig):
    """The Transformer's sizes (the same blocks, GLA in place of attention) and GLA's own."""
    expand_k: float = 0.5          # key width / d_model (the paper's 0.5)
    gate_rank: int = 16            # rank of the low-rank decay gate
    gate_normalizer: float = 16.0  # g = logsigmoid(.) / gate_normalizer (the paper's tau)
    chunk_size: int = 16           # chunk length of the torch chunkwise form
    backend: str = "auto"          # bkbench.ops.gla backend: auto, torch, fla, naive

    def __post_init__(self) -> None:
        key_dim = int(self.d_model * self.expand_k)
        if self.d_model % self.n_heads or key_dim % self.n_heads or key_dim < self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) and the key width d_model*expand_k "
                             f"({key_dim}) must both be divisible by n_heads ({self.n_heads})")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not self.gate_normalizer > 0 or self.gate_rank < 1:
            raise ValueError("gate_normalizer must be > 0 and gate_rank >= 1")


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: GLAConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.key_dim = int(d * cfg.expand_k)
        self.chunk_size = cfg.chunk_size
        self.backend = cfg.backend
        self.gate_normalizer = cfg.gate_normalizer
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.r_proj = nn.Linear(d, d, bias=False)       # output gate
        self.gk_down = nn.Linear(d, cfg.gate_rank, bias=False)
        self.gk_up = nn.Linear(cfg.gate_rank, self.key_dim, bias=True)
        self.o_norm = nn.RMSNorm(d // cfg.n_heads, eps=1e-5)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.resid_dropout = KeyedDropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_heads
        q = self.q_proj(x).view(B, T, H, -1)
        k = self.k_proj(x).view(B, T, H, -1)
        v = self.v_proj(x).view(B, T, H, -1)
        g = F.logsigmoid(self.gk_up(self.gk_down(x))).view(B, T, H, -1) / self.gate_normalizer
        o = gated_linear_attention(q, k, v, g, chunk_size=self.chunk_size, backend=self.backend)
        o = self.o_norm(o).reshape(B, T, C) * F.silu(self.r_proj(x))
        return self.resid_dropout(self.o_proj(o))


class GLALM(PreLNLM):
    """The Transformer's model with GLA as the mixer (components, init and forward shared)."""

    def __init__(self, cfg: GLAConfig):
        super().__init__(cfg, lambda: GatedLinearAttention(cfg))
