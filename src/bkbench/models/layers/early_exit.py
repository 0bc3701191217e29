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
    mean exit layer and measured evaluation seconds of each, and the forward FLOPs per token
    counted on the first ``record_windows`` validation windows (LM head and exit heads
    included); the exits term per epoch.

Causality
    A token's exit decision after layer n is a function of its own state x_n only (norm and
    head are row-wise); its frozen state is a function of its own past; the gathered rows are
    padded to a multiple of 16 rows (see depth.py), so no kernel's result for one token depends
    on how many other tokens exited. The exits loss reads the states of the ordinary forward and
    changes none of its arithmetic.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...eval import fused_head
from ...flags.base import Flag
from ...objectives.layer_states import LayerStates
from ...ops.lm_loss import lm_head_nll
from .depth import ROW_MULTIPLE, gather_rows

# rows of exit logits computed at once (a multiple of ROW_MULTIPLE)
CONFIDENCE_CHUNK = 64 * ROW_MULTIPLE


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


def head_logits(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.ln_f(states))


def exit_nll(model: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``targets`` through the final norm and the LM head (fused when possible)."""
    head = fused_head(model)
    feats = model.ln_f(states)
    if head is not None:
        return lm_head_nll(feats, head.weight, head.bias, targets, reduction="sum") / targets.numel()
    logits = model.lm_head(feats)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class ExitPolicy:
    """Depth policy of the evaluation model: exit confident tokens (see depth.py)."""

    def __init__(self, threshold: float, n_layers: int):
        self.threshold = threshold
        self.n_layers = n_layers
        self.histogram = torch.zeros(n_layers, dtype=torch.long)   # over all forwards

    def begin(self, model, x):
        self._layer = torch.full((x.shape[0] * x.shape[1],), self.n_layers, dtype=torch.long,
                                 device=x.device)

    def after_layer(self, model, n, x, running):
        if n == self.n_layers - 1:
            return running
        if self.threshold > 1:     # no probability reaches it: nothing to compute
            return running
        index = running.nonzero().squeeze(1)
        if self.threshold <= 0:    # every probability reaches it
            stop = torch.ones(index.numel(), dtype=torch.bool, device=x.device)
        else:
            rows, real = gather_rows(x.reshape(-1, x.shape[-1]), index)
            stop = self.confidence(model, rows)[:real] >= self.threshold
        exited = index[stop]
        self._layer[exited] = n + 1
        running = running.clone()
        running[exited] = False
        return running

    @staticmethod
    def confidence(model, rows: torch.Tensor) -> torch.Tensor:
        """Max softmax probability of each row's exit, CONFIDENCE_CHUNK rows at a time so that
        the (rows, vocab) logits never exist in full (at 33k words an eval batch's would take
        gigabytes). Chunks are multiples of 16 rows, so every GEMM stays in the row-count
        regime of depth.py."""
        out = []
        for chunk in rows.split(CONFIDENCE_CHUNK):
            logits = head_logits(model, chunk).float()
            out.append((logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1)).exp())
        return torch.cat(out) if out else rows.new_zeros(0)

    def finish(self, model, x):
        self.histogram += torch.bincount(self._layer.cpu(), minlength=self.n_layers + 1)[1:]
        return x


def histogram_summary(hist: torch.Tensor) -> dict[str, Any]:
    total = int(hist.sum())
    layers = torch.arange(1, hist.numel() + 1, dtype=torch.float64)
    return {"tokens": total,
            "mean_exit_layer": float((hist.double() * layers).sum() / total) if total else None,
            "exit_layer_histogram": {str(i + 1): int(c) for i, c in enumerate(hist)}}


def with_exits(model: nn.Module, threshold: float) -> tuple[nn.Module, ExitPolicy]:
    """A shallow copy of ``model`` (same modules and weights) that exits at ``threshold``."""
    policy = ExitPolicy(threshold, len(model.blocks))
    evaluated = copy.copy(model)
    evaluated.depth_policies = list(model.depth_policies) + [policy]
    return evaluated, policy


class EarlyExit(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "depth_policies") or not hasattr(model, "blocks"):
            raise ValueError("use_early_exit needs a ResNet-BK model (per-token depth policies)")
        self.states = LayerStates(model, "use_early_exit")
        L = len(model.blocks)
        self.weights = [n / (L * (L - 1) / 2) for n in range(1, L)]
        self._sum = {"term": 0.0, "count": 0, "per_layer": [0.0] * (L - 1)}
        self.epochs: list[dict[str, Any]] = []
        self._last: list[torch.Tensor] = []
        self.last_policy: ExitPolicy | None = None
        return model

    def loss_terms(self, model, inputs, targets, step):
        states = self.states.full_resolution()
        per_layer = [exit_nll(model, states[n], targets) for n in range(1, len(states) - 1)]
        self._last = [v.detach() for v in per_layer]
        term = sum(w * v for w, v in zip(self.weights, per_layer))
        return {"exits": self.settings.weight * term}

    def after_optimizer_step(self, trainer, terms) -> None:
        self._sum["term"] += terms["exits"].item()
        self._sum["count"] += 1
        for i, v in enumerate(self._last):
            self._sum["per_layer"][i] += v.item()

    def on_epoch_end(self, trainer) -> None:
        n = max(1, self._sum["count"])
        self.epochs.append({"epoch": trainer.progress.epoch + 1, "term": self._sum["term"] / n,
                            "exit_cross_entropy_per_layer": [v / n for v in self._sum["per_layer"]],
                            "steps": self._sum["count"]})
        self._sum = {"term": 0.0, "count": 0, "per_layer": [0.0] * len(self.weights)}

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        evaluated, self.last_policy = with_exits(model, self.settings.threshold)
        return evaluated

    @torch.no_grad()
    def counted_flops(self, evaluated: nn.Module, windows: torch.Tensor) -> int:
        """Counted FLOPs of one eval-mode forward of ``windows`` with the exits, LM head
        included (the exits' head passes are the price of deciding)."""
        from ...metrics.flops import new_counter
        was = evaluated.training
        evaluated.eval()
        try:
            counter = new_counter()
            with counter:
                evaluated(windows)
        finally:
            evaluated.train(was)
        return counter.get_total_flops()

    def sweep(self, trainer) -> list[dict[str, Any]]:
        from ...objectives.layer_states import held_out_windows
        windows = held_out_windows(trainer.data.valid, self.config.n_seq,
                                   self.settings.record_windows).to(trainer.device)
        out = []
        for threshold in parse_thresholds(self.settings.sweep) + [math.inf]:
            flops = self.counted_flops(with_exits(trainer.model, threshold)[0], windows)
            evaluated, policy = with_exits(trainer.model, threshold)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            start = time.perf_counter()
            result = trainer.evaluate(evaluated, trainer.data.valid)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            seconds = time.perf_counter() - start
            summary = histogram_summary(policy.histogram)
            out.append({"threshold": "no exit" if threshold == math.inf else threshold,
                        "perplexity": result.perplexity, "loss": result.loss,
                        "mean_exit_layer": summary["mean_exit_layer"],
                        "eval_seconds": seconds,
                        "forward_flops_per_token": flops / windows.numel()})
        return out

    def record(self, trainer, outcome) -> dict[str, Any]:
        test = histogram_summary(self.last_policy.histogram) if self.last_policy else None
        return {"threshold": self.settings.threshold,
                "test_perplexity_early_exit": outcome.test.perplexity,
                "test_exits": test,
                "exits_term_per_epoch": self.epochs,
                "layer_weights": self.weights,
                "sweep_split": "validation",
                "sweep": self.sweep(trainer)}

    def state_dict(self) -> dict[str, Any]:
        return {"sum": {**self._sum, "per_layer": list(self._sum["per_layer"])},
                "epochs": list(self.epochs)}

    def load_state_dict(self, state, trainer) -> None:
        self._sum = {**state["sum"], "per_layer": list(state["sum"]["per_layer"])}
        self.epochs = list(state["epochs"])
