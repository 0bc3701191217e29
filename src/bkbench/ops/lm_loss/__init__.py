"""The LM head fused with log-softmax and the NLL, chunked over rows.

Public API::

    from bkbench.ops.lm_loss import lm_head_nll
    loss = lm_head_nll(h, head.weight, head.bias, targets)                   # summed NLL
    nll = lm_head_nll(h, head.weight, head.bias, targets, reduction="none")  # per token, no grad
    loss, rows = lm_head_nll(h, head.weight, head.bias, targets, with_rows=True)  # both

A model hands these ops its head through the protocol of :mod:`.head` (``Head``: weight,
bias, input transform, or an int8 weight with its scales for ``lm_head_nll_int8``).

``h`` is (..., d), ``targets`` the matching (...) integer ids, ``weight`` (V, d). The result is
the NLL of ``F.cross_entropy(F.linear(h, weight, bias).float(), targets)`` (see
:mod:`.naive`, the reference), computed ``chunk_rows`` rows at a time so that the full (rows x V)
logits and their gradient never exist at once: at the default preset's sizes (4096 x 13,777)
each is 225 MB of float32, written and read several times by the unfused path (logits,
log-softmax, its gradient, the logits' gradient).

When a gradient is needed, each chunk's gradient is computed in the forward, while its logits
are still in cache: d(sum NLL)/d logits = softmax - onehot(target), then ``dh = G W`` and
``dW += G^T h`` (``db += sum G``). Since the loss is a sum, its upstream gradient is one scalar,
and the backward only scales the stored dh, dW, db by it: no logits are recomputed (the approach
of Liger-Kernel's fused linear cross-entropy). ``reduction="none"`` has no backward and exists
for evaluation.

FLOPs (``torch.utils.flop_counter``): the ops are ``torch.library`` custom ops with registered
formulas. The forward op is charged 2·N·d·V (the head's matrix product) and the backward op
4·N·d·V (dh and dW), although the latter work physically runs inside the forward call: the
counts are then the same as the unfused head's, phase by phase. ``bkbench.metrics.flops``
charges them to the ``lm_head`` component and estimates the softmax/NLL work inside them as the
unfused ops would be estimated.

Mixed precision: under autocast the two matrix products run in the autocast dtype (as
``nn.Linear`` would), the softmax and every accumulation in float32.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import naive

__all__ = ["lm_head_nll", "lm_head_nll_int8", "quantize_rows", "int8_logits", "default_chunk_rows",
           "CHUNK_ELEMENTS", "naive"]

#: logits per chunk (2**23 float32 values: 32 MiB, 608 rows at V = 13,777, against 225 MiB for
#: the full logits). ``benchmarks/train_step.py`` ("LM head + loss") times the chunk sizes; on
#: 2 shared CPU cores at 4096 x 64 x 13,777, forward+backward against the unfused path: 38 rows
#: 0.31x, 152 rows 1.06x, 608 rows 1.25x, 2432 rows 1.26x (fewer, larger ops sync the threads
#: less often).
CHUNK_ELEMENTS = 2 ** 23


def default_chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunked(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, chunk_rows: int, compute_dtype: torch.dtype,
             want_grad: bool):
    """Per-row NLL and, if ``want_grad``, the gradients of its sum w.r.t. h, weight, bias."""
    N, d = h.shape
    V = weight.shape[0]
    acc = _acc_dtype(compute_dtype)
    # one dtype everywhere (no autocast, no casts): products write straight into the outputs
    plain = h.dtype == weight.dtype == compute_dtype == acc and (
        bias is None or bias.dtype == acc)
    hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
    bc = bias.to(compute_dtype) if bias is not None else None
    nll = torch.empty(N, dtype=acc, device=h.device)
    grad_h = torch.empty_like(h) if want_grad else None
    if want_grad:   # written by the first chunk's product when plain, else accumulated
        grad_w = (torch.empty_like(weight) if plain and N > 0
                  else torch.zeros(V, d, dtype=acc, device=h.device))
    else:
        grad_w = None
    grad_b = torch.zeros(V, dtype=acc, device=h.device) if want_grad and bias is not None else None
    minus_one = None
    for start in range(0, N, chunk_rows):
        end = min(start + chunk_rows, N)
        x, t = hc[start:end], targets[start:end, None]
        logits = torch.addmm(bc, x, wc.t()) if bc is not None else torch.mm(x, wc.t())
        logp = torch.log_softmax(logits, dim=1, dtype=acc)
        del logits
        torch.neg(logp.gather(1, t).squeeze(1), out=nll[start:end])
        if not want_grad:
            continue
        g = logp.exp_()                                     # softmax, in place
        if minus_one is None or minus_one.shape[0] != end - start:
            minus_one = torch.full((end - start, 1), -1.0, dtype=acc, device=h.device)
        g.scatter_add_(1, t, minus_one)                     # softmax - onehot(target)
        if grad_b is not None:
            grad_b += g.sum(0)
        if plain:
            torch.mm(g, wc, out=grad_h[start:end])
            if start == 0:
                torch.mm(g.t(), x, out=grad_w)
            else:
                grad_w.addmm_(g.t(), x)
        else:
            g = g.to(compute_dtype)
            grad_h[start:end] = torch.mm(g, wc)
            grad_w += torch.mm(g.t(), x)
    if want_grad:
        grad_w = grad_w.to(weight.dtype)
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else torch.empty(0, device=h.device)
    return nll, grad_h, grad_w, grad_b


# ---------------------------------------------------------------------------------------------
# Custom ops (opaque to the FLOP counter, which gets their formulas) and the autograd function
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("bkbench::lm_head_nll", mutates_args=())
def _nll_rows(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              targets: torch.Tensor, chunk_rows: int, compute_dtype: torch.dtype) -> torch.Tensor:
    with torch.autocast(h.device.type, enabled=False):
        return _chunked(h, weight, bias, targets, chunk_rows, compute_dtype, False)[0]


@_nll_rows.register_fake
def _(h, weight, bias, targets, chunk_rows, compute_dtype):
    return h.new_empty(h.shape[0], dtype=_acc_dtype(compute_dtype))


@torch.library.custom_op("bkbench::lm_head_nll_sum_with_grad", mutates_args=())
def _nll_sum_with_grad(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, chunk_rows: int, compute_dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor]:
    """(summed NLL, per-row NLL, and the gradients of the sum)."""
    with torch.autocast(h.device.type, enabled=False):
        nll, gh, gw, gb = _chunked(h, weight, bias, targets, chunk_rows, compute_dtype, True)
    return nll.sum(), nll, gh, gw, gb


@_nll_sum_with_grad.register_fake
def _(h, weight, bias, targets, chunk_rows, compute_dtype):
    gb = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    acc = _acc_dtype(compute_dtype)
    return (h.new_empty((), dtype=acc), h.new_empty(h.shape[0], dtype=acc),
            torch.empty_like(h), torch.empty_like(weight), gb)


@torch.library.custom_op("bkbench::lm_head_nll_sum_backward", mutates_args=())
def _nll_sum_backward(grad_loss: torch.Tensor, grad_h: torch.Tensor, grad_w: torch.Tensor,
                      grad_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales the gradients the forward computed by the upstream gradient of the loss."""
    return ((grad_h * grad_loss).to(grad_h.dtype), (grad_w * grad_loss).to(grad_w.dtype),
            (grad_b * grad_loss).to(grad_b.dtype))


