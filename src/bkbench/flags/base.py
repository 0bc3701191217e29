"""The hooks a flag may implement, and the set of active flags the trainer calls.

The trainer knows no flag by name: it calls a small fixed set of points on a
:class:`FlagSet`, which calls every active flag in registry order (the pattern of the callback
lists of Lightning or the HF Trainer). A flag overrides only the points it needs:

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
``record(trainer)``         what the flag measured, for ``flags.<name>`` in the results
``state_dict`` /            the flag's own state in checkpoints, restored *before* the model's
``load_state_dict``         weights so that a flag that changed the model's structure can
                            rebuild it first
==========================  ==================================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:  # pragma: no cover
    from ..train import Trainer, TrainOutcome


class Flag:
    """Base class of a flag's hooks; every default does nothing."""

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

    def after_optimizer_step(self, trainer: "Trainer", terms: dict[str, torch.Tensor]) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer") -> None:
        pass

    def select_windows(self, trainer: "Trainer", epoch: int, order: torch.Tensor) -> torch.Tensor:
        return order

    def batch_windows(self, trainer: "Trainer", epoch: int, order: torch.Tensor,
                      index: int) -> torch.Tensor | None:
        return None

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        return model

    def record(self, trainer: "Trainer", outcome: "TrainOutcome") -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must record what it measured")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], trainer: "Trainer") -> None:
        pass


class FlagSet:
    """The active flags of one run, called in registry order."""

    def __init__(self, flags: dict[str, Flag]):
        self.flags = flags

    @classmethod
    def from_config(cls, config) -> "FlagSet":
        from . import registry
        flags = {}
        for name in config.enabled_flags():
            spec = registry.spec(name)
            flags[name] = spec.flag_class(config, registry.settings_of(config, name))
        return cls(flags)

    def __contains__(self, name: str) -> bool:
        return name in self.flags

    def __getitem__(self, name: str) -> Flag:
        return self.flags[name]

    def __bool__(self) -> bool:
        return bool(self.flags)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        for flag in self.flags.values():
            model = flag.wrap_model(model)
        return model

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        dtypes = {d for f in self.flags.values() if (d := f.autocast_dtype(device)) is not None}
        if len(dtypes) > 1:
            raise RuntimeError(f"flags ask for different autocast dtypes: {dtypes}")
        return dtypes.pop() if dtypes else None

    def autocast(self, device: torch.device):
        dtype = self.autocast_dtype(device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def loss_terms(self, model, inputs, targets, step) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        for flag in self.flags.values():
            for key, value in flag.loss_terms(model, inputs, targets, step).items():
                if key in terms:
                    raise RuntimeError(f"two flags produce a loss term named {key!r}")
                terms[key] = value
        return terms

    def selection_flops(self) -> int:
        return sum(flag.selection_flops() for flag in self.flags.values())

    def next_selection_flops(self, epoch: int, index: int) -> int:
        return sum(flag.next_selection_flops(epoch, index) for flag in self.flags.values())

    def after_optimizer_step(self, trainer, terms) -> None:
        for flag in self.flags.values():
            flag.after_optimizer_step(trainer, terms)

    def on_epoch_end(self, trainer) -> None:
        for flag in self.flags.values():
            flag.on_epoch_end(trainer)

    def select_windows(self, trainer, epoch: int, order: torch.Tensor) -> torch.Tensor:
        for flag in self.flags.values():
            order = flag.select_windows(trainer, epoch, order)
        return order

    def batch_windows(self, trainer, epoch: int, order: torch.Tensor,
                      index: int) -> torch.Tensor | None:
        chosen = None
        for name, flag in self.flags.items():
            windows = flag.batch_windows(trainer, epoch, order, index)
            if windows is not None:
                if chosen is not None:
                    raise RuntimeError(f"two flags choose the windows of a batch ({name} and another)")
                chosen = windows
        return chosen

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        for flag in self.flags.values():
            model = flag.prepare_for_eval(model)
        return model

    def record(self, trainer, outcome, run_one=None) -> dict[str, dict[str, Any]]:
        """``{flag: {"settings": {...}, "measured": {...}}}`` for every active flag.
        ``run_one(name, measure)`` runs each flag's ``measure()`` (progress, kept records)."""
        out = {}
        for name, flag in self.flags.items():
            measure = lambda flag=flag: flag.record(trainer, outcome)  # noqa: E731
            measured = run_one(name, measure) if run_one is not None else measure()
            if not measured:
                raise RuntimeError(f"{name} is on but recorded nothing (DESIGN: a defect)")
            settings = dataclasses.asdict(flag.settings) if flag.settings is not None else {}
            out[name] = {"settings": settings, "measured": measured}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: flag.state_dict() for name, flag in self.flags.items()}

    def load_state_dict(self, state: dict[str, Any], trainer) -> None:
        missing = sorted(set(self.flags) - set(state))
        if missing:
            raise ValueError(f"checkpoint has no state for flag(s) {', '.join(missing)}")
        for name, flag in self.flags.items():
            flag.load_state_dict(state[name], trainer)


def build_model(config, vocab_size: int) -> tuple[nn.Module, FlagSet]:
    """The run's model with its flags applied, and the flags: what training and audit use."""
    from ..models import build_model as build_plain
    flags = FlagSet.from_config(config)
    model = build_plain(config.architecture, vocab_size, **config.model_kwargs())
    return flags.wrap_model(model), flags


__all__ = ["Flag", "FlagSet", "build_model"]
