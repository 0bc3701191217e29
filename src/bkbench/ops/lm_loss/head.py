"""The LM-head protocol: what a model hands the fused loss instead of calling its head.

A head module's forward is ``linear(transform(h), weight, bias)`` for some row-wise
``transform`` (identity for an ``nn.Linear``; fake quantization of the activations for a
quantization-aware layer; their integer grid for an integer layer). :class:`Head` holds those
three pieces as tensors and a function, so :func:`bkbench.ops.lm_loss.lm_head_nll` can fuse the
product with the cross-entropy, chunk by chunk, whatever kind of layer the head is. A module
says what its head is by a method ``effective_head() -> Head``; a plain ``nn.Linear`` needs none.
Nothing here knows a flag: a layer that changes its head's arithmetic implements the method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import int8_logits, lm_head_nll, lm_head_nll_int8, quantize_rows


@dataclass(frozen=True)
class Head:
    weight: torch.Tensor                   # (V, d): what multiplies the transformed features
    bias: torch.Tensor | None              # (V,)
    # row-wise map of the features before the product (None: identity). Row-wise, so the
    # chunked loss may apply it to the whole batch at once and stay causal.
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # an integer head: ``weight`` is int8 with these (V,) float scales, and the features are
    # rounded to INT8 per token (``quantize_rows``) for an int8 x int8 -> int32 product
    weight_scale: torch.Tensor | None = None

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.transform is None else self.transform(features)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head's output, as the module's forward would compute it (the fused loss's oracle)."""
        x = self.inputs(features)
        if self.weight_scale is None:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = int8_logits(*quantize_rows(rows), self.weight, self.weight_scale, self.bias)
        return out.view(*x.shape[:-1], self.weight.shape[0])

    def nll(self, features: torch.Tensor, targets: torch.Tensor,
            reduction: str = "sum", *, with_rows: bool = False):
        """NLL of ``targets`` with the head fused into the loss (:func:`lm_head_nll`, or
        :func:`lm_head_nll_int8` for an integer head, which evaluates only). ``with_rows``:
        also the per-target NLL of the same pass (:func:`lm_head_nll`)."""
        x = self.inputs(features)
        if self.weight_scale is None:
            return lm_head_nll(x, self.weight, self.bias, targets, reduction, with_rows=with_rows)
        if with_rows:
            raise ValueError("the integer head evaluates only; with_rows is a training option")
        return lm_head_nll_int8(x, self.weight, self.weight_scale, self.bias, targets, reduction)


def head_of(module: nn.Module | None) -> Head | None:
    """The :class:`Head` of a head module, or None if its forward is not a linear map of
    row-wise transformed features (then the caller must run the module and take its logits)."""
    own = getattr(module, "effective_head", None)
    if callable(own):
        return own()
    if isinstance(module, nn.Linear):
        return Head(module.weight, module.bias)
    return None


__all__ = ["Head", "head_of"]
