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
    output, an expert's or MLP's output, the BK-Core output); training tokens/s of
    forward+backward with and without autocast on the run's shapes, interleaved.

Causality
    Autocast changes the precision of each operation, not which positions it reads; the
    kernels still see the fixed shapes they see in float32, so the audit passes bit for bit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..flags.base import Flag

DTYPE = torch.bfloat16


@dataclass
class MixedPrecisionSettings:
    timing_steps: int = field(default=3, metadata={
        "help": "forward+backward passes per setting for the recorded tokens/s with and without"})

    def validate(self, config) -> None:
        if self.timing_steps < 1:
            raise ValueError(f"mixed_precision_timing_steps must be >= 1, got {self.timing_steps}")


class _Float32Island:
    """Forward pre/post hooks that run a module with autocast off and float32 inputs."""

    def __init__(self):
        self._contexts: list[Any] = []

    def pre(self, module, args):
        ctx = torch.autocast(device_type=args[0].device.type, enabled=False)
        ctx.__enter__()
        self._contexts.append(ctx)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def post(self, module, args, output):
        self._contexts.pop().__exit__(None, None, None)


def _bk_mixers(model: nn.Module) -> list[nn.Module]:
    from ..models.resnet_bk import BKMixer
    return [m for m in model.modules() if isinstance(m, BKMixer)]


class MixedPrecision(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        island = _Float32Island()
        for mixer in _bk_mixers(model):
            mixer.register_forward_pre_hook(island.pre)
            mixer.register_forward_hook(island.post, always_call=True)
        return model

    def autocast_dtype(self, device: torch.device) -> torch.dtype:
        return DTYPE

    def observed_dtypes(self, model: nn.Module, inputs: torch.Tensor) -> dict[str, str]:
        """Output dtypes of a few modules in one training-mode forward under autocast."""
        from ..models.resnet_bk import BKMixer
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
        for m in model.modules():
            if isinstance(m, BKMixer):
                hooks.append(m.register_forward_hook(watch("bk_mixer")))
                hooks.append(m.register_forward_hook(watch_core))
                break
        try:
            with torch.no_grad(), torch.autocast(device_type=inputs.device.type, dtype=DTYPE):
                model(inputs)
        finally:
            for h in hooks:
                h.remove()
        return seen

    def record(self, trainer, outcome) -> dict[str, Any]:
        model, device = trainer.model, trainer.device
        # the first training windows, without the flags' selection: going through
        # trainer.batch would run (and record) an active-learning round after training
        inputs, targets = trainer.window_batch(torch.arange(trainer.config.batch_size))
        dtypes = self.observed_dtypes(model, inputs)
        # training throughput with and without autocast, interleaved, on the run's shapes
        times: dict[bool, list[float]] = {True: [], False: []}
        was = model.training
        model.train()
        try:
            for rep in range(self.settings.timing_steps + 1):   # the first pass is warm-up
                for on in (True, False):
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    with torch.autocast(device_type=device.type, dtype=DTYPE, enabled=on):
                        logits = model(inputs)
                    loss = nn.functional.cross_entropy(
                        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
                    loss.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if rep:
                        times[on].append(time.perf_counter() - start)
                    model.zero_grad(set_to_none=True)
        finally:
            model.train(was)
        tokens = inputs.numel()
        tps = {("bf16_autocast" if on else "float32"): tokens / statistics.median(t)
               for on, t in times.items()}
        return {"autocast_dtype": "bfloat16", "device": device.type,
                "float32_modules": "BK mixers (potential projection, BK-Core complex64, features)",
                "grad_scaler": False,
                "observed_dtypes": dtypes,
                "train_tokens_per_second": tps,
                "speedup": tps["bf16_autocast"] / tps["float32"],
                "timing": f"forward+backward (no optimizer step), median of "
                          f"{self.settings.timing_steps} interleaved passes per setting, "
                          f"batch {tuple(inputs.shape)}, after the run"}
