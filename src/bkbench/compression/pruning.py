"""Pruning's mechanism: the cubic sparsity schedule, magnitude masks folded into the weights,
hidden units of feed-forward networks removed for real, and MoE experts removed (modules, gate
rows and their optimizer state).

Every structural change replaces the affected weights by new Parameters (taking the old ones'
places in the optimizer, with their moments sliced alike) instead of swapping ``.data`` in
place: autograd keeps one gradient accumulator per parameter, sized when it was created, and
DDP holds on to it, so a parameter resized in place would get gradients of its old shape.

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


def prunable_layers(model: nn.Module, include_head: bool = False) -> dict[str, nn.Module]:
    """The Linear layers weight pruning masks, by name: every Linear of the blocks (experts or
    MLP, attention projections) except the MoE gates and the BK mixers' small projections,
    and the LM head if ``include_head`` and it is not tied to the embedding; never a flag's
    attached module."""
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
        if id(module) in in_blocks or (module is head and include_head and not tied):
            layers[name] = module
    return layers


def feed_forward_pairs(model: nn.Module) -> dict[str, nn.Module]:
    """The feed-forward networks d -> H -> d inside the blocks (each MoE expert, or a
    Transformer's MLP): modules with an ``fc`` (H x d) and a ``proj`` (d x H) layer."""
    in_blocks = {id(m) for m in model.blocks.modules()} if hasattr(model, "blocks") else set()
    excluded = attached_ids(model)
    return {name: m for name, m in model.named_modules()
            if id(m) in in_blocks and id(m) not in excluded
            and isinstance(getattr(m, "fc", None), (nn.Linear, QATLinear))
            and isinstance(getattr(m, "proj", None), (nn.Linear, QATLinear))}


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean keep-mask zeroing the round(sparsity x numel) smallest |weight| (ties by position).

    Zeros sort first, so weights pruned before (folded to zero) stay pruned as it grows."""
    amount = int(round(sparsity * weight.numel()))
    keep = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    order = torch.argsort(weight.detach().abs().flatten(), stable=True)
    keep[order[:amount]] = False
    return keep.view_as(weight)


@torch.no_grad()
def fold_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero the pruned weights in the weight itself (no hook, no stored original)."""
    module.weight.mul_(mask)


def replace_parameter(module: nn.Module, name: str, index: torch.Tensor, dim: int,
                      optimizer: torch.optim.Optimizer | None) -> None:
    """Keep the entries ``index`` along ``dim`` of ``module.<name>``, as a new Parameter that
    takes the old one's place in the optimizer with its moments sliced alike."""
    old = getattr(module, name)
    new = nn.Parameter(old.detach().index_select(dim, index).contiguous(),
                       requires_grad=old.requires_grad)
    setattr(module, name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is not None:
        optimizer.state[new] = {k: v.index_select(dim, index).contiguous()
                                if torch.is_tensor(v) and v.shape == old.shape else v
                                for k, v in state.items()}


def hidden_unit_scores(ffn: nn.Module) -> torch.Tensor:
    """(H,) magnitude of each hidden unit: |its input row of fc| x |its output column of proj|
    (an upper bound on the unit's contribution per unit of activation)."""
    w_in = ffn.fc.weight.detach().float()
    if ffn.fc.bias is not None:
        w_in = torch.cat([w_in, ffn.fc.bias.detach().float()[:, None]], dim=1)
    return w_in.norm(dim=1) * ffn.proj.weight.detach().float().norm(dim=0)


def keep_hidden_units(ffn: nn.Module, keep: torch.Tensor,
                      optimizer: torch.optim.Optimizer | None = None) -> None:
    """Shrink a feed-forward network d -> H -> d to the hidden units ``keep`` (ascending)."""
    keep = keep.to(ffn.fc.weight.device)
    replace_parameter(ffn.fc, "weight", keep, 0, optimizer)
    if ffn.fc.bias is not None:
        replace_parameter(ffn.fc, "bias", keep, 0, optimizer)
    replace_parameter(ffn.proj, "weight", keep, 1, optimizer)
    ffn.fc.out_features = ffn.proj.in_features = keep.numel()


def prune_hidden_units(ffn: nn.Module, width: int,
                       optimizer: torch.optim.Optimizer | None = None) -> None:
    """Keep the ``width`` hidden units of largest :func:`hidden_unit_scores` (ties by index)."""
    scores = hidden_unit_scores(ffn)
    if width >= scores.numel():
        return
    top = torch.argsort(scores, descending=True, stable=True)[:width]
    keep_hidden_units(ffn, torch.sort(top).values, optimizer)


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [b.moe for b in getattr(model, "blocks", []) if hasattr(b, "moe")]


def remove_experts(moe: nn.Module, keep: list[int], optimizer=None) -> list[nn.Parameter]:
    """Keep experts ``keep`` (ascending) of an MoE layer; return the removed parameters.

    The gate's rows are sliced into new Parameters (:func:`replace_parameter`), so the
    optimizer's parameter order is that of a model built with these experts.
    """
    removed = [p for e, ex in enumerate(moe.experts) if e not in keep for p in ex.parameters()]
    moe.experts = nn.ModuleList(moe.experts[e] for e in keep)
    gate = moe.gate
    index = torch.tensor(keep, device=gate.weight.device)
    if optimizer is not None:
        gone = {id(p) for p in removed}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in removed:
            optimizer.state.pop(p, None)
    replace_parameter(gate, "weight", index, 0, optimizer)
    if gate.bias is not None:
        replace_parameter(gate, "bias", index, 0, optimizer)
    gate.out_features = len(keep)
    moe.num_experts = len(keep)
    moe.last_counts = moe.last_indices = moe.last_aux_loss = moe.last_probs_sum = None
    return removed
