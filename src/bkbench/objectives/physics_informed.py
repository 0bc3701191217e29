"""The physics-informed regularizer's mechanism: the relative energy drift of the states along
depth.

E(h) = 1/2 |h|^2 / d per position; the drift of layer l is |E(h_{l+1}) - E(h_l)| / E(h_l),
relative so that the steady norm growth of a pre-LN residual stream (each block adds its
output to the stream, so |h| grows with depth in a healthy model) is measured against the
state's own scale rather than penalised in absolute units that grow with it; the ratio is also
unchanged by rescaling every state, so the term cannot be lowered by shrinking the stream.
The flag that adds it to the loss and records it is :mod:`bkbench.flags.physics_informed`.
"""

from __future__ import annotations

import torch

#: floor of E(h_l) in the ratio (a state of exactly zero energy has no relative drift)
MIN_ENERGY = 1e-6


def energy(states: torch.Tensor) -> torch.Tensor:
    """(L + 1, B, T) E(h) = 1/2 |h|^2 / d of (L + 1, B, T, d) states."""
    return 0.5 * states.float().pow(2).mean(dim=-1)


def energy_drift(states: torch.Tensor) -> torch.Tensor:
    """(L,) mean over positions of |E(h_{l+1}) - E(h_l)| / E(h_l), for (L + 1, B, T, d) states."""
    e = energy(states)
    return ((e[1:] - e[:-1]).abs() / e[:-1].clamp_min(MIN_ENERGY)).mean(dim=(1, 2))
