"""``use_quantization``: quantization-aware training of the Linear layers, integer weights to evaluate.

What it does
    Training: every ``nn.Linear`` of the model (LM head, experts or MLP, gate, attention and
    BK projections) becomes a :class:`QATLinear` that multiplies *fake-quantized* operands:

    * weights: symmetric per output channel, ``scale = max|w_row| / qmax`` with qmax = 127
      (INT8, default) or 7 (INT4), ``w_q = clamp(round(w / scale), -qmax, qmax) * scale``
      (``torch.fake_quantize_per_channel_affine``, whose gradient is the straight-through
      estimator inside the range);
    * activations (the layer's input): symmetric INT8 per token (per row), scale from the
      row's own max |x|, straight-through gradient.

    The BK-Core is not a Linear layer and stays in complex64. Under mixed precision the
    quantized products run in float32, so that training simulates the integer model.

    Evaluation (``prepare_for_eval``): a copy of the model whose QATLinears are
    :class:`IntLinear` layers holding only integer weights (int8; INT4 packed two per byte)
    and float32 per-channel scales. Each call quantizes its input per token to int8 and
    multiplies with ``torch._int_mm`` (int8 x int8 -> int32, exact), then rescales. Every
    validation and the test perplexity of the run are this integer model's.

    Why not ``torch.ao.quantization.quantize_dynamic``: its dynamically quantized Linear
    takes one activation scale for the whole input batch, so a later token changes the
    rounding of an earlier one's logits: the model is no longer causal (a test shows it).
    torch.ao's static quantization (fixed calibrated scales) would be causal but quantizes
    each layer's output to 8 bits as well, which the QAT above does not simulate; and
    ``torch.ao.quantization`` is deprecated in this torch version.

Paper
    B. Jacob et al., "Quantization and training of neural networks for efficient
    integer-arithmetic-only inference", CVPR 2018 (QAT with fake quantization); the
    straight-through estimator of Y. Bengio, N. Leonard, A. Courville, arXiv:1308.3432 (2013);
    per-token activation scales as in LLM.int8 / SmoothQuant-style W8A8 inference.

Settings (``quantization_<field>``)
    ``bits``: 8 or 4 (weights; activations are always INT8).

Cost
    Fake quantization adds elementwise work to every Linear call in training (uncounted by
    the FLOP counter, estimated in its census). The integer model's products are int8 GEMMs,
    which FlopCounterMode does not count.

What it records
    Test perplexity of the integer model (the run's test result) and of the fake-quantized
    model; the bytes of the integer model's weights as stored (int8/int4 weights + float32
    scales, plus every other parameter in float32) against the float32 model; how many layers
    were quantized; the causality audit of the integer model.

Causality
    Weight scales depend on weights only; each activation scale depends on its own token's
    vector only; integer products are exact, so no row of a product depends on another row.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flags.base import Flag

ACT_QMAX = 127


@dataclass
class QuantizationSettings:
    bits: int = field(default=8, metadata={"help": "weight bits: 8 (INT8) or 4 (INT4)"})

    def validate(self, config) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization_bits must be 8 or 4, got {self.bits}")


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

    Deliberately not an ``nn.Linear`` subclass: code that special-cases ``nn.Linear`` (e.g. a
    loss fusing the LM head's weight into the cross-entropy) must not skip the quantization.
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
        w = fake_quant_weight(self.weight, self.bits)
        b = self.bias.float() if self.bias is not None else None
        return F.linear(fake_quant_tokens(x.float()), w, b)

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
    """Integer weights (int8, or int4 packed in uint8) and per-channel scales; int8 GEMM."""

    def __init__(self, qat: QATLinear):
        super().__init__()
        self.in_features, self.out_features, self.bits = qat.in_features, qat.out_features, qat.bits
        with torch.no_grad():
            # a pruned layer's weight attribute is recomputed at each forward: use its parts
            w = (qat.weight_orig * qat.weight_mask if hasattr(qat, "weight_mask")
                 else qat.weight).detach().float()
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
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        if x.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        scale = token_scale(x)
        x_int = torch.clamp(torch.round(x / scale), -ACT_QMAX, ACT_QMAX).to(torch.int8)
        acc = torch._int_mm(x_int, self.int_weight().t().contiguous())   # exact int32
        y = acc.float() * scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def _replace(model: nn.Module, kind: type, make) -> int:
    """Replace every module of exactly type ``kind`` by ``make(module)``; other flags' own
    modules (``flag_modules``: e.g. the Koopman head, not part of the language model) stay."""
    count = 0
    for path, parent in list(model.named_modules()):
        if path.split(".")[0] == "flag_modules":
            continue
        for name, child in list(parent.named_children()):
            if name == "flag_modules":
                continue
            if type(child) is kind:
                setattr(parent, name, make(child))
                count += 1
    return count


def stored_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class Quantization(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.layers = _replace(model, nn.Linear, lambda lin: QATLinear(lin, self.settings.bits))
        return model

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        return integer_model(model)

    def record(self, trainer, outcome) -> dict[str, Any]:
        from ..audit import audit_causality
        fake = trainer.evaluate(trainer.model, trainer.data.test)
        int_model = integer_model(trainer.model)
        float_bytes = sum(p.numel() * 4 for p in {id(p): p for p in trainer.model.parameters()}.values())
        audit = audit_causality(int_model, len(trainer.data.vocab), seq_len=self.config.n_seq,
                                modes=("eval",), device=trainer.device)
        return {"weights": f"INT{self.settings.bits} symmetric per output channel",
                "activations": "INT8 symmetric per token (dynamic, causal)",
                "integer_kernel": "torch._int_mm (int8 x int8 -> int32)",
                "quantized_layers": self.layers,
                "test_perplexity_integer": outcome.test.perplexity,
                "test_perplexity_fake_quant": fake.perplexity,
                "test_tokens": outcome.test.num_tokens,
                "size_bytes_integer": stored_bytes(int_model),
                "size_bytes_float32": float_bytes,
                "size_ratio": stored_bytes(int_model) / float_bytes,
                "integer_model_causal": audit.causal,
                "integer_model_max_leak": audit.max_leak}


def integer_model(model: nn.Module) -> nn.Module:
    """A copy of a QAT model with every QATLinear replaced by its IntLinear (eval mode)."""
    if not any(isinstance(m, QATLinear) for m in model.modules()):
        raise ValueError("integer_model needs a model with QATLinear layers (use_quantization)")
    # tensors that are not graph leaves (pruning's recomputed ``weight``) cannot be deep-copied;
    # a detached view is enough, each IntLinear reads its layer's parameters again
    memo = {id(v): v.detach() for m in model.modules() for v in vars(m).values()
            if torch.is_tensor(v) and v.grad_fn is not None}
    copied = copy.deepcopy(model, memo)
    _replace(copied, QATLinear, IntLinear)
    return copied.eval()
