"""``use_act``: adaptive computation time over depth, with the skipped work really skipped.

What it does
    After each layer n < L of the ResNet-BK LM a halting unit h_n = sigmoid(w_n . z_n + b_n)
    (a Linear d -> 1 per layer, on z_n = LayerNorm(x_n) without affine parameters, x_n the
    token's state after layer n) gives each token a
    halting probability. A token halts after layer N = min{n : h_1 + ... + h_n >= 1 - eps}
    (N = L if it never does); its remainder is R = 1 - (h_1 + ... + h_{N-1}). The state given to
    the final norm is Graves's mean over the layers it used,
    ``y = h_1 x_1 + ... + h_{N-1} x_{N-1} + R x_N``, so the halting units get a gradient from
    the task loss, and the ponder cost ``rho = N + R`` per token (its gradient flows through R)
    is added to the loss as the named term ``ponder = act_weight * mean(rho)``.

    Once a token has halted its state is frozen and the later layers' feed-forward (LayerNorm +
    MoE) runs without it: the still-running tokens' rows are gathered, run through the MoE and
    scattered back (``models/layers/depth.py``), so the FLOP counter and the clock see the
    saving. The BK mixer still runs over the whole sequence: every position must stay a site
    of the BK-Core chain (the recurrence g_i = 1/(alpha_i - t^2 g_{i-1}) runs through all of
    them), so a halted token keeps feeding the later layers' mixers the potential of its last
    computed feed-forward output; its own state is not updated any more.

Paper
    A. Graves, "Adaptive Computation Time for Recurrent Neural Networks", arXiv:1603.08983
    (2016), applied over depth (as in Universal Transformers, Dehghani et al. 2019).

Settings (``act_<field>``)
    ``weight`` (ponder cost weight), ``eps`` (halt at cumulative probability >= 1 - eps),
    ``bias_init`` (initial bias of every halting unit), ``record_windows`` (held-out windows
    for the record).

Initialisation: start at full depth
    sigmoid(b) is each unit's initial halting probability (its weights start near zero, std
    0.02), so a token's cumulative probability after n layers starts near n sigmoid(b). With
    b = 0 it reaches 1 - eps after two layers: most tokens would halt there from step 0, and
    the later layers would hardly train before the ponder cost had any say. Graves (2016)
    treats the halting bias as the knob that sets the initial ponder time; we set it so that
    training *starts* at full depth and the ponder cost, not the initialisation, teaches the
    units to stop early: the default b = -1 (sigmoid 0.27) keeps n sigmoid(b) below 1 - eps
    for 3 layers, so a token of a 4-layer model (the default preset's) runs every layer at
    step 0; deeper models want a more negative b (-3 keeps up to 21 layers). The default
    was chosen on the validation split among -3, -2 and -1 (docs/flags.md). The mean depth of the first training step is recorded, next to that
    of the last epoch and of held-out text after training.

Cost
    (L - 1)(d + 1) parameters and one d -> 1 product per token and layer; the gather/scatter
    of the running rows and their zero padding to a multiple of 16 (at most 15 rows per
    layer, counted: it is work done). Saved: the MoE of every halted token in every later
    layer. Not saved: the BK mixer (whole chain), the embeddings and the LM head.

What it records
    Mean and histogram of layers used per token over the last training epoch's steps (and per
    epoch), and over held-out text (the first ``record_windows`` validation windows, eval
    mode); the ponder term per epoch; the forward FLOPs counted on those held-out windows and
    the measured forward time, with ACT and with the same weights running every layer.

Causality
    A token's halting depends on its own states x_1..x_n only (the unit is applied row by
    row). The gathered rows are padded so that no GEMM's row count regime depends on how many
    other tokens halted, and the mixer always sees the whole chain, so the audit's
    bit-for-bit comparison holds in eval and train mode.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..hooks import Flag, RunContext
from ..metrics.flops import new_counter
from ..metrics.with_without import clocked, interleaved_medians
from ..models.dropout import shard_weight
from ..models.layers.act import ACTHalting, without_policy
from ..models.layers.attached import attach
from ..objectives.layer_states import held_out_windows
from .meter import EpochMeter

TIMING_REPEATS = 3   # interleaved forwards timed with ACT and with every layer


@dataclass
class ACTSettings:
    weight: float = field(default=0.01, metadata={"help": "weight of the ponder cost N + R"})
    eps: float = field(default=0.01, metadata={
        "help": "a token halts once its cumulative halting probability reaches 1 - eps"})
    bias_init: float = field(default=-1.0, metadata={
        "help": "initial bias of every halting unit (sigmoid of it: the initial halting "
                "probability per layer; -1 runs every layer of up to 4 at step 0, -3 of up to 21)"})
    record_windows: int = field(default=16, metadata={
        "help": "held-out validation windows for the recorded layers used and FLOPs"})

    def validate(self, config) -> None:
        if not self.weight >= 0:
            raise ValueError(f"act_weight must be >= 0, got {self.weight}")
        if not 0 < self.eps < 1:
            raise ValueError(f"act_eps must be in (0, 1), got {self.eps}")
        if self.record_windows < 1:
            raise ValueError(f"act_record_windows must be >= 1, got {self.record_windows}")
        if config.n_layers < 2:
            raise ValueError("use_act needs n_layers >= 2 (a one-layer model has nothing to skip)")


def _histogram(layers: torch.Tensor, n_layers: int) -> torch.Tensor:
    return torch.bincount(layers.reshape(-1).cpu(), minlength=n_layers + 1)[1:]


def _summary(hist: torch.Tensor) -> dict[str, Any]:
    total = int(hist.sum())
    layers = torch.arange(1, hist.numel() + 1, dtype=torch.float64)
    mean = float((hist.double() * layers).sum() / total) if total else None
    return {"tokens": total, "mean_layers_used": mean,
            "layers_used_histogram": {str(i + 1): int(c) for i, c in enumerate(hist)}}


class ACT(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "depth_policies") or not hasattr(model, "blocks"):
            raise ValueError("use_act needs a ResNet-BK model (per-token depth policies)")
        halting = attach(model, "act", ACTHalting(self.config.d_model, len(model.blocks),
                                                  self.settings.eps, self.settings.bias_init))
        model.depth_policies = list(model.depth_policies) + [halting]
        self.n_layers = len(model.blocks)
        self._hist = torch.zeros(self.n_layers, dtype=torch.long)
        self.meter = EpochMeter(mean_ponder_cost=0.0)
        self.first_step: dict[str, Any] | None = None   # layers used by step 1 (the init)
        return model

    def loss_terms(self, model, inputs, targets, step):
        halting = model.flag_modules["act"]
        weight = self.settings.weight * shard_weight(targets.shape[0])   # unequal shards
        return {"ponder": weight * halting.last_ponder.mean()}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        halting = run.model.flag_modules["act"]
        hist = _histogram(halting.last_layers, self.n_layers)
        self._hist += hist
        if self.first_step is None:
            self.first_step = _summary(hist)
        self.meter.add(mean_ponder_cost=float(halting.last_ponder.detach().mean()))

    def on_epoch_end(self, run: RunContext) -> None:
        self.meter.end_epoch(run.progress.epoch, **_summary(self._hist))
        self._hist = torch.zeros(self.n_layers, dtype=torch.long)

    @torch.no_grad()
    def held_out(self, model: nn.Module, split: torch.Tensor, device) -> dict[str, Any]:
        windows = held_out_windows(split, self.config.n_seq,
                                   self.settings.record_windows).to(device)
        halting = model.flag_modules["act"]
        was = model.training
        model.eval()

        def with_act() -> None:
            model(windows, return_features=True)

        def all_layers() -> None:
            with without_policy(model, halting):
                model(windows, return_features=True)

        try:
            counter = new_counter()
            with counter:
                with_act()
            flops_act = counter.get_total_flops()
            out = _summary(_histogram(halting.last_layers, self.n_layers))
            rows = list(model.last_rows_per_layer)
            counter = new_counter()
            with counter:
                all_layers()
            flops_all = counter.get_total_flops()
            seconds = interleaved_medians(clocked(with_act, device), clocked(all_layers, device),
                                          TIMING_REPEATS)
        finally:
            model.train(was)
        return {"windows": int(windows.shape[0]), **out,
                "moe_rows_per_layer": rows,
                "forward_flops_counted": {"act": flops_act, "all_layers": flops_all,
                                          "saving": 1 - flops_act / flops_all},
                "forward_seconds": {"act": seconds["with"], "all_layers": seconds["without"],
                                    "how": seconds["how"]},
                "flops_note": "FlopCounterMode on a no-grad forward of these windows up to the "
                              "final norm (LM head excluded: ACT does not change it); "
                              "all_layers = the same weights with every token running every layer"}

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        epochs = self.meter.epochs
        return {"bias_init": self.settings.bias_init, "train_first_step": self.first_step,
                "train_last_epoch": epochs[-1] if epochs else None, "train_per_epoch": epochs,
                "halting_parameters": sum(p.numel() for p in
                                          run.model.flag_modules["act"].parameters()),
                "held_out": self.held_out(run.model, run.data.valid, run.device)}

    def state_dict(self) -> dict[str, Any]:
        return {"hist": self._hist.clone(), "meter": self.meter.state_dict(),
                "first_step": self.first_step}

    def load_state_dict(self, state, run: RunContext) -> None:
        self._hist = state["hist"].clone()
        self.meter.load_state_dict(state["meter"])
        self.first_step = state["first_step"]
