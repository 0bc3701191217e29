"""``use_quantization``: quantization-aware training of the Linear layers, integer weights
to evaluate.

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

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..audit import audit_causality
from ..compression.quantization import integer_model, quantize_linears, stored_bytes
from ..hooks import Flag, RunContext


@dataclass
class QuantizationSettings:
    bits: int = field(default=8, metadata={"help": "weight bits: 8 (INT8) or 4 (INT4)"})

    def validate(self, config) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"quantization_bits must be 8 or 4, got {self.bits}")


class Quantization(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.layers = quantize_linears(model, self.settings.bits)
        return model

    def prepare_for_eval(self, model: nn.Module) -> nn.Module:
        return integer_model(model)

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        fake = run.evaluate(run.model, run.data.test)
        int_model = integer_model(run.model)
        float_bytes = sum(p.numel() * 4 for p in {id(p): p for p in run.model.parameters()}.values())
        audit = audit_causality(int_model, len(run.data.vocab), seq_len=self.config.n_seq,
                                modes=("eval",), device=run.device)
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
