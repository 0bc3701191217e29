"""``use_koopman``: a Koopman auxiliary objective on the layer-to-layer dynamics.

What it does
    Treats depth as time: at every position the residual stream moves h_0 -> h_1 -> ... -> h_L
    through the blocks. A learned lifting phi (d -> m, a two-layer GELU network), a learned
    linear operator K (m x m, initialised to the identity) and a learned linear decoder psi
    (m -> d) are trained, together with the language model, so that the lifted dynamics are
    linear, as in deep Koopman networks::

        linear      = mean |K phi(z_l) - phi(z_{l+1})|^2
        reconstruct = mean |psi(phi(z_l)) - z_l|^2
        predict     = mean |psi(K phi(z_l)) - z_{l+1}|^2,      z_l = LayerNorm(h_l) (no affine)

    and ``koopman = weight_t * (linear + reconstruct + predict)`` is added to the loss, with
    ``weight_t = koopman_weight x min(1, (t + 1) / W)`` at 0-based step t, W = ceil(``warmup`` x
    the run's steps): a linear warm-up, so that the term joins the language-modelling loss
    once that loss has started forming the states (``objectives/schedule.py`` says why).
    The decoder terms keep phi from collapsing to a constant (which would make ``linear``
    zero for free); the states are normalised so that shrinking them cannot do it either.
    The gradient reaches the language model's states: the objective shapes its dynamics.

Paper
    B. Lusch, J. N. Kutz, S. L. Brunton, "Deep learning for universal linear embeddings of
    nonlinear dynamics", Nature Communications 9, 4950 (2018).

Settings (``koopman_<field>``)
    ``weight``, ``warmup`` (fraction of the run's steps), ``dim`` (m), ``record_windows``
    (held-out windows for the record).

Cost
    phi, K and psi add 2dm + 2m^2 + md + 2m + d parameters (trained, checkpointed, not used
    for prediction) and about 3 small matrix products per position and layer to each training
    step (counted by the FLOP measurement, which runs the same loss).

What it records
    The term (weighted and raw) averaged per epoch and at the last step; on held-out text
    (the first ``record_windows`` windows of the validation split, eval mode): the lifted
    linear error, the relative error of K's one-layer prediction of z_{l+1} per layer, and
    the same for the trivial predictor z_{l+1} = z_l for scale.

Causality
    The objective reads the states of each position along depth only (h_l and h_{l+1} of the
    same token), and it adds a loss term: it changes no arithmetic of the forward, so every
    logit depends on the tokens it depended on, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..hooks import RunContext
from ..models.dropout import shard_weight
from ..models.layers.attached import attach
from ..objectives.koopman import KoopmanHead
from ..objectives.layer_states import LayerStates, held_out_windows
from .meter import EpochMeter
from .regularizer import WarmedUpRegularizer


@dataclass
class KoopmanSettings:
    weight: float = field(default=0.01, metadata={"help": "weight of the Koopman loss term"})
    warmup: float = field(default=0.1, metadata={
        "help": "fraction of the run's steps over which the weight ramps up linearly from 0 "
                "(0: full weight at once)"})
    dim: int = field(default=32, metadata={"help": "dimension m of the lifted space"})
    record_windows: int = field(default=16, metadata={
        "help": "held-out validation windows for the recorded prediction error"})

    def validate(self, config) -> None:
        if not self.weight >= 0:
            raise ValueError(f"koopman_weight must be >= 0, got {self.weight}")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"koopman_warmup must be in [0, 1], got {self.warmup}")
        if self.dim < 1 or self.record_windows < 1:
            raise ValueError("koopman_dim and koopman_record_windows must be >= 1")


class Koopman(WarmedUpRegularizer):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.states = LayerStates(model, "use_koopman")
        attach(model, "koopman", KoopmanHead(self.config.d_model, self.settings.dim))
        self.meter = EpochMeter(term=0.0, raw=0.0)
        self.ramp: int | None = None
        self.last: dict[str, float] | None = None
        self._raw: torch.Tensor | None = None
        return model

    def loss_terms(self, model, inputs, targets, step):
        parts = model.flag_modules["koopman"].losses(self.states.stacked())
        raw = (parts["linear"] + parts["reconstruct"] + parts["predict"]).mean()
        self._raw = raw.detach()
        return {"koopman": self.weight_at(step) * shard_weight(targets.shape[0]) * raw}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        term, raw = terms["koopman"].item(), self._raw.item()
        self.meter.add(term=term, raw=raw)
        # progress.step counts the steps before this one until the trainer's loop moves it on
        self.last = {"step": run.progress.step + 1, "term": term, "raw": raw,
                     "weight": self.weight_at(run.progress.step)}

    def on_epoch_end(self, run: RunContext) -> None:
        self.meter.end_epoch(run.progress.epoch)

    @torch.no_grad()
    def held_out_errors(self, model: nn.Module, split: torch.Tensor, device) -> dict[str, Any]:
        windows = held_out_windows(split, self.config.n_seq, self.settings.record_windows)
        was = model.training
        model.eval()
        try:
            model(windows.to(device))
            parts = model.flag_modules["koopman"].losses(self.states.stacked())
        finally:
            model.train(was)
        rel = (parts["predict"] / parts["z_next"]).tolist()
        rel_id = (parts["identity_predict"] / parts["z_next"]).tolist()
        return {"windows": int(windows.shape[0]),
                "linear_mse": parts["linear"].mean().item(),
                "relative_prediction_error_per_layer": rel,
                "identity_relative_error_per_layer": rel_id}

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        head = run.model.flag_modules["koopman"]
        return {"dynamics": "layer to layer (depth as time), per position",
                "warmup_steps": self.ramp,
                "term_per_epoch": self.meter.epochs, "final": self.last,
                "head_parameters": sum(p.numel() for p in head.parameters()),
                "held_out": self.held_out_errors(run.model, run.data.valid, run.device)}
