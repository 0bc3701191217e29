"""Adaptive computation time's mechanism: per-layer halting units as a depth policy
(``models/layers/depth.py``), Graves's weighted mean of the states used, and the ponder cost.

The flag that attaches it, trains the ponder cost and records the layers used is
:mod:`bkbench.flags.act` (its docstring is the flag's documentation).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class ACTHalting(nn.Module):
    """The halting units and the per-forward ACT state (a depth policy, see depth.py)."""

    def __init__(self, d_model: int, n_layers: int, eps: float, bias_init: float):
        super().__init__()
        self.n_layers = n_layers
        self.eps = eps
        # the last layer halts every token that is still running: it needs no unit
        self.units = nn.ModuleList(nn.Linear(d_model, 1) for _ in range(n_layers - 1))
        with torch.no_grad():
            for unit in self.units:
                nn.init.normal_(unit.weight, std=0.02)
                unit.bias.fill_(bias_init)
        self.last_layers: torch.Tensor | None = None     # (B*T,) layers used, last forward
        self.last_ponder: torch.Tensor | None = None     # (B*T,) N + R (with its gradient)

    def begin(self, model, x):
        B, T, d = x.shape
        rows = B * T
        self._shape = x.shape
        self._going = torch.ones(rows, dtype=torch.bool, device=x.device)
        self._cum = x.new_zeros(rows)
        self._remainder = x.new_zeros(rows)
        self._layers = torch.full((rows,), self.n_layers, dtype=torch.long, device=x.device)
        self._y = x.new_zeros(rows, d)

    def after_layer(self, model, n, x, running):
        xf = x.reshape(-1, x.shape[-1])
        if n == self.n_layers - 1:
            stop = self._going
        else:
            # on the normalised state: the residual stream's scale differs by layer and is
            # tiny at initialisation, which would leave the unit's input without variation
            z = F.layer_norm(xf, xf.shape[-1:])
            h = torch.sigmoid(self.units[n](z).squeeze(-1)).to(xf.dtype)
            stop = self._going & (self._cum + h >= 1 - self.eps)
        cont = self._going & ~stop
        remainder = 1 - self._cum
        zero = torch.zeros_like(remainder)
        step = torch.where(cont, h, zero) if n < self.n_layers - 1 else zero
        p = torch.where(stop, remainder, step)
        self._y = self._y + p.unsqueeze(-1) * xf
        self._remainder = torch.where(stop, remainder, self._remainder)
        self._layers = torch.where(stop, torch.full_like(self._layers, n + 1), self._layers)
        self._cum = self._cum + step
        self._going = cont
        return running & cont

    def finish(self, model, x):
        self.last_layers = self._layers.detach()
        self.last_ponder = self._layers.to(self._remainder.dtype) + self._remainder
        y = self._y.view(self._shape)
        del self._y, self._cum, self._going, self._remainder, self._layers
        return y


@contextlib.contextmanager
def without_policy(model: nn.Module, policy):
    """The same weights with ``policy`` removed (every token runs every layer, for ACT)."""
    saved = model.depth_policies
    model.depth_policies = [p for p in saved if p is not policy]
    try:
        yield model
    finally:
        model.depth_policies = saved
