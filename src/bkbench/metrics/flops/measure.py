"""One training step's FLOPs (:func:`measure_step_flops`), one evaluation forward's
(:func:`measure_forward_flops`), and the results fields they fill."""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from ...eval import target_nll
from .analytic import analytic_flops_for, rel_diff, routing_variation
from .attribution import ComponentTracker, attribute, by_op, snapshot, split_by_source, subtract
from .counter import SOURCES_EXPLANATION, UNCOUNTED_EXPLANATION, Census, new_counter
from .optimizer import (ADAMW_EXPLANATION, GRAD_CLIP_FLOPS_PER_PARAM, OPTIMIZER_FLOPS_PER_PARAM,
                        WEIGHT_DECAY_FLOPS_PER_PARAM, optimized_params, optimizer_flops,
                        optimizer_name)

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


Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def plain_objective(model: nn.Module) -> Objective:
    """The objective of a training step without a trainer: the mean NLL of the targets
    (:func:`bkbench.eval.target_nll`, the function training uses: the LM head fused with the
    loss where the model allows) plus the model's ``auxiliary_loss()``. A trainer's
    ``compute_loss`` adds its flags' loss terms and autocast; pass that where there is one."""
    def compute_loss(inputs: torch.Tensor, targets: torch.Tensor):
        loss = target_nll(model, inputs, targets) / targets.numel()
        aux = model.auxiliary_loss() if hasattr(model, "auxiliary_loss") else None
        return (loss if aux is None else loss + aux), {}
    return compute_loss


def _count_step(model: nn.Module, compute_loss: Objective, inputs: torch.Tensor,
                targets: torch.Tensor) -> tuple[dict, dict, Census]:
    """Run one forward (``compute_loss``) and backward under the counter; return the forward
    and backward counts by op and the census (uncounted ops, counts by component)."""
    counter = new_counter()
    tracker = ComponentTracker(model)
    census = Census(counter.flop_registry, tracker)
    model.train()
    tracker.install()
    try:
        with counter, tracker, census:
            loss, _ = compute_loss(inputs, targets)
            forward_counts = snapshot(counter.get_flop_counts())
            census.phase = "backward"
            loss.backward()
            all_counts = snapshot(counter.get_flop_counts())
    finally:
        tracker.remove()
    return forward_counts, subtract(all_counts, forward_counts), census


def _optimizer_fields(model: nn.Module, optimizer: Any, grad_clip: bool) -> dict[str, Any]:
    """The optimizer's FLOPs per step by formula, in total and by component."""
    opt_name = optimizer_name(optimizer)
    params = optimized_params(model, optimizer)
    num_params = sum(p.numel() for p, _ in params)
    num_decayed = sum(p.numel() for p, decays in params if decays)
    per_param_plain = OPTIMIZER_FLOPS_PER_PARAM[opt_name] + (
        GRAD_CLIP_FLOPS_PER_PARAM if grad_clip else 0)
    per_param = per_param_plain + WEIGHT_DECAY_FLOPS_PER_PARAM[opt_name]
    opt_by_comp: dict[str, int] = defaultdict(int)
    decays_of = {id(p): decays for p, decays in params}
    for name, p in model.named_parameters():
        if id(p) in decays_of:
            comp = model.component_of(name) if hasattr(model, "component_of") else "other"
            opt_by_comp[comp] += p.numel() * (per_param if decays_of[id(p)] else per_param_plain)
    explanation = ADAMW_EXPLANATION if opt_name == "adamw" else (
        f"{opt_name}: {OPTIMIZER_FLOPS_PER_PARAM[opt_name]} per parameter element per step, "
        f"{WEIGHT_DECAY_FLOPS_PER_PARAM[opt_name]} more where weight decay is on"
        + (f", plus {GRAD_CLIP_FLOPS_PER_PARAM} for gradient clipping" if grad_clip else ""))
    return dict(optimizer=optimizer_flops(num_params, opt_name, grad_clip=grad_clip,
                                          decayed=num_decayed),
                optimizer_by_component=dict(opt_by_comp), num_parameters=num_params,
                optimizer_name=opt_name, optimizer_flops_per_parameter=per_param,
                optimizer_explanation=explanation, decayed_parameters=num_decayed,
                optimizer_flops_per_parameter_without_decay=per_param_plain)


def _uncounted(census: Census, counted: int) -> dict[str, Any]:
    unc_f = {k: int(v) for k, v in sorted(census.flops["forward"].items())}
    unc_b = {k: int(v) for k, v in sorted(census.flops["backward"].items())}
    unc_total = sum(unc_f.values()) + sum(unc_b.values())
    return {
        "forward": unc_f, "backward": unc_b,
        "forward_total": sum(unc_f.values()), "backward_total": sum(unc_b.values()),
        "total": unc_total,
        "fraction_of_counted": (unc_total / counted) if counted else None,
        "top_ops": dict(Counter(census.ops["forward"] + census.ops["backward"]).most_common(12)),
        "unknown_ops_charged_1_per_element": sorted(census.unknown),
        "explanation": UNCOUNTED_EXPLANATION,
    }


