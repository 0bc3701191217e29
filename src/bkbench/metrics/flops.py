"""FLOPs of one real training step, measured with torch's FlopCounterMode.

What is counted
---------------
:func:`measure_step_flops` runs one training step of the model as configured (random tokens,
train mode, dropout on, the model's auxiliary loss included) and counts

* the **forward** (model + loss) and the **backward** separately, with
  ``torch.utils.flop_counter.FlopCounterMode``. The counter knows matrix products (mm, addmm,
  bmm, baddbmm, convolutions, the fused attention kernels) and any op registered with
  ``register_flop_formula`` -- the BK-Core registers its own per-position formula. This module
  adds a formula for ``aten._scaled_dot_product_flash_attention_for_cpu`` (and its backward),
  the kernel PyTorch picks on the CPU when attention dropout is off (evaluation, dropout=0),
  which torch's table does not cover; without it attention would be invisible there; and
  for torch's fused LSTM kernels (``aten.mkldnn_rnn_layer`` on the CPU, ``aten._cudnn_rnn``
  on CUDA, and their backwards: 2 x the gate matmuls). Like
  torch's own attention formulas it charges the full T x T score matrix even for causal
  attention (the math kernel really computes it; a causal flash kernel skips about half).
* the **optimizer** by formula, per parameter per step (:data:`OPTIMIZER_FLOPS_PER_PARAM`,
  :data:`WEIGHT_DECAY_FLOPS_PER_PARAM` for the parameters of the run's param groups that
  have weight decay, :data:`GRAD_CLIP_FLOPS_PER_PARAM`).

Every figure says where it comes from (``FlopReport.sources``, ``flops["sources"]`` in the
results): ``counted`` is what the counter derived from the ops that ran (matrix products from
their shapes); ``formula`` is a hand-derived count charged per element or per position --
bkbench's own registered ops (the BK-Core's per-position count on both gradient paths, the
GLA score markers), the optimizer and the estimate of what the counter does not see.

FLOPs are attributed to the model's components (``LanguageModel.COMPONENTS``: embedding,
mixer, feed_forward, lm_head) with the counter's own formulas, op by op: in the forward by the
module that runs the op; in the backward by the module whose forward created the autograd node
being run (each node is tagged when it is created). The counter's own per-module breakdown is
not used: in the backward it follows module hooks, which mis-attribute work as soon as a module
returns its input unchanged (dropout with p = 0). Whatever runs outside the model (the
cross-entropy and the auxiliary-loss sum) is the ``loss`` component, and ops of a module that
belongs to no component are ``other``. The LM head fused with the loss
(``bkbench.ops.lm_loss``, what training and evaluation run) is one op with a registered
formula: its head products are charged to ``lm_head`` -- 2·N·d·V in the forward, 4·N·d·V in
the backward, exactly what the unfused head is charged -- and the log-softmax/NLL inside it is
estimated as uncounted, as the unfused ops would be. The components add up to the counter's global total
(any difference would be put under ``other`` and noted).

What is not counted
-------------------
The counter sees no elementwise arithmetic, activations (GELU), normalisation (LayerNorm),
softmax/log-softmax (attention probabilities and the loss), dropout, reductions, bias
additions, residual additions or the embedding gather/scatter. So that nobody mistakes the
count for more than it is, a census of every aten op actually dispatched during the step is
taken alongside the counter, and each op the counter skips is charged a per-element cost by
formula (:data:`UNCOUNTED_COST`). That estimate is reported as ``uncounted`` -- beside the
count, never added to it.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from ..eval import fused_head
from ..ops.lm_loss import FUSED_OPS
from ..ops.lm_loss import logits_of as lm_logits_of

__all__ = [
    "FlopReport",
    "measure_step_flops",
    "measure_forward_flops",
    "optimizer_flops",
    "analytic_transformer_flops",
    "analytic_resnet_bk_flops",
    "analytic_gla_flops",
    "analytic_lstm_flops",
    "analytic_flops_for",
    "flops_result_fields",
    "OPTIMIZER_FLOPS_PER_PARAM",
    "WEIGHT_DECAY_FLOPS_PER_PARAM",
    "GRAD_CLIP_FLOPS_PER_PARAM",
    "UNCOUNTED_COST",
]

# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------

#: FLOPs per parameter element per optimizer step, without weight decay. AdamW (torch's
#: update): first moment ``m += (1-b1)(g - m)`` 3 (sub, mul, add); second moment
#: ``v = b2*v + (1-b2)*g*g`` 4 (square, two scalings, add); denominator
#: ``sqrt(v)/sqrt(bc2) + eps`` 3 (sqrt, div, add); update ``p -= step * m / denom`` 3
#: (div, mul, sub). Total 13. Bias corrections are per tensor scalars, not per element.
#: Adam: 13. SGD: g*lr and p -= 2; with momentum ``buf = mu*buf + g`` 2 more.
OPTIMIZER_FLOPS_PER_PARAM = {"adamw": 13, "adam": 13, "sgd": 2, "sgd_momentum": 4}

#: Extra FLOPs per element of a parameter whose group has weight_decay != 0 (torch skips the
#: decay where it is 0): AdamW's decoupled ``p *= 1 - lr*wd`` 1; Adam's and SGD's L2 term
#: ``g += wd*p`` 2.
WEIGHT_DECAY_FLOPS_PER_PARAM = {"adamw": 1, "adam": 2, "sgd": 2, "sgd_momentum": 2}

#: Global-norm gradient clipping (``clip_grad_norm_``): square and sum each gradient element
#: (2) and scale it by the clip coefficient (1).
GRAD_CLIP_FLOPS_PER_PARAM = 3

_OPTIMIZER_WHY = (
    "AdamW per parameter element per step: first moment 3, second moment 4, denominator "
    "sqrt/bias-correction/eps 3, update 3 = 13, plus 1 for the decoupled weight decay where "
    "the parameter's group has weight_decay != 0 (bias corrections are per-tensor scalars); "
    "gradient clipping by global norm adds 3 (square, sum, scale)")


def optimizer_flops(num_params: int, optimizer: str = "adamw", grad_clip: bool = False, *,
                    decayed: int | None = None) -> int:
    """FLOPs of one optimizer step over ``num_params`` parameter elements, ``decayed`` of
    which (default: all) are in param groups with weight decay.

    Per element: ``OPTIMIZER_FLOPS_PER_PARAM[optimizer]`` (AdamW 13, see its docstring), plus
    ``WEIGHT_DECAY_FLOPS_PER_PARAM[optimizer]`` per decayed element, plus
    :data:`GRAD_CLIP_FLOPS_PER_PARAM` when ``grad_clip`` (clip_grad_norm_ runs every step).
    """
    key = optimizer.lower()
    if key not in OPTIMIZER_FLOPS_PER_PARAM:
        raise ValueError(f"unknown optimizer {optimizer!r}; known: "
                         f"{', '.join(OPTIMIZER_FLOPS_PER_PARAM)}")
    if num_params < 0:
        raise ValueError(f"num_params must be >= 0, got {num_params}")
    decayed = num_params if decayed is None else decayed
    if not 0 <= decayed <= num_params:
        raise ValueError(f"decayed must be between 0 and num_params ({num_params}), got {decayed}")
    per = OPTIMIZER_FLOPS_PER_PARAM[key] + (GRAD_CLIP_FLOPS_PER_PARAM if grad_clip else 0)
    return int(num_params) * per + int(decayed) * WEIGHT_DECAY_FLOPS_PER_PARAM[key]


def _optimizer_name(optimizer: Any) -> str:
    if optimizer is None:
        return "adamw"
    if isinstance(optimizer, str):
        return optimizer.lower()
    name = type(optimizer).__name__.lower()
    if name == "sgd":
        momentum = any(g.get("momentum", 0) for g in optimizer.param_groups)
        return "sgd_momentum" if momentum else "sgd"
    if name in OPTIMIZER_FLOPS_PER_PARAM:
        return name
    raise ValueError(f"no FLOP formula for optimizer {type(optimizer).__name__}; "
                     f"known: {', '.join(OPTIMIZER_FLOPS_PER_PARAM)}")


def _optimized_params(model: nn.Module, optimizer: Any) -> list[tuple[torch.Tensor, bool]]:
    """(parameter, has weight decay) for each parameter the optimizer updates; without an
    optimizer instance, every trainable parameter, decayed (torch's AdamW default)."""
    if optimizer is not None and not isinstance(optimizer, str):
        seen, out = set(), []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    out.append((p, group.get("weight_decay", 0) != 0))
        return out
    return [(p, True) for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------
# Extra counter formulas: the CPU flash-attention kernel
# --------------------------------------------------------------------------------------------

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


def _int_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # the integer layers' int8 x int8 -> int32 product (IntLinear): one multiply-add per term,
    # counted as a float matmul of the same shape would be
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


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
    return FlopCounterMode(display=False, depth=None, custom_mapping=_extra_formulas())


# --------------------------------------------------------------------------------------------
# Census of the ops the counter does not see
# --------------------------------------------------------------------------------------------

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


class _Census(TorchDispatchMode):
    """Sees every dispatched aten op of the step.

    Ops with a FLOP formula (the counter's registry) are charged, with the same formula, to the
    component that is current (:class:`_ComponentTracker`), or for a fused op of
    ``ops.lm_loss.FUSED_OPS`` (the LM head with the loss) to its own component, ``lm_head``, plus
    the softmax/NLL work inside it as uncounted; every other op is charged a formula cost per
    element as 'uncounted'.
    """

    def __init__(self, registry: dict, tracker: "_ComponentTracker"):
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


class _ComponentTracker(TorchFunctionMode):
    """Which component is running, in the forward and in the backward.

    Forward: a stack of the model's modules (forward pre/post hooks); ops outside the model
    belong to 'loss'. Every autograd node created by an op is tagged with the component that
    created it (nodes made inside a composite op, e.g. attention, included), and a pre-hook on
    the node makes that component current while the backward runs it -- so the backward of a
    layer is charged to the layer, whatever modules the backward passes through.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._model = model
        self._stack: list[str] = []
        self._tags: dict[Any, str] = {}
        self._backward_current = "loss"
        self._handles: list[Any] = []
        self._cache: dict[str, str] = {}
        self._valid = set(getattr(model, "COMPONENTS", {}))

    def component_of(self, name: str) -> str:
        if name not in self._cache:
            fn = getattr(self._model, "component_of", None)
            comp = fn(name) if fn and name else "other"
            self._cache[name] = comp if comp in self._valid else "other"
        return self._cache[name]

    def current(self, phase: str) -> str:
        if phase == "backward":
            return self._backward_current
        if not self._stack:
            return "loss"
        return self.component_of(self._stack[-1])

    # module hooks
    def install(self) -> None:
        def pre(name: str):
            def hook(module, args) -> None:
                self._stack.append(name)
            return hook

        def post(module, args, output) -> None:
            if self._stack:
                self._stack.pop()

        for name, module in self._model.named_modules():
            if name:
                self._handles.append(module.register_forward_pre_hook(pre(name)))
                self._handles.append(module.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._tags.clear()

    def _enter_root(self) -> None:
        self._stack.append("")

    # node tagging
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            comp = "other" if self._stack and self._stack[-1] == "" else self.current("forward")
            flat, _ = tree_flatten(out)
            for t in flat:
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    self._tag(t.grad_fn, comp)
        return out

    def _tag(self, node, comp: str) -> None:
        pending = [node]
        while pending:
            n = pending.pop()
            if n is None or n in self._tags or type(n).__name__ == "AccumulateGrad":
                continue
            self._tags[n] = comp
            n.register_prehook(lambda grads, _c=comp: self._set_backward(_c))
            pending.extend(child for child, _ in n.next_functions)

    def _set_backward(self, comp: str) -> None:
        self._backward_current = comp


# --------------------------------------------------------------------------------------------
# Attribution of the counter's per-module counts to components
# --------------------------------------------------------------------------------------------

def _snapshot(counts: dict) -> dict[str, dict[str, int]]:
    return {k: {str(op): int(n) for op, n in v.items()} for k, v in counts.items()}


def _subtract(after: dict, before: dict) -> dict[str, dict[str, int]]:
    out = {}
    for key, ops in after.items():
        prior = before.get(key, {})
        diff = {op: n - prior.get(op, 0) for op, n in ops.items()}
        diff = {op: n for op, n in diff.items() if n}
        if diff:
            out[key] = diff
    return out


def _attribute(census: _Census, phase: str, global_total: int,
               components: list[str]) -> tuple[dict[str, int], list[str]]:
    """Counted FLOPs per component; they add up to the counter's global total exactly."""
    by_component = {c: 0 for c in components}
    for comp, n in census.counted[phase].items():
        by_component[comp if comp in by_component else "other"] += n
    notes = []
    residual = global_total - sum(by_component.values())
    if residual:
        notes.append(f"{phase}: {residual} counted FLOPs could not be attributed to a "
                     "component; put under 'other'")
        by_component["other"] += residual
    return by_component, notes


def _by_op(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    return dict(sorted(counts.get("Global", {}).items()))


def _is_formula_op(op: str) -> bool:
    # bkbench's own ops (the BK-Core and its FLOP marker) carry a hand-derived per-position
    # count; every other op the counter knows is a product counted from its shapes
    return op.startswith("bkbench.") or op.startswith("bkbench::")


def _split_by_source(by_op: dict[str, int]) -> dict[str, int]:
    """{"counted": .., "formula": ..} of a phase's per-op counts (see the module docstring)."""
    formula = sum(n for op, n in by_op.items() if _is_formula_op(str(op)))
    return {"counted": sum(by_op.values()) - formula, "formula": formula}


# --------------------------------------------------------------------------------------------
# Analytic formulas (matrix products only, 2 FLOPs per multiply-add)
# --------------------------------------------------------------------------------------------

def analytic_transformer_flops(batch_size: int, seq_len: int, d_model: int, n_layers: int,
                               vocab_size: int, *, mlp_ratio: int = 4) -> dict[str, Any]:
    """Matrix-product FLOPs of one training step of :class:`~bkbench.models.TransformerLM`.

    Per token and layer (forward): qkv 2·3d², output projection 2·d², MLP 2·2·(ratio·d)·d;
    attention scores and values 2·2·T·d per token -- the full T x T, which is what the CPU
    math kernel computes and what the counter's formulas charge for causal attention too.
    LM head 2·d·V per token. Backward = 2 x forward for every product: a gradient for the
    weights and one for the inputs (the first layer's input needs one because the embeddings
    are trained); the embedding itself is a gather, no product.
    """
    tokens = batch_size * seq_len
    d = d_model
    mixer = n_layers * tokens * (2 * 3 * d * d + 2 * d * d + 2 * 2 * seq_len * d)
    ffn = n_layers * tokens * (2 * 2 * mlp_ratio * d * d)
    head = tokens * 2 * d * vocab_size
    forward = {"embedding": 0, "mixer": mixer, "feed_forward": ffn, "lm_head": head, "loss": 0}
    backward = {k: 2 * v for k, v in forward.items()}
    return {"architecture": "transformer", "forward": sum(forward.values()),
            "backward": sum(backward.values()), "forward_by_component": forward,
            "backward_by_component": backward,
            "notes": "matrix products only; attention charged for the full T x T scores"}


def analytic_resnet_bk_flops(batch_size: int, seq_len: int, d_model: int, n_layers: int,
                             vocab_size: int, *, num_experts: int, top_k: int = 1,
                             bk_heads: int = 1, causal: bool = True,
                             expert_hidden: int | None = None,
                             dense_experts: bool = False,
                             expert_rows: int | None = None) -> dict[str, Any]:
    """FLOPs of one training step of the ResNet-BK LM (docs/models.md), by formula.

    Per token and layer (forward): gate 2·d·E; experts d→h→d (h = 2d by default) 2·2·d·h for
    each of the ``top_k`` experts a token is routed to (``dense_experts``: all E); potential
    projection 2·d·K; BK-Core features Linear(2K, d) 2·2K·d; the BK-Core itself
    ``bk_core_flops`` per position and head (a recurrence, counted by its registered formula).
    LM head 2·d·V. Backward: 2 x forward for the matrix products and the BK-Core's own backward
    formula (``bk_core_flops(..., backward=True)``, which is the same for the analytic and the
    autograd gradient: the op reports it either way).

    ``expert_rows``: rows the experts actually processed in the step, summed over layers and
    experts. The model pads each expert's batch with zero rows to a multiple of 16 (so that a
    row's result does not depend on the others'), which the counter sees as work; pass the
    padded total to match it exactly. Default: ``n_layers x tokens x top_k`` (no padding; the
    padding adds at most 15 rows per expert and layer).
    """
    from ..ops.bk_core import bk_core_flops

    tokens = batch_size * seq_len
    d, h = d_model, (expert_hidden or 2 * d_model)
    experts_used = num_experts if dense_experts else top_k
    if expert_rows is None:
        expert_rows = n_layers * tokens * experts_used
    ffn = n_layers * tokens * 2 * d * num_experts + expert_rows * 2 * 2 * d * h
    mixer_mm = n_layers * tokens * (2 * d * bk_heads + 2 * 2 * bk_heads * d)
    positions = n_layers * batch_size * bk_heads * seq_len
    core_fwd = bk_core_flops(positions, causal=causal)
    core_bwd = bk_core_flops(positions, causal=causal, backward=True)
    head = tokens * 2 * d * vocab_size
    forward = {"embedding": 0, "mixer": mixer_mm + core_fwd, "feed_forward": ffn,
               "lm_head": head, "loss": 0}
    backward = {"embedding": 0, "mixer": 2 * mixer_mm + core_bwd, "feed_forward": 2 * ffn,
                "lm_head": 2 * head, "loss": 0}
    return {"architecture": "resnet_bk", "forward": sum(forward.values()),
            "backward": sum(backward.values()), "forward_by_component": forward,
            "backward_by_component": backward, "bk_core_forward": core_fwd,
            "bk_core_backward": core_bwd,
            "expert_rows": int(expert_rows),
            "notes": (f"matrix products + BK-Core formula; {experts_used} expert(s) per token, "
                      f"{int(expert_rows)} expert rows in all (padding included)")}


def analytic_gla_flops(batch_size: int, seq_len: int, d_model: int, n_layers: int,
                       vocab_size: int, *, n_heads: int, chunk_size: int, expand_k: float = 0.5,
                       gate_rank: int = 16, mlp_ratio: int = 4) -> dict[str, Any]:
    """FLOPs of one training step of :class:`~bkbench.models.gla.GLALM`, by formula.

    Per token and layer (forward): q, k projections 2·2·d·dk (dk = expand_k·d), v, output gate
    and output projections 3·2·d², low-rank decay gate 2·d·r + 2·r·dk; the GLA op itself
    ``gla_flops`` (its chunkwise matmuls, bkbench.ops.gla.flops); the Transformer's MLP
    2·2·(ratio·d)·d; LM head 2·d·V. Backward = 2 x forward for every product.
    """
    from ..ops.gla import gla_flops

    tokens = batch_size * seq_len
    d, dk = d_model, int(d_model * expand_k)
    projections = n_layers * tokens * (2 * 2 * d * dk + 3 * 2 * d * d + 2 * d * gate_rank
                                       + 2 * gate_rank * dk)
    core = n_layers * gla_flops(batch_size, seq_len, n_heads, dk // n_heads, d // n_heads,
                                chunk_size)
    ffn = n_layers * tokens * (2 * 2 * mlp_ratio * d * d)
    head = tokens * 2 * d * vocab_size
    forward = {"embedding": 0, "mixer": projections + core, "feed_forward": ffn,
               "lm_head": head, "loss": 0}
    backward = {k: 2 * v for k, v in forward.items()}
    return {"architecture": "gla", "forward": sum(forward.values()),
            "backward": sum(backward.values()), "forward_by_component": forward,
            "backward_by_component": backward, "gla_core_forward": core,
            "notes": f"matrix products + the chunkwise GLA formula (chunk {chunk_size})"}


def analytic_lstm_flops(batch_size: int, seq_len: int, d_model: int, n_layers: int,
                        vocab_size: int) -> dict[str, Any]:
    """FLOPs of one training step of :class:`~bkbench.models.lstm.LSTMLM`, by formula.

    Per token and layer (forward): the four gates from the layer input and the hidden state,
    2·4d·(d + d); LM head 2·d·V. Backward = 2 x forward (the kernels' gradients for inputs,
    hidden states and weights).
    """
    tokens = batch_size * seq_len
    d = d_model
    mixer = n_layers * tokens * 2 * 4 * d * (d + d)
    head = tokens * 2 * d * vocab_size
    forward = {"embedding": 0, "mixer": mixer, "lm_head": head, "loss": 0}
    backward = {k: 2 * v for k, v in forward.items()}
    return {"architecture": "lstm", "forward": sum(forward.values()),
            "backward": sum(backward.values()), "forward_by_component": forward,
            "backward_by_component": backward, "notes": "gate matrix products + LM head"}


def analytic_flops_for(model: nn.Module, batch_size: int, seq_len: int,
                       vocab_size: int) -> dict[str, Any] | None:
    """The analytic formula matching ``model``'s architecture, or None if there is none."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is None:
        return None
    if name == "TransformerLM":
        return analytic_transformer_flops(batch_size, seq_len, cfg.d_model, cfg.n_layers,
                                          vocab_size)
    if name == "ResNetBKLM":
        return analytic_resnet_bk_flops(
            batch_size, seq_len, cfg.d_model, cfg.n_layers, vocab_size,
            num_experts=cfg.num_experts, top_k=cfg.top_k, bk_heads=getattr(cfg, "bk_heads", 1),
            causal=getattr(cfg, "bk_mode", "causal") == "causal",
            expert_rows=_padded_expert_rows(model))
    if name == "GLALM":
        from ..ops.gla import FLA_CHUNK_SIZE, resolve_backend
        device = next(model.parameters()).device
        fla = resolve_backend(cfg.backend, device) == "fla"
        return analytic_gla_flops(batch_size, seq_len, cfg.d_model, cfg.n_layers, vocab_size,
                                  n_heads=cfg.n_heads,
                                  chunk_size=FLA_CHUNK_SIZE if fla else cfg.chunk_size,
                                  expand_k=cfg.expand_k, gate_rank=cfg.gate_rank)
    if name == "LSTMLM":
        return analytic_lstm_flops(batch_size, seq_len, cfg.d_model, cfg.n_layers, vocab_size)
    return None


def _padded_expert_rows(model: nn.Module) -> int | None:
    """Rows the ResNet-BK experts processed in the model's last forward, padding included."""
    try:
        counts = model.last_routing_counts()
    except Exception:
        return None
    import sys
    multiple = getattr(sys.modules.get(type(model).__module__), "EXPERT_ROW_MULTIPLE", 1)
    rows = 0
    for n in counts.flatten().tolist():
        if n > 0:
            rows += -(-int(n) // multiple) * multiple
    return rows


def _routing_variation(model: nn.Module, batch_size: int, seq_len: int, forward: int,
                       backward: int) -> dict[str, Any] | None:
    """Bounds of the forward/backward count over all routings (ResNet-BK's padded experts).

    Each token costs top_k expert rows whatever the routing; only the zero-row padding of each
    expert's batch (to a multiple of EXPERT_ROW_MULTIPLE) depends on the routing.
    """
    rows = _padded_expert_rows(model)
    cfg = getattr(model, "config", None)
    if rows is None or cfg is None or not hasattr(cfg, "num_experts"):
        return None
    import sys
    multiple = getattr(sys.modules.get(type(model).__module__), "EXPERT_ROW_MULTIPLE", 1)
    tokens = batch_size * seq_len
    d = cfg.d_model
    per_row = 2 * 2 * d * (2 * d)                       # d -> 2d -> d, forward
    least = cfg.n_layers * tokens * cfg.top_k           # no padding needed anywhere
    most = least + cfg.n_layers * cfg.num_experts * (multiple - 1)
    lo_f, hi_f = forward - (rows - least) * per_row, forward + (most - rows) * per_row
    return {"source": "MoE expert batches padded to a multiple of "
                      f"{multiple} rows (the only routing-dependent work)",
            "expert_rows_measured": rows, "expert_rows_min": least, "expert_rows_max": most,
            "forward_min": lo_f, "forward_max": hi_f,
            "backward_min": backward - 2 * (rows - least) * per_row,
            "backward_max": backward + 2 * (most - rows) * per_row,
            "max_relative_spread": (hi_f - lo_f) / forward if forward else None,
            "explanation": (f"expert FLOPs depend on routing only through padding: "
                            f"{least}-{most} expert rows per step, {rows} in the measured step; "
                            f"the forward count lies in [{lo_f:.4g}, {hi_f:.4g}] for any routing")}


def _rel_diff(measured: float, expected: float) -> float | None:
    if not expected:
        return None if measured else 0.0
    return (measured - expected) / expected


# --------------------------------------------------------------------------------------------
# The report and the measurement
# --------------------------------------------------------------------------------------------

@dataclass
class FlopReport:
    """FLOPs of one training step (counted), the optimizer (formula) and what the count misses.

    ``forward``/``backward`` are FlopCounterMode totals; ``*_by_component`` split them over
    the model's components plus ``loss`` and ``other`` and add up to them exactly.
    ``uncounted`` is the formula estimate of what the counter cannot see (never included in
    the totals); ``sources`` splits forward, backward and optimizer into ``counted`` and
    ``formula`` FLOPs (module docstring); ``analytic`` the architecture's formula and its relative difference from the
    count (None for a model without a formula).
    """

    batch_size: int
    seq_len: int
    vocab_size: int
    forward: int
    backward: int
    optimizer: int
    total: int
    forward_by_component: dict[str, int]
    backward_by_component: dict[str, int]
    optimizer_by_component: dict[str, int]
    forward_by_op: dict[str, int]
    backward_by_op: dict[str, int]
    num_parameters: int
    optimizer_name: str
    optimizer_flops_per_parameter: int          # per element of a decayed parameter
    optimizer_explanation: str
    uncounted: dict[str, Any]
    analytic: dict[str, Any] | None
    varies_per_step: bool = False
    per_step_range: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    decayed_parameters: int | None = None       # elements in param groups with weight decay
    optimizer_flops_per_parameter_without_decay: int | None = None
    # where each figure comes from: {"forward": {"counted": .., "formula": ..}, ...}
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    counter: str = "torch.utils.flop_counter.FlopCounterMode"
    torch_version: str = torch.__version__

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_step"] = self.tokens
        return d

    def training_totals(self, steps: int) -> dict[str, Any]:
        """Whole-training FLOPs: ``steps`` x the per-step counts (compute is constant per step
        unless ``varies_per_step``, in which case sum measured steps instead)."""
        comps = sorted(set(self.forward_by_component) | set(self.backward_by_component))
        by_component = {c: steps * (self.forward_by_component.get(c, 0)
                                    + self.backward_by_component.get(c, 0)) for c in comps}
        by_component["optimizer"] = steps * self.optimizer
        return {"steps": steps, "forward": steps * self.forward,
                "backward": steps * self.backward, "optimizer": steps * self.optimizer,
                "total": steps * self.total, "by_component": by_component,
                "uncounted_estimate": steps * int(self.uncounted.get("total", 0))}


def _default_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # as in bkbench.train: summed cross-entropy in float32, normalised by the token count
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         reduction="sum")
    return ce / targets.numel()


@contextlib.contextmanager
def _preserved_state(model: nn.Module, device: torch.device):
    """Leave parameters, gradients, buffers, train/eval modes and RNG streams as they were."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, training in modes:
            m.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _components(model: nn.Module) -> list[str]:
    return list(getattr(model, "COMPONENTS", {})) + ["loss", "other"]


def _random_batch(batch_size: int, seq_len: int, vocab_size: int, device: torch.device,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=gen)
    idx = idx.to(device)
    return idx[:, :-1], idx[:, 1:]


def measure_step_flops(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int, *,
                       device: str | torch.device = "cpu", optimizer: Any = None,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                       grad_clip: bool = True, autocast_dtype: torch.dtype | None = None,
                       compute_loss: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None,
                       seed: int = 0) -> FlopReport:
    """Count the FLOPs of one real training step of ``model`` (see the module docstring).

    A random (batch_size, seq_len) token batch runs forward in train mode, the loss
    (``loss_fn(logits, targets)``; default: the cross-entropy as in training, i.e. the LM head
    fused with it, ``bkbench.ops.lm_loss``, for a model whose forward is
    ``lm_head(features(idx))``; plus the model's ``auxiliary_loss()``) and backward; ``optimizer`` (a torch optimizer, a name, or None for
    AdamW over the trainable parameters) is charged by formula, with gradient clipping when
    ``grad_clip``. The model's parameters, gradients, buffers, modes and the RNG state are
    left as they were; no optimizer step is taken.

    ``compute_loss(inputs, targets) -> (loss, terms)``, when given, replaces the forward and
    the loss: pass the trainer's own (``Trainer.compute_loss``), so that what is counted is
    the objective that trains, flags' loss terms and autocast included.
    """
    device = torch.device(device)
    components = _components(model)
    counter = new_counter()
    tracker = _ComponentTracker(model)
    census = _Census(counter.flop_registry, tracker)
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype)
                if autocast_dtype is not None else contextlib.nullcontext())
    # as in training: the LM head fused with the loss, unless a loss of the logits is given
    head = fused_head(model) if loss_fn is None else None
    loss_fn = loss_fn or _default_loss
    with _preserved_state(model, device):
        inputs, targets = _random_batch(batch_size, seq_len, vocab_size, device, seed)
        model.train()
        tracker.install()
        try:
            with counter, tracker, census:
                if compute_loss is not None:
                    # ops of the model's own forward body are 'other', as below
                    root = [model.register_forward_pre_hook(lambda m, a: tracker._enter_root()),
                            model.register_forward_hook(lambda m, a, o: tracker._stack.clear(),
                                                        always_call=True)]
                    try:
                        loss, _ = compute_loss(inputs, targets)
                    finally:
                        for h in root:
                            h.remove()
                    logits = aux = None
                else:
                    with autocast:
                        tracker._enter_root()
                        try:
                            logits = (model(inputs, return_features=True) if head is not None
                                      else model(inputs))
                        finally:
                            tracker._stack.clear()
                        if head is not None:
                            loss = head.nll(logits, targets) / targets.numel()
                    if head is None:
                        loss = loss_fn(logits, targets)
                    aux = model.auxiliary_loss() if hasattr(model, "auxiliary_loss") else None
                    if aux is not None:
                        loss = loss + aux
                forward_counts = _snapshot(counter.get_flop_counts())
                census.phase = "backward"
                loss.backward()
                all_counts = _snapshot(counter.get_flop_counts())
        finally:
            tracker.remove()
        del logits, loss, aux
    backward_counts = _subtract(all_counts, forward_counts)

    forward = sum(forward_counts.get("Global", {}).values())
    backward = sum(backward_counts.get("Global", {}).values())
    fwd_comp, notes_f = _attribute(census, "forward", forward, components)
    bwd_comp, notes_b = _attribute(census, "backward", backward, components)
    notes_f += [f"formula error: {e}" for e in census.errors[:5]]

    opt_name = _optimizer_name(optimizer)
    params = _optimized_params(model, optimizer)
    num_params = sum(p.numel() for p, _ in params)
    num_decayed = sum(p.numel() for p, decays in params if decays)
    per_param_plain = OPTIMIZER_FLOPS_PER_PARAM[opt_name] + (
        GRAD_CLIP_FLOPS_PER_PARAM if grad_clip else 0)
    per_param = per_param_plain + WEIGHT_DECAY_FLOPS_PER_PARAM[opt_name]
    opt_total = optimizer_flops(num_params, opt_name, grad_clip=grad_clip, decayed=num_decayed)
    opt_by_comp: dict[str, int] = defaultdict(int)
    decays_of = {id(p): decays for p, decays in params}
    for name, p in model.named_parameters():
        if id(p) in decays_of:
            comp = model.component_of(name) if hasattr(model, "component_of") else "other"
            opt_by_comp[comp] += p.numel() * (per_param if decays_of[id(p)] else per_param_plain)
    explanation = _OPTIMIZER_WHY if opt_name == "adamw" else (
        f"{opt_name}: {OPTIMIZER_FLOPS_PER_PARAM[opt_name]} per parameter element per step, "
        f"{WEIGHT_DECAY_FLOPS_PER_PARAM[opt_name]} more where weight decay is on"
        + (f", plus {GRAD_CLIP_FLOPS_PER_PARAM} for gradient clipping" if grad_clip else ""))

    unc_f = {k: int(v) for k, v in sorted(census.flops["forward"].items())}
    unc_b = {k: int(v) for k, v in sorted(census.flops["backward"].items())}
    unc_total = sum(unc_f.values()) + sum(unc_b.values())
    counted = forward + backward
    uncounted = {
        "forward": unc_f, "backward": unc_b,
        "forward_total": sum(unc_f.values()), "backward_total": sum(unc_b.values()),
        "total": unc_total,
        "fraction_of_counted": (unc_total / counted) if counted else None,
        "top_ops": dict(Counter(census.ops["forward"] + census.ops["backward"]).most_common(12)),
        "unknown_ops_charged_1_per_element": sorted(census.unknown),
        "explanation": UNCOUNTED_EXPLANATION,
    }

    analytic = analytic_flops_for(model, batch_size, seq_len, vocab_size)
    if analytic is not None:
        analytic = dict(analytic)
        analytic["forward_rel_diff"] = _rel_diff(forward, analytic["forward"])
        analytic["backward_rel_diff"] = _rel_diff(backward, analytic["backward"])

    variation = _routing_variation(model, batch_size, seq_len, forward, backward)
    varies = variation is not None or bool(getattr(model, "flops_vary_per_step", False))
    notes = notes_f + notes_b
    if variation is not None:
        notes.append(variation["explanation"])
    elif varies:
        notes.append("this model's compute varies per step (data-dependent routing or halting); "
                     "the per-step figure is one sample")
    forward_by_op, backward_by_op = _by_op(forward_counts), _by_op(backward_counts)
    sources = {"forward": _split_by_source(forward_by_op),
               "backward": _split_by_source(backward_by_op),
               "optimizer": {"counted": 0, "formula": opt_total}}
    return FlopReport(
        batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
        forward=forward, backward=backward, optimizer=opt_total,
        total=forward + backward + opt_total,
        forward_by_component=fwd_comp, backward_by_component=bwd_comp,
        optimizer_by_component=dict(opt_by_comp),
        forward_by_op=forward_by_op, backward_by_op=backward_by_op,
        num_parameters=num_params, optimizer_name=opt_name,
        optimizer_flops_per_parameter=per_param, optimizer_explanation=explanation,
        decayed_parameters=num_decayed,
        optimizer_flops_per_parameter_without_decay=per_param_plain, sources=sources,
        uncounted=uncounted, analytic=analytic, varies_per_step=varies,
        per_step_range=variation, notes=notes)


def measure_forward_flops(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int, *,
                          device: str | torch.device = "cpu", seed: int = 0,
                          windows: torch.Tensor | None = None) -> dict[str, Any]:
    """Counted FLOPs of one evaluation forward (eval mode, no gradient) with the loss.

    ``windows``: (batch_size, seq_len + 1) token ids to run (inputs and their next tokens),
    e.g. held-out text for a model whose work depends on its input (early exit, routing);
    default: seeded random tokens. Pass the model as it is evaluated (the flags'
    ``prepare_for_eval``), so that its exits or integer layers are what is counted.

    Returns ``{"forward", "per_token", "by_component", "tokens", "sources"}`` (sources: the
    counted/formula split of ``forward``); multiply ``per_token`` by an eval
    split's token count for its evaluation FLOPs.
    """
    device = torch.device(device)
    counter = new_counter()
    tracker = _ComponentTracker(model)
    census = _Census(counter.flop_registry, tracker)
    with _preserved_state(model, device):
        if windows is None:
            inputs, targets = _random_batch(batch_size, seq_len, vocab_size, device, seed)
        else:
            if windows.shape != (batch_size, seq_len + 1):
                raise ValueError(f"windows of shape {tuple(windows.shape)} do not fit batch "
                                 f"{batch_size} x seq_len {seq_len} (expected "
                                 f"{(batch_size, seq_len + 1)})")
            inputs, targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
        model.eval()
        tracker.install()
        try:
            with torch.no_grad(), counter, census:
                head = fused_head(model)
                tracker._enter_root()
                try:
                    out = model(inputs, return_features=True) if head is not None else model(inputs)
                finally:
                    tracker._stack.clear()
                if head is not None:   # as evaluate() does
                    head.nll(out, targets, reduction="none")
                else:
                    F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1))
        finally:
            tracker.remove()
        counts = _snapshot(counter.get_flop_counts())
    total = sum(counts.get("Global", {}).values())
    by_comp, _ = _attribute(census, "forward", total, _components(model))
    return {"forward": total, "per_token": total / (batch_size * seq_len),
            "by_component": by_comp, "tokens": batch_size * seq_len,
            "sources": _split_by_source(_by_op(counts))}


def flops_result_fields(report: FlopReport, steps: int, *,
                        eval_forward: dict[str, Any] | None = None,
                        eval_tokens: int | None = None) -> dict[str, Any]:
    """The ``BenchmarkResults`` cost fields for a run of ``steps`` optimizer steps.

    ``forward_flops``/``backward_flops``/``optimizer_flops`` are per training step;
    ``total_flops`` is the whole training (steps x per-step total; evaluation excluded);
    ``flops`` holds the full report, the training totals by component and, if given, the
    evaluation FLOPs (``eval_forward['per_token']`` x ``eval_tokens``).
    """
    detail = report.to_dict()
    detail["per_step"] = {"forward": report.forward, "backward": report.backward,
                          "optimizer": report.optimizer, "total": report.total}
    detail["training"] = report.training_totals(steps)
    detail["sources"] = {**report.sources,
                         "uncounted": {"counted": 0, "formula": int(report.uncounted.get("total", 0))},
                         "explanation": SOURCES_EXPLANATION}
    if eval_forward is not None and eval_tokens is not None:
        detail["evaluation"] = {"tokens": int(eval_tokens),
                                "per_token": eval_forward["per_token"],
                                "total": int(round(eval_forward["per_token"] * eval_tokens))}
        if "sources" in eval_forward:
            scale = eval_tokens / eval_forward["tokens"]
            detail["sources"]["evaluation"] = {k: int(round(v * scale))
                                               for k, v in eval_forward["sources"].items()}
    return {"forward_flops": report.forward, "backward_flops": report.backward,
            "optimizer_flops": report.optimizer, "total_flops": steps * report.total,
            "flops": detail}
