"""``use_early_exit``: exits at every layer, trained on sampled positions; a token exits at
evaluation once its hidden state saturates, at a threshold calibrated on the validation split.

What it does
    *Training.* Each step, a random ``positions`` share of the batch's positions is split
    evenly among the exits n = 1..L-1; exit n's sampled states x_n go through the model's own
    final LayerNorm and its effective LM head, fused with the cross-entropy
    (``ops/lm_loss``), and the loss adds the named term
    ``exits = early_exit_weight * sum_n w_n CE_n`` with CE_n the mean next-token cross-entropy
    of exit n on its rows and w_n = n / (1 + ... + (L-1)) (deeper exits weigh more, as in
    CALM). The last layer's exit is the model's ordinary output and loss. CE_n is an unbiased
    estimate of the exit's loss over all positions, at ``positions`` of the head's cost
    instead of L - 1 full-vocabulary heads. The positions are sampled over the *global*
    batch (seeded by the run's seed and the step); under DDP each rank keeps the sampled
    positions of its own windows and divides its NLL sum by the global count, so 2 ranks
    train the exits on the positions one process would, with the same term.

    *Evaluation* (the ``prepare_for_eval`` hook; the training model never exits). After layer
    n < L a still-running token exits when its *saturation*, the cosine similarity of its
    state after the layer with its state before it, reaches the calibrated threshold: O(d)
    per token, no LM head to decide. An exited token's state is frozen and copied forward,
    the later layers' feed-forward runs without its rows (``models/layers/depth.py``), and
    its state reaches the final norm and the LM head once, with every other token's, fused
    with the loss. The later layers' BK mixers still see it as a site of the chain, with its
    last feed-forward output as its potential, so the later tokens still mix with it.

    *Calibration* (``on_epoch_end``, before the epoch's validation): on the first
    ``calibration_windows`` windows of the validation split, the full-depth perplexity, then
    the ``candidates`` thresholds from the highest (fewest exits) down, as in CALM's
    fixed-sequence calibration: the threshold kept is the lowest one reached before the first
    whose perplexity exceeds full depth's by more than ``tolerance`` (relative). None passes:
    no exit. The threshold is a buffer of the model (``early_exit_threshold``), so the best
    epoch's weights come back with their own threshold and checkpoints keep it. A point
    estimate on validation windows, without CALM's statistical risk guarantee; never the
    test split.

Paper
    T. Schuster, A. Fisch, J. Gupta, M. Dehghani, D. Bahri, V. Q. Tran, Y. Tay, D. Metzler,
    "Confident Adaptive Language Modeling", NeurIPS 2022 (CALM): the hidden-state saturation
    measure, the depth-weighted exit losses and the calibration on held-out data.

Settings (``early_exit_<field>``)
    ``weight`` (of the exits term), ``positions`` (share of a batch's positions whose exit
    losses train), ``candidates`` (thresholds the calibration tries), ``tolerance`` (relative
    perplexity increase it allows), ``calibration_windows`` (validation windows it scores),
    ``record_windows`` (test windows of the with/without record).

Cost
    Training: the final norm and the LM head, forward and backward, on ``positions`` of the
    batch's rows (12.5% by default), plus a random permutation of the batch's positions;
    under DDP one all-reduce of the L - 1 exit losses per step.
    Evaluation: one cosine similarity per token and layer. Calibration: up to
    len(candidates) + 1 evaluations of the calibration windows per epoch. Saved: the MoE
    rows of exited tokens in later layers (the LM head, most of the cost at a word
    vocabulary, runs once per token either way).

What it records
    The calibrated threshold and each epoch's calibration table (threshold, validation
    perplexity, mean exit layer); the run's test perplexity (computed with the exits) with the
    mean and histogram of exit layers on the test split; with and without exits on the same
    held-out test windows (``bkbench.metrics.with_without``): perplexity, mean layers used,
    evaluation seconds and counted FLOPs per token of evaluate() (LM head and loss included); the
    exits term and each exit's sampled cross-entropy per epoch.

Causality
    A token's exit decision after layer n is a function of its own states x_n and x_{n-1}
    only (a row-wise cosine); its frozen state is a function of its own past; the gathered
    rows are padded to a multiple of 16 rows (see depth.py), so no kernel's result for one
    token depends on how many other tokens exited. The exits loss reads the states of the
    ordinary forward and changes none of its arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..hooks import Flag, RunContext
from ..metrics.flops import new_counter
from ..metrics.with_without import clocked, interleaved_medians
from ..models.dropout import batch_positions
from ..models.layers.early_exit import (ExitPolicy, exit_cross_entropies, sampled_exit_rows,
                                        shard_rows, with_exits)
from ..objectives.layer_states import LayerStates, held_out_windows
from .meter import EpochMeter

TIMING_REPEATS = 3   # interleaved evaluations timed with exits and without


def parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"early_exit_candidates must be comma-separated numbers, "
                         f"got {text!r}") from None
    if not values or any(not (-1 <= v <= 1) for v in values):
        raise ValueError(f"early_exit_candidates needs one or more cosine thresholds in "
                         f"[-1, 1], got {text!r}")
    return values


@dataclass
class EarlyExitSettings:
    weight: float = field(default=0.5, metadata={"help": "weight of the exits loss"})
    positions: float = field(default=0.125, metadata={
        "help": "share of a batch's positions whose exit losses train (split among the exits)"})
    candidates: str = field(default="0.999,0.995,0.99,0.98,0.97,0.95,0.9", metadata={
        "help": "saturation thresholds the validation calibration tries, highest first"})
    tolerance: float = field(default=0.02, metadata={
        "help": "relative validation perplexity increase the calibrated threshold may cost"})
    calibration_windows: int = field(default=16, metadata={
        "help": "validation windows the calibration evaluates"})
    record_windows: int = field(default=8, metadata={
        "help": "test windows evaluated with and without exits for the record"})

    def validate(self, config) -> None:
        if not self.weight >= 0:
            raise ValueError(f"early_exit_weight must be >= 0, got {self.weight}")
        if not 0 < self.positions <= 1:
            raise ValueError(f"early_exit_positions must be in (0, 1], got {self.positions}")
        parse_thresholds(self.candidates)
        if not self.tolerance >= 0:
            raise ValueError(f"early_exit_tolerance must be >= 0, got {self.tolerance}")
        for name in ("calibration_windows", "record_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"early_exit_{name} must be >= 1, got {getattr(self, name)}")
        if config.n_layers < 2:
            raise ValueError("use_early_exit needs n_layers >= 2 (a one-layer model has no "
                             "earlier exit)")


def mean_over_ranks(terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each term with the mean over the ranks as its value and this rank's own gradient (DDP
    averages the gradients): one all-reduce for all; unchanged without DDP."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return terms
    local = torch.stack([t.float() for t in terms])
    mean = local.detach().clone()
    dist.all_reduce(mean)
    mean /= dist.get_world_size()
    return list(local + (mean - local.detach()))


def histogram_summary(hist: torch.Tensor) -> dict[str, Any]:
    total = int(hist.sum())
    layers = torch.arange(1, hist.numel() + 1, dtype=torch.float64)
    return {"tokens": total,
            "mean_exit_layer": float((hist.double() * layers).sum() / total) if total else None,
            "exit_layer_histogram": {str(i + 1): int(c) for i, c in enumerate(hist)}}


def _threshold_name(threshold: float) -> float | str:
    return threshold if threshold <= 1 else "no exit"


class EarlyExit(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        if not hasattr(model, "depth_policies") or not hasattr(model, "blocks"):
            raise ValueError("use_early_exit needs a ResNet-BK model (per-token depth policies)")
        self.states = LayerStates(model, "use_early_exit")
        L = len(model.blocks)
        self.weights = [n / (L * (L - 1) / 2) for n in range(1, L)]
        # no exit until the first calibration (> 1: no cosine reaches it)
        model.register_buffer("early_exit_threshold", torch.tensor(math.inf, dtype=torch.float64))
        self.meter = EpochMeter(term=0.0, exit_cross_entropy_per_layer=[0.0] * (L - 1))
        self.calibrations: list[dict[str, Any]] = []
        self._last: list[torch.Tensor] = []
        self.last_policy: ExitPolicy | None = None
        return model

    def loss_terms(self, model, inputs, targets, step):
        states = self.states.full_resolution()
        # the positions are sampled over the global batch and each rank keeps those of its
        # shard (keyed like dropout), so one process and any number of ranks train the exits
        # on the same positions; sampled per shard, they parted at step 2
        samples, batch = batch_positions(targets.shape[0])
        seq_len = targets.shape[1]
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        rows = sampled_exit_rows(batch * seq_len, len(self.weights), self.settings.positions,
                                 generator)
        mine = [shard_rows(r, samples, batch, seq_len) for r in rows]
        # DDP averages the ranks' gradients: a shard's sum over world / count averages to
        # the global batch's mean; its value is the ranks' mean, the global batch's term
        world = dist.get_world_size() if dist.is_initialized() else 1
        per_layer = mean_over_ranks(exit_cross_entropies(
            model, states, targets, mine, [r.numel() / world for r in rows]))
        self._last = [v.detach() for v in per_layer]
        term = sum(w * v for w, v in zip(self.weights, per_layer))
        return {"exits": self.settings.weight * term}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        self.meter.add(term=terms["exits"].item(),
                       exit_cross_entropy_per_layer=[v.item() for v in self._last])

    def on_epoch_end(self, run: RunContext) -> None:
        self.meter.end_epoch(run.progress.epoch)
        self.calibrations.append({"epoch": run.progress.epoch + 1, **self.calibrate(run)})

    def calibrate(self, run: RunContext) -> dict[str, Any]:
        """CALM-style fixed-sequence calibration on validation windows; sets the threshold."""
        n = self.settings.calibration_windows
        windows = held_out_windows(run.data.valid, self.config.n_seq, n)
        stream = windows.reshape(-1)
        full = run.evaluate(run.model, stream).perplexity      # the trained model itself
        table = [{"threshold": "no exit", "perplexity": full,
                  "mean_exit_layer": float(len(run.model.blocks))}]
        chosen = math.inf
        for threshold in sorted(parse_thresholds(self.settings.candidates), reverse=True):
            evaluated, policy = with_exits(run.model, threshold)
            ppl = run.evaluate(evaluated, stream).perplexity
            table.append({"threshold": threshold, "perplexity": ppl,
                          "mean_exit_layer": histogram_summary(policy.histogram)["mean_exit_layer"]})
            if ppl > full * (1 + self.settings.tolerance):
                break
            chosen = threshold
        run.model.early_exit_threshold.fill_(chosen)
        return {"windows": len(windows), "chosen": _threshold_name(chosen), "table": table}

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        evaluated, self.last_policy = with_exits(model, float(model.early_exit_threshold))
        return evaluated

    def with_and_without(self, run: RunContext) -> dict[str, Any]:
        """Perplexity, layers used, evaluation seconds and counted FLOPs on the same held-out
        test windows with the calibrated exits and without (the trained model itself)."""
        stream = held_out_windows(run.data.test, self.config.n_seq,
                                  self.settings.record_windows).reshape(-1)
        threshold = float(run.model.early_exit_threshold)
        results, flops = {}, {}
        counted, policy = with_exits(run.model, threshold)
        # without: the trained model itself (the plain path, not the depth machinery)
        for label, model in (("with", counted), ("without", run.model)):
            counter = new_counter()
            with counter:   # one whole evaluation: the fused LM head and loss included
                results[label] = run.evaluate(model, stream)
            flops[label] = counter.get_total_flops() / stream.numel()
        seconds = interleaved_medians(
            clocked(lambda: run.evaluate(with_exits(run.model, threshold)[0], stream), run.device),
            clocked(lambda: run.evaluate(run.model, stream), run.device),
            TIMING_REPEATS)
        return {"threshold": _threshold_name(threshold), "tokens": stream.numel(),
                "perplexity": {"with": results["with"].perplexity,
                               "without": results["without"].perplexity},
                "mean_layers_used": {"with": histogram_summary(policy.histogram)["mean_exit_layer"],
                                     "without": float(len(run.model.blocks))},
                "eval_seconds": {k: seconds[k] for k in ("with", "without", "ratio")},
                "eval_flops_per_token": flops,
                "how": f"evaluate() of the first {self.settings.record_windows} test windows; "
                       f"seconds: {seconds['how']}; FLOPs: FlopCounterMode over one evaluate()"}

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        test = histogram_summary(self.last_policy.histogram) if self.last_policy else None
        return {"threshold": _threshold_name(float(run.model.early_exit_threshold)),
                "confidence": "hidden-state saturation: cos(x_n, x_{n-1}) per token",
                "test_perplexity_early_exit": outcome.test.perplexity,
                "test_exits": test,
                "calibration_split": "validation",
                "calibrations": self.calibrations,
                "held_out_with_and_without": self.with_and_without(run),
                "exits_term_per_epoch": self.meter.epochs,
                "layer_weights": self.weights,
                "positions_per_step": self.settings.positions}

    def state_dict(self) -> dict[str, Any]:
        return {"meter": self.meter.state_dict(), "calibrations": self.calibrations}

    def load_state_dict(self, state, run: RunContext) -> None:
        self.meter.load_state_dict(state["meter"])
        self.calibrations = list(state["calibrations"])
