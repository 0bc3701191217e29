"""``use_multi_scale``: a causal hourglass - the middle layers run on N/k positions.

What it does
    The ResNet-BK stack of L blocks is run as an hourglass (Nawrot et al.): the first
    ``outer_layers`` and the last ``outer_layers`` blocks run at full resolution; the blocks
    between them (the middle) run on a sequence shortened by the factor k::

        s       = shift_right(x, k - 1)            # k - 1 zero vectors in front
        short_j = mean(s[j*k .. j*k + k - 1])      # average pool by k: ceil(N/k) positions
        short   = middle_blocks(short)
        x       = x + repeat_interleave(short, k)[:N]   # upsample, residual from before

    Every middle block is an ordinary ResNet-BK block (MoE feed-forward, BK-Core mixer); it
    just sees ceil(N/k) positions, so its experts, its potential projection and its BK chain
    do 1/k of the work. N need not be divisible by k: thanks to the shift, the first
    ceil(N/k)*k positions of the shifted sequence always exist (ceil(N/k)*k <= N + k - 1), so
    no group is padded, and the upsampled tail beyond N is cut off.

Paper
    P. Nawrot, S. Tworkowski, M. Tyrolski, L. Kaiser, Y. Wu, C. Szegedy, H. Michalewski,
    "Hierarchical Transformers Are More Efficient Language Models", Findings of NAACL 2022
    (arXiv:2110.13711, 2021): shortening by shift + pooling, upsampling with a residual.

Settings (``multi_scale_<field>``)
    ``factor`` (k, default 2), ``outer_layers`` (full-resolution blocks at each end, default
    1; the model needs n_layers >= 2 * outer_layers + 1, i.e. at least one middle block),
    ``timing_repeats`` (forwards timed with and without for the record).

Cost
    No parameters. The middle blocks' matrix products and BK-Core positions drop by k; the
    pooling and the upsampling are element-wise (not counted by the FLOP counter, as no
    element-wise op is). With the default L = 4, k = 2 half of the blocks run at half length,
    so the blocks' work drops by about a quarter; the embedding and the LM head (at a 33k
    vocabulary nearly all FLOPs) are unchanged.

What it records
    Positions each block runs on; counted forward FLOPs (and the mixer and feed-forward
    components) with and without the hourglass, the same weights both ways; eval-forward
    time with and without.

With other flags
    The blocks keep their names and weights (the hourglass is a shortened stage of
    ``ResNetBKLM.stages``, which owns no parameters), so per-block flags apply as usual; the
    layer-to-layer objectives (use_koopman, use_physics_informed) read a middle block's state
    at full resolution, each pooled state standing for the k positions it is upsampled to. With use_sparse_bk the
    middle blocks route among their N/k positions. Each flag's "without" measurement switches
    off that flag only.

Causality
    After upsampling, position t reads pooled group j = floor(t/k), and with the shift that
    group is the mean of tokens j*k - k + 1 .. j*k, all <= t. The middle blocks are causal
    over groups (group j sees groups <= j). Without the shift, group j would hold tokens
    j*k .. j*k + k - 1, and position j*k would see k - 1 later tokens: the audit catches that
    (tests/test_multiscale_sparse.py runs it); a shift of k - 1 is the least that is causal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from ..hooks import Flag, RunContext
from ..metrics.with_without import forward_with_and_without
from ..models.layers.hourglass import ShortenedStage, apply_hourglass, without_hourglass
from ..models.layers.stages import positions_per_block
from ..objectives.layer_states import held_out_windows


@dataclass
class MultiScaleSettings:
    factor: int = field(default=4, metadata={
        "help": "shortening factor k of the middle blocks (they run on ceil(N/k) positions)"})
    outer_layers: int = field(default=1, metadata={
        "help": "blocks at full resolution at each end (needs n_layers >= 2 * this + 1)"})
    timing_repeats: int = field(default=3, metadata={
        "help": "eval forwards timed with and without the hourglass for the record"})

    def validate(self, config) -> None:
        if self.factor < 2:
            raise ValueError(f"multi_scale_factor must be >= 2, got {self.factor}")
        if self.outer_layers < 0:
            raise ValueError(f"multi_scale_outer_layers must be >= 0, got {self.outer_layers}")
        if config.n_layers < 2 * self.outer_layers + 1:
            raise ValueError(f"needs n_layers >= 2 * multi_scale_outer_layers + 1 = "
                             f"{2 * self.outer_layers + 1} (at least one middle block), "
                             f"got n_layers={config.n_layers}")
        if self.timing_repeats < 1:
            raise ValueError(f"multi_scale_timing_repeats must be >= 1, got {self.timing_repeats}")


class MultiScale(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        apply_hourglass(model, self.settings.factor, self.settings.outer_layers)
        return model

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        model, cfg = run.model, self.config
        middle = next(s for s in model.stages if isinstance(s, ShortenedStage))
        batch = max(1, cfg.batch_size // run.world)
        windows = held_out_windows(run.data.valid, cfg.n_seq, batch).to(run.device)
        measured = forward_with_and_without(model, lambda: without_hourglass(model), windows,
                                            batch, self.settings.timing_repeats, seed=cfg.seed)
        return {"positions_per_block": positions_per_block(model.stages, cfg.n_seq),
                "middle_blocks": list(middle.layers), "shift": middle.shift, **measured}
