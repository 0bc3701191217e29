"""``use_curriculum``: competence-based curriculum (easy windows first, then all of them).

What it does
    Every training window (``n_seq`` targets cut from the training stream, as the trainer cuts
    them) gets a difficulty score: the mean negative log-likelihood, in nats per target, of its
    targets under an add-one-smoothed n-gram model fitted on the *training split only*
    (``curriculum_score``: ``unigram`` or ``bigram``, the default; the bigram conditions each
    target on the token before it, which is inside the window or the token just before it:
    the score reads no validation or test text and no future of another window). The windows
    are ranked easy to hard (ties by position). At global step s (0-based) the model's
    competence is the square-root schedule of Platanios et al.::

        c(s) = min(1, sqrt(s * (1 - c0^2) / T + c0^2))

    with c0 = ``curriculum_initial_competence`` and T = ``curriculum_full_at`` x the run's
    total steps, and the batch of step s is ``batch_size`` windows drawn uniformly, without
    replacement, from the easiest ceil(c(s) x N) windows (at least one batch). From step T on
    the draw is from all windows: plain random sampling (with replacement across steps,
    unlike the trainer's epoch permutation).

Paper
    E. A. Platanios, O. Stretcu, G. Neubig, B. Poczos, T. Mitchell, "Competence-based
    curriculum learning for neural machine translation", NAACL 2019.

Settings (``curriculum_<field>``)
    ``score``, ``initial_competence`` (c0, in (0, 1]), ``full_at`` (T as a fraction of the
    run's steps, in (0, 1]), ``target_perplexity`` (for the time-to-target record).

Determinism and resume
    The batches of epoch e are drawn with a ``torch.Generator`` seeded by (run seed, e), so
    the order is a function of the seed, the epoch and the training split only; the epoch's
    order and the pacing record are in the checkpoint, and a resumed run feeds the same
    windows in the same order (tested bit for bit).

Cost
    Scoring is a counting pass over the training tokens at the first epoch (no model
    forward, no FLOPs in the model's sense; its seconds are recorded). Training steps cost
    what they cost without the flag.

What it records
    The scorer and a summary of the scores (min, quartiles, max); the competence actually used
    at the first and last step of every epoch and at up to 32 evenly spaced steps; per epoch
    the mean score of the windows fed against the mean over all windows and how many distinct
    windows were fed; the validation curve and time to ``target_perplexity``.

Causality
    Only which windows are fed changes; the model and its arithmetic do not, so every logit
    depends on the tokens it depended on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data_selection.curriculum import competence, difficulty_scores
from ..data_selection.target import curve_of, time_to_target
from ..hooks import Flag, RunContext


@dataclass
class CurriculumSettings:
    score: str = field(default="bigram", metadata={
        "help": "difficulty score: mean NLL of a window's targets under an add-one-smoothed "
                "'unigram' or 'bigram' model fitted on the training split"})
    initial_competence: float = field(default=0.01, metadata={
        "help": "c0: the fraction of easiest windows sampled at step 0, in (0, 1]"})
    full_at: float = field(default=0.5, metadata={
        "help": "T as a fraction of the run's total steps: competence reaches 1 there, in (0, 1]"})
    target_perplexity: float = field(default=0.0, metadata={
        "help": "validation perplexity for the time-to-target record when no baseline run is "
                "compared (0: none)"})

    def validate(self, config) -> None:
        if self.score not in ("unigram", "bigram"):
            raise ValueError(f"curriculum_score must be 'unigram' or 'bigram', got {self.score!r}")
        if not 0 < self.initial_competence <= 1:
            raise ValueError("curriculum_initial_competence must be in (0, 1], got "
                             f"{self.initial_competence}")
        if not 0 < self.full_at <= 1:
            raise ValueError(f"curriculum_full_at must be in (0, 1], got {self.full_at}")
        if not self.target_perplexity >= 0:
            raise ValueError("curriculum_target_perplexity must be >= 0 (0: none), got "
                             f"{self.target_perplexity}")


class Curriculum(Flag):
    """Draws each step's batch from the easiest c(s) fraction of the ranked windows."""

    MAX_SAMPLES = 32

    def __init__(self, config, settings: CurriculumSettings):
        super().__init__(config, settings)
        self.scores: torch.Tensor | None = None
        self.ranking: torch.Tensor | None = None     # window ids, easiest first
        self.scoring_seconds = 0.0
        self.epoch_records: dict[str, dict[str, Any]] = {}
        self.order_epoch: int | None = None           # the epoch whose order is held
        self.order: torch.Tensor | None = None

    def _ensure_scores(self, run: RunContext) -> None:
        if self.scores is not None:
            return
        start = time.perf_counter()
        self.scores = difficulty_scores(run.data.train, self.config.n_seq,
                                        len(run.data.vocab), self.settings.score)
        # stable: ties keep window order, so the ranking is the same on every machine
        self.ranking = torch.sort(self.scores, stable=True).indices
        self.scoring_seconds = time.perf_counter() - start

    def full_steps(self, run: RunContext) -> float:
        return max(1.0, self.settings.full_at * run.total_steps)

    def competence_at(self, run: RunContext, step: int) -> float:
        return competence(step, self.settings.initial_competence, self.full_steps(run))

    def epoch_order(self, run: RunContext, epoch: int) -> torch.Tensor:
        """The windows of epoch ``epoch``, batch after batch, by the competence schedule."""
        self._ensure_scores(run)
        bs, spe, n = self.config.batch_size, run.steps_per_epoch, run.num_windows
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 7919 * epoch + 17)
        batches, comps = [], []
        for b in range(spe):
            c = self.competence_at(run, epoch * spe + b)
            pool = min(n, max(bs, math.ceil(c * n)))
            pick = torch.randperm(pool, generator=g)[:bs]
            batches.append(self.ranking[pick])
            comps.append(c)
        order = torch.cat(batches)
        fed = order[:min(spe, run.total_steps - epoch * spe) * bs]
        self.epoch_records[str(epoch)] = {
            "epoch": epoch + 1, "competence_first": comps[0],
            "competence_last": comps[min(spe, run.total_steps - epoch * spe) - 1],
            "mean_score_fed": float(self.scores[fed].mean()),
            "distinct_windows_fed": int(torch.unique(fed).numel()), "windows_fed": int(fed.numel())}
        return order

    def select_windows(self, run: RunContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        # the trainer asks again for the epoch in progress after a resume: give the held one
        if self.order_epoch != epoch or self.order is None:
            self.order = self.epoch_order(run, epoch)
            self.order_epoch = epoch
        return self.order

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        self._ensure_scores(run)
        q = torch.quantile(self.scores.double(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0],
                                                               dtype=torch.float64)).tolist()
        total = run.total_steps
        samples = sorted({round(i * (total - 1) / (self.MAX_SAMPLES - 1))
                          for i in range(self.MAX_SAMPLES)}) if total > 1 else [0]
        curve = curve_of(outcome, run.steps_per_epoch, self.config.batch_size * self.config.n_seq)
        tt = self.settings.target_perplexity or None
        return {
            "score": f"mean NLL (nats/target) under an add-one {self.settings.score} model of "
                     "the training split",
            "score_summary": {"min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4],
                              "mean": float(self.scores.mean()), "windows": int(self.scores.numel())},
            "scoring_seconds": self.scoring_seconds,
            "full_competence_step": self.full_steps(run),
            "competence_samples": [{"step": s + 1, "competence": self.competence_at(run, s)}
                                   for s in samples],
            "epochs": [self.epoch_records[k] for k in sorted(self.epoch_records, key=int)],
            "validation_curve": curve,
            "time_to_target": time_to_target(curve, tt),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"order_epoch": -1 if self.order_epoch is None else self.order_epoch,
                "order": self.order.clone() if self.order is not None else torch.empty(0, dtype=torch.long),
                "epoch_records": {k: dict(v) for k, v in self.epoch_records.items()}}

    def load_state_dict(self, state, run: RunContext) -> None:
        self.order_epoch = None if state["order_epoch"] < 0 else int(state["order_epoch"])
        self.order = state["order"].clone() if state["order"].numel() else None
        self.epoch_records = {k: dict(v) for k, v in state["epoch_records"].items()}
