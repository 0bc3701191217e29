"""``use_active_learning``: online batch selection by the current model's loss.

What it does
    Every ``active_learning_every`` steps (a *round* of k steps) the flag draws a candidate
    pool of ceil(k / ``fraction``) batches of windows, uniformly without replacement from the
    epoch's window order (seeded by run seed, epoch and round), scores every candidate by the
    current model's mean cross-entropy on it (eval mode, no gradient, the same fused loss as
    evaluation; the model is put back in training mode after), and trains the round's k
    batches on k x batch_size of them: the highest-loss ones (the *top-loss* criterion of
    Loshchilov & Hutter; not RHO-LOSS, which would need a second, irreducible-loss model),
    except a ``random_share`` of the slots filled uniformly from the remaining candidates so
    that the selection cannot collapse onto a few windows the model keeps failing on. The
    selected windows are shuffled (seeded) before being cut into the round's batches.
    So the model trains on ``fraction`` of the windows it scores (exactly k / ceil(k /
    fraction); recorded).

Papers
    I. Loshchilov, F. Hutter, "Online batch selection for faster training of neural networks",
    ICLR workshop 2016; S. Mindermann et al., "Prioritized training on points that are
    learnable, worth learning, and not yet learnt" (RHO-LOSS), ICML 2022 (the criterion not
    used here, and why).

Settings (``active_learning_<field>``)
    ``fraction`` (in (0, 1]), ``random_share`` (in [0, 1)), ``every`` (k >= 1 steps per
    round), ``target_perplexity`` (for the time-to-target record).

Cost, and how it is counted
    ceil(k / fraction) scoring forwards of one batch per round. Their FLOPs are measured once
    with the repository's FLOP counter (``measure_forward_flops``: one eval forward with the
    loss, batch_size x n_seq) and multiplied by the number of scoring passes; the result is
    ``flops.selection`` of the run's results and is added to ``total_flops``. Their time is in
    the run's training time (the trainer fetches the batch inside the timed step) and is also
    recorded on its own. Under DDP every rank scores the whole pool (the same numbers on every
    rank; the FLOPs recorded are one rank's). A FLOP budget (``budget_flops``) counts training
    steps only, not these passes.

Determinism and resume
    The pool is drawn with a ``torch.Generator`` seeded by (run seed, epoch, round); the
    scores are those of the model's weights at the round's first step; the round's selected
    windows are in the checkpoint, so a run resumed inside a round feeds the same windows
    (tested bit for bit).

What it records
    The selected fraction (configured and actual), windows fed and scored, rounds, scoring
    passes, per-pass and total selection FLOPs and their share of the run's training FLOPs,
    selection seconds and their share of the training time, the mean loss of the selected
    windows against the pool's per epoch, the validation curve and time to
    ``target_perplexity``.

Causality
    Scoring reads training windows only and changes no weights; the model's arithmetic is
    untouched, so every logit depends on the tokens it depended on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data_selection.active_learning import top_loss_selection
from ..data_selection.target import curve_of, time_to_target
from ..eval import target_nll
from ..hooks import Flag, RunContext
from ..metrics.flops import measure_forward_flops, measure_step_flops


@dataclass
class ActiveLearningSettings:
    fraction: float = field(default=0.5, metadata={
        "help": "share of the scored candidate windows that is trained on, in (0, 1]"})
    random_share: float = field(default=0.1, metadata={
        "help": "share of the selected windows drawn at random from the rest of the pool "
                "instead of by top loss, in [0, 1)"})
    every: int = field(default=1, metadata={
        "help": "steps per selection round (k): one pool is scored for k batches"})
    target_perplexity: float = field(default=0.0, metadata={
        "help": "validation perplexity for the time-to-target record when no baseline run is "
                "compared (0: none)"})

    def validate(self, config) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"active_learning_fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.random_share < 1:
            raise ValueError("active_learning_random_share must be in [0, 1), got "
                             f"{self.random_share}")
        if self.every < 1:
            raise ValueError(f"active_learning_every must be >= 1, got {self.every}")
        if not self.target_perplexity >= 0:
            raise ValueError("active_learning_target_perplexity must be >= 0 (0: none), got "
                             f"{self.target_perplexity}")

    def pool_batches(self) -> int:
        # round(): 1 / 0.1 is 10.000000000000002 in floating point, not 11 batches
        return math.ceil(round(self.every / self.fraction, 9))


class ActiveLearning(Flag):
    """Scores a pool of candidate batches each round and feeds the top-loss windows."""

    def __init__(self, config, settings: ActiveLearningSettings):
        super().__init__(config, settings)
        self.round_key: tuple[int, int] | None = None     # (epoch, round) of the held selection
        self.round_windows: torch.Tensor | None = None
        self.per_pass_flops: int | None = None
        self.passes = 0
        self.rounds = 0
        self.windows_fed = 0
        self.windows_scored = 0
        self.seconds = 0.0
        self.epoch_stats: dict[str, dict[str, float]] = {}

    def select_windows(self, run: RunContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        # measured here, outside the timed steps: the counter's own overhead is not selection
        if self.per_pass_flops is None:
            report = measure_forward_flops(run.model, self.config.batch_size,
                                           self.config.n_seq, len(run.data.vocab),
                                           device=run.device, seed=self.config.seed)
            self.per_pass_flops = int(report["forward"])
        return order

    @torch.no_grad()
    def _score(self, run: RunContext, windows: torch.Tensor) -> torch.Tensor:
        """Mean NLL of each window under the current model, one batch per pass."""
        model, bs, n = run.model, self.config.batch_size, self.config.n_seq
        was_training = model.training
        model.eval()
        offsets = torch.arange(n + 1)
        losses = []
        try:
            for i in range(0, windows.numel(), bs):
                chunk = run.data.train[windows[i:i + bs, None] * n + offsets].to(run.device)
                with run.autocast():
                    nll = target_nll(model, chunk[:, :-1], chunk[:, 1:], reduction="none")
                losses.append(nll.float().mean(dim=1).cpu())
                self.passes += 1
        finally:
            model.train(was_training)
        return torch.cat(losses)

    def _select_round(self, run: RunContext, epoch: int, order: torch.Tensor, rnd: int) -> torch.Tensor:
        s, bs = self.settings, self.config.batch_size
        k, pool_batches = s.every, s.pool_batches()
        if pool_batches * bs > order.numel():
            raise ValueError(f"active learning needs a pool of {pool_batches * bs} windows per "
                             f"round but the epoch has {order.numel()}; raise "
                             "active_learning_fraction or lower active_learning_every")
        g = torch.Generator().manual_seed(self.config.seed * 1_000_033 + 104_729 * epoch + rnd)
        pool = order[torch.randperm(order.numel(), generator=g)[:pool_batches * bs]]
        run.sync()
        start = time.perf_counter()
        losses = self._score(run, pool)
        run.sync()
        self.seconds += time.perf_counter() - start
        chosen = top_loss_selection(losses, k * bs, s.random_share, g)
        self.rounds += 1
        self.windows_scored += pool.numel()
        st = self.epoch_stats.setdefault(str(epoch), {"epoch": epoch + 1, "rounds": 0,
                                                      "pool_loss_sum": 0.0, "selected_loss_sum": 0.0})
        st["rounds"] += 1
        st["pool_loss_sum"] += float(losses.mean())
        st["selected_loss_sum"] += float(losses[chosen].mean())
        return pool[chosen]

    def batch_windows(self, run: RunContext, epoch: int, order: torch.Tensor, index: int) -> torch.Tensor:
        k, bs = self.settings.every, self.config.batch_size
        rnd, offset = divmod(index, k)
        if self.round_key != (epoch, rnd) or self.round_windows is None:
            self.round_windows = self._select_round(run, epoch, order, rnd)
            self.round_key = (epoch, rnd)
        self.windows_fed += bs
        return self.round_windows[offset * bs:(offset + 1) * bs]

    def selection_flops(self) -> int:
        return self.passes * (self.per_pass_flops or 0)

    def next_selection_flops(self, epoch: int, index: int) -> int:
        # a batch that opens a round scores its pool first (batch_windows)
        if self.round_key == (epoch, index // self.settings.every) and self.round_windows is not None:
            return 0
        return self.settings.pool_batches() * (self.per_pass_flops or 0)

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        step = measure_step_flops(run.model, self.config.batch_size, self.config.n_seq,
                                  len(run.data.vocab), device=run.device,
                                  optimizer=run.optimizer, compute_loss=run.compute_loss,
                                  seed=self.config.seed)
        train_flops = step.total * outcome.steps
        sel = self.selection_flops()
        curve = curve_of(outcome, run.steps_per_epoch, self.config.batch_size * self.config.n_seq)
        epochs = [{"epoch": v["epoch"], "rounds": v["rounds"],
                   "mean_pool_loss": v["pool_loss_sum"] / v["rounds"],
                   "mean_selected_loss": v["selected_loss_sum"] / v["rounds"]}
                  for _, v in sorted(self.epoch_stats.items(), key=lambda kv: int(kv[0]))]
        return {
            "criterion": "top loss (mean cross-entropy of the window under the current model), "
                         f"{self.settings.random_share:.0%} of the slots random",
            "fraction_configured": self.settings.fraction,
            "fraction_actual": self.settings.every / self.settings.pool_batches(),
            "windows_fed": self.windows_fed, "windows_scored": self.windows_scored,
            "rounds": self.rounds, "scoring_passes": self.passes,
            "per_pass_flops": self.per_pass_flops,
            "selection_flops": sel,
            "selection_flops_share": sel / (sel + train_flops) if sel + train_flops else None,
            "selection_seconds": self.seconds,
            "selection_seconds_share": self.seconds / outcome.training_time
            if outcome.training_time > 0 else None,
            "epochs": epochs,
            "validation_curve": curve,
            "time_to_target": time_to_target(curve, self.settings.target_perplexity or None),
        }

    def state_dict(self) -> dict[str, Any]:
        held = self.round_key is not None and self.round_windows is not None
        return {"round_key": list(self.round_key) if held else [],
                "round_windows": self.round_windows.clone() if held else torch.empty(0, dtype=torch.long),
                "per_pass_flops": -1 if self.per_pass_flops is None else self.per_pass_flops,
                "passes": self.passes, "rounds": self.rounds, "windows_fed": self.windows_fed,
                "windows_scored": self.windows_scored, "seconds": self.seconds,
                "epoch_stats": {k: dict(v) for k, v in self.epoch_stats.items()}}

    def load_state_dict(self, state, run: RunContext) -> None:
        key = state["round_key"]
        self.round_key = (int(key[0]), int(key[1])) if key else None
        self.round_windows = state["round_windows"].clone() if key else None
        self.per_pass_flops = None if state["per_pass_flops"] < 0 else int(state["per_pass_flops"])
        self.passes, self.rounds = int(state["passes"]), int(state["rounds"])
        self.windows_fed, self.windows_scored = int(state["windows_fed"]), int(state["windows_scored"])
        self.seconds = float(state["seconds"])
        self.epoch_stats = {k: dict(v) for k, v in state["epoch_stats"].items()}
