"""The Koopman auxiliary objective's mechanism: the lifting phi, the linear operator K and the
decoder psi, and their per-layer losses on the states along depth.

The flag that trains it (its loss term, schedule and record) is :mod:`bkbench.flags.koopman`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KoopmanHead(nn.Module):
    """phi (lifting), K (linear operator) and psi (decoder)."""

    def __init__(self, d_model: int, dim: int):
        super().__init__()
        self.lift = nn.Sequential(nn.Linear(d_model, dim), nn.GELU(), nn.Linear(dim, dim))
        self.operator = nn.Linear(dim, dim, bias=False)
        self.decode = nn.Linear(dim, d_model)
        with torch.no_grad():
            self.operator.weight.copy_(torch.eye(dim))

    def losses(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer mean losses of (L + 1, B, T, d) states: each of shape (L,)."""
        z = F.layer_norm(states, states.shape[-1:])
        phi = self.lift(z)
        ahead = self.operator(phi[:-1])
        mean = lambda x: x.pow(2).mean(dim=(1, 2, 3))  # noqa: E731 (per layer)
        return {"linear": mean(ahead - phi[1:]),
                "reconstruct": mean(self.decode(phi[:-1]) - z[:-1]),
                "predict": mean(self.decode(ahead) - z[1:]),
                "identity_predict": mean(z[:-1] - z[1:]),
                "z_next": mean(z[1:])}
