"""FLOPs of gated linear attention, and the markers that let FlopCounterMode see them.

:func:`gla_flops` is the formula; the counter's count for :func:`~bkbench.ops.gla.chunk.chunk_gla`
equals it (a test). It counts the matrix products of the chunkwise form, 2 FLOPs per
multiply-add, per (batch row, head) with N = ceil(T / C) chunks:

* intra-chunk scores, C x K x C per chunk (N chunks): an elementwise product in the code,
  charged through :func:`score_marker` as the matmul (q*exp(b)) (k*exp(-b))^T it equals;
* scores times values, C x C x V per chunk (N chunks);
* state updates (k*exp(b_C - b))^T v, K x C x V, for chunks 0 .. N-2 (the last one's is unused);
* inter-chunk outputs (q*exp(b)) S, C x K x V, for chunks 1 .. N-1 (chunk 0 enters with S = 0).

The backward of every product is two products of the same size (gradients of both operands),
so it is 2 x the forward. Like the counter's attention formulas, the causal mask is not
discounted: the full C x C tiles are charged, as they are computed. Gates, exponentials and
the chunk-to-chunk state recurrence are elementwise, which the counter never counts.

The flash-linear-attention kernels (Triton) are invisible to the counter; their output passes
through :func:`fla_marker`, which charges the same formula at fla's chunk size (64), so a
count on CUDA with fla and one without compare like with like.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

FLA_CHUNK_SIZE = 64


def gla_flops(batch: int, seq_len: int, heads: int, key_dim: int, value_dim: int,
              chunk_size: int, backward: bool = False) -> int:
    """Matrix-product FLOPs of the chunkwise GLA for (batch, seq_len, heads) and per-head
    key/value sizes; ``backward``: those of its backward (2 x the forward)."""
    C, K, V = chunk_size, key_dim, value_dim
    N = math.ceil(seq_len / C)
    per_row = N * (2 * C * C * K + 2 * C * C * V) + max(N - 1, 0) * (2 * K * C * V + 2 * C * K * V)
    forward = batch * heads * per_row
    return 2 * forward if backward else forward


@torch.library.custom_op("bkbench::gla_score_marker", mutates_args=())
def _score_marker(scores: torch.Tensor, key_dim: int, backward: bool) -> torch.Tensor:
    """Identity (a copy) that carries the FLOPs of the intra-chunk scores (see the module)."""
    return scores.clone()


@_score_marker.register_fake
def _(scores, key_dim, backward):
    return torch.empty_like(scores)


def _score_setup(ctx, inputs, output):
    ctx.key_dim = inputs[1]


def _score_backward(ctx, grad):
    return _score_marker(grad, ctx.key_dim, True), None, None


_score_marker.register_autograd(_score_backward, setup_context=_score_setup)


@register_flop_formula(torch.ops.bkbench.gla_score_marker)
def _score_flops(scores_shape, key_dim, backward, *args, out_shape=None, **kwargs) -> int:
    # scores (..., C, C): one C x K x C product per leading index; backward: dq and dk
    return (4 if backward else 2) * math.prod(scores_shape) * key_dim


def score_marker(scores: torch.Tensor, key_dim: int) -> torch.Tensor:
    return _score_marker(scores, key_dim, False)


@torch.library.custom_op("bkbench::gla_fla_marker", mutates_args=())
def _fla_marker(o: torch.Tensor, key_dim: int, backward: bool) -> torch.Tensor:
    """Identity (a copy) that carries the FLOPs of fla's kernels for an output o (B, T, H, V)."""
    return o.clone()


@_fla_marker.register_fake
def _(o, key_dim, backward):
    return torch.empty_like(o)


def _fla_setup(ctx, inputs, output):
    ctx.key_dim = inputs[1]


def _fla_backward(ctx, grad):
    return _fla_marker(grad, ctx.key_dim, True), None, None


_fla_marker.register_autograd(_fla_backward, setup_context=_fla_setup)


@register_flop_formula(torch.ops.bkbench.gla_fla_marker)
def _fla_flops(o_shape, key_dim, backward, *args, out_shape=None, **kwargs) -> int:
    B, T, H, V = o_shape
    return gla_flops(B, T, H, key_dim, V, FLA_CHUNK_SIZE, backward=backward)


def fla_marker(o: torch.Tensor, key_dim: int) -> torch.Tensor:
    return _fla_marker(o, key_dim, False)
