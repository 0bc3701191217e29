"""Quantization's mechanism: fake-quantized Linear layers for training (:class:`QATLinear`),
integer-weight Linear layers for evaluation (:class:`IntLinear`), and the swaps between them.

Weights are symmetric per output channel (INT8 or INT4, packed two per byte), activations
symmetric INT8 per token (so a token's rounding depends on its own vector only: causal). The
flag that applies them, and its documentation, is :mod:`bkbench.flags.quantization`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.layers.attached import attached_ids
from ..ops.lm_loss import ACT_QMAX
from ..ops.lm_loss.head import Head


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-output-channel scale (out,), float32; a zero row gets scale 1."""
    amax = w.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / qmax_of(bits), torch.ones_like(amax))


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    q = qmax_of(bits)
    scale = weight_scale(w, bits)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -q, q)


def token_scale(x: torch.Tensor) -> torch.Tensor:
    amax = x.detach().abs().amax(dim=-1, keepdim=True)
    return torch.where(amax > 0, amax / ACT_QMAX, torch.ones_like(amax))


def fake_quant_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric INT8 fake quantization with a straight-through gradient."""
    scale = token_scale(x)
    q = torch.clamp(torch.round(x / scale), -ACT_QMAX, ACT_QMAX) * scale
    return x + (q - x).detach()


class QATLinear(nn.Module):
    """A Linear layer whose forward multiplies fake-quantized weights and inputs; it takes
    over the original layer's parameters (same objects: initialisation and tying kept).

    Deliberately not an ``nn.Linear`` subclass: code that special-cases ``nn.Linear`` must not
    skip the quantization. A loss that fuses the LM head asks :meth:`effective_head` instead.
    """

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the grid values are formed in float32; the product runs in the autocast dtype when
        # use_mixed_precision is on too, so that flag reaches the quantized Linears (rounding a
        # grid value to bf16 moves it by at most 2^-9 of itself, well inside one INT8 step)
        return self.effective_head().logits(x)

    def effective_head(self) -> Head:
        """The fake-quantized weight, and the per-token fake quantization of the input."""
        w = fake_quant_weight(self.weight, self.bits)
        b = self.bias.float() if self.bias is not None else None
        return Head(w, b, lambda x: fake_quant_tokens(x.float()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 values in [-8, 7] -> (out, ceil(in/2)) uint8, two nibbles per byte."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :in_features]
    return torch.where(both > 7, both - 16, both).to(torch.int8)


class IntLinear(nn.Module):
    """Integer weights and per-channel scales; int8 GEMM (``torch._int_mm``).

    INT8 weights are stored (out, in) row-major: ``weight.t()`` is then the column-major
    (in, out) operand ``torch._int_mm`` takes without a copy (on CPU about 2.6x faster than a
    row-major (in, out) copy at the LM head's shape). INT4 weights are stored packed two per
    byte and unpacked to int8 at each call: INT4 saves storage, not arithmetic.
    """

    def __init__(self, qat: QATLinear):
        super().__init__()
        self.in_features, self.out_features, self.bits = qat.in_features, qat.out_features, qat.bits
        with torch.no_grad():
            w = qat.weight.detach().float()
            scale = weight_scale(w, self.bits)
            q = qmax_of(self.bits)
            w_int = torch.clamp(torch.round(w / scale[:, None]), -q, q).to(torch.int8)
        if self.bits == 8:
            self.register_buffer("weight_int8", w_int)
        else:
            self.register_buffer("weight_int4_packed", pack_int4(w_int))
        self.register_buffer("weight_scale", scale)
        bias = qat.bias.detach().float().clone() if qat.bias is not None else None
        self.register_buffer("bias", bias)

    def int_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.weight_int8
        return unpack_int4(self.weight_int4_packed, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=torch.float32)
        return self.effective_head().logits(x)

    def effective_head(self) -> Head:
        """The int8 weight, its scales and the bias; the input is rounded to INT8 per token
        and multiplied in int32 (:func:`bkbench.ops.lm_loss.int8_logits`)."""
        return Head(self.int_weight(), self.bias, weight_scale=self.weight_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _replace(model: nn.Module, kind: type, make) -> int:
    """Replace every module of exactly type ``kind`` by ``make(module)``; other flags' own
    modules (attached beside the layers: e.g. the Koopman head, not part of the language
    model) stay."""
    attached = attached_ids(model)
    count = 0
    for parent in list(model.modules()):
        if id(parent) in attached:
            continue
        for name, child in list(parent.named_children()):
            if type(child) is kind and id(child) not in attached:
                setattr(parent, name, make(child))
                count += 1
    return count


def quantize_linears(model: nn.Module, bits: int) -> int:
    """Make every ``nn.Linear`` of the language model a QATLinear of ``bits``; returns how many."""
    return _replace(model, nn.Linear, lambda linear: QATLinear(linear, bits))


def stored_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _graph_tensors(value, seen: set[int], depth: int = 0):
    """Tensors with a grad_fn reachable from ``value`` through containers and plain objects
    (a stage's ``last_entering``, a policy's state); modules are walked by the caller."""
    if id(value) in seen or depth > 6 or isinstance(value, (nn.Module, type)):
        return
    seen.add(id(value))
    if torch.is_tensor(value):
        if value.grad_fn is not None:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _graph_tensors(item, seen, depth + 1)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _graph_tensors(item, seen, depth + 1)
    elif hasattr(value, "__dict__"):
        yield from _graph_tensors(vars(value), seen, depth + 1)


def _converted(model: nn.Module, make) -> nn.Module:
    """A copy of a QAT model with every QATLinear replaced by ``make(layer)``, in eval mode."""
    if not any(isinstance(m, QATLinear) for m in model.modules()):
        raise ValueError("integer_model needs a model with QATLinear layers (use_quantization)")
    # tensors that are not graph leaves cannot be deep-copied: pruning's recomputed ``weight``,
    # and what a training forward leaves on modules (a router's last gates, exit states, in
    # lists too); a detached view is enough, each new layer reads its layer's parameters again
    seen: set[int] = set()
    memo = {id(t): t.detach() for m in model.modules()
            for item in vars(m).values() for t in _graph_tensors(item, seen)}
    copied = copy.deepcopy(model, memo)
    _replace(copied, QATLinear, make)
    return copied.eval()


def integer_model(model: nn.Module) -> nn.Module:
    """A copy of a QAT model with every QATLinear replaced by its IntLinear (eval mode)."""
    return _converted(model, IntLinear)


def float_linear(qat: QATLinear) -> nn.Linear:
    """The float32 Linear of a QAT layer's weights, quantizing nothing."""
    linear = nn.Linear(qat.in_features, qat.out_features, bias=qat.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(qat.weight)
        if qat.bias is not None:
            linear.bias.copy_(qat.bias)
    return linear


def float_model(model: nn.Module) -> nn.Module:
    """A copy of a QAT model whose layers multiply their float weights unquantized: the
    model without quantization, the same trained weights (the integer model's comparison)."""
    return _converted(model, float_linear)
