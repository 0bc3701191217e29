"""Early exit's mechanism: the exits' loss through the final norm and the shared LM head, and
the evaluation depth policy that lets confident tokens exit (``models/layers/depth.py``).

The flag that trains the exits, evaluates with them and records the threshold sweep is
:mod:`bkbench.flags.early_exit` (its docstring is the flag's documentation).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...eval import fused_head
from ...ops.lm_loss import lm_head_nll
from .depth import ROW_MULTIPLE, gather_rows


# rows of exit logits computed at once (a multiple of ROW_MULTIPLE)
CONFIDENCE_CHUNK = 64 * ROW_MULTIPLE


def head_logits(model: nn.Module, states: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.ln_f(states))


def exit_nll(model: nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``targets`` through the final norm and the LM head (fused when possible)."""
    head = fused_head(model)
    feats = model.ln_f(states)
    if head is not None:
        return lm_head_nll(feats, head.weight, head.bias, targets, reduction="sum") / targets.numel()
    logits = model.lm_head(feats)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class ExitPolicy:
    """Depth policy of the evaluation model: exit confident tokens (see depth.py)."""

    def __init__(self, threshold: float, n_layers: int):
        self.threshold = threshold
        self.n_layers = n_layers
        self.histogram = torch.zeros(n_layers, dtype=torch.long)   # over all forwards

    def begin(self, model, x):
        self._layer = torch.full((x.shape[0] * x.shape[1],), self.n_layers, dtype=torch.long,
                                 device=x.device)

    def after_layer(self, model, n, x, running):
        if n == self.n_layers - 1:
            return running
        if self.threshold > 1:     # no probability reaches it: nothing to compute
            return running
        index = running.nonzero().squeeze(1)
        if self.threshold <= 0:    # every probability reaches it
            stop = torch.ones(index.numel(), dtype=torch.bool, device=x.device)
        else:
            rows, real = gather_rows(x.reshape(-1, x.shape[-1]), index)
            stop = self.confidence(model, rows)[:real] >= self.threshold
        exited = index[stop]
        self._layer[exited] = n + 1
        running = running.clone()
        running[exited] = False
        return running

    @staticmethod
    def confidence(model, rows: torch.Tensor) -> torch.Tensor:
        """Max softmax probability of each row's exit, CONFIDENCE_CHUNK rows at a time so that
        the (rows, vocab) logits never exist in full (at 33k words an eval batch's would take
        gigabytes). Chunks are multiples of 16 rows, so every GEMM stays in the row-count
        regime of depth.py."""
        out = []
        for chunk in rows.split(CONFIDENCE_CHUNK):
            logits = head_logits(model, chunk).float()
            out.append((logits.max(dim=-1).values - torch.logsumexp(logits, dim=-1)).exp())
        return torch.cat(out) if out else rows.new_zeros(0)

    def finish(self, model, x):
        self.histogram += torch.bincount(self._layer.cpu(), minlength=self.n_layers + 1)[1:]
        return x


def with_exits(model: nn.Module, threshold: float) -> tuple[nn.Module, ExitPolicy]:
    """A shallow copy of ``model`` (same modules and weights) that exits at ``threshold``."""
    policy = ExitPolicy(threshold, len(model.blocks))
    evaluated = copy.copy(model)
    evaluated.depth_policies = list(model.depth_policies) + [policy]
    return evaluated, policy
