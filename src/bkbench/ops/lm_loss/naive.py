"""Reference LM-head loss: the full logits, then ``F.cross_entropy``. The oracle of the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_head_nll(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """NLL of ``targets`` under ``log_softmax(features @ weight.T + bias)``, computed in at
    least float32 (as the trainer always did: the logits are cast before the softmax)."""
    d = features.shape[-1]
    logits = F.linear(features.reshape(-1, d), weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.reshape(-1), reduction=reduction)
