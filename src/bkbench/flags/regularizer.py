"""What the two layer-state regularizers (koopman, physics_informed) share: a loss weight that
warms up linearly from 0 over a fraction of the run's steps (objectives/schedule.py), and a
per-epoch meter of the term, both kept in checkpoints."""

from __future__ import annotations

from typing import Any

import torch

from ..hooks import Flag, RunContext
from ..objectives.schedule import warmed_weight, warmup_steps


class WarmedUpRegularizer(Flag):
    """A flag whose loss term is ``settings.weight`` ramped over ``settings.warmup`` of the
    run. Subclasses set ``self.meter`` (an EpochMeter) and ``self.last`` in ``wrap_model``."""

    ramp: int | None = None
    last: dict[str, float] | None = None

    def select_windows(self, run: RunContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        # the first hook with the run's plan before a training step: size the ramp
        self.ramp = warmup_steps(run.total_steps, self.settings.warmup)
        return order

    def weight_at(self, step: int) -> float:
        # before any training (a FLOP measurement of the step) the ramp is not sized yet
        return warmed_weight(self.settings.weight, step, self.ramp or 0)

    def state_dict(self) -> dict[str, Any]:
        return {"meter": self.meter.state_dict(), "last": self.last}

    def load_state_dict(self, state, run: RunContext) -> None:
        self.ramp = warmup_steps(run.total_steps, self.settings.warmup)
        self.meter.load_state_dict(state["meter"])
        self.last = state["last"]


__all__ = ["WarmedUpRegularizer"]
