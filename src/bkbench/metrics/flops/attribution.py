"""Attribution of counted FLOPs to the model's components, in the forward and the backward,
and the split of a phase's count into ``counted`` and ``formula`` FLOPs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

if TYPE_CHECKING:
    from .counter import Census


class ComponentTracker(TorchFunctionMode):
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
        # ops of the model's own forward body (outside any submodule) are 'other'; whatever
        # runs outside the model (the loss) is 'loss'
        self._handles.append(self._model.register_forward_pre_hook(
            lambda module, args: self.enter_root()))
        self._handles.append(self._model.register_forward_hook(
            lambda module, args, output: self.leave_root(), always_call=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._tags.clear()

    def enter_root(self) -> None:
        self._stack.append("")

    def leave_root(self) -> None:
        self._stack.clear()

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



def snapshot(counts: dict) -> dict[str, dict[str, int]]:
    return {k: {str(op): int(n) for op, n in v.items()} for k, v in counts.items()}


def subtract(after: dict, before: dict) -> dict[str, dict[str, int]]:
    out = {}
    for key, ops in after.items():
        prior = before.get(key, {})
        diff = {op: n - prior.get(op, 0) for op, n in ops.items()}
        diff = {op: n for op, n in diff.items() if n}
        if diff:
            out[key] = diff
    return out


def attribute(census: Census, phase: str, global_total: int,
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


def by_op(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    return dict(sorted(counts.get("Global", {}).items()))


def _is_formula_op(op: str) -> bool:
    # bkbench's own ops (the BK-Core and its FLOP marker) carry a hand-derived per-position
    # count; every other op the counter knows is a product counted from its shapes
    return op.startswith("bkbench.") or op.startswith("bkbench::")


def split_by_source(by_op: dict[str, int]) -> dict[str, int]:
    """{"counted": .., "formula": ..} of a phase's per-op counts (see the module docstring)."""
    formula = sum(n for op, n in by_op.items() if _is_formula_op(str(op)))
    return {"counted": sum(by_op.values()) - formula, "formula": formula}
