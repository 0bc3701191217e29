"""The set of active flags the trainer calls, and the run's model built with its flags.

The hooks themselves (:class:`~bkbench.hooks.Flag`) and the context they receive
(:class:`~bkbench.hooks.RunContext`) live in the leaf module :mod:`bkbench.hooks`, which
the trainer imports as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
import torch.nn as nn

from ..hooks import Flag, RunContext
from . import registry


class FlagSet:
    """The active flags of one run, called in registry order."""

    def __init__(self, flags: dict[str, Flag]):
        self.flags = flags

    @classmethod
    def from_config(cls, config) -> "FlagSet":
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

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        for flag in self.flags.values():
            flag.after_optimizer_step(run, terms)

    def on_epoch_end(self, run: RunContext) -> None:
        for flag in self.flags.values():
            flag.on_epoch_end(run)

    def select_windows(self, run: RunContext, epoch: int, order: torch.Tensor) -> torch.Tensor:
        for flag in self.flags.values():
            order = flag.select_windows(run, epoch, order)
        return order

    def batch_windows(self, run: RunContext, epoch: int, order: torch.Tensor,
                      index: int) -> torch.Tensor | None:
        chosen = None
        for name, flag in self.flags.items():
            windows = flag.batch_windows(run, epoch, order, index)
            if windows is not None:
                if chosen is not None:
                    raise RuntimeError(f"two flags choose the windows of a batch ({name} and another)")
                chosen = windows
        return chosen

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        for flag in self.flags.values():
            model = flag.prepare_for_eval(model)
        return model

    def record(self, run: RunContext, outcome, run_one=None) -> dict[str, dict[str, Any]]:
        """``{flag: {"settings": {...}, "measured": {...}}}`` for every active flag.
        ``run_one(name, measure)`` runs each flag's ``measure()`` (progress, kept records)."""
        out = {}
        for name, flag in self.flags.items():
            measure = lambda flag=flag: flag.record(run, outcome)  # noqa: E731
            measured = run_one(name, measure) if run_one is not None else measure()
            if not measured:
                raise RuntimeError(f"{name} is on but recorded nothing (DESIGN: a defect)")
            settings = dataclasses.asdict(flag.settings) if flag.settings is not None else {}
            out[name] = {"settings": settings, "measured": measured}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: flag.state_dict() for name, flag in self.flags.items()}

    def load_state_dict(self, state: dict[str, Any], run: RunContext) -> None:
        missing = sorted(set(self.flags) - set(state))
        if missing:
            raise ValueError(f"checkpoint has no state for flag(s) {', '.join(missing)}")
        for name, flag in self.flags.items():
            flag.load_state_dict(state[name], run)


def build_model(config, vocab_size: int) -> tuple[nn.Module, FlagSet]:
    """The run's model with its flags applied, and the flags: what training and audit use."""
    from ..models import build_model as build_plain
    flags = FlagSet.from_config(config)
    model = build_plain(config.architecture, vocab_size, **config.model_kwargs())
    return flags.wrap_model(model), flags


__all__ = ["Flag", "FlagSet", "build_model"]
