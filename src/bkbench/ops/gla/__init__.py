"""Gated linear attention (GLA; Yang et al. 2023), the token mixer of the ``gla`` peer model.

Public API::

    from bkbench.ops.gla import gated_linear_attention, gla_flops
    o = gated_linear_attention(q, k, v, g, scale=None, chunk_size=16, backend="auto")

Shapes follow flash-linear-attention: q, k and the log-decay g are (B, T, H, K), v is
(B, T, H, V), the output (B, T, H, V). With a per-head state S (K x V), S_0 = 0:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,        o_t = scale * S_t^T q_t

so o_t depends on positions <= t only; g_t <= 0 (a decay in (0, 1]) is the caller's business
(the model uses logsigmoid(.)/16, as the paper does).

Backends (flash-linear-attention's layout of a ``naive`` reference beside fast kernels):

* ``"naive"`` -- :mod:`.naive`, the recurrence one position at a time (the oracle);
* ``"torch"`` -- :mod:`.chunk`, the chunkwise-parallel form from matmuls, any device;
* ``"fla"`` -- flash-linear-attention's Triton ``chunk_gla`` (CUDA, ``pip install
  bkbench[fla]``); its FLOPs are charged through :func:`.flops.fla_marker`;
* ``"auto"`` -- ``"fla"`` for CUDA tensors when the package imports, else ``"torch"``.

FLOPs: :func:`gla_flops` (see :mod:`.flops`); FlopCounterMode reports exactly that for the
torch and fla backends.
"""

from __future__ import annotations

import torch

from .chunk import chunk_gla
from .flops import FLA_CHUNK_SIZE, fla_marker, gla_flops
from .naive import naive_recurrent_gla

__all__ = ["gated_linear_attention", "gla_flops", "chunk_gla", "naive_recurrent_gla",
           "fla_available", "BACKENDS", "FLA_CHUNK_SIZE"]

BACKENDS = ("auto", "torch", "fla", "naive")


def fla_available() -> bool:
    """True when flash-linear-attention's GLA kernels import (they need Triton and CUDA)."""
    try:
        from fla.ops.gla import chunk_gla as _  # noqa: F401
    except Exception:  # ImportError, or Triton failing to initialise without a GPU
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"GLA backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "fla" if device.type == "cuda" and fla_available() else "torch"
    if backend == "fla":
        if device.type != "cuda":
            raise ValueError("GLA backend 'fla' needs CUDA tensors; use 'torch' or 'auto'")
        if not fla_available():
            raise ValueError("GLA backend 'fla' needs flash-linear-attention: "
                             "pip install 'bkbench[fla]', or use 'torch'")
    return backend


def gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           scale: float | None = None, chunk_size: int = 16,
                           backend: str = "auto") -> torch.Tensor:
    """GLA outputs (B, T, H, V) for q, k, g (B, T, H, K) and v (B, T, H, V); see the module."""
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"q, k and g must share one (B, T, H, K) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(g.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be (B, T, H, V) with q's B, T, H, got {tuple(v.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    backend = resolve_backend(backend, q.device)
    if backend == "naive":
        return naive_recurrent_gla(q, k, v, g, scale)
    if backend == "torch":
        return chunk_gla(q, k, v, g, scale, chunk_size)
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    o, _ = fla_chunk_gla(q, k, v, g, scale=scale)
    return fla_marker(o, q.shape[-1])
