"""Modules a flag attaches to a model beside its layers (the Koopman head, ACT's halting
units): they train, checkpoint and move with the model, under ``flag_modules.<name>``.

They are the flag's own, not the language model's layers: quantization and pruning, which
act on the model's layers, recognise them by this container's type and leave them alone.
"""

from __future__ import annotations

import torch.nn as nn


class AttachedModules(nn.ModuleDict):
    """A model's ``flag_modules``: the modules flags attached, by flag."""


def attach(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Attach ``module`` to ``model`` as ``flag_modules[name]``; returns it."""
    if not isinstance(getattr(model, "flag_modules", None), AttachedModules):
        model.flag_modules = AttachedModules()
    model.flag_modules[name] = module
    return module


def attached_ids(model: nn.Module) -> set[int]:
    """ids of every module inside a model's attached modules (the containers included)."""
    return {id(m) for c in model.modules() if isinstance(c, AttachedModules) for m in c.modules()}


__all__ = ["AttachedModules", "attach", "attached_ids"]
