"""Per-token depth: tokens that stop computing before the last layer, for real.

Shared machinery of ``use_act`` (a token halts when its cumulative halting probability passes
1 - eps) and ``use_early_exit`` (at evaluation a token exits when its exit is confident). Both
are *depth policies*: objects on ``ResNetBKLM.depth_policies`` with three methods,

``begin(model, x)``                         before the first layer (x: (B, T, d) embeddings)
``after_layer(model, n, x, running)``       after layer n (0-based) with its output x; returns
                                            the (B*T,) bool mask of tokens that keep running
                                            (a policy only ever clears bits)
``finish(model, x)``                        the state given to the final LayerNorm

When a model has policies, :func:`run_depth` runs its stages (``models/layers/stages.py``)
with a :class:`TokenSkip`:

* the feed-forward (LayerNorm + MoE, the bulk of a layer's work) runs only on the running
  tokens: their rows are gathered (``index_select``), padded with zero rows to a multiple of
  ``ROW_MULTIPLE``, run through the MoE, and its output scattered back (``index_copy``). A
  stopped token costs the MoE nothing, and the FLOP counter and the clock see it.
* the BK mixer still runs on the whole sequence: the BK-Core is a recurrence along the chain of
  positions, and removing a stopped token from the chain would change every later token's
  resolvent (and make the chain depend on which tokens stopped). A stopped token stays a site
  of the chain with the potential of its last computed feed-forward output, i.e. its state is
  *copied forward* to the later layers' mixers.
* a stopped token's hidden state is frozen (not updated by the layer), so it reaches the final
  norm as it was when it stopped.

Why this stays causal bit for bit: which tokens run is decided per token from its own state
(the policies see row-wise functions of x only), and the gathered rows are padded to a multiple
of ``ROW_MULTIPLE`` so that the gate's and the experts' GEMMs see row counts from the regime
where a row's result does not depend on how many other rows there are (the reason of the MoE's
own padding, ``models/resnet_bk.py``); every other operation has a fixed shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Gathered rows are padded to a multiple of this (see the module docstring).
ROW_MULTIPLE = 16


def gather_rows(flat: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows padded with zeros to a multiple of ROW_MULTIPLE, number of real rows)."""
    rows = flat.index_select(0, index)
    real = rows.shape[0]
    pad = -real % ROW_MULTIPLE
    if pad:
        rows = F.pad(rows, (0, 0, 0, pad))
    return rows, real


class TokenSkip:
    """State of one forward through the layers: which tokens still run, and each token's last
    computed feed-forward output (the potential it keeps feeding to the mixers)."""

    def __init__(self, x: torch.Tensor):
        B, T, d = x.shape
        self.running = torch.ones(B * T, dtype=torch.bool, device=x.device)
        self.f_last: torch.Tensor | None = None
        self.rows_per_layer: list[int] = []      # real rows that entered each layer's MoE

    def run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        index = self.running.nonzero().squeeze(1)
        rows, real = gather_rows(x.reshape(B * T, d), index)
        f_rows = block.moe(block.ln(rows), real_rows=real).to(x.dtype)
        self.rows_per_layer.append(real)
        if self.f_last is None:   # first layer: every token runs it (policies start after it)
            base = x.new_zeros(B * T, d)
        else:
            base = self.f_last.reshape(B * T, d).to(x.dtype)
        f = base.index_copy(0, index, f_rows).view(B, T, d)
        self.f_last = f
        out = x + block.dropout(f + block.bk(f))
        # a stopped token's state is frozen: only running tokens take the layer's update
        return torch.where(self.running.view(B, T, 1), out, x)


def run_depth(model: nn.Module, x: torch.Tensor, policies: list) -> torch.Tensor:
    """The blocks of ``model`` (its ``stages``) on embeddings ``x`` under depth ``policies``;
    the state before the final norm. The policies see each block's output, in block order."""
    skip = TokenSkip(x)
    for policy in policies:
        policy.begin(model, x)
    for stage in model.stages:
        x = stage.run(model.blocks, x, skip)
        for n in stage.layers:
            running = skip.running
            for policy in policies:
                running = policy.after_layer(model, n, x, running)
            skip.running = running
    for policy in policies:
        x = policy.finish(model, x)
    model.last_rows_per_layer = list(skip.rows_per_layer)
    return x


def run_stack(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s blocks on embeddings ``x``, stage by stage: through :func:`run_depth` when
    it has depth policies, plainly (every token every block) when it has none."""
    if model.depth_policies:
        return run_depth(model, x, model.depth_policies)
    for stage in model.stages:
        x = stage.run(model.blocks, x)
    return x


__all__ = ["ROW_MULTIPLE", "TokenSkip", "run_depth", "run_stack", "gather_rows"]
