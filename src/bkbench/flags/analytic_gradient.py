"""``use_analytic_gradient``: the BK-Core's backward by the exact O(N) adjoint sweep.

What it does
    Every BK mixer of the ResNet-BK model computes its backward with the adjoint recurrence
    ``s_N = gbar_N, s_i = gbar_i + conj(t^2 g_{i+1}^2) s_{i+1}`` (the exact gradient) in the
    compiled kernel of :mod:`bkbench.ops.bk_core` (numba on CPU, Triton on CUDA), instead of
    autograd through a vectorised torch recurrence. Without the flag, the forward of a
    training step also differs: it must run the recurrence as torch ops so that autograd can
    record it. The gradient is the same function either way (tests compare both with a dense
    complex128 oracle).

Paper
    The adjoint (reverse-mode) sweep of a linear recurrence; the published ResNet-BK's
    "analytic gradient" was a heuristic blend and not the gradient, which this replaces.

Settings (``analytic_gradient_<field>``)
    ``timing_repeats``: timed repetitions (median taken) of the BK-Core measurement below.

Cost and what it records
    Nothing extra during training. After training it times, on the run's own shapes
    (batch_size x bk_heads x n_seq, the first layer's t, E, eps), the BK-Core forward and
    backward with and without the flag, interleaved, and records both with the backward path
    used.

Causality
    The forward values are those of the causal core whichever backward runs; the flag
    changes no forward arithmetic that any logit depends on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..hooks import Flag, RunContext
from ..metrics.with_without import interleaved_medians, synchronize
from ..models.resnet_bk import bk_mixers
from ..ops.bk_core import auto_backend, resolvent_diag


@dataclass
class AnalyticGradientSettings:
    timing_repeats: int = field(default=7, metadata={
        "help": "timed repetitions of the with/without BK-Core backward measurement"})

    def validate(self, config) -> None:
        if self.timing_repeats < 1:
            raise ValueError(f"analytic_gradient_timing_repeats must be >= 1, got "
                             f"{self.timing_repeats}")


def time_bk_core(mixer: nn.Module, batch: int, seq_len: int, analytic: bool, device: torch.device,
                 seed: int = 0) -> tuple[float, float]:
    """(forward s, backward s) of one BK-Core call of ``mixer``'s heads on random potentials."""
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randn(batch, mixer.heads, seq_len, generator=gen) * mixer.v_max / 2).to(device)
    v.requires_grad_(True)
    grad = torch.randn(batch, mixer.heads, seq_len, dtype=torch.complex64, generator=gen).to(device)
    with torch.no_grad():
        t, energy, eps = (p.detach().clone() for p in (mixer.coupling, mixer.energy, mixer.eps()))
    synchronize(device)
    start = time.perf_counter()
    g = resolvent_diag(v, mixer.h0, t, energy=energy, eps=eps, causal=mixer.causal,
                       analytic_gradient=analytic)
    synchronize(device)
    mid = time.perf_counter()
    g.backward(grad)
    synchronize(device)
    return mid - start, time.perf_counter() - mid


class AnalyticGradient(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        mixers = bk_mixers(model)
        if not mixers:
            raise ValueError("use_analytic_gradient: the model has no BK mixer")
        for m in mixers:
            m.analytic_gradient = True
        return model

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        mixers = bk_mixers(run.model)
        mixer, device = mixers[0], run.device
        cfg = self.config
        batch = max(1, cfg.batch_size // run.world)
        calls = {analytic: (lambda a=analytic: time_bk_core(mixer, batch, cfg.n_seq, a, device))
                 for analytic in (True, False)}
        timed = interleaved_medians(calls[True], calls[False], self.settings.timing_repeats)
        (fwd_a, bwd_a), (fwd_b, bwd_b) = timed["with"], timed["without"]
        return {
            "backward_path": f"exact adjoint sweep, compiled backend {auto_backend(device)!r} "
                             "(bkbench.ops.bk_core)",
            "backward_path_without": "autograd through the vectorised torch recurrence",
            "mixers_switched": len(mixers),
            "timed_shape": [batch, mixer.heads, cfg.n_seq],
            "timing": "one BK-Core call (one layer) on random potentials of the run's shapes, "
                      f"after the run, on its device; {timed['how']}",
            "bk_core_backward_ms": {"analytic": bwd_a * 1e3, "autograd": bwd_b * 1e3},
            "bk_core_forward_ms": {"analytic": fwd_a * 1e3, "autograd": fwd_b * 1e3},
            "backward_speedup": bwd_b / bwd_a if bwd_a > 0 else None,
        }
