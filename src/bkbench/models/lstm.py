"""LSTM language model: the classic WikiText-2 baseline (Zaremba et al. 2014; Merity et al.).

Token embedding -> dropout -> ``torch.nn.LSTM`` (n_layers, hidden size d_model, dropout
between layers) -> dropout -> LM head, tied to the embedding when ``tie_weights`` (Press &
Wolf 2017; Inan et al. 2017). No position embedding: the recurrence knows the order. Every
window starts from a zero state, as the Transformer's windows start with no context, so the
models see the same context per target; a stateful (truncated-BPTT) LSTM would see more.

Causal by construction: the hidden state at t is a function of tokens <= t. ``n_seq`` only
bounds the input length, for the common interface. At d = 64 and 4 layers the LSTM has
4 x 4 x (64 x 128 + 2 x 64) = 133,120 recurrent parameters against the Transformer's 199,936
in its blocks: 1,896,576 parameters in all against 1,971,712 with the proxy vocabulary of
13,777 (-3.8%), 4,392,704 against 4,467,840 with 33,278 (-1.7%; tests/test_peers.py).
``features`` returns the top layer's output (after dropout) with no final norm: the LSTM's
output h = o * tanh(c) is already bounded in (-1, 1), and the classic model has none.

Initialisation: embedding and head ~ N(0, 0.02) as the other models; the LSTM keeps torch's
U(-1/sqrt(d), 1/sqrt(d)), the usual choice for this model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .common import LanguageModel
from .dropout import KeyedDropout


@dataclass
class LSTMConfig:
    vocab_size: int
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    dropout: float = 0.1
    tie_weights: bool = False


class LSTMLM(LanguageModel):
    COMPONENTS = {
        "embedding": ("tok_emb",),
        "mixer": ("lstm",),
        "lm_head": ("lm_head",),
    }

    def __init__(self, cfg: LSTMConfig):
        super().__init__()
        self.config = cfg
        self.n_seq = cfg.n_seq
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = KeyedDropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.d_model, cfg.d_model, cfg.n_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        self.check_input(idx)
        out, _ = self.lstm(self.drop(self.tok_emb(idx)))
        return self.drop(out)
