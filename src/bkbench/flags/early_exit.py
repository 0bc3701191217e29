"""``use_early_exit``: per-layer exits, trained jointly; confident tokens exit at evaluation.

What it does
    *Training.* Every layer's output state x_n (n = 1..L-1) goes through the model's own final
    LayerNorm and its shared LM head, and the loss adds the named term
    ``exits = early_exit_weight * sum_n w_n CE_n`` with CE_n the mean next-token cross-entropy
    of exit n and w_n = n / (1 + 2 + ... + (L-1)) (deeper exits weigh more, as in CALM). The
    last layer's exit is the model's ordinary output and loss.

    *Evaluation* (the ``prepare_for_eval`` hook returns the model with exits switched on; the
    training model never exits). After layer n < L each still-running token's state goes
    through the final norm and the LM head; if its largest softmax probability is
    >= ``early_exit_threshold`` the token exits: its state is frozen and copied forward, its
    prediction is that exit's, and the later layers' feed-forward runs without it (its rows
    are not gathered, ``models/layers/depth.py``). The later layers' BK mixers still see the
    exited token as a site of the chain, with its last feed-forward output as its potential,
    so the later tokens still mix with it. Threshold 0 exits every token after layer 1; a
    threshold above 1 never exits (the full model).

Paper
    T. Schuster, A. Fisch, J. Gupta, M. Dehghani, D. Bahri, V. Q. Tran, Y. Tay, D. Metzler,
    "Confident Adaptive Language Modeling", NeurIPS 2022 (CALM); the confidence measure used
    here is CALM's softmax response (max probability).

Settings (``early_exit_<field>``)
    ``weight`` (of the exits term), ``threshold`` (confidence to exit at evaluation),
    ``sweep`` (comma-separated thresholds evaluated for the record), ``record_windows``
    (validation windows on which the sweep's FLOPs are counted).

Cost
    Training: L - 1 extra passes of the final norm and the LM head (at a WikiText-2 vocabulary
    the head is most of a forward's FLOPs, so this is expensive). Evaluation: one LM head pass
    per layer for every still-running token -- with a 33k vocabulary this costs far more than
    the feed-forward work an exit saves, which the recorded sweep shows in seconds. Saved: the
    MoE rows of exited tokens in later layers.

What it records
    At the configured threshold: the test perplexity of the early-exit model (the run's test
    result is computed with exits on) and the mean and histogram of exit layers on the test
    split; a sweep over ``sweep`` thresholds plus "no exit" on the validation split: perplexity,
    mean exit layer and the eval-forward seconds on the first ``record_windows`` validation
    windows with those exits and without (``bkbench.metrics.with_without``), and the forward
    FLOPs per token counted on the same windows (LM head and exit heads included); the exits
    term per epoch.

Causality
    A token's exit decision after layer n is a function of its own state x_n only (norm and
    head are row-wise); its frozen state is a function of its own past; the gathered rows are
    padded to a multiple of 16 rows (see depth.py), so no kernel's result for one token depends
    on how many other tokens exited. The exits loss reads the states of the ordinary forward and
    changes none of its arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..hooks import Flag, RunContext
from ..metrics.flops import new_counter
from ..metrics.with_without import clocked, interleaved_medians
from ..models.layers.early_exit import ExitPolicy, exit_nll, with_exits
from ..objectives.layer_states import LayerStates, held_out_windows
from .meter import EpochMeter

TIMING_REPEATS = 3   # interleaved forwards timed with exits and without, per sweep point


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"early_exit_sweep must be comma-separated numbers, got {text!r}") from None
    if not values or any(not (v >= 0) for v in values):
        raise ValueError(f"early_exit_sweep needs one or more thresholds >= 0, got {text!r}")
    return values


@dataclass
class EarlyExitSettings:
    weight: float = field(default=0.5, metadata={"help": "weight of the per-layer exits loss"})
    threshold: float = field(default=0.9, metadata={
        "help": "max softmax probability at which a token exits at evaluation (>1: never)"})
    sweep: str = field(default="0.5,0.7,0.8,0.9,0.95,0.99", metadata={
        "help": "comma-separated thresholds evaluated on the validation split for the record"})
    record_windows: int = field(default=8, metadata={
        "help": "validation windows on which each sweep point's forward FLOPs are counted"})

    def validate(self, config) -> None:
        if not self.weight >= 0:
            raise ValueError(f"early_exit_weight must be >= 0, got {self.weight}")
        if not self.threshold >= 0:
            raise ValueError(f"early_exit_threshold must be >= 0, got {self.threshold}")
        parse_thresholds(self.sweep)
        if self.record_windows < 1:
            raise ValueError(f"early_exit_record_windows must be >= 1, got {self.record_windows}")
        if config.n_layers < 2:
            raise ValueError("use_early_exit needs n_layers >= 2 (a one-layer model has no "
                             "earlier exit)")


def histogram_summary(hist: torch.Tensor) -> dict[str, Any]:
    total = int(hist.sum())
    layers = torch.arange(1, hist.numel() + 1, dtype=torch.float64)
    return {"tokens": total,
            "mean_exit_layer": float((hist.double() * layers).sum() / total) if total else None,
            "exit_layer_histogram": {str(i + 1): int(c) for i, c in enumerate(hist)}}


class EarlyExit(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "depth_policies") or not hasattr(model, "blocks"):
            raise ValueError("use_early_exit needs a ResNet-BK model (per-token depth policies)")
        self.states = LayerStates(model, "use_early_exit")
        L = len(model.blocks)
        self.weights = [n / (L * (L - 1) / 2) for n in range(1, L)]
        self.meter = EpochMeter(term=0.0, exit_cross_entropy_per_layer=[0.0] * (L - 1))
        self._last: list[torch.Tensor] = []
        self.last_policy: ExitPolicy | None = None
        return model

    def loss_terms(self, model, inputs, targets, step):
        states = self.states.full_resolution()
        per_layer = [exit_nll(model, states[n], targets) for n in range(1, len(states) - 1)]
        self._last = [v.detach() for v in per_layer]
        term = sum(w * v for w, v in zip(self.weights, per_layer))
        return {"exits": self.settings.weight * term}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        self.meter.add(term=terms["exits"].item(),
                       exit_cross_entropy_per_layer=[v.item() for v in self._last])

    def on_epoch_end(self, run: RunContext) -> None:
        self.meter.end_epoch(run.progress.epoch)

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        evaluated, self.last_policy = with_exits(model, self.settings.threshold)
        return evaluated

    @torch.no_grad()
    def counted_flops(self, evaluated: nn.Module, windows: torch.Tensor) -> int:
        """Counted FLOPs of one eval-mode forward of ``windows`` with the exits, LM head
        included (the exits' head passes are the price of deciding)."""
        was = evaluated.training
        evaluated.eval()
        try:
            counter = new_counter()
            with counter:
                evaluated(windows)
        finally:
            evaluated.train(was)
        return counter.get_total_flops()

    @torch.no_grad()
    def forward_seconds(self, model: nn.Module, threshold: float, windows: torch.Tensor,
                        device: torch.device) -> dict[str, Any]:
        """Eval forwards of ``windows`` (LM head included) exiting at ``threshold`` against
        the trained model itself (no exits), interleaved."""
        exiting = with_exits(model, threshold)[0]
        was = model.training
        model.eval()
        exiting.eval()
        try:
            return interleaved_medians(clocked(lambda: exiting(windows), device),
                                       clocked(lambda: model(windows), device), TIMING_REPEATS)
        finally:
            model.train(was)

    def sweep(self, run: RunContext) -> list[dict[str, Any]]:
        windows = held_out_windows(run.data.valid, self.config.n_seq,
                                   self.settings.record_windows).to(run.device)
        out = []
        for threshold in parse_thresholds(self.settings.sweep) + [math.inf]:
            flops = self.counted_flops(with_exits(run.model, threshold)[0], windows)
            evaluated, policy = with_exits(run.model, threshold)
            result = run.evaluate(evaluated, run.data.valid)
            summary = histogram_summary(policy.histogram)
            seconds = self.forward_seconds(run.model, threshold, windows, run.device)
            out.append({"threshold": "no exit" if threshold == math.inf else threshold,
                        "perplexity": result.perplexity, "loss": result.loss,
                        "mean_exit_layer": summary["mean_exit_layer"],
                        "forward_seconds": seconds["with"],
                        "forward_seconds_no_exit": seconds["without"],
                        "forward_flops_per_token": flops / windows.numel()})
        return out

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        test = histogram_summary(self.last_policy.histogram) if self.last_policy else None
        return {"threshold": self.settings.threshold,
                "test_perplexity_early_exit": outcome.test.perplexity,
                "test_exits": test,
                "exits_term_per_epoch": self.meter.epochs,
                "layer_weights": self.weights,
                "sweep_split": "validation",
                "sweep": self.sweep(run),
                "forward_seconds_how": f"eval forwards of the first {self.settings.record_windows} "
                                       "validation windows, with exits and without "
                                       f"(median of {TIMING_REPEATS} interleaved calls each)"}

    def state_dict(self) -> dict[str, Any]:
        return {"meter": self.meter.state_dict()}

    def load_state_dict(self, state, run: RunContext) -> None:
        self.meter.load_state_dict(state["meter"])
