"""Mixed precision's mechanism: the autocast dtype, and float32 islands (modules that run with
autocast off: the BK mixers, whose resolvent recurrence amplifies rounding).

The flag, and its documentation, is :mod:`bkbench.flags.mixed_precision`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn


DTYPE = torch.bfloat16


class Float32Island:
    """Forward pre/post hooks that run a module with autocast off and float32 inputs."""

    def __init__(self):
        self._contexts: list[Any] = []

    def pre(self, module, args):
        device = args[0].device.type
        # the meta device (bkbench.size_estimate's shapes-only trace) has no autocast to leave
        ctx = (contextlib.nullcontext() if device == "meta"
               else torch.autocast(device_type=device, enabled=False))
        ctx.__enter__()
        self._contexts.append(ctx)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def post(self, module, args, output):
        self._contexts.pop().__exit__(None, None, None)


def keep_in_float32(modules: list[nn.Module]) -> None:
    """Run each of ``modules`` with autocast off and float32 inputs (forward hooks)."""
    island = Float32Island()
    for module in modules:
        module.register_forward_pre_hook(island.pre)
        module.register_forward_hook(island.post, always_call=True)
