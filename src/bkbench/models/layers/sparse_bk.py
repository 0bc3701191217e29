"""Sparse BK's mechanism: a per-token router that chooses the sites of a BK mixer's chain
(``BKMixer.router``): the mixer gathers the routed tokens into a shorter chain, runs the
BK-Core on it only, and scatters the results back.

The flag that applies it, trains the share loss and records the routed share is
:mod:`bkbench.flags.sparse_bk` (its docstring is the flag's documentation, causality
included).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..resnet_bk import EXPERT_ROW_MULTIPLE, PermuteRows


def padded_chain_length(longest: int, batch: int) -> int:
    """Least length >= max(longest, 1) with batch * length a multiple of the row multiple."""
    step = EXPERT_ROW_MULTIPLE // math.gcd(batch, EXPERT_ROW_MULTIPLE)
    return -(-max(longest, 1) // step) * step


class ChainRouter(nn.Linear):
    """The sites of a BK mixer's chain: a Linear(d, 1) on each token's feed-forward output f_t;
    the token is a site when its logit is > 0 (gate p_t = sigmoid(logit) > 1/2). Set as
    ``BKMixer.router``; the mixer asks it for the :meth:`sites` of each forward."""

    def __init__(self, d_model: int):
        super().__init__(d_model, 1)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        self.dense = False        # True: every token a site (the plain mixer), for comparisons
        # the last forward, for the share loss, the record and the tests
        self.last_gate: torch.Tensor | None = None      # (B, T) gate probabilities (graph kept)
        self.last_routed: torch.Tensor | None = None    # (B, T) bool
        self.last_counts: torch.Tensor | None = None    # (B,) routed tokens per sequence
        self.last_chain_length: int | None = None       # padded length the BK-Core ran on

    def sites(self, f: torch.Tensor) -> "RoutedSites | None":
        """The routed tokens of each sequence of ``f`` (B, T, d) as a chain; None: all."""
        if self.dense:
            return None
        B, T, d = f.shape
        logit = self(f).squeeze(-1)                        # (B, T)
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
        self.last_gate, self.last_routed = gate, routed
        self.last_counts, self.last_chain_length = counts, M
        return RoutedSites(to_chain, to_token, gate, (B, T, d), M)


class RoutedSites:
    """One forward's chains of routed tokens: ``gather`` (B, T, d) -> (B, M, d) chains padded
    at their end, ``scatter`` the mixer's chain outputs back to their tokens, weighted by the
    gate (so the task loss reaches the router); an unrouted token gets 0."""

    def __init__(self, to_chain: torch.Tensor, to_token: torch.Tensor, gate: torch.Tensor,
                 shape: tuple[int, int, int], length: int):
        self.to_chain, self.to_token, self.gate = to_chain, to_token, gate
        self.shape, self.length = shape, length
        self.dtype: torch.dtype | None = None

    def gather(self, f: torch.Tensor) -> torch.Tensor:
        B, T, d = self.shape
        self.dtype = f.dtype
        chain = PermuteRows.apply(f.reshape(B * T, d), self.to_chain, self.to_token, True, True)
        return chain.reshape(B, self.length, d)

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        B, T, d = self.shape
        out = PermuteRows.apply(out.reshape(B * self.length, d).to(self.dtype), self.to_token,
                                self.to_chain, True, True)
        return out.reshape(B, T, d) * self.gate.unsqueeze(-1).to(self.dtype)


def add_routers(model: nn.Module) -> list[ChainRouter]:
    """A router in every BK mixer of ``model``'s blocks (on the mixer's device)."""
    routers = []
    for block in model.blocks:
        mixer = block.bk
        mixer.router = ChainRouter(mixer.feature_proj.out_features).to(
            mixer.feature_proj.weight.device)
        routers.append(mixer.router)
    return routers


def chain_routers(model: nn.Module) -> list[ChainRouter]:
    return [m for m in model.modules() if isinstance(m, ChainRouter)]


@contextmanager
def dense_mixers(model: nn.Module):
    """Every mixer runs on every token inside (the plain model's mixers, same weights)."""
    routers = chain_routers(model)
    for r in routers:
        r.dense = True
    try:
        yield
    finally:
        for r in routers:
            r.dense = False


def layer_stats(routers: list[ChainRouter]) -> list[dict[str, float]]:
    """Routed share, mean routed chain length and padded length of each router's last forward."""
    out = []
    for r in routers:
        out.append({"share": r.last_routed.float().mean().item(),
                    "mean_routed_length": r.last_counts.float().mean().item(),
                    "padded_length": r.last_chain_length,
                    "positions": r.last_routed.shape[1]})
    return out
