"""What a run will need, estimated before anything is allocated.

The model is built with its flags on the meta device (tensors with shapes and no memory) and
one training forward with the loss is traced there at the run's batch size (and at the
evaluation batch size, which is often larger): the parameters are counted, the largest tensor
any operation produces is noted, and the forward's FLOPs are counted. Every size-like setting
of every model and flag reaches one of these (a Koopman lifting of 10^8 dimensions in the
parameters, a GLA chunk of 10^6 tokens or an hourglass factor of 10^6 in the largest
activation), with no list of setting names to keep up to date.

Meta tensors hold no values, so operations whose output shape or result depends on values
(``nonzero``, ``bincount``, ``.item()``) are answered with a stand-in: every element nonzero,
``minlength`` bins, zero, and ``all()`` true, ``any()`` false (so that checks pass). The trace may therefore take a different branch than training
would; every size it records is one the model really produces for some input, so the
numbers are lower bounds: a refusal on them is never wrong. Should the trace still fail
part-way (an operation meta tensors do not support), what it saw until then is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


@dataclass
class SizeEstimate:
    parameters: int
    largest_tensor_bytes: int      # of a training forward and an evaluation one (lower bound)
    # counted FLOPs of one training forward's Linear layers, a lower bound of a training
    # step's; None when a stand-in may have added work (every element nonzero: e.g. no token
    # halted by ACT)
    forward_flops: int | None
    traced_to_the_end: bool        # False: the trace stopped part-way (values still lower bounds)


class _MetaTrace(TorchDispatchMode):
    """Notes the largest tensor made and stands in for value-dependent operations."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.took_every_element = False   # a nonzero() stand-in was used

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        stand_in = self._stand_in(func, args, kwargs)
        self.took_every_element |= func is aten.nonzero.default and stand_in is not None
        out = stand_in if stand_in is not None else func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        if func.overloadpacket in (aten.all, aten.any):
            # a forward's checks on values (`if not (eps > 0).all(): raise`) pass
            out._meta_value = func.overloadpacket is aten.all
        return out

    @staticmethod
    def _stand_in(func, args, kwargs):
        x = args[0] if args else None
        if not (isinstance(x, torch.Tensor) and x.is_meta):
            return None
        if func is aten._local_scalar_dense.default:        # .item(), bool(), .tolist()
            return getattr(x, "_meta_value", False if x.dtype == torch.bool else 0)
        if func is aten.nonzero.default:                     # every element nonzero
            return torch.empty((x.numel(), x.dim()), dtype=torch.long, device="meta")
        if func is aten._to_copy.default and kwargs.get("device", x.device).type != "meta" \
                and x.numel() <= 1 << 20:                    # .tolist(), .cpu(): small, zeros
            return torch.zeros(x.shape, dtype=kwargs.get("dtype") or x.dtype,
                               device=kwargs["device"])
        if func in (aten.fake_quantize_per_channel_affine_cachemask.default,
                    aten.fake_quantize_per_tensor_affine_cachemask.default):   # no meta kernel
            return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)
        if func is aten.bincount.default:
            bins = kwargs.get("minlength", args[2] if len(args) > 2 else 0)
            return torch.empty((bins,), dtype=torch.long, device="meta")
        return None


class _LinearFlops:
    """FLOPs of the Linear layers a forward runs (2 x rows x in x out each: what every device's
    FLOP counter counts for them). Other products are left out: attention or an LSTM may run
    as one fused kernel that one device's counter skips and another's meta decomposition
    counts, and a lower bound must hold for every device."""

    def __init__(self, model):
        self.flops = 0
        self.handles = [m.register_forward_hook(self._count) for m in model.modules()
                        if isinstance(getattr(m, "in_features", None), int)
                        and isinstance(getattr(m, "out_features", None), int)]

    def _count(self, module, inputs, _output) -> None:
        rows = inputs[0].numel() // module.in_features
        self.flops += 2 * rows * module.in_features * module.out_features

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(model, tokens) -> None:
    """The training forward up to the LM head's input for a model whose head runs fused with
    the loss (its chunked logits are smaller than the features' consumers), else its logits."""
    from .eval import fused_head
    if fused_head(model) is not None:
        model(tokens, return_features=True)
    else:
        model(tokens)


def estimate(config, vocab_size: int) -> SizeEstimate:
    """Parameters, largest activation and forward FLOPs of ``config``'s model with its flags,
    measured on the meta device."""
    from .flags import build_model

    # dropout draws its masks from a generator, which the meta device lacks; a mask has its
    # input's shape, so leaving it out changes no largest tensor
    config = dataclasses.replace(config, dropout=0.0)
    with torch.device("meta"):
        model, _flags = build_model(config, vocab_size)
    parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    trace, linear, complete, flops = _MetaTrace(), _LinearFlops(model), True, None
    train = torch.zeros(config.batch_size, config.n_seq, dtype=torch.long, device="meta")
    evaluation = torch.zeros(config.eval_batch_size, config.n_seq, dtype=torch.long,
                             device="meta")
    try:
        with trace:
            _forward(model.train(), train)
            flops = None if trace.took_every_element else linear.flops
            with torch.no_grad():
                _forward(model.eval(), evaluation)
    except Exception:  # noqa: BLE001 -- an op meta tensors lack: keep what was seen
        complete = False
    linear.remove()
    return SizeEstimate(parameters, trace.largest, flops, complete)
