"""The stack of a model's blocks as a list of stages.

A stage runs a contiguous range of the model's blocks (``layers``). The plain stack is one
stage per block at full resolution; a structural flag replaces stages (``use_multi_scale``'s
hourglass runs its middle blocks as one shortened stage, ``models/layers/hourglass.py``).
Everything that walks the stack -- the forward, per-token depth policies
(``models/layers/depth.py``), the per-layer states of the auxiliary objectives
(``objectives/layer_states.py``) -- iterates the stages and asks each how it runs and how its
blocks' states read at full resolution; none of them knows a particular stage.

A stage has

``layers``                           the block indices it runs (a range)
``run(blocks, x, skip=None)``        x after its blocks; ``skip``: the per-token depth state
                                     (a :class:`~bkbench.models.layers.depth.TokenSkip`)
``upsampled(state, length)``         one of its blocks' output states at full resolution, each
                                     position standing for the ones it stands for
``resolved(state, entering, length)`` that state as the next block sees it (``entering``: the
                                     state that entered the stage)
``positions(length)``                positions each of its blocks runs on
"""

from __future__ import annotations

import torch
import torch.nn as nn


class BlockStage:
    """One block at full resolution: the plain stack's stage."""

    def __init__(self, index: int):
        self.layers = range(index, index + 1)

    def run(self, blocks: nn.ModuleList, x: torch.Tensor, skip=None) -> torch.Tensor:
        block = blocks[self.layers.start]
        return block(x) if skip is None else block(x, skip)

    def upsampled(self, state: torch.Tensor, length: int) -> torch.Tensor:
        return state

    def resolved(self, state: torch.Tensor, entering: torch.Tensor, length: int) -> torch.Tensor:
        return state

    def positions(self, length: int) -> int:
        return length

    def __repr__(self) -> str:
        return f"BlockStage({self.layers.start})"


def plain_stages(n_blocks: int) -> list:
    """Every block at full resolution, in order."""
    return [BlockStage(i) for i in range(n_blocks)]


def positions_per_block(stages: list, length: int) -> list[int]:
    return [stage.positions(length) for stage in stages for _ in stage.layers]


def stage_of_layers(stages: list) -> list:
    """The stage that runs each block, by block index."""
    return [stage for stage in stages for _ in stage.layers]


__all__ = ["BlockStage", "plain_stages", "positions_per_block", "stage_of_layers"]
