"""The hooks a flag may implement, and the run context a hook receives.

A leaf module (it imports torch only): the trainer (``bkbench.train``) builds a
:class:`RunContext` and calls the hooks of the active flags; the flags (``bkbench.flags``)
implement them. Neither imports the other's internals.

The trainer knows no flag by name: it calls a small fixed set of points on the set of
active flags (``bkbench.flags.FlagSet``), which calls every active flag in registry order
(the pattern of the callback lists of Lightning or the HF Trainer). A flag overrides only the
points it needs:

==========================  ==================================================================
``wrap_model(model)``       once, right after the model is built and before the causality
                            audit, the optimizer and DDP: swap layers, add masks, attach the
                            flag's own trainable modules (they then train, checkpoint and move
                            with the model)
``autocast_dtype(device)``  the dtype of torch.autocast for training and evaluation forwards
``loss_terms(...)``         named loss terms of the forward just run, added to the loss; the
                            trainer logs every term each step
``after_optimizer_step``    after each optimizer step (schedules, pruning masks, statistics)
``on_epoch_end``            after an epoch's last step, before its validation
``select_windows``          the order of the training windows of an epoch (data selection)
``batch_windows``           the window ids of one global batch (online selection); None: the
                            batch's slice of the epoch's order
``prepare_for_eval(model)`` the model that is evaluated (integer weights, early exits)
``record(run, outcome)``    what the flag measured, for ``flags.<name>`` in the results
``state_dict`` /            the flag's own state in checkpoints, restored *before* the model's
``load_state_dict``         weights so that a flag that changed the model's structure can
                            rebuild it first
==========================  ==================================================================
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn as nn


class Progress(Protocol):
    """Where training is: what a hook may read of the trainer's progress."""

    step: int      # optimizer steps done (the step in progress is step + 1 until it is counted)
    epoch: int     # the epoch in progress, 0-based


@dataclass
class RunContext:
    """What a flag's hooks see of a run: the pieces, not the trainer.

    Built by the trainer once it has its model, optimizer and step plan; the trainer keeps
    ``progress`` pointing at its current progress (a resume replaces it).
    """

    model: nn.Module                 # the model being trained (not the DDP wrapper)
    optimizer: torch.optim.Optimizer
    device: torch.device
    data: Any                        # .train / .valid / .test token tensors and .vocab
    progress: Progress
    total_steps: int                 # optimizer steps the run plans
    steps_per_epoch: int
    num_windows: int                 # training windows of n_seq targets
    world: int                       # processes (1 without DDP)
    # held-out perplexity of a model on a split, as the run evaluates (flags' autocast)
    evaluate: Callable[[nn.Module, torch.Tensor], Any]
    sync: Callable[[], None]         # wait for the device (before reading a clock)
    # the training objective of one batch: (loss, named terms), as the trainer computes it
    compute_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
    autocast: Callable[[], AbstractContextManager]   # the flags' autocast for a forward
    # a flag removed parameters: rewrap DDP; True also forgets the best epoch's weights
    structure_changed: Callable[[bool], None]
    # the run's model with its flags, built afresh from the config (untrained; the caller
    # seeds first): (model, the new model's flag set)
    build_model: Callable[[], tuple[nn.Module, Any]]

    @property
    def distributed(self) -> bool:
        return self.world > 1


class Flag:
    """Base class of a flag's hooks; every default does nothing.

    ``config`` is the run's config object (read, never imported: a flag reads fields such as
    ``n_seq``), ``settings`` the flag's own settings dataclass (None: it has none).
    """

    def __init__(self, config, settings):
        self.config = config
        self.settings = settings

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        return None

    def loss_terms(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   step: int) -> dict[str, torch.Tensor]:
        return {}

    def selection_flops(self) -> int:
        """Counted FLOPs spent so far choosing training data (model forwards outside the steps)."""
        return 0

    def next_selection_flops(self, epoch: int, index: int) -> int:
        """Counted FLOPs that fetching batch ``index`` of ``epoch`` will spend choosing data."""
        return 0

    def after_optimizer_step(self, run: RunContext, terms: dict[str, torch.Tensor]) -> None:
        pass

    def on_epoch_end(self, run: RunContext) -> None:
        pass

    def select_windows(self, run: RunContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        return order

    def batch_windows(self, run: RunContext, epoch: int, order: torch.Tensor,
                      index: int) -> torch.Tensor | None:
        return None

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        return model

    def record(self, run: RunContext, outcome: Any) -> dict[str, Any]:
        """What the flag measured; ``outcome`` is the finished run's ``TrainOutcome``."""
        raise NotImplementedError(f"{type(self).__name__} must record what it measured")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], run: RunContext) -> None:
        pass


__all__ = ["Flag", "Progress", "RunContext"]
