"""Sparse BK's mechanism: per-token routers that let a token skip work, for real.

* :class:`BlockRouter` (``Block.router``, scope ``block``, Mixture-of-Depths): the token runs
  the whole block - LayerNorm rows, MoE and BK mixer - or passes it by the residual alone.
* :class:`ChainRouter` (``BKMixer.router``, scope ``mixer``): only the BK mixer's chain is
  routed; every token still runs the MoE.

Both decide per token from its own state (logit > 0) and gather the routed tokens of each
sequence, in order, into a shorter chain padded at its end (:class:`ChainPlan`). The flag that
applies them, trains the share loss and records the routed share is
:mod:`bkbench.flags.sparse_bk` (its docstring is the flag's documentation, causality included).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..resnet_bk import EXPERT_ROW_MULTIPLE, PermuteRows
from .depth import gather_rows

SCOPES = ("block", "mixer")


def padded_chain_length(longest: int, batch: int) -> int:
    """Least length >= max(longest, 1) with batch * length a multiple of the row multiple."""
    step = EXPERT_ROW_MULTIPLE // math.gcd(batch, EXPERT_ROW_MULTIPLE)
    return -(-max(longest, 1) // step) * step


class ChainPlan:
    """Index maps of one forward's routing ``routed`` (B, T) bool.

    Three layouts: *tokens* (B*T rows), *rows* (the N routed tokens in (b, t) order) and
    *chains* (B*M: sequence b's m-th routed token at b*M + m, padding after its count).
    ``to_rows`` (N,) token of each row; ``chain_to_row`` (B*M,) row of each chain slot, N for
    padding; ``row_to_chain`` (N,) chain slot of each row; ``chain_to_token`` (B*M,) token of
    each chain slot, B*T for padding; ``token_to_chain`` (B*T,) chain slot of each token, B*M
    for an unrouted one.

    The shapes N and M must be known on the host, so the per-sequence counts are read once
    (``counts.tolist()``: the one host synchronization of a routed layer); every map is then
    built on the device without another (no ``nonzero``, no boolean indexing).
    """

    def __init__(self, routed: torch.Tensor):
        B, T = routed.shape
        device = routed.device
        self.counts = routed.sum(dim=1)                                      # (B,)
        counts = self.counts.tolist()
        self.rows, self.length = sum(counts), padded_chain_length(max(counts), B)
        N, M = self.rows, self.length
        # the routed tokens first, each in its order (stable sort), then the rest: cut at N
        self.to_rows = torch.argsort((~routed).reshape(-1).to(torch.int8), stable=True)[:N]
        rank = torch.cumsum(routed.to(torch.long), dim=1) - 1               # within sequence
        seq = torch.arange(B, device=device).unsqueeze(1)
        self.token_to_chain = torch.where(routed, seq * M + rank, B * M).reshape(-1)
        self.row_to_chain = self.token_to_chain.index_select(0, self.to_rows)
        first_row = torch.cumsum(self.counts, 0) - self.counts
        slots = torch.arange(M, device=device)
        self.chain_to_row = torch.where(slots < self.counts.unsqueeze(1),
                                        first_row.unsqueeze(1) + slots, N).reshape(-1)
        self.chain_to_token = torch.cat([self.to_rows, self.to_rows.new_full((1,), B * T)]
                                        ).index_select(0, self.chain_to_row)

    def to_chains(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, d) rows -> (B, M, d) chains (padding slots zero)."""
        d = rows.shape[-1]
        out = PermuteRows.apply(rows, self.chain_to_row, self.row_to_chain, True, False)
        return out.reshape(-1, self.length, d)

    def from_chains(self, chains: torch.Tensor) -> torch.Tensor:
        """(B, M, d) chains -> (N, d) rows (padding slots dropped)."""
        d = chains.shape[-1]
        return PermuteRows.apply(chains.reshape(-1, d), self.row_to_chain, self.chain_to_row,
                                 False, True)


class Router(nn.Linear):
    """Linear(d, 1): the token is routed when its logit is > 0 (gate p = sigmoid(logit) > 1/2).
    Keeps its last forward's routing for the share loss, the record and the tests."""

    def __init__(self, d_model: int):
        super().__init__(d_model, 1)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        self.dense = False        # True: every token runs (the plain model), for comparisons
        self.last_gate: torch.Tensor | None = None      # (B, T) gate probabilities (graph kept)
        self.last_routed: torch.Tensor | None = None    # (B, T) bool
        self.last_counts: torch.Tensor | None = None    # (B,) routed tokens per sequence
        self.last_chain_length: int | None = None       # padded chain length M

    def decide(self, h: torch.Tensor, running: torch.Tensor | None = None):
        """(gate (B, T), plan) for the router input ``h`` (B, T, d); ``running`` (B, T): the
        tokens a depth policy still runs (a stopped token is never routed)."""
        logit = self(h).squeeze(-1)
        routed = logit.detach() > 0
        if running is not None:
            routed = routed & running
        gate = torch.sigmoid(logit)
        plan = ChainPlan(routed)
        self.last_gate, self.last_routed = gate, routed
        self.last_counts, self.last_chain_length = plan.counts, plan.length
        return gate, plan


class BlockRouter(Router):
    """Mixture-of-Depths routing of a whole ResNet-BK block, on the block's normalized input.

    A routed token's update is gate * (f + BK(f)) with f = MoE(LN(x)) computed on the routed
    tokens' gathered rows and BK on the chain of its sequence's routed tokens; an unrouted
    token keeps x. Set as ``Block.router``; :meth:`run_block` replaces the block's forward.
    """

    def run_block(self, block: nn.Module, x: torch.Tensor, skip=None) -> torch.Tensor:
        B, T, d = x.shape
        # the router reads LN(x), which the routed rows reuse: the LayerNorm runs on every
        # token (O(d) each, against the MoE's O(d^2)) so that the threshold sees a state of
        # one scale at every depth
        h = block.ln(x)
        running = None if skip is None else skip.running.view(B, T)
        gate, plan = self.decide(h, running)
        flat = h.reshape(B * T, d)
        rows, real = gather_rows(flat, plan.to_rows)
        f_rows = block.moe(rows, real_rows=real).to(x.dtype)                # (N, d)
        mixed = block.bk(plan.to_chains(f_rows))                            # (B, M, d)
        update_rows = f_rows + plan.from_chains(mixed.to(x.dtype))
        update = x.new_zeros(B * T, d).index_copy(0, plan.to_rows, update_rows)
        update = update.view(B, T, d) * gate.unsqueeze(-1).to(x.dtype)
        if skip is not None:
            skip.rows_per_layer.append(real)
        return x + block.dropout(update)


class ChainRouter(Router):
    """The sites of a BK mixer's chain, chosen from each token's feed-forward output f_t. Set
    as ``BKMixer.router``; the mixer asks it for the :meth:`sites` of each forward."""

    def sites(self, f: torch.Tensor) -> "RoutedSites | None":
        """The routed tokens of each sequence of ``f`` (B, T, d) as a chain; None: all."""
        if self.dense:
            return None
        gate, plan = self.decide(f)
        return RoutedSites(plan, gate, f.shape)


class RoutedSites:
    """One forward's chains of routed tokens: ``gather`` (B, T, d) -> (B, M, d) chains padded
    at their end, ``scatter`` the mixer's chain outputs back to their tokens, weighted by the
    gate (so the task loss reaches the router); an unrouted token gets 0."""

    def __init__(self, plan: ChainPlan, gate: torch.Tensor, shape: torch.Size):
        self.plan, self.gate, self.shape = plan, gate, shape
        self.dtype: torch.dtype | None = None

    def gather(self, f: torch.Tensor) -> torch.Tensor:
        B, T, d = self.shape
        self.dtype = f.dtype
        plan = self.plan
        chain = PermuteRows.apply(f.reshape(B * T, d), plan.chain_to_token, plan.token_to_chain,
                                  True, True)
        return chain.reshape(B, plan.length, d)

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        B, T, d = self.shape
        plan = self.plan
        out = PermuteRows.apply(out.reshape(B * plan.length, d).to(self.dtype),
                                plan.token_to_chain, plan.chain_to_token, True, True)
        return out.reshape(B, T, d) * self.gate.unsqueeze(-1).to(self.dtype)


def add_routers(model: nn.Module, scope: str = "block") -> list[Router]:
    """A router in every block (scope ``block``) or every BK mixer (``mixer``) of ``model``,
    on the block's device."""
    if scope not in SCOPES:
        raise ValueError(f"sparse_bk scope must be one of {SCOPES}, got {scope!r}")
    routers = []
    for block in model.blocks:
        d = block.bk.feature_proj.out_features
        device = block.bk.feature_proj.weight.device
        if scope == "block":
            block.router = BlockRouter(d).to(device)
            routers.append(block.router)
        else:
            block.bk.router = ChainRouter(d).to(device)
            routers.append(block.bk.router)
    return routers


def chain_routers(model: nn.Module) -> list[Router]:
    """Every router of ``model`` (either scope), in block order."""
    return [m for m in model.modules() if isinstance(m, Router)]


@contextmanager
def dense_mixers(model: nn.Module):
    """Every block runs every token inside (the plain model, same weights)."""
    routers = chain_routers(model)
    for r in routers:
        r.dense = True
    try:
        yield
    finally:
        for r in routers:
            r.dense = False


def layer_stats(routers: list[Router]) -> list[dict[str, float]]:
    """Routed share, mean routed chain length and padded length of each router's last forward."""
    out = []
    for r in routers:
        out.append({"share": r.last_routed.float().mean().item(),
                    "mean_routed_length": r.last_counts.float().mean().item(),
                    "padded_length": r.last_chain_length,
                    "positions": r.last_routed.shape[1]})
    return out
