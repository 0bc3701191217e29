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
