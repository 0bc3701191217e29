"""``use_physics_informed``: an energy-conservation regularizer on the layer-to-layer dynamics.

What it does
    Treats depth as time and the residual stream h_l (at each position) as the state of a
    system whose energy is the fixed quadratic E(h) = 1/2 |h|^2 / d (per channel, so that the
    weight means the same at any width; not a learned Hamiltonian). A conservative system
    keeps E constant along its trajectory, so the loss gets::

        physics_energy = weight_t * mean over positions and layers of
                         |E(h_{l+1}) - E(h_l)| / E(h_l)

    It pulls each block toward an update that moves the state along a level set of E
    (norm-preserving), the discrete analogue of a Hamiltonian flow. The drift is *relative*:
    a pre-LN residual stream grows in norm with depth as each block adds its output, and an
    absolute drift would grow with that scale and penalise the stream's normal growth the
    more the larger the states; relative to E(h_l) it measures each block's change against
    the state it changes, and rescaling all states leaves it unchanged (no reward for
    shrinking the stream). ``weight_t = weight x min(1, (t + 1) / W)`` at 0-based step t,
    W = ceil(``warmup`` x the run's steps): a linear warm-up, so that the language-modelling
    loss shapes the states before the penalty joins (``objectives/schedule.py``).

Paper
    The physics-informed loss of M. Raissi, P. Perdikaris, G. E. Karniadakis, "Physics-informed
    neural networks", J. Comput. Phys. 378 (2019), applied to a conservation law as in
    Hamiltonian neural networks (S. Greydanus, M. Dzamba, J. Yosinski, NeurIPS 2019).

Settings (``physics_informed_<field>``)
    ``weight``; ``warmup`` (fraction of the run's steps); ``record_windows`` (held-out
    windows for the record).

Cost
    No parameters; a squared norm per position and layer (elementwise work, which the FLOP
    counter does not count; its census estimates it under ``uncounted``).

What it records
    The term per epoch and at the last step; on held-out text (the first ``record_windows``
    windows of the validation split, eval mode) the mean relative energy drift per layer and
    the mean energy per state of the trained model, and of the same architecture and seed at initialisation (the
    baseline's starting point: what the drift is without the regularizer having acted).

Causality
    The term reads the states of each position along depth only and changes no arithmetic of
    the forward, so every logit depends on the tokens it depended on, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..hooks import RunContext
from ..models.dropout import shard_weight
from ..objectives.layer_states import LayerStates, held_out_windows
from ..objectives.physics_informed import energy, energy_drift
from ..seeding import seed_everything
from .meter import EpochMeter
from .regularizer import WarmedUpRegularizer


@dataclass
class PhysicsInformedSettings:
    weight: float = field(default=0.1, metadata={"help": "weight of the energy-drift penalty"})
    warmup: float = field(default=0.1, metadata={
        "help": "fraction of the run's steps over which the weight ramps up linearly from 0 "
                "(0: full weight at once)"})
    record_windows: int = field(default=16, metadata={
        "help": "held-out validation windows for the recorded energy drift"})

    def validate(self, config) -> None:
        if not self.weight >= 0:
            raise ValueError(f"physics_informed_weight must be >= 0, got {self.weight}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"physics_informed_warmup must be in [0, 1], got {self.warmup}")
        if self.record_windows < 1:
            raise ValueError("physics_informed_record_windows must be >= 1")


class PhysicsInformed(WarmedUpRegularizer):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.states = LayerStates(model, "use_physics_informed")
        self.meter = EpochMeter(term=0.0)
        self.last: dict[str, float] | None = None
        self.ramp: int | None = None
        return model

    def loss_terms(self, model, inputs, targets, step):
        drift = energy_drift(self.states.stacked()).mean()
        return {"physics_energy": self.weight_at(step) * shard_weight(targets.shape[0]) * drift}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        term = terms["physics_energy"].item()
        self.meter.add(term=term)
        self.last = {"step": run.progress.step + 1, "term": term,  # this step, 1-based
                     "weight": self.weight_at(run.progress.step)}

    def on_epoch_end(self, run: RunContext) -> None:
        self.meter.end_epoch(run.progress.epoch)

    @torch.no_grad()
    def drift_per_layer(self, model: nn.Module, windows: torch.Tensor) -> dict[str, list[float]]:
        was = model.training
        model.eval()
        try:
            model(windows)
            states = self.states.stacked()
            return {"relative_drift": energy_drift(states).tolist(),
                    "mean_energy": energy(states).mean(dim=(1, 2)).tolist()}
        finally:
            model.train(was)

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        windows = held_out_windows(run.data.valid, self.config.n_seq,
                                   self.settings.record_windows).to(run.device)
        trained = self.drift_per_layer(run.model, windows)
        # the same build (architecture, seed) before any training step: the initial model
        rng = torch.get_rng_state()
        seed_everything(self.config.seed)
        initial, flags = run.build_model()
        torch.set_rng_state(rng)
        at_init = flags["use_physics_informed"].drift_per_layer(initial.to(run.device), windows)
        return {"energy": "E(h) = 1/2 |h|^2 / d per position (fixed, not learned)",
                "drift": "|E(h_{l+1}) - E(h_l)| / E(h_l), mean over positions",
                "warmup_steps": self.ramp,
                "term_per_epoch": self.meter.epochs, "final": self.last,
                "held_out_windows": int(windows.shape[0]),
                "held_out_drift_per_layer": trained["relative_drift"],
                "held_out_energy_per_state": trained["mean_energy"],
                "held_out_drift_per_layer_at_initialization": at_init["relative_drift"],
                "held_out_energy_per_state_at_initialization": at_init["mean_energy"]}
