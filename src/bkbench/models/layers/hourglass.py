"""``use_multi_scale``: a causal hourglass - the middle layers run on N/k positions.

What it does
    The ResNet-BK stack of L blocks is run as an hourglass (Nawrot et al.): the first
    ``outer_layers`` and the last ``outer_layers`` blocks run at full resolution; the blocks
    between them (the middle) run on a sequence shortened by the factor k::

        s       = shift_right(x, k - 1)            # k - 1 zero vectors in front
        short_j = mean(s[j*k .. j*k + k - 1])      # average pool by k: ceil(N/k) positions
        short   = middle_blocks(short)
        x       = x + repeat_interleave(short, k)[:N]   # upsample, residual from before

    Every middle block is an ordinary ResNet-BK block (MoE feed-forward, BK-Core mixer); it
    just sees ceil(N/k) positions, so its experts, its potential projection and its BK chain
    do 1/k of the work. N need not be divisible by k: thanks to the shift, the first
    ceil(N/k)*k positions of the shifted sequence always exist (ceil(N/k)*k <= N + k - 1), so
    no group is padded, and the upsampled tail beyond N is cut off.

Paper
    P. Nawrot, S. Tworkowski, M. Tyrolski, L. Kaiser, Y. Wu, C. Szegedy, H. Michalewski,
    "Hierarchical Transformers Are More Efficient Language Models", Findings of NAACL 2022
    (arXiv:2110.13711, 2021): shortening by shift + pooling, upsampling with a residual.

Settings (``multi_scale_<field>``)
    ``factor`` (k, default 2), ``outer_layers`` (full-resolution blocks at each end, default
    1; the model needs n_layers >= 2 * outer_layers + 1, i.e. at least one middle block),
    ``timing_repeats`` (forwards timed with and without for the record).

Cost
    No parameters. The middle blocks' matrix products and BK-Core positions drop by k; the
    pooling and the upsampling are element-wise (not counted by the FLOP counter, as no
    element-wise op is). With the default L = 4, k = 2 half of the blocks run at half length,
    so the blocks' work drops by about a quarter; the embedding and the LM head (at a 33k
    vocabulary nearly all FLOPs) are unchanged.

What it records
    Positions each block runs on; counted forward FLOPs (and the mixer and feed-forward
    components) with and without the hourglass, the same weights both ways; eval-forward
    time with and without.

With other flags
    The blocks keep their names and weights (the hourglass is ``ResNetBKLM.stack``, which
    owns no parameters), so per-block flags apply as usual; the layer-to-layer objectives
    (use_koopman, use_physics_informed) read a middle block's state at full resolution, each
    pooled state standing for the k positions it is upsampled to. With use_sparse_bk the
    middle blocks route among their N/k positions. Each flag's "without" measurement switches
    off that flag only.

Causality
    After upsampling, position t reads pooled group j = floor(t/k), and with the shift that
    group is the mean of tokens j*k - k + 1 .. j*k, all <= t. The middle blocks are causal
    over groups (group j sees groups <= j). Without the shift, group j would hold tokens
    j*k .. j*k + k - 1, and position j*k would see k - 1 later tokens: the audit catches that
    (tests/test_multiscale_sparse.py runs it); a shift of k - 1 is the least that is causal.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...flags.base import Flag


@dataclass
class MultiScaleSettings:
    factor: int = field(default=2, metadata={
        "help": "shortening factor k of the middle blocks (they run on ceil(N/k) positions)"})
    outer_layers: int = field(default=1, metadata={
        "help": "blocks at full resolution at each end (needs n_layers >= 2 * this + 1)"})
    timing_repeats: int = field(default=3, metadata={
        "help": "eval forwards timed with and without the hourglass for the record"})

    def validate(self, config) -> None:
        if self.factor < 2:
            raise ValueError(f"multi_scale_factor must be >= 2, got {self.factor}")
        if self.outer_layers < 0:
            raise ValueError(f"multi_scale_outer_layers must be >= 0, got {self.outer_layers}")
        if config.n_layers < 2 * self.outer_layers + 1:
            raise ValueError(f"needs n_layers >= 2 * multi_scale_outer_layers + 1 = "
                             f"{2 * self.outer_layers + 1} (at least one middle block), "
                             f"got n_layers={config.n_layers}")
        if self.timing_repeats < 1:
            raise ValueError(f"multi_scale_timing_repeats must be >= 1, got {self.timing_repeats}")


def shorten(x: torch.Tensor, factor: int, shift: int) -> torch.Tensor:
    """(B, N, d) -> (B, ceil(N/k), d): shift right by ``shift`` (zeros in front), mean-pool by k."""
    B, N, d = x.shape
    groups = math.ceil(N / factor)
    s = F.pad(x, (0, 0, shift, 0))
    need = groups * factor
    if s.shape[1] < need:          # only for a shift below k - 1 (the leaking test variant)
        s = F.pad(s, (0, 0, 0, need - s.shape[1]))
    return s[:, :need].reshape(B, groups, factor, d).mean(dim=2)


def upsample(short: torch.Tensor, factor: int, length: int) -> torch.Tensor:
    """(B, G, d) -> (B, length, d): each group repeated k times, the tail beyond length cut."""
    return short.repeat_interleave(factor, dim=1)[:, :length]


class HourglassStack(nn.Module):
    """Runs a model's blocks as an hourglass; ``stack(blocks, x)`` (ResNetBKLM.stack).

    ``shift`` defaults to k - 1; any smaller value sees the future and exists for the test
    that shows the audit catching it.
    """

    def __init__(self, factor: int, first_middle: int, end_middle: int, shift: int | None = None):
        super().__init__()
        self.factor = factor
        self.first_middle, self.end_middle = first_middle, end_middle
        self.shift = factor - 1 if shift is None else shift

    def forward(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks[:self.first_middle]:
            x = block(x)
        x = self.middle(blocks, x)
        for block in blocks[self.end_middle:]:
            x = block(x)
        return x

    def middle(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """The full-resolution state after the middle blocks: x + upsample(middle(shorten(x)))."""
        short = shorten(x, self.factor, self.shift)
        for block in blocks[self.first_middle:self.end_middle]:
            short = block(short)
        return x + upsample(short, self.factor, x.shape[1])

    def upsample_state(self, short: torch.Tensor, length: int) -> torch.Tensor:
        """A middle block's (B, G, d) state at full resolution (for per-layer objectives)."""
        return upsample(short, self.factor, length)

    def positions_per_block(self, n_blocks: int, length: int) -> list[int]:
        short = math.ceil(length / self.factor)
        return [short if self.first_middle <= i < self.end_middle else length
                for i in range(n_blocks)]

    def extra_repr(self) -> str:
        return (f"factor={self.factor}, middle=blocks[{self.first_middle}:{self.end_middle}], "
                f"shift={self.shift}")