def measure_step_flops(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int, *,
                       device: str | torch.device = "cpu", optimizer: Any = None,
                       compute_loss: Objective | None = None, grad_clip: bool = True,
                       seed: int = 0) -> FlopReport:
    """Count the FLOPs of one real training step of ``model`` (see the package docstring).

    A random (batch_size, seq_len) token batch runs forward in train mode through
    ``compute_loss(inputs, targets) -> (loss, terms)`` and backward. Pass the trainer's own
    (``Trainer.compute_loss``), so that what is counted is the objective that trains, flags'
    loss terms and autocast included; without one, :func:`plain_objective`. ``optimizer`` (a
    torch optimizer, a name, or None for AdamW over the trainable parameters) is charged by
    formula, with gradient clipping when ``grad_clip``. The model's parameters, gradients,
    buffers, modes and the RNG state are left as they were; no optimizer step is taken.
    """
    device = torch.device(device)
    compute_loss = compute_loss or plain_objective(model)
    with _preserved_state(model, device):
        inputs, targets = _random_batch(batch_size, seq_len, vocab_size, device, seed)
        forward_counts, backward_counts, census = _count_step(model, compute_loss, inputs,
                                                              targets)
    forward = sum(forward_counts.get("Global", {}).values())
    backward = sum(backward_counts.get("Global", {}).values())
    components = _components(model)
    fwd_comp, notes_f = attribute(census, "forward", forward, components)
    bwd_comp, notes_b = attribute(census, "backward", backward, components)
    notes_f += [f"formula error: {e}" for e in census.errors[:5]]
    opt = _optimizer_fields(model, optimizer, grad_clip)

    analytic = analytic_flops_for(model, batch_size, seq_len, vocab_size)
    if analytic is not None:
        analytic = dict(analytic)
        analytic["forward_rel_diff"] = rel_diff(forward, analytic["forward"])
        analytic["backward_rel_diff"] = rel_diff(backward, analytic["backward"])
    variation = routing_variation(model, batch_size, seq_len, forward, backward)
    varies = variation is not None or bool(getattr(model, "flops_vary_per_step", False))
    notes = notes_f + notes_b
    if variation is not None:
        notes.append(variation["explanation"])
    elif varies:
        notes.append("this model's compute varies per step (data-dependent routing or halting); "
                     "the per-step figure is one sample")
    forward_by_op, backward_by_op = by_op(forward_counts), by_op(backward_counts)
    sources = {"forward": split_by_source(forward_by_op),
               "backward": split_by_source(backward_by_op),
               "optimizer": {"counted": 0, "formula": opt["optimizer"]}}
    return FlopReport(
        batch_size=batch_size, seq_len=seq_len, vocab_size=vocab_size,
        forward=forward, backward=backward, total=forward + backward + opt["optimizer"],
        forward_by_component=fwd_comp, backward_by_component=bwd_comp,
        forward_by_op=forward_by_op, backward_by_op=backward_by_op, sources=sources,
        uncounted=_uncounted(census, forward + backward), analytic=analytic,
        varies_per_step=varies, per_step_range=variation, notes=notes, **opt)


def _eval_batch(windows: torch.Tensor | None, batch_size: int, seq_len: int, vocab_size: int,
                device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if windows is None:
        return _random_batch(batch_size, seq_len, vocab_size, device, seed)
    if windows.shape != (batch_size, seq_len + 1):
        raise ValueError(f"windows of shape {tuple(windows.shape)} do not fit batch {batch_size} "
                         f"x seq_len {seq_len} (expected {(batch_size, seq_len + 1)})")
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


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
    tracker = ComponentTracker(model)
    census = Census(counter.flop_registry, tracker)
    with _preserved_state(model, device):
        inputs, targets = _eval_batch(windows, batch_size, seq_len, vocab_size, device, seed)
        model.eval()
        tracker.install()
        try:
            with torch.no_grad(), counter, census:
                target_nll(model, inputs, targets, reduction="none")   # as evaluate() does
        finally:
            tracker.remove()
        counts = snapshot(counter.get_flop_counts())
    total = sum(counts.get("Global", {}).values())
    by_comp, _ = attribute(census, "forward", total, _components(model))
    return {"forward": total, "per_token": total / (batch_size * seq_len),
            "by_component": by_comp, "tokens": batch_size * seq_len,
            "sources": split_by_source(by_op(counts))}


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