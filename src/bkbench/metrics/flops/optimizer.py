"""The optimizer's FLOPs per step, by formula (the counter never sees the optimizer step)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

#: FLOPs per parameter element per optimizer step, without weight decay. AdamW (torch's
#: update): first moment ``m += (1-b1)(g - m)`` 3 (sub, mul, add); second moment
#: ``v = b2*v + (1-b2)*g*g`` 4 (square, two scalings, add); denominator
#: ``sqrt(v)/sqrt(bc2) + eps`` 3 (sqrt, div, add); update ``p -= step * m / denom`` 3
#: (div, mul, sub). Total 13. Bias corrections are per tensor scalars, not per element.
#: Adam: 13. SGD: g*lr and p -= 2; with momentum ``buf = mu*buf + g`` 2 more.
OPTIMIZER_FLOPS_PER_PARAM = {"adamw": 13, "adam": 13, "sgd": 2, "sgd_momentum": 4}

#: Extra FLOPs per element of a parameter whose group has weight_decay != 0 (torch skips the
#: decay where it is 0): AdamW's decoupled ``p *= 1 - lr*wd`` 1; Adam's and SGD's L2 term
#: ``g += wd*p`` 2.
WEIGHT_DECAY_FLOPS_PER_PARAM = {"adamw": 1, "adam": 2, "sgd": 2, "sgd_momentum": 2}

#: Global-norm gradient clipping (``clip_grad_norm_``): square and sum each gradient element
#: (2) and scale it by the clip coefficient (1).
GRAD_CLIP_FLOPS_PER_PARAM = 3

ADAMW_EXPLANATION = (
    "AdamW per parameter element per step: first moment 3, second moment 4, denominator "
    "sqrt/bias-correction/eps 3, update 3 = 13, plus 1 for the decoupled weight decay where "
    "the parameter's group has weight_decay != 0 (bias corrections are per-tensor scalars); "
    "gradient clipping by global norm adds 3 (square, sum, scale)")


def optimizer_flops(num_params: int, optimizer: str = "adamw", grad_clip: bool = False, *,
                    decayed: int | None = None) -> int:
    """FLOPs of one optimizer step over ``num_params`` parameter elements, ``decayed`` of
    which (default: all) are in param groups with weight decay.

    Per element: ``OPTIMIZER_FLOPS_PER_PARAM[optimizer]`` (AdamW 13, see its docstring), plus
    ``WEIGHT_DECAY_FLOPS_PER_PARAM[optimizer]`` per decayed element, plus
    :data:`GRAD_CLIP_FLOPS_PER_PARAM` when ``grad_clip`` (clip_grad_norm_ runs every step).
    """
    key = optimizer.lower()
    if key not in OPTIMIZER_FLOPS_PER_PARAM:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: "
                         f"{', '.join(OPTIMIZER_FLOPS_PER_PARAM)}")
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    decayed = num_params if decayed is None else decayed
    if not 0 <= decayed <= num_params:
        raise ValueError(f"decayed must be between 0 and num_params ({num_params}), got {decayed}")
    per = OPTIMIZER_FLOPS_PER_PARAM[key] + (GRAD_CLIP_FLOPS_PER_PARAM if grad_clip else 0)
    return int(num_params) * per + int(decayed) * WEIGHT_DECAY_FLOPS_PER_PARAM[key]


def optimizer_name(optimizer: Any) -> str:
    if optimizer is None:
        return "adamw"
    if isinstance(optimizer, str):
        return optimizer.lower()
    name = type(optimizer).__name__.lower()
    if name == "sgd":
        momentum = any(g.get("momentum", 0) for g in optimizer.param_groups)
        return "sgd_momentum" if momentum else "sgd"
    if name in OPTIMIZER_FLOPS_PER_PARAM:
        return name
    raise ValueError(f"no FLOP formula for optimizer {type(optimizer).__name__}; "
                     f"known: {', '.join(OPTIMIZER_FLOPS_PER_PARAM)}")


def optimized_params(model: nn.Module, optimizer: Any) -> list[tuple[torch.Tensor, bool]]:
    """(parameter, has weight decay) for each parameter the optimizer updates; without an
    optimizer instance, every trainable parameter, decayed (torch's AdamW default)."""
    if optimizer is not None and not isinstance(optimizer, str):
        seen, out = set(), []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append((p, group.get("weight_decay", 0) != 0))
        return out
    return [(p, True) for p in model.parameters() if p.requires_grad]