def apply_hourglass(model: nn.Module, factor: int, outer_layers: int,
                    shift: int | None = None) -> HourglassStack:
    """Make ``model`` (a ResNetBKLM) run its blocks as an hourglass; returns the stack."""
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "stack") or blocks is None:
        raise ValueError("use_multi_scale needs a ResNet-BK model (blocks run through model.stack)")
    if model.stack is not None:
        raise ValueError("use_multi_scale: another flag already runs this model's blocks")
    if len(blocks) < 2 * outer_layers + 1:
        raise ValueError(f"use_multi_scale: {len(blocks)} blocks leave no middle block with "
                         f"outer_layers={outer_layers}")
    model.stack = HourglassStack(factor, outer_layers, len(blocks) - outer_layers, shift)
    return model.stack


@contextmanager
def without_hourglass(model: nn.Module):
    """The plain stack (every block at full resolution) inside, the hourglass again after."""
    stack, model.stack = model.stack, None
    try:
        yield
    finally:
        model.stack = stack


class MultiScale(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        apply_hourglass(model, self.settings.factor, self.settings.outer_layers)
        return model

    def record(self, trainer, outcome) -> dict[str, Any]:
        from .measure import with_and_without
        model, cfg = trainer.model, self.config
        stack = model.stack
        batch = max(1, cfg.batch_size // trainer.world)
        measured = with_and_without(model, lambda: without_hourglass(model), batch, cfg.n_seq,
                                    trainer.device, self.settings.timing_repeats, seed=cfg.seed)
        return {"positions_per_block": stack.positions_per_block(len(model.blocks), cfg.n_seq),
                "middle_blocks": list(range(stack.first_middle, stack.end_middle)),
                "shift": stack.shift, **measured}
