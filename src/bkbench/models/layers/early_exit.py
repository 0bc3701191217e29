"""Early exit's mechanism: the exits' training loss on sampled positions, and the evaluation
depth policy that stops a token once its hidden state has saturated (``models/layers/depth.py``).

The flag that trains the exits, calibrates the threshold and records what they save is
:mod:`bkbench.flags.early_exit` (its docstring is the flag's documentation).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def saturation(x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """(B*T,) cosine similarity of each token's state after a layer with its state before it
    (CALM's hidden-state saturation): O(d) per token, a function of the token's own rows."""
    d = x.shape[-1]
    return F.cosine_similarity(x.reshape(-1, d).float(), previous.reshape(-1, d).float(), dim=-1)


def sampled_exit_rows(num_rows: int, exits: int, fraction: float,
                      generator: torch.Generator) -> list[torch.Tensor]:
    """Disjoint random row indices, one set per exit, ``fraction`` of ``num_rows`` in all
    (at least one row per exit): each sampled position trains one exit."""
    per_exit = max(1, round(fraction * num_rows / exits))
    if per_exit * exits > num_rows:
        per_exit = num_rows // exits
    order = torch.randperm(num_rows, generator=generator)
    return list(order[: per_exit * exits].view(exits, per_exit))


def shard_rows(rows: torch.Tensor, samples: Sequence[int], batch: int,
               seq_len: int) -> torch.Tensor:
    """Of ``rows`` (flat indices into a global batch of ``batch`` x ``seq_len`` positions),
    those of the shard holding the global batch's ``samples``, as flat indices into the
    shard's ``len(samples)`` x ``seq_len`` positions, in the order of ``rows``."""
    local = torch.full((batch,), -1, dtype=torch.long)
    local[torch.as_tensor(samples, dtype=torch.long)] = torch.arange(len(samples))
    sample = local[rows // seq_len]
    mine = sample >= 0
    return sample[mine] * seq_len + rows[mine] % seq_len


def exit_cross_entropies(model: nn.Module, states: list[torch.Tensor], targets: torch.Tensor,
                         rows: list[torch.Tensor],
                         counts: Sequence[float] | None = None) -> list[torch.Tensor]:
    """NLL of exit n = 1..L-1 summed over its sampled ``rows[n - 1]`` and divided by
    ``counts[n - 1]`` (default: the rows' own count, the mean): the state after layer n
    through the final norm and the model's effective LM head, fused with the loss. Only the
    sampled rows reach the head (the LM head is most of a step's work). A shard's rows divide
    by the global batch's count, so that the shards' terms add up to the global mean."""
    head = model.effective_head()
    flat_targets = targets.reshape(-1)
    counts = [index.numel() for index in rows] if counts is None else counts
    out = []
    for n, (index, count) in enumerate(zip(rows, counts), start=1):
        if index.numel() == 0:   # none of the exit's rows is in this shard
            out.append(states[n].new_zeros((), dtype=torch.float32))
            continue
        index = index.to(flat_targets.device)
        x = states[n].reshape(-1, states[n].shape[-1]).index_select(0, index)
        out.append(head.nll(model.ln_f(x), flat_targets.index_select(0, index)) / count)
    return out


class ExitPolicy:
    """Depth policy of the evaluation model (see depth.py): after layer n < L, a running token
    whose saturation (cosine of its states after and before the layer) reaches ``threshold``
    exits. Its state is then frozen and goes through the final norm and the LM head once,
    with every other token's, at the end of the forward: no head runs to decide."""

    def __init__(self, threshold: float, n_layers: int):
        self.threshold = threshold
        self.n_layers = n_layers
        self.histogram = torch.zeros(n_layers, dtype=torch.long)   # over all forwards

    def begin(self, model, x):
        self._layer = torch.full((x.shape[0] * x.shape[1],), self.n_layers, dtype=torch.long,
                                 device=x.device)
        self._previous = x

    def after_layer(self, model, n, x, running):
        previous, self._previous = self._previous, x
        # the hourglass's middle reports each of its layers with the one state it returns:
        # a layer that did not change the state (the same tensor) decides nothing new
        if n == self.n_layers - 1 or x is previous or not self.threshold <= 1:
            return running
        stop = running & (saturation(x, previous) >= self.threshold)
        self._layer[stop] = n + 1
        return running & ~stop

    def finish(self, model, x):
        self.histogram += torch.bincount(self._layer.cpu(), minlength=self.n_layers + 1)[1:]
        self._previous = None
        return x


def with_exits(model: nn.Module, threshold: float) -> tuple[nn.Module, ExitPolicy]:
    """A shallow copy of ``model`` (same modules and weights) that exits at ``threshold``."""
    policy = ExitPolicy(threshold, len(model.blocks))
    evaluated = copy.copy(model)
    evaluated.depth_policies = list(model.depth_policies) + [policy]
    return evaluated, policy
