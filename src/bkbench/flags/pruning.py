"""``use_pruning``: gradual magnitude pruning, and removal of rarely used MoE experts.

What it does
    *Magnitude pruning.* The weight of every Linear layer inside the blocks (experts or MLP,
    attention projections; not the MoE gate or the small BK projections) and of the LM head
    (unless it is tied to the embedding) is masked with ``torch.nn.utils.prune`` (the mask is a
    buffer, ``weight = weight_orig * weight_mask``). Starting at step ``begin`` x total steps
    and every ``frequency`` steps until ``end`` x total steps, each layer's sparsity is raised
    along the cubic schedule ``s_t = s_f (1 - (1 - (t - t_0) / (t_end - t_0))^3)`` to the
    target ``s_f``; the mask zeroes the smallest |weight| of the (already masked) layer, so a
    pruned weight stays pruned.

    *Expert pruning (ResNet-BK).* Tokens routed to each expert are counted over the training
    steps before step ``expert_prune_at`` x total steps; there, every expert whose share of a
    layer's routed tokens is below ``expert_min_share`` is removed for real: its module leaves
    ``block.moe.experts``, its row leaves the gate (``block.moe.gate``), ``num_experts`` drops,
    and its parameters leave the optimizer. At least ``top_k`` experts stay in each layer
    (the most used). Validations before the removal are not used for model selection, since
    their models no longer exist; the best epoch is chosen among the pruned models.

Paper
    M. Zhu, S. Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model
    compression", arXiv:1710.01878 (2017); expert pruning by usage as in T. Chen et al.,
    "Task-specific expert pruning for sparse mixture-of-experts", arXiv:2206.00277 (2022).

Settings (``pruning_<field>``)
    ``target_sparsity``, ``begin``, ``end``, ``frequency``, ``expert_min_share``,
    ``expert_prune_at``.

Cost
    A top-k over each pruned weight at every schedule step. Unstructured sparsity saves no
    FLOPs and no time on dense kernels: the FLOP counter sees the same matrix products, and
    the weights are stored dense. Expert removal saves parameters, the removed experts'
    gate rows and their padding rows (routed work per token stays top_k experts); the record
    shows the forward FLOPs counted before and after it.

What it records
    Sparsity reached per layer and over all pruned layers; the schedule steps taken; experts
    removed per layer with the measured usage shares; parameters, model size and a counted
    forward's FLOPs before and after expert removal.

Causality
    Masks depend on weights only and are fixed within a forward; removing an expert changes
    which weights exist, not which positions any computation reads. Routing stays a function
    of each token's own state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from ..compression.pruning import (cubic_sparsity, moe_layers, prunable_layers,
                                   remove_experts)
from ..compression.quantization import stored_bytes
from ..hooks import Flag, RunContext
from ..metrics.flops import measure_forward_flops


@dataclass
class PruningSettings:
    target_sparsity: float = field(default=0.5, metadata={
        "help": "final fraction of zero weights in each pruned layer"})
    begin: float = field(default=0.0, metadata={
        "help": "start of the schedule, as a fraction of the training steps"})
    end: float = field(default=0.75, metadata={
        "help": "end of the schedule (target reached), as a fraction of the training steps"})
    frequency: int = field(default=10, metadata={"help": "steps between mask updates"})
    expert_min_share: float = field(default=0.05, metadata={
        "help": "remove MoE experts receiving less than this share of a layer's routed tokens "
                "(0: keep all)"})
    expert_prune_at: float = field(default=0.5, metadata={
        "help": "when experts are removed, as a fraction of the training steps"})

    def validate(self, config) -> None:
        if not 0 <= self.target_sparsity < 1:
            raise ValueError(f"pruning_target_sparsity must be in [0, 1), got {self.target_sparsity}")
        if not 0 <= self.begin < self.end <= 1:
            raise ValueError(f"need 0 <= pruning_begin < pruning_end <= 1, got {self.begin}, "
                             f"{self.end}")
        if self.frequency < 1:
            raise ValueError(f"pruning_frequency must be >= 1, got {self.frequency}")
        if not 0 <= self.expert_min_share < 1:
            raise ValueError(f"pruning_expert_min_share must be in [0, 1), got "
                             f"{self.expert_min_share}")
        if not 0 < self.expert_prune_at <= 1:
            raise ValueError(f"pruning_expert_prune_at must be in (0, 1], got {self.expert_prune_at}")


class Pruning(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        self.layers = prunable_layers(model)
        if not self.layers:
            raise ValueError("use_pruning: the model has no prunable Linear layer")
        for module in self.layers.values():
            prune.identity(module, "weight")
        self.sparsity = 0.0
        self.schedule: list[dict[str, float]] = []
        self.moe = moe_layers(model)
        self.usage = [torch.zeros(m.num_experts, dtype=torch.long) for m in self.moe]
        self.kept: list[list[int]] | None = None       # set once experts were removed
        self.expert_record: dict[str, Any] | None = None
        self.parameters_at_build = sum(p.numel() for p in model.parameters())
        self.bytes_at_build = stored_bytes(model)
        return model

    # --- magnitude pruning -------------------------------------------------------------------

    def set_sparsity(self, sparsity: float) -> None:
        for module in self.layers.values():
            amount = int(round(sparsity * module.weight_mask.numel()))
            with torch.no_grad():
                masked = module.weight_orig * module.weight_mask
                mask = prune.L1Unstructured(amount=amount).compute_mask(
                    masked, default_mask=torch.ones_like(module.weight_mask))
                module.weight_mask.copy_(mask)
        self.sparsity = sparsity

    def layer_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - m.weight_mask.count_nonzero().item() / m.weight_mask.numel()
                for name, m in self.layers.items()}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        # steps done including this one (the trainer's loop moves progress.step on after it)
        s, step, total = self.settings, run.progress.step + 1, run.total_steps
        t0, t_end = round(s.begin * total), max(1, round(s.end * total))
        if t0 < step and ((step - t0) % s.frequency == 0 or step >= t_end) \
                and self.sparsity < s.target_sparsity:
            target = cubic_sparsity(step, t0, t_end, s.target_sparsity)
            if target > self.sparsity:
                self.set_sparsity(target)
                self.schedule.append({"step": step, "sparsity": target})
        if self.moe and self.kept is None and s.expert_min_share > 0:
            for counts, moe in zip(self.usage, self.moe):
                counts += moe.last_counts.cpu()
            if step >= max(1, round(s.expert_prune_at * total)):
                self.prune_experts(run)

    # --- expert pruning ----------------------------------------------------------------------

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
        model, cfg = run.model, self.config
        vocab = model.lm_head.out_features
        shares = [(c.double() / max(1, int(c.sum()))).tolist() for c in self.usage]

        def size() -> dict[str, int]:
            flops = measure_forward_flops(model, cfg.batch_size, cfg.n_seq, vocab,
                                          device=run.device, seed=cfg.seed)["forward"]
            return {"parameters": sum(p.numel() for p in model.parameters()),
                    "bytes": stored_bytes(model), "forward_flops": flops}

        before = size()
        self.kept = self.choose_experts()
        self._apply_kept(model, run.optimizer)
        after = size()
        removed = sum(len(u) - len(k) for u, k in zip(self.usage, self.kept))
        self.expert_record = {"step": run.progress.step + 1, "usage_share_per_layer": shares,
                              "kept_per_layer": self.kept, "experts_removed": removed,
                              "before": before, "after": after}
        if removed:
            run.structure_changed(True)

    def _apply_kept(self, model: nn.Module, optimizer) -> None:
        for moe, keep in zip(self.moe, self.kept):
            if len(keep) < moe.num_experts:
                remove_experts(moe, keep, optimizer)
        self.layers = prunable_layers(model)   # the removed experts' layers are gone

    # --- results and checkpoints -------------------------------------------------------------

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        model = run.model
        per_layer = self.layer_sparsity()
        zeros = sum(per_layer[n] * m.weight_mask.numel() for n, m in self.layers.items())
        numel = sum(m.weight_mask.numel() for m in self.layers.values())
        out = {"sparsity_per_layer": per_layer, "sparsity_pruned_layers": zeros / numel,
               "target_sparsity": self.settings.target_sparsity, "schedule": self.schedule,
               "pruned_layers": len(self.layers),
               "parameters_at_build": self.parameters_at_build,
               "parameters_final": sum(p.numel() for p in model.parameters()),
               "nonzero_weights_of_pruned_layers": int(numel - zeros),
               "bytes_at_build": self.bytes_at_build, "bytes_final_dense": stored_bytes(model),
               "flops_note": "unstructured sparsity: dense kernels run every zero, so FLOPs and "
                             "time are unchanged by the masks; weights are stored dense (the "
                             "mask doubles their storage during training)"}
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
                "expert_record": self.expert_record}

    def load_state_dict(self, state, run: RunContext) -> None:
        self.sparsity, self.schedule = state["sparsity"], list(state["schedule"])
        self.usage = [c.clone() for c in state["usage"]]
        self.kept, self.expert_record = state["kept"], state["expert_record"]
        if self.kept is not None and any(len(k) < m.num_experts for k, m in zip(self.kept, self.moe)):
            self._apply_kept(run.model, run.optimizer)   # the optimizer has no state yet
            run.structure_changed(False)
