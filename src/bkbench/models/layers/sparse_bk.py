"""Sparse BK's mechanism: a BK mixer with a per-token router that gathers the routed tokens
into a shorter chain, runs the BK-Core on it only, and scatters the results back.

The flag that applies it, trains the share loss and records the routed share is
:mod:`bkbench.flags.sparse_bk` (its docstring is the flag's documentation, causality
included).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..resnet_bk import EXPERT_ROW_MULTIPLE, BKMixer, PermuteRows


def padded_chain_length(longest: int, batch: int) -> int:
    """Least length >= max(longest, 1) with batch * length a multiple of the row multiple."""
    step = EXPERT_ROW_MULTIPLE // math.gcd(batch, EXPERT_ROW_MULTIPLE)
    return -(-max(longest, 1) // step) * step


class SparseBKMixer(BKMixer):
    """A BKMixer (its own parameters, adopted under the same names) plus a router."""

    def __init__(self, mixer: BKMixer):
        nn.Module.__init__(self)
        for name, value in vars(mixer).items():       # plain attributes (heads, v_max, ...)
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, p in mixer._parameters.items():
            setattr(self, name, p)
        for name, b in mixer._buffers.items():
            self.register_buffer(name, b)
        for name, m in mixer._modules.items():
            setattr(self, name, m)
        self.train(mixer.training)
        d = mixer.feature_proj.out_features
        self.router = nn.Linear(d, 1).to(mixer.feature_proj.weight.device)
        nn.init.normal_(self.router.weight, std=0.02)
        nn.init.zeros_(self.router.bias)
        self.dense = False        # True: the plain mixer (every token a site), for comparisons
        # the last forward, for the share loss, the record and the tests
        self.last_gate: torch.Tensor | None = None      # (B, T) gate probabilities (graph kept)
        self.last_routed: torch.Tensor | None = None    # (B, T) bool
        self.last_counts: torch.Tensor | None = None    # (B,) routed tokens per sequence
        self.last_chain_length: int | None = None       # padded length the BK-Core ran on

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return super().forward(f)
        B, T, d = f.shape
        logit = self.router(f).squeeze(-1)                 # (B, T)
        gate = torch.sigmoid(logit)
        routed = logit.detach() > 0
        counts = routed.sum(dim=1)
        M = padded_chain_length(int(counts.max()), B)
        # slot m of sequence b holds its m-th routed token (stable sort: in order), the
        # slots past its count are padding at the end of its chain
        order = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)
        if M > T:
            order = torch.cat([order, order.new_zeros(B, M - T)], dim=1)
        order = order[:, :M]
        slots = torch.arange(M, device=f.device)
        rows = torch.arange(B, device=f.device).unsqueeze(1)
        valid = slots < counts.unsqueeze(1)
        to_chain = torch.where(valid, rows * T + order, B * T).reshape(-1)          # (B*M,)
        rank = torch.cumsum(routed.to(torch.long), dim=1) - 1
        to_token = torch.where(routed, rows * M + rank, B * M).reshape(-1)          # (B*T,)

        chain = PermuteRows.apply(f.reshape(B * T, d), to_chain, to_token, True, True)
        out = super().forward(chain.reshape(B, M, d))                               # (B, M, d)
        out = PermuteRows.apply(out.reshape(B * M, d).to(f.dtype), to_token, to_chain, True, True)
        self.last_gate, self.last_routed = gate, routed
        self.last_counts, self.last_chain_length = counts, M
        return out.reshape(B, T, d) * gate.unsqueeze(-1).to(f.dtype)


def sparse_mixers(model: nn.Module) -> list[SparseBKMixer]:
    return [m for m in model.modules() if isinstance(m, SparseBKMixer)]


@contextmanager
def dense_mixers(model: nn.Module):
    """Every mixer runs on every token inside (the plain model's mixers, same weights)."""
    mixers = sparse_mixers(model)
    for m in mixers:
        m.dense = True
    try:
        yield
    finally:
        for m in mixers:
            m.dense = False


def layer_stats(mixers: list[SparseBKMixer]) -> list[dict[str, float]]:
    """Routed share, mean routed chain length and padded length of each mixer's last forward."""
    out = []
    for m in mixers:
        out.append({"share": m.last_routed.float().mean().item(),
                    "mean_routed_length": m.last_counts.float().mean().item(),
                    "padded_length": m.last_chain_length,
                    "positions": m.last_routed.shape[1]})
    return out