@_nll_sum_backward.register_fake
def _(grad_loss, grad_h, grad_w, grad_b):
    return torch.empty_like(grad_h), torch.empty_like(grad_w), torch.empty_like(grad_b)


class _NLLSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows, compute_dtype):
        loss, rows, gh, gw, gb = _nll_sum_with_grad(h, weight, bias, targets, chunk_rows,
                                                    compute_dtype)
        ctx.save_for_backward(gh, gw, gb)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(rows)
        return loss, rows

    @staticmethod
    def backward(ctx, grad_loss, grad_rows):
        gh, gw, gb = _nll_sum_backward(grad_loss, *ctx.saved_tensors)
        return gh, gw, gb if ctx.has_bias else None, None, None, None


# ---------------------------------------------------------------------------------------------
# The integer head: int8 weights and per-token int8 activations, evaluation only
# ---------------------------------------------------------------------------------------------

ACT_QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 per row: (int8 values, float32 (rows, 1) scales); a zero row gets scale 1.
    A row's rounding depends on that row only (causal)."""
    x = x.detach().float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / ACT_QMAX, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -ACT_QMAX, ACT_QMAX).to(torch.int8), scale


def int8_logits(x_int: torch.Tensor, x_scale: torch.Tensor, w_int: torch.Tensor,
                w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 logits of int8 rows against an int8 (V, d) weight: the exact int32 product
    (``torch._int_mm``; ``w_int.t()`` is the column-major view it takes without a copy),
    rescaled by the row and channel scales."""
    if x_int.shape[1] == 1:   # _int_mm on CPU is wrong at K = 1 (torch 2.13): a zero column
        x_int, w_int = torch.nn.functional.pad(x_int, (0, 1)), torch.nn.functional.pad(w_int, (0, 1))
    logits = torch._int_mm(x_int, w_int.t()).float().mul_(x_scale).mul_(w_scale)
    return logits.add_(bias) if bias is not None else logits


@torch.library.custom_op("bkbench::lm_head_nll_int8", mutates_args=())
def _nll_rows_int8(x_int: torch.Tensor, x_scale: torch.Tensor, w_int: torch.Tensor,
                   w_scale: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   chunk_rows: int) -> torch.Tensor:
    nll = torch.empty(x_int.shape[0], dtype=torch.float32, device=x_int.device)
    for start in range(0, x_int.shape[0], chunk_rows):
        end = min(start + chunk_rows, x_int.shape[0])
        logits = int8_logits(x_int[start:end], x_scale[start:end], w_int, w_scale, bias)
        logp = torch.log_softmax(logits, dim=1)
        torch.neg(logp.gather(1, targets[start:end, None]).squeeze(1), out=nll[start:end])
    return nll


@_nll_rows_int8.register_fake
def _(x_int, x_scale, w_int, w_scale, bias, targets, chunk_rows):
    return x_int.new_empty(x_int.shape[0], dtype=torch.float32)


def lm_head_nll_int8(features: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, targets: torch.Tensor, reduction: str = "sum",
                     *, chunk_rows: int | None = None) -> torch.Tensor:
    """NLL of ``targets`` under an integer LM head: ``features`` rounded to INT8 per token,
    times the int8 ``weight`` (V, d) in int32, rescaled by the row scales and ``weight_scale``
    (V,), plus ``bias``; chunked as :func:`lm_head_nll`. Evaluation only (no backward)."""
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if weight.dtype != torch.int8 or weight.dim() != 2 or features.shape[-1] != weight.shape[1]:
        raise ValueError(f"an integer head needs an int8 (V, {features.shape[-1]}) weight, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if targets.shape != features.shape[:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match features of "
                         f"shape {tuple(features.shape)}")
    if torch.is_grad_enabled() and features.requires_grad:
        raise ValueError("lm_head_nll_int8 has no backward; call it under torch.no_grad()")
    chunk = default_chunk_rows(weight.shape[0]) if chunk_rows is None else int(chunk_rows)
    x_int, x_scale = quantize_rows(features.reshape(-1, features.shape[-1]))
    t = targets.reshape(-1).to(torch.int64).contiguous()
    nll = _nll_rows_int8(x_int, x_scale, weight, weight_scale.float(),
                         bias.float() if bias is not None else None, t, chunk)
    return nll.view(targets.shape) if reduction == "none" else nll.sum()


def _head_shapes(h_shape, w_shape) -> tuple[int, int, int]:
    return h_shape[0], h_shape[1], w_shape[0]


@register_flop_formula(torch.ops.bkbench.lm_head_nll)
def _nll_rows_flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    n, d, v = _head_shapes(h_shape, w_shape)
    return 2 * n * d * v


@register_flop_formula(torch.ops.bkbench.lm_head_nll_sum_with_grad)
def _nll_sum_flops(h_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    n, d, v = _head_shapes(h_shape, w_shape)
    return 2 * n * d * v      # its gradient products are charged to the backward op


@register_flop_formula(torch.ops.bkbench.lm_head_nll_sum_backward)
def _nll_backward_flops(loss_shape, gh_shape, gw_shape, *args, out_shape=None, **kwargs) -> int:
    n, d, v = _head_shapes(gh_shape, gw_shape)
    return 4 * n * d * v      # dh = G W and dW = G^T h, computed in the forward call


@register_flop_formula(torch.ops.bkbench.lm_head_nll_int8)
def _nll_int8_flops(x_shape, s_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    n, d, v = _head_shapes(x_shape, w_shape)
    return 2 * n * d * v      # the int8 product, counted as a float one of its shape


#: ops -> (their FLOP component, per-logit estimate of the uncounted work inside them, by
#: bkbench.metrics.flops category: what log_softmax + nll_loss, or their backwards, are charged)
FUSED_OPS = {
    torch.ops.bkbench.lm_head_nll: ("lm_head", {"softmax": 5, "loss": 1}),
    torch.ops.bkbench.lm_head_nll_sum_with_grad: ("lm_head", {"softmax": 5, "loss": 1}),
    torch.ops.bkbench.lm_head_nll_sum_backward: ("lm_head", {"softmax": 3, "loss": 1}),
    torch.ops.bkbench.lm_head_nll_int8: ("lm_head", {"softmax": 5, "loss": 1}),
}


def logits_of(func, args) -> int:
    """Number of logits (rows x V) an op of :data:`FUSED_OPS` covers."""
    if func is torch.ops.bkbench.lm_head_nll_sum_backward:   # (grad_loss, grad_h, grad_w, ..)
        return args[1].shape[0] * args[2].shape[0]
    if func is torch.ops.bkbench.lm_head_nll_int8:           # (x_int, x_scale, w_int, ..)
        return args[0].shape[0] * args[2].shape[0]
    return args[0].shape[0] * args[1].shape[0]


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------

def _compute_dtype(features: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = features.device.type
    if torch.is_autocast_enabled(device) and features.dtype in (torch.float32, torch.bfloat16,
                                                                torch.float16):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(features.dtype, weight.dtype)


def lm_head_nll(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, reduction: str = "sum", *,
                chunk_rows: int | None = None, with_rows: bool = False):
    """NLL of ``targets`` under the LM head ``(weight, bias)`` applied to ``features``.

    ``reduction="sum"``: the summed NLL (a float32 scalar, float64 for float64 inputs), with a
    backward to features, weight and bias. ``reduction="none"``: the NLL of every target, shape
    ``targets.shape``; no backward (evaluation). ``chunk_rows``: rows per chunk (default
    :func:`default_chunk_rows`). ``with_rows`` (``reduction="sum"`` only): return
    ``(summed NLL, per-target NLL)``, the latter without gradient, computed by the same pass
    (what a training step's data selection reads at no extra cost).
    """
    if with_rows and reduction != "sum":
        raise ValueError("with_rows needs reduction='sum' (reduction='none' already gives rows)")
    if reduction not in ("sum", "none"):
        raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
    if weight.dim() != 2 or features.shape[-1] != weight.shape[1]:
        raise ValueError(f"features (..., {features.shape[-1]}) do not fit a head weight of "
                         f"shape {tuple(weight.shape)} (expected (V, d))")
    if targets.shape != features.shape[:-1]:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match features of "
                         f"shape {tuple(features.shape)} (expected {tuple(features.shape[:-1])})")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be integer class ids, got {targets.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit V={weight.shape[0]}")
    chunk = default_chunk_rows(weight.shape[0]) if chunk_rows is None else int(chunk_rows)
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    h = features.reshape(-1, features.shape[-1]).contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    dtype = _compute_dtype(features, weight)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (features, weight, bias))
    if reduction == "none":
        if needs_grad:
            raise ValueError("lm_head_nll(reduction='none') has no backward; use "
                             "reduction='sum' for training, or call it under torch.no_grad()")
        return _nll_rows(h, weight, bias, t, chunk, dtype).view(targets.shape)
    if not needs_grad:
        rows = _nll_rows(h, weight, bias, t, chunk, dtype)
        return (rows.sum(), rows.view(targets.shape)) if with_rows else rows.sum()
    loss, rows = _NLLSum.apply(h, weight, bias, t, chunk, dtype)
    return (loss, rows.view(targets.shape)) if with_rows else loss
