"""Pruning's mechanism: the cubic sparsity schedule, the choice of prunable Linear layers, and
the removal of MoE experts (modules, gate rows and their optimizer state).

The flag that applies them on a schedule, and its documentation, is
:mod:`bkbench.flags.pruning`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.layers.attached import attached_ids
from ..models.resnet_bk import BKMixer, MoEFeedForward
from .quantization import QATLinear


def cubic_sparsity(step: int, t0: int, t_end: int, target: float) -> float:
    """Zhu & Gupta's schedule from 0 at t0 to ``target`` at t_end (and after)."""
    if step <= t0:
        return 0.0
    progress = min(1.0, (step - t0) / max(1, t_end - t0))
    return target * (1.0 - (1.0 - progress) ** 3)


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers magnitude pruning masks, by name: every Linear of the blocks (experts
    or MLP, attention projections) except the MoE gates and the BK mixers' small projections,
    and the LM head unless it is tied to the embedding; never a flag's attached module."""
    excluded = attached_ids(model)
    for m in model.modules():
        if isinstance(m, BKMixer):
            excluded |= {id(x) for x in m.modules()}
        elif isinstance(m, MoEFeedForward):
            excluded.add(id(m.gate))
    in_blocks = {id(m) for m in model.blocks.modules()} if hasattr(model, "blocks") else set()
    tied = getattr(getattr(model, "config", None), "tie_weights", False)
    head = getattr(model, "lm_head", None)
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, QATLinear)) or id(module) in excluded:
            continue
        if id(module) in in_blocks or (module is head and not tied):
            layers[name] = module
    return layers


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [b.moe for b in getattr(model, "blocks", []) if hasattr(b, "moe")]


def remove_experts(moe: nn.Module, keep: list[int], optimizer=None) -> list[nn.Parameter]:
    """Keep experts ``keep`` (ascending) of an MoE layer; return the removed parameters.

    The gate keeps its Parameter object (sliced in place, with its optimizer state), so the
    optimizer's parameter order is that of a model built with these experts.
    """
    removed = [p for e, ex in enumerate(moe.experts) if e not in keep for p in ex.parameters()]
    moe.experts = nn.ModuleList(moe.experts[e] for e in keep)
    gate = moe.gate
    index = torch.tensor(keep, device=gate.weight.device)
    with torch.no_grad():
        gate.weight.data = gate.weight.data.index_select(0, index).contiguous()
        gate.weight.grad = None
        if gate.bias is not None:
            gate.bias.data = gate.bias.data.index_select(0, index).contiguous()
            gate.bias.grad = None
    gate.out_features = len(keep)
    moe.num_experts = len(keep)
    moe.last_counts = moe.last_indices = moe.last_aux_loss = moe.last_probs_sum = None
    if optimizer is not None:
        gone = {id(p) for p in removed}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in removed:
            optimizer.state.pop(p, None)
        for p in [gate.weight] + ([gate.bias] if gate.bias is not None else []):
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):   # moments of the gate rows that stay
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape != p.shape:
                    state[k] = v.index_select(0, index).contiguous()
    return removed
