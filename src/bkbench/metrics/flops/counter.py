"""The FLOP counter (torch's FlopCounterMode with bkbench's extra formulas) and the census of
the aten ops it does not count (the ``uncounted`` estimate)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ...ops.lm_loss import FUSED_OPS
from ...ops.lm_loss import logits_of as lm_logits_of


# torch's table has no formula for the CPU flash-attention kernel nor for the fused LSTM kernels

def _attention_fwd_flops(q_shape, k_shape, v_shape) -> int:
    *batch, t, d = q_shape
    s, dv = k_shape[-2], v_shape[-1]
    rows = math.prod(batch)
    return 2 * rows * t * s * d + 2 * rows * t * s * dv   # scores Q K^T, then P V


def _cpu_flash_fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _attention_fwd_flops(query, key, value)


def _cpu_flash_bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    # dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward's two products
    return 2 * _attention_fwd_flops(query, key, value)


def _rnn_fwd_flops(rows: int, weight_shapes) -> int:
    # every step multiplies the layer input and the hidden state by the gates' weights
    return 2 * rows * sum(math.prod(s) for s in weight_shapes)


def _mkldnn_rnn_fwd(input, weight0, weight1, *args, out_shape=None, **kwargs) -> int:
    # the CPU LSTM kernel (one layer per call); weight0: (4h, in), weight1: (4h, h)
    return _rnn_fwd_flops(input[0] * input[1], (weight0, weight1))


def _mkldnn_rnn_bwd(input, weight1, weight2, *args, out_shape=None, **kwargs) -> int:
    # gradients for the inputs/hidden states and for the weights: 2 x the forward
    return 2 * _rnn_fwd_flops(input[0] * input[1], (weight1, weight2))


def _cudnn_weights(weight, stride) -> list:
    # per layer [w_ih, w_hh, (b_ih, b_hh)]: the two matrices of each group of ``stride``
    return [s for i in range(0, len(weight), stride) for s in weight[i:i + 2]]


def _cudnn_rnn_fwd(input, weight, weight_stride0, *args, out_shape=None, **kwargs) -> int:
    return _rnn_fwd_flops(input[0] * input[1], _cudnn_weights(weight, weight_stride0))


def _cudnn_rnn_bwd(input, weight, weight_stride0, *args, out_shape=None, **kwargs) -> int:
    return 2 * _rnn_fwd_flops(input[0] * input[1], _cudnn_weights(weight, weight_stride0))


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # the integer layers' int8 x int8 -> int32 product (IntLinear): one multiply-add per term,
    # counted as a float matmul of the same shape would be
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _extra_formulas() -> dict:
    extra = {}
    aten = torch.ops.aten
    # torch's LSTM kernels (CPU oneDNN, cuDNN) are single ops the counter has no formula for
    for name, formula in (("mkldnn_rnn_layer", _mkldnn_rnn_fwd),
                          ("mkldnn_rnn_layer_backward", _mkldnn_rnn_bwd),
                          ("_cudnn_rnn", _cudnn_rnn_fwd), ("_cudnn_rnn_backward", _cudnn_rnn_bwd)):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = formula
    extra[aten._int_mm] = _int_mm_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return extra


def new_counter() -> FlopCounterMode:
    """torch's FlopCounterMode with bkbench's extra formulas (attention on the CPU, LSTMs)."""
    return FlopCounterMode(display=False, depth=None, custom_mapping=_extra_formulas())


#: Estimated FLOPs per output element (per input element for reductions) of the ops that
#: FlopCounterMode does not count, by category. Rough by nature (a transcendental counts as one
#: FLOP, as is customary); complex-valued elements count double.
UNCOUNTED_COST: dict[str, dict[str, float]] = {
    "elementwise": {"add": 1, "sub": 1, "mul": 1, "div": 1, "neg": 1, "rsub": 1, "pow": 1,
                    "sqrt": 1, "rsqrt": 1, "reciprocal": 1, "abs": 1, "clamp": 1, "clamp_min": 1,
                    "clamp_max": 1, "maximum": 1, "minimum": 1, "sign": 1, "square": 1,
                    "exp": 1, "log": 1, "log1p": 1, "expm1": 1, "tanh": 1, "sigmoid": 1,
                    "erf": 1, "sin": 1, "cos": 1, "addcmul": 2, "addcdiv": 2, "lerp": 3,
                    "mul_": 1, "add_": 1, "sub_": 1, "div_": 1, "tanh_backward": 2,
                    "sigmoid_backward": 2, "hardtanh_backward": 1, "round": 1, "floor": 1,
                    "where": 0, "masked_fill": 0, "eq": 1, "ne": 1, "lt": 1, "gt": 1, "le": 1,
                    "ge": 1, "logical_not": 1, "logical_and": 1, "logical_or": 1,
                    "fake_quantize_per_tensor_affine": 4, "fake_quantize_per_channel_affine": 4},
    "activation": {"gelu": 8, "gelu_backward": 12, "relu": 1, "threshold_backward": 1,
                   "silu": 4, "silu_backward": 6, "softplus": 4, "softplus_backward": 4},
    "normalization": {"native_layer_norm": 8, "native_layer_norm_backward": 14,
                      "_fused_rms_norm": 5, "_fused_rms_norm_backward": 9,
                      "native_batch_norm": 8, "native_batch_norm_backward": 14},
    "softmax": {"_softmax": 5, "_safe_softmax": 5, "_log_softmax": 5, "_softmax_backward_data": 3,
                "_log_softmax_backward_data": 3},
    "dropout": {"native_dropout": 2, "native_dropout_backward": 1, "bernoulli": 1,
                "bernoulli_": 1},
    "reduction": {"sum": 1, "mean": 1, "amax": 1, "amin": 1, "max": 1, "min": 1, "prod": 1,
                  "norm": 2, "linalg_vector_norm": 2, "var": 3, "std": 3, "var_mean": 3,
                  "logsumexp": 3, "cumsum": 1, "argmax": 1, "argmin": 1, "topk": 1,
                  "sort": 1},
    "loss": {"nll_loss_forward": 1, "nll_loss_backward": 1, "nll_loss2d_forward": 1,
             "nll_loss2d_backward": 1},
    "scatter_add": {"embedding_dense_backward": 1, "index_add": 1, "index_add_": 1,
                  "scatter_add": 1, "scatter_add_": 1, "index_put": 0, "index_put_": 0},
}

# per input element instead of per output element
_PER_INPUT = set(UNCOUNTED_COST["reduction"]) | {"embedding_dense_backward", "nll_loss_forward",
                                                  "nll_loss2d_forward", "index_add",
                                                  "index_add_", "scatter_add", "scatter_add_"}

# data movement, views, creation and RNG: no arithmetic
_NO_ARITHMETIC = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "clone", "copy_",
    "_to_copy", "contiguous", "split", "split_with_sizes", "slice", "select", "unsqueeze",
    "squeeze", "cat", "stack", "index", "index_select", "embedding", "arange", "zeros",
    "zeros_like", "empty", "empty_like", "empty_strided", "ones", "ones_like", "full",
    "full_like", "fill_", "zero_", "new_empty", "new_zeros", "new_ones", "new_full",
    "new_empty_strided", "detach", "alias", "lift_fresh", "lift_fresh_copy", "as_strided",
    "unbind", "randint", "rand", "randn", "rand_like", "randn_like", "normal_", "uniform_",
    "_local_scalar_dense", "scalar_tensor", "gather", "scatter", "scatter_", "repeat", "flip",
    "roll", "narrow", "view_as_real", "view_as_complex", "_conj", "conj", "resolve_conj",
    "resolve_neg", "complex", "real", "imag", "_reshape_alias", "diagonal", "unfold", "pad",
    "constant_pad_nd", "masked_select", "nonzero", "tril", "triu", "is_nonzero", "item",
    "equal", "set_", "resize_", "_index_put_impl_", "slice_scatter", "select_scatter",
    "as_strided_scatter", "bincount", "one_hot", "unsqueeze_", "squeeze_", "t_", "split_copy",
    "detach_", "polar", "select_backward", "slice_backward", "index_select_backward",
    "unsqueeze_copy", "expand_copy", "permute_copy", "transpose_copy", "view_copy", "count_nonzero", "any", "all", "isfinite", "isnan", "_assert_async",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_foreach_zero_", "linspace",
    "_efficientzerotensor", "repeat_interleave", "histc", "searchsorted", "bucketize",
}

SOURCES_EXPLANATION = (
    "counted: derived by torch's FlopCounterMode from the ops that ran (matrix products, from "
    "their shapes); formula: a hand-derived count -- bkbench's own registered ops (the "
    "BK-Core's per-position count, the same on both gradient paths; GLA's score markers), "
    "the optimizer's per-parameter count (weight decay "
    "charged only to the param groups that have it), and the estimate of the uncounted ops")

_CATEGORY_OF = {name: cat for cat, table in UNCOUNTED_COST.items() for name in table}

UNCOUNTED_EXPLANATION = (
    "FlopCounterMode counts matrix products (and ops with a registered formula such as the "
    "BK-Core); it does not see elementwise arithmetic, activations (GELU), normalisation "
    "(LayerNorm), softmax and log-softmax (attention probabilities, the loss), dropout, "
    "reductions, bias and residual additions, or the embedding gather/scatter. 'uncounted' "
    "estimates those from a census of the aten ops the step actually ran, charging each a "
    "per-element cost by formula (e.g. LayerNorm 8 forward / 14 backward, GELU 8 / 12, softmax "
    "5 / 3, dropout 2 / 1, add or mul 1 per element). It is an estimate, reported beside the "
    "count and never added to it.")


def _elements(tree) -> tuple[int, bool]:
    flat, _ = tree_flatten(tree)
    n, is_complex = 0, False
    for t in flat:
        if isinstance(t, torch.Tensor):
            n += t.numel()
            is_complex = is_complex or t.is_complex()
    return n, is_complex


class Census(TorchDispatchMode):
    """Sees every dispatched aten op of the step.

    Ops with a FLOP formula (the counter's registry) are charged, with the same formula, to the
    component that is current (:class:`ComponentTracker`), or for a fused op of
    ``ops.lm_loss.FUSED_OPS`` (the LM head with the loss) to its own component, ``lm_head``, plus
    the softmax/NLL work inside it as uncounted; every other op is charged a formula cost per
    element as 'uncounted'.
    """

    def __init__(self, registry: dict, tracker: "ComponentTracker"):
        super().__init__()
        self._registry = registry
        self._tracker = tracker
        self.phase = "forward"
        self.counted: dict[str, dict[str, int]] = {"forward": defaultdict(int),
                                                   "backward": defaultdict(int)}
        self.flops: dict[str, dict[str, float]] = {"forward": defaultdict(float),
                                                   "backward": defaultdict(float)}
        self.ops: dict[str, Counter] = {"forward": Counter(), "backward": Counter()}
        self.unknown: set[str] = set()
        self.errors: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in self._registry:
            try:
                n = self._registry[packet](*args, **kwargs, out_val=out)
            except Exception as exc:  # the counter itself would have failed the same way
                self.errors.append(f"{packet}: {exc}")
            else:
                fused = FUSED_OPS.get(packet)
                comp = fused[0] if fused else self._tracker.current(self.phase)
                self.counted[self.phase][comp] += int(n)
                if fused:  # the uncounted work inside the fused op, as if it were unfused
                    logits = lm_logits_of(packet, args)
                    for category, per_logit in fused[1].items():
                        self.flops[self.phase][category] += per_logit * logits
                        self.ops[self.phase][packet.__name__] += int(per_logit * logits)
            return out
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # the census must never break the step it observes
            pass
        return out

    def _record(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if name in _NO_ARITHMETIC:
            return
        category = _CATEGORY_OF.get(name)
        if category is None:
            base = name.rstrip("_")
            category = _CATEGORY_OF.get(base)
            cost = UNCOUNTED_COST[category][base] if category else 1.0
            if category is None:
                category = "other"
                self.unknown.add(name)
        else:
            cost = UNCOUNTED_COST[category][name]
        if cost == 0:
            return
        if name in _PER_INPUT:
            n, cplx = _elements(args[0] if args else ())
        else:
            n, cplx = _elements(out)
        flops = cost * n * (2 if cplx else 1)
        self.flops[self.phase][category] += flops
        self.ops[self.phase][name] += int(flops)
