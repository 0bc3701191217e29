"""``use_active_learning``: online batch selection by each window's latest training loss.

What it does
    Every training step's forward already computes the loss of every window it trains on;
    the flag keeps the latest one per window (and the step that measured it) and selects by
    it, as Loshchilov & Hutter's online batch selection ranks data points by their latest
    known loss: no second, scoring forward is run. Every ``active_learning_every`` steps (a
    *round* of k steps) the candidate pool is the next ceil(k / ``fraction``) batches of the
    epoch's window order, starting at the round's first batch (wrapping around at the
    epoch's end); the round's k batches are the k x batch_size candidates of highest latest
    loss (a window never trained on ranks first: its loss is unknown, and measuring it is
    what training it does), except a ``random_share`` of the slots filled uniformly from the
    other candidates, so that the selection cannot collapse onto a few windows the model
    keeps failing on. The selected windows are shuffled (seeded) before being cut into the
    round's batches. The model trains on ``fraction`` of the windows it considers (exactly
    k / ceil(k / fraction); recorded).

    The latest loss of a window is that of the weights at the step that last trained on it:
    older entries are staler (the model has improved since), which favours windows not
    visited for a while; Loshchilov & Hutter refresh all losses periodically at the cost of
    extra forwards, which this flag does not spend. The age of the losses it selected by is
    recorded.

Composition with ``use_curriculum``
    The pool is a stretch of the epoch's order *at the round's position*, and with the
    curriculum on that order is the curriculum's (it runs first in the registry): batch s of
    it is drawn from the easiest c(s) share of the windows. So active learning selects
    within the curriculum's current pacing (the pool spans the competence of the round's
    next ceil(k / fraction) steps) and never feeds a window the curriculum has not yet
    admitted; the curriculum decides *which* windows are eligible, active learning which of
    them are worth the step. The curriculum samples with replacement across steps, so a pool
    may hold a window twice.

Papers
    I. Loshchilov, F. Hutter, "Online batch selection for faster training of neural networks",
    ICLR workshop 2016 (latest-loss ranking); A. Katharopoulos, F. Fleuret, "Not all samples
    are created equal", ICML 2018, and A. H. Jiang et al., "Accelerating deep learning by
    focusing on the biggest losers" (selective backprop), 2019, for the family.

Settings (``active_learning_<field>``)
    ``fraction`` (in (0, 1]), ``random_share`` (in [0, 1)), ``every`` (k >= 1 steps per
    round), ``target_perplexity`` (for the time-to-target record).

Cost, and how it is counted
    No model forward beyond the training steps: the per-window losses are a by-product of
    the step's fused loss (``lm_head_nll(..., with_rows=True)``), so the selection FLOPs are
    0 (``flops.selection``) and the training step's FLOPs are those of a plain step. A sort
    of the pool per round, and under DDP one all-gather of the batch's window losses per
    step, so that every rank keeps the same table.

Determinism and resume
    The random slots and the shuffle use a ``torch.Generator`` seeded by (run seed, epoch,
    round); the table of latest losses and the round's selected windows are in the
    checkpoint, so a resumed run feeds the same windows (tested bit for bit).

What it records
    The selected fraction (configured and actual), windows fed and considered, distinct
    windows fed, rounds; the share of selected slots chosen by a known loss and the mean age
    (steps) of those losses; per epoch the mean latest loss of the selected windows against
    the pool's (known losses only); selection FLOPs (0) and the selection's seconds; the
    validation curve and time to ``target_perplexity``.

Causality
    Selection reads training windows' losses only and changes no weights; the model's
    arithmetic is untouched, so every logit depends on the tokens it depended on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data_selection.active_learning import LatestLosses, top_loss_selection
from ..data_selection.target import curve_of, time_to_target
from ..hooks import Flag, RunContext


@dataclass
class ActiveLearningSettings:
    fraction: float = field(default=0.75, metadata={
        "help": "share of the candidate windows that is trained on, in (0, 1]"})
    random_share: float = field(default=0.1, metadata={
        "help": "share of the selected windows drawn at random from the rest of the pool "
                "instead of by top loss, in [0, 1)"})
    every: int = field(default=1, metadata={
        "help": "steps per selection round (k): one pool is ranked for k batches"})
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


def gather_batch_losses(run: RunContext, shard: torch.Tensor, batch: int) -> torch.Tensor:
    """The global batch's per-window losses from each rank's shard (rank r holds windows
    r, r + world, ...; the trainer's ``window_batch``), in global batch order."""
    if not run.distributed:
        return shard.detach()
    world, width = run.world, math.ceil(batch / run.world)
    padded = torch.full((width,), float("nan"), dtype=torch.float32, device=run.device)
    padded[:shard.numel()] = shard.detach().float()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.stack(parts).t().reshape(-1)[:batch]   # position j: rank j % world


class ActiveLearning(Flag):
    """Feeds, each round, the pool's windows of highest latest training loss."""

    def __init__(self, config, settings: ActiveLearningSettings):
        super().__init__(config, settings)
        self.table: LatestLosses | None = None
        self.round_key: tuple[int, int] | None = None     # (epoch, round) of the held selection
        self.round_windows: torch.Tensor | None = None
        self.fed_now: torch.Tensor | None = None          # the batch of the step in progress
        self.rounds = 0
        self.windows_fed = 0
        self.windows_considered = 0
        self.known_slots = 0
        self.age_sum = 0
        self.seconds = 0.0
        self.fed_count: torch.Tensor | None = None
        self.epoch_stats: dict[str, dict[str, float]] = {}

    def _ensure_table(self, run: RunContext) -> None:
        if self.table is None:
            self.table = LatestLosses(run.num_windows)
            self.fed_count = torch.zeros(run.num_windows, dtype=torch.long)

    def _select_round(self, run: RunContext, epoch: int, order: torch.Tensor, rnd: int) -> torch.Tensor:
        s, bs = self.settings, self.config.batch_size
        k, pool_size = s.every, s.pool_batches() * bs
        if pool_size > order.numel():
            raise ValueError(f"active learning needs a pool of {pool_size} windows per "
                             f"round but the epoch has {order.numel()}; raise "
                             "active_learning_fraction or lower active_learning_every")
        start = time.perf_counter()
        self._ensure_table(run)
        at = rnd * k * bs
        pool = order[(at + torch.arange(pool_size)) % order.numel()]
        priority = self.table.priority(pool)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_033 + 104_729 * epoch + rnd)
        chosen = top_loss_selection(priority, k * bs, s.random_share, g)
        self.seconds += time.perf_counter() - start
        self._count(epoch, run.progress.step, pool, priority, chosen)
        return pool[chosen]

    def _count(self, epoch: int, step: int, pool, priority, chosen) -> None:
        self.rounds += 1
        self.windows_considered += pool.numel()
        known = torch.isfinite(priority[chosen])
        self.known_slots += int(known.sum())
        self.age_sum += int((step - self.table.step[pool[chosen][known]]).sum())
        st = self.epoch_stats.setdefault(str(epoch), {"epoch": epoch + 1, "rounds": 0,
                                                      "pool_loss_sum": 0.0, "pool_known": 0,
                                                      "selected_loss_sum": 0.0,
                                                      "selected_known": 0})
        st["rounds"] += 1
        finite = torch.isfinite(priority)
        st["pool_loss_sum"] += float(priority[finite].sum())
        st["pool_known"] += int(finite.sum())
        st["selected_loss_sum"] += float(priority[chosen][known].sum())
        st["selected_known"] += int(known.sum())

    def batch_windows(self, run: RunContext, epoch: int, order: torch.Tensor, index: int) -> torch.Tensor:
        k, bs = self.settings.every, self.config.batch_size
        rnd, offset = divmod(index, k)
        if self.round_key != (epoch, rnd) or self.round_windows is None:
            self.round_windows = self._select_round(run, epoch, order, rnd)
            self.round_key = (epoch, rnd)
        self.windows_fed += bs
        self.fed_now = self.round_windows[offset * bs:(offset + 1) * bs]
        self.fed_count[self.fed_now] += 1
        return self.fed_now

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        if self.fed_now is None:      # a step whose batch this flag did not choose
            return
        losses = gather_batch_losses(run, terms["cross_entropy_per_window"], self.fed_now.numel())
        self.table.update(self.fed_now, losses, run.progress.step)
        self.fed_now = None

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        curve = curve_of(outcome, run.steps_per_epoch, self.config.batch_size * self.config.n_seq)
        mean = lambda total, n: total / n if n else None  # noqa: E731
        epochs = [{"epoch": v["epoch"], "rounds": v["rounds"],
                   "mean_pool_latest_loss": mean(v["pool_loss_sum"], v["pool_known"]),
                   "mean_selected_latest_loss": mean(v["selected_loss_sum"], v["selected_known"]),
                   "selected_slots_with_known_loss": v["selected_known"]}
                  for _, v in sorted(self.epoch_stats.items(), key=lambda kv: int(kv[0]))]
        slots = self.windows_fed if self.rounds else 0
        return {
            "criterion": "top latest training loss (mean cross-entropy of the window when it "
                         f"was last trained on; never trained: first), "
                         f"{self.settings.random_share:.0%} of the slots random",
            "fraction_configured": self.settings.fraction,
            "fraction_actual": self.settings.every / self.settings.pool_batches(),
            "windows_fed": self.windows_fed, "windows_considered": self.windows_considered,
            "distinct_windows_fed": int((self.fed_count > 0).sum()) if self.fed_count is not None else 0,
            "rounds": self.rounds,
            "selected_by_known_loss_share": self.known_slots / slots if slots else None,
            "mean_age_of_selecting_loss_steps": mean(self.age_sum, self.known_slots),
            "scoring_passes": 0, "selection_flops": 0,
            "selection_note": "no scoring forward: the losses are the training steps' own",
            "selection_seconds": self.seconds,
            "epochs": epochs,
            "validation_curve": curve,
            "time_to_target": time_to_target(curve, self.settings.target_perplexity or None),
        }

    def state_dict(self) -> dict[str, Any]:
        held = self.round_key is not None and self.round_windows is not None
        empty = torch.empty(0, dtype=torch.long)
        return {"round_key": list(self.round_key) if held else [],
                "round_windows": self.round_windows.clone() if held else empty,
                "table": self.table.state_dict() if self.table is not None else {},
                "fed_count": self.fed_count.clone() if self.fed_count is not None else empty,
                "counts": [self.rounds, self.windows_fed, self.windows_considered,
                           self.known_slots, self.age_sum], "seconds": self.seconds,
                "epoch_stats": {k: dict(v) for k, v in self.epoch_stats.items()}}

    def load_state_dict(self, state, run: RunContext) -> None:
        key = state["round_key"]
        self.round_key = (int(key[0]), int(key[1])) if key else None
        self.round_windows = state["round_windows"].clone() if key else None
        if state["table"]:
            self._ensure_table(run)
            self.table.load_state_dict(state["table"])
            self.fed_count = state["fed_count"].clone()
        (self.rounds, self.windows_fed, self.windows_considered, self.known_slots,
         self.age_sum) = (int(c) for c in state["counts"])
        self.seconds = float(state["seconds"])
        self.epoch_stats = {k: dict(v) for k, v in state["epoch_stats"].items()}
