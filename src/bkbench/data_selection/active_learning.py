"""Active learning's mechanism: the top-loss choice of training windows from a scored pool.

The flag that draws the pools, scores them with the current model and feeds the chosen
windows, and its documentation, is :mod:`bkbench.flags.active_learning`.
"""

from __future__ import annotations

import torch


def top_loss_selection(losses: torch.Tensor, want: int, random_share: float,
                       generator: torch.Generator) -> torch.Tensor:
    """Indices of ``want`` pool entries: the highest ``losses``, except ``random_share`` of
    the slots drawn uniformly from the rest; shuffled (seeded by ``generator``)."""
    n_random = round(random_share * want)
    # stable sort, descending: ties keep pool order, so the choice is reproducible
    ranked = torch.sort(losses, descending=True, stable=True).indices
    top, rest = ranked[:want - n_random], ranked[want - n_random:]
    extra = rest[torch.randperm(rest.numel(), generator=generator)[:n_random]]
    chosen = torch.cat([top, extra])
    return chosen[torch.randperm(chosen.numel(), generator=generator)]
