"""The physics-informed regularizer's mechanism: the energy drift of the states along depth.

E(h) = 1/2 |h|^2 / d per position; the flag that adds the drift to the loss and records it
is :mod:`bkbench.flags.physics_informed`.
"""

from __future__ import annotations

import torch


def energy_drift(states: torch.Tensor) -> torch.Tensor:
    """(L,) mean |E(h_{l+1}) - E(h_l)| over positions, for (L + 1, B, T, d) states."""
    energy = 0.5 * states.pow(2).mean(dim=-1)          # (L + 1, B, T), 1/2 |h|^2 / d
    return (energy[1:] - energy[:-1]).abs().mean(dim=(1, 2))
