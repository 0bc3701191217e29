"""``use_pruning``: gradual pruning of the blocks' feed-forward weights, and removal of rarely
used MoE experts.

What it does
    The schedule: from step t0 to t_end the pruned share of each layer rises along the cubic
    schedule of Zhu & Gupta, ``s_t = s_f (1 - (1 - (t - t0) / (t_end - t0))^3)``, updated every
    ``frequency`` steps, to the target ``s_f``. t0 and t_end are counted *after the learning-rate
    warm-up* (``warmup_steps``): t0 = W + ``begin`` x (T - W), t_end = W + ``end`` x (T - W), so
    that no weight is judged by its magnitude before training has moved it away from its
    initialisation (pruning untrained weights removes what a random draw made small).

    ``structure = "hidden_units"`` (structured, the default): s_t is the share of hidden units
    removed from every feed-forward network of the blocks (each MoE expert's d -> 2d -> d,
    a Transformer's MLP). A unit's score is |its row of fc (and bias)| x |its column of proj|;
    the lowest-scored units leave for real: fc's rows, its bias entries and proj's columns are
    sliced into new, smaller Parameters (their Adam moments sliced alike), so the matrices
    shrink and the counted FLOPs, the parameters and the step time fall with them.

    ``structure = "weights"`` (unstructured): s_t is the share of zero weights in every Linear
    layer of the blocks (not the MoE gate, not the small BK projections), chosen by smallest
    |weight|. The keep-mask is folded into the weight after every optimizer step (the weight
    itself holds the zeros: no forward hook, no stored original, so the model stores what an
    unpruned one does); the masks themselves live in the flag's checkpoint state only.
    Dense kernels multiply the zeros: no FLOP or time saving (recorded as such).

    The LM head and the embedding are not pruned: at word vocabularies each of their rows is
    one token's whole representation (d = 64 weights), and the head feeds the fused loss as a
    plain Linear. ``include_head`` prunes an untied head's weights (``weights`` only).

    *Expert removal (ResNet-BK).* Tokens routed to each expert are counted over the training
    steps before step ``expert_prune_at`` x total steps; there, every expert whose share of a
    layer's routed tokens is below ``expert_min_share`` leaves ``block.moe.experts``, its row
    leaves the gate (new Parameters, DDP-safe), ``num_experts`` drops, and its parameters leave
    the optimizer. At least ``top_k`` experts stay in each layer (the most used). After any
    structural change the best epoch is chosen among the pruned models only.

Papers
    M. Zhu, S. Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
    compression", arXiv:1710.01878 (2017) (schedule, masks); H. Li et al., "Pruning filters for
    efficient ConvNets", ICLR 2017 (structured pruning by the norm of whole units); expert
    pruning by usage as in T. Chen et al., "Task-specific expert pruning for sparse
    mixture-of-experts", arXiv:2206.00277 (2022).

Settings (``pruning_<field>``)
    ``structure``, ``target_sparsity``, ``begin``, ``end``, ``frequency``, ``include_head``,
    ``expert_min_share``, ``expert_prune_at``, ``timing_repeats``.

Cost
    A sort of each pruned matrix (or its units' scores) at every schedule step; ``weights``
    also one elementwise product per pruned weight and step, and a boolean mask per weight in
    memory and in checkpoints. Routed work per token stays top_k experts after expert removal.

What it records
    The schedule steps taken; per layer the sparsity (``weights``) or hidden width
    (``hidden_units``); experts removed with the measured usage shares; and, against the same
    architecture built unpruned: parameters, stored bytes, counted forward FLOPs (one eval
    forward with the loss) and the median training-step time (forward + backward on held-out
    windows, interleaved with the unpruned model's by ``metrics.with_without``).

Causality
    Masks and unit choices depend on weights only and are fixed within a forward; removing a
    unit or an expert changes which weights exist, not which positions any computation reads.
    Routing stays a function of each token's own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..compression.pruning import (cubic_sparsity, feed_forward_pairs, fold_mask,
                                   keep_hidden_units, magnitude_mask, moe_layers,
                                   prunable_layers, prune_hidden_units, remove_experts)
from ..compression.quantization import stored_bytes
from ..eval import target_nll
from ..hooks import Flag, RunContext
from ..metrics.flops import measure_forward_flops
from ..metrics.with_without import clocked, interleaved_medians
from ..objectives.layer_states import held_out_windows
from ..seeding import seed_everything

STRUCTURES = ("hidden_units", "weights")


@dataclass
class PruningSettings:
    structure: str = field(default="hidden_units", metadata={
        "help": "'hidden_units': remove feed-forward hidden units (matrices shrink); "
                "'weights': zero single weights (masks folded into the weights)"})
    target_sparsity: float = field(default=0.75, metadata={
        "help": "final share of hidden units removed, or of zero weights, in each pruned layer"})
    begin: float = field(default=0.0, metadata={
        "help": "start of the schedule, as a fraction of the steps after the LR warm-up"})
    end: float = field(default=0.75, metadata={
        "help": "end of the schedule (target reached), as a fraction of the steps after the "
                "LR warm-up"})
    frequency: int = field(default=10, metadata={"help": "steps between schedule updates"})
    include_head: bool = field(default=False, metadata={
        "help": "also prune an untied LM head's weights (structure 'weights' only)"})
    expert_min_share: float = field(default=0.05, metadata={
        "help": "remove MoE experts receiving less than this share of a layer's routed tokens "
                "(0: keep all)"})
    expert_prune_at: float = field(default=0.5, metadata={
        "help": "when experts are removed, as a fraction of the training steps"})
    timing_repeats: int = field(default=3, metadata={
        "help": "interleaved training steps timed pruned and unpruned for the record"})

    def validate(self, config) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"pruning_structure must be one of {', '.join(STRUCTURES)}, got "
                             f"{self.structure!r}")
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"pruning_target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if not 0 <= self.begin < self.end <= 1:
            raise ValueError(f"need 0 <= pruning_begin < pruning_end <= 1, got {self.begin}, "
                             f"{self.end}")
        if self.frequency < 1:
            raise ValueError(f"pruning_frequency must be >= 1, got {self.frequency}")
        if self.include_head and self.structure != "weights":
            raise ValueError("pruning_include_head needs pruning_structure 'weights' (the head "
                             "has no hidden units)")
        if not 0 <= self.expert_min_share < 1:
            raise ValueError(f"pruning_expert_min_share must be in [0, 1), got "
                             f"{self.expert_min_share}")
        if not 0 < self.expert_prune_at <= 1:
            raise ValueError(f"pruning_expert_prune_at must be in (0, 1], got {self.expert_prune_at}")
        if self.timing_repeats < 1:
            raise ValueError(f"pruning_timing_repeats must be >= 1, got {self.timing_repeats}")


class Pruning(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.structured = self.settings.structure == "hidden_units"
        units = feed_forward_pairs(model)
        self.widths = {name: f.fc.out_features for name, f in units.items()}
        self.full_width = dict(self.widths)
        self.layers = prunable_layers(model, self.settings.include_head)
        if not (units if self.structured else self.layers):
            raise ValueError(f"use_pruning: the model has nothing to prune by "
                             f"{self.settings.structure}")
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0
        self.schedule: list[dict[str, float]] = []
        self.moe = moe_layers(model)
        self.usage = [torch.zeros(m.num_experts, dtype=torch.long) for m in self.moe]
        self.kept: list[list[int]] | None = None       # set once experts were removed
        self.expert_record: dict[str, Any] | None = None
        return model

    # --- the schedule ------------------------------------------------------------------------

    def window(self, total: int) -> tuple[int, int]:
        """(t0, t_end) in optimizer steps: the schedule's span after the LR warm-up."""
        s = self.settings
        warm = min(self.config.warmup_steps, total - 1)
        t0 = warm + round(s.begin * (total - warm))
        return t0, max(t0 + 1, warm + round(s.end * (total - warm)))

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        # steps done including this one (the trainer's loop moves progress.step on after it)
        s, step = self.settings, run.progress.step + 1
        t0, t_end = self.window(run.total_steps)
        if t0 < step and ((step - t0) % s.frequency == 0 or step >= t_end) \
                and self.sparsity < s.target_sparsity:
            target = cubic_sparsity(step, t0, t_end, s.target_sparsity)
            if target > self.sparsity:
                self.set_sparsity(run, target)
                self.schedule.append({"step": step, "sparsity": target})
        for name, mask in self.masks.items():   # the optimizer step moved pruned weights
            fold_mask(self.layers[name], mask)
        if self.moe and self.kept is None and s.expert_min_share > 0:
            for counts, moe in zip(self.usage, self.moe):
                counts += moe.last_counts.cpu()
            if step >= max(1, round(s.expert_prune_at * run.total_steps)):
                self.prune_experts(run)

    def set_sparsity(self, run: RunContext, sparsity: float) -> None:
        self.sparsity = sparsity
        if not self.structured:
            self.masks = {name: magnitude_mask(m.weight, sparsity) for name, m in self.layers.items()}
            return
        changed = False
        for name, ffn in feed_forward_pairs(run.model).items():
            width = self.full_width[name] - int(round(sparsity * self.full_width[name]))
            if width < self.widths[name]:
                prune_hidden_units(ffn, width, run.optimizer)
                self.widths[name] = width
                changed = True
        if changed:
            run.structure_changed(True)

    # --- expert removal ----------------------------------------------------------------------

    def choose_experts(self) -> list[list[int]]:
        kept = []
        for counts, moe in zip(self.usage, self.moe):
            share = counts.double() / max(1, int(counts.sum()))
            keep = [e for e in range(len(counts)) if share[e] >= self.settings.expert_min_share]
            if len(keep) < moe.top_k:  # the most used, enough for top_k routing
                keep = sorted(torch.argsort(counts, descending=True, stable=True)[:moe.top_k].tolist())
            kept.append(keep)
        return kept

    def prune_experts(self, run: RunContext) -> None:
        if run.distributed:
            for counts in self.usage:
                c = counts.to(run.device)
                torch.distributed.all_reduce(c)
                counts.copy_(c.cpu())
        model = run.model
        shares = [(c.double() / max(1, int(c.sum()))).tolist() for c in self.usage]
        before = self.size_and_flops(model, run.device)
        self.kept = self.choose_experts()
        self._apply_kept(model, run.optimizer)
        after = self.size_and_flops(model, run.device)
        removed = sum(len(u) - len(k) for u, k in zip(self.usage, self.kept))
        self.expert_record = {"step": run.progress.step + 1, "usage_share_per_layer": shares,
                              "kept_per_layer": self.kept, "experts_removed": removed,
                              "before": before, "after": after}
        if removed:
            run.structure_changed(True)

    def _apply_kept(self, model: nn.Module, optimizer) -> None:
        name_of = {id(m): n for n, m in self.layers.items()}
        old_units = {id(m): n for n, m in feed_forward_pairs(model).items()}
        for moe, keep in zip(self.moe, self.kept):
            if len(keep) < moe.num_experts:
                remove_experts(moe, keep, optimizer)
        # the kept experts are renumbered: carry their masks and widths to the new names
        self.layers = prunable_layers(model, self.settings.include_head)
        self.masks = {n: self.masks[name_of[id(m)]] for n, m in self.layers.items()
                      if name_of.get(id(m)) in self.masks}
        units = feed_forward_pairs(model)
        for table in (self.widths, self.full_width):
            kept = {n: table[old_units[id(f)]] for n, f in units.items()}
            table.clear()
            table.update(kept)

    # --- measurements ------------------------------------------------------------------------

    def size_and_flops(self, model: nn.Module, device) -> dict[str, Any]:
        cfg = self.config
        flops = measure_forward_flops(model, cfg.batch_size, cfg.n_seq, model.lm_head.out_features,
                                      device=device, seed=cfg.seed)
        return {"parameters": sum(p.numel() for p in model.parameters()),
                "bytes": stored_bytes(model), "forward_flops": flops["forward"],
                "feed_forward_flops": flops["by_component"].get("feed_forward")}

    def unpruned_model(self, run: RunContext) -> nn.Module:
        """The same architecture built afresh, before any pruning (the 'without')."""
        rng = torch.get_rng_state()
        seed_everything(self.config.seed)
        model, _ = run.build_model()
        torch.set_rng_state(rng)
        return model.to(run.device)

    def step_seconds(self, run: RunContext, pruned: nn.Module, unpruned: nn.Module) -> dict:
        windows = held_out_windows(run.data.valid, self.config.n_seq + 1,
                                   self.config.batch_size).to(run.device)
        inputs, targets = windows[:, :-1], windows[:, 1:]

        def train_step(model: nn.Module):
            def call() -> None:
                model.train()
                with run.autocast():
                    target_nll(model, inputs, targets).backward()
                model.zero_grad(set_to_none=True)
            return clocked(call, run.device)

        was = pruned.training
        try:
            seconds = interleaved_medians(train_step(pruned), train_step(unpruned),
                                          self.settings.timing_repeats)
        finally:
            pruned.train(was)
        return {"pruned_ms": seconds["with"] * 1e3, "unpruned_ms": seconds["without"] * 1e3,
                "ratio": seconds["ratio"],
                "how": f"forward + backward of {len(windows)} held-out windows on "
                       f"{run.device.type}; {seconds['how']}"}

    # --- results and checkpoints -------------------------------------------------------------

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        model = run.model
        unpruned = self.unpruned_model(run)
        after, before = self.size_and_flops(model, run.device), self.size_and_flops(unpruned, run.device)
        out = {"structure": self.settings.structure, "target_sparsity": self.settings.target_sparsity,
               "schedule_window": dict(zip(("t0", "t_end"), self.window(run.total_steps))),
               "schedule": self.schedule, "unpruned": before, "pruned": after,
               "parameters_ratio": after["parameters"] / before["parameters"],
               "forward_flops_ratio": after["forward_flops"] / before["forward_flops"],
               "training_step": self.step_seconds(run, model, unpruned)}
        if self.structured:
            out["hidden_width_per_network"] = dict(self.widths)
            out["hidden_units_kept"] = sum(self.widths.values()) / sum(self.full_width.values())
        else:
            numel = sum(m.weight.numel() for m in self.layers.values())
            zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
            out["sparsity_per_layer"] = {n: float((m.weight == 0).float().mean())
                                         for n, m in self.layers.items()}
            out["sparsity_pruned_layers"] = zeros / numel
            out["flops_note"] = ("unstructured zeros: dense kernels multiply them, so FLOPs and "
                                 "time are not saved; weights are stored dense, masks not at all")
        if not self.moe:
            out["experts"] = "no MoE layers in this architecture: no experts to remove"
        elif self.settings.expert_min_share == 0:
            out["experts"] = "expert pruning off (pruning_expert_min_share = 0)"
        else:
            out["experts"] = self.expert_record or "training ended before expert_prune_at"
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "schedule": list(self.schedule),
                "usage": [c.clone() for c in self.usage], "kept": self.kept,
                "expert_record": self.expert_record, "widths": dict(self.widths),
                "masks": {n: m.cpu().clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state, run: RunContext) -> None:
        """Rebuilds the pruned structure before the trainer loads the weights into it."""
        self.sparsity, self.schedule = state["sparsity"], list(state["schedule"])
        self.usage = [c.clone() for c in state["usage"]]
        self.kept, self.expert_record = state["kept"], state["expert_record"]
        changed = False
        if self.kept is not None and any(len(k) < m.num_experts for k, m in zip(self.kept, self.moe)):
            self._apply_kept(run.model, run.optimizer)   # the optimizer has no state yet
            changed = True
        for name, ffn in feed_forward_pairs(run.model).items():
            width = state["widths"][name]
            if width < ffn.fc.out_features:   # which units: the weights loaded next say
                keep_hidden_units(ffn, torch.arange(width), run.optimizer)
                changed = True
        self.widths = dict(state["widths"])
        self.masks = {n: m.to(run.device) for n, m in state["masks"].items()}
        if changed:
            run.structure_changed(False)
