"""``use_mixed_precision``: torch.autocast in bfloat16, with the BK mixer kept in float32.

What it does
    Every training and evaluation forward runs under ``torch.autocast`` with dtype bfloat16,
    on CPU and on CUDA: matrix products (the LM head, the experts, attention) run in bf16,
    autocast keeps reductions such as the loss's log-softmax in float32. The BK mixer of each
    ResNet-BK block (its potential projection, the BK-Core in complex64 and its feature
    projection) runs with autocast switched off, in float32: the resolvent recurrence
    amplifies rounding, and bf16's 8-bit mantissa would make ``|g| <= 1/eps`` checks and the
    adjoint gradient meaningless. bf16 has float32's exponent range, so no gradient scaler is
    needed; fp16 with a GradScaler is not offered.

Paper
    P. Micikevicius et al., "Mixed precision training", ICLR 2018; bf16: D. Kalamkar et al.,
    "A study of BFLOAT16 for deep learning training", arXiv:1905.12322 (2019).

Settings (``mixed_precision_<field>``)
    ``timing_steps``: forward+backward passes per setting for the recorded with/without
    throughput.

Cost
    On a CPU without native bf16 matrix units it can be slower than float32: the record
    measures it, and so does ``benchmarks/mixed_precision.py``.

What it records
    The autocast dtype and device; the dtypes observed in one training forward (LM head
    output, an expert's or MLP's output, the BK-Core output); tokens/s of the training
    loss's forward+backward with and without autocast, on held-out validation windows of the
    run's batch shape (``bkbench.metrics.with_without``: interleaved, median).

Causality
    Autocast changes the precision of each operation, not which positions it reads; the
    kernels still see the fixed shapes they see in float32, so the audit passes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..compression.mixed_precision import DTYPE, keep_in_float32
from ..eval import target_nll
from ..hooks import Flag, RunContext
from ..metrics.with_without import clocked, interleaved_medians
from ..models.resnet_bk import bk_mixers
from ..objectives.layer_states import held_out_windows


@dataclass
class MixedPrecisionSettings:
    timing_steps: int = field(default=3, metadata={
        "help": "forward+backward passes per setting for the recorded tokens/s with and without"})

    def validate(self, config) -> None:
        if self.timing_steps < 1:
            raise ValueError(f"mixed_precision_timing_steps must be >= 1, got {self.timing_steps}")


class MixedPrecision(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        keep_in_float32(bk_mixers(model))
        return model

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        return DTYPE

    def observed_dtypes(self, model: nn.Module, inputs: torch.Tensor) -> dict[str, str]:
        """Output dtypes of a few modules in one training-mode forward under autocast."""
        seen: dict[str, str] = {}
        hooks = []

        def watch(name):
            def hook(module, args, out):
                seen.setdefault(name, str(out.dtype).removeprefix("torch."))
            return hook

        def watch_core(module, args, out):
            with torch.no_grad():
                seen.setdefault("bk_core", str(module.resolvent(args[0]).dtype).removeprefix("torch."))

        hooks.append(model.lm_head.register_forward_hook(watch("lm_head")))
        block = model.blocks[0]
        ffn = getattr(block, "moe", None) or getattr(block, "mlp", None)
        if ffn is not None:
            hooks.append(ffn.register_forward_hook(watch("feed_forward")))
        for mixer in bk_mixers(model)[:1]:
            hooks.append(mixer.register_forward_hook(watch("bk_mixer")))
            hooks.append(mixer.register_forward_hook(watch_core))
        try:
            with torch.no_grad(), torch.autocast(device_type=inputs.device.type, dtype=DTYPE):
                model(inputs)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        model, device = run.model, run.device
        batch = max(1, self.config.batch_size // run.world)
        windows = held_out_windows(run.data.valid, self.config.n_seq + 1, batch).to(device)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        dtypes = self.observed_dtypes(model, inputs)

        def train_pass(autocast: bool) -> None:
            # the training loss's forward and backward (fused head, no optimizer step)
            with torch.autocast(device_type=device.type, dtype=DTYPE, enabled=autocast):
                nll = target_nll(model, inputs, targets)
            nll.backward()
            model.zero_grad(set_to_none=True)

        was = model.training
        model.train()
        try:
            seconds = interleaved_medians(clocked(lambda: train_pass(True), device),
                                          clocked(lambda: train_pass(False), device),
                                          self.settings.timing_steps)
        finally:
            model.train(was)
        tokens = inputs.numel()
        tps = {"bf16_autocast": tokens / seconds["with"], "float32": tokens / seconds["without"]}
        return {"autocast_dtype": "bfloat16", "device": device.type,
                "float32_modules": "BK mixers (potential projection, BK-Core complex64, features)",
                "grad_scaler": False,
                "observed_dtypes": dtypes,
                "train_tokens_per_second": tps,
                "speedup": tps["bf16_autocast"] / tps["float32"],
                "timing": f"forward+backward of the training loss (no optimizer step) on "
                          f"{tuple(inputs.shape)} held-out validation tokens, after the run; "
                          + seconds["how"]}
