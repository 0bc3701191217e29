"""The causal hourglass's mechanism: shorten (shift right by k - 1, mean-pool by k), the middle
blocks on N/k positions, upsample with the residual (Nawrot et al., 2022).

The flag that applies it, and its documentation (why the shift keeps it causal), is
:mod:`bkbench.flags.multi_scale`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from .stages import BlockStage, plain_stages


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


class ShortenedStage:
    """The hourglass's middle: blocks ``first .. end - 1`` on the sequence shortened by k,
    upsampled and added to the state that entered (a stage, ``models/layers/stages.py``).

    ``shift`` defaults to k - 1; any smaller value sees the future and exists for the test
    that shows the audit catching it.
    """

    def __init__(self, factor: int, first: int, end: int, shift: int | None = None):
        self.factor = factor
        self.layers = range(first, end)
        self.shift = factor - 1 if shift is None else shift

    def run(self, blocks: nn.ModuleList, x: torch.Tensor, skip=None) -> torch.Tensor:
        short = shorten(x, self.factor, self.shift)
        for n in self.layers:
            short = blocks[n](short)
        out = x + upsample(short, self.factor, x.shape[1])
        if skip is None:
            return out
        # The shortened middle pools k neighbouring tokens into one position, so no single
        # token can skip it: every position runs the middle blocks, and a token that has
        # stopped keeps its state (its own bit, hence causal). Only the full-resolution
        # blocks save work.
        skip.rows_per_layer.extend([x.shape[0] * short.shape[1]] * len(self.layers))
        return torch.where(skip.running.view(*x.shape[:2], 1), out, x)

    def upsampled(self, state: torch.Tensor, length: int) -> torch.Tensor:
        return upsample(state, self.factor, length)

    def resolved(self, state: torch.Tensor, entering: torch.Tensor, length: int) -> torch.Tensor:
        return entering + upsample(state, self.factor, length)

    def positions(self, length: int) -> int:
        return math.ceil(length / self.factor)

    def __repr__(self) -> str:
        return (f"ShortenedStage(factor={self.factor}, blocks[{self.layers.start}:"
                f"{self.layers.stop}], shift={self.shift})")


def hourglass_stages(n_blocks: int, factor: int, outer_layers: int,
                     shift: int | None = None) -> list:
    """``outer_layers`` blocks at full resolution at each end, the blocks between them as one
    shortened stage."""
    if n_blocks < 2 * outer_layers + 1:
        raise ValueError(f"use_multi_scale: {n_blocks} blocks leave no middle block with "
                         f"outer_layers={outer_layers}")
    end = n_blocks - outer_layers
    return (plain_stages(n_blocks)[:outer_layers]
            + [ShortenedStage(factor, outer_layers, end, shift)]
            + plain_stages(n_blocks)[end:])


def apply_hourglass(model: nn.Module, factor: int, outer_layers: int,
                    shift: int | None = None) -> ShortenedStage:
    """Make ``model`` (a ResNetBKLM) run its blocks as an hourglass; returns the middle stage."""
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "stages") or blocks is None:
        raise ValueError("use_multi_scale needs a ResNet-BK model (blocks run as model.stages)")
    if any(not isinstance(stage, BlockStage) for stage in model.stages):
        raise ValueError("use_multi_scale: another flag already runs this model's blocks")
    model.stages = hourglass_stages(len(blocks), factor, outer_layers, shift)
    return next(s for s in model.stages if isinstance(s, ShortenedStage))


@contextmanager
def without_hourglass(model: nn.Module):
    """The plain stack (every block at full resolution) inside, the hourglass again after."""
    stages, model.stages = model.stages, plain_stages(len(model.blocks))
    try:
        yield
    finally:
        model.stages = stages
