"""``use_sparse_bk``: Mixture-of-Depths routing of the ResNet-BK block - tokens skip a block for real.

What it does
    Each ResNet-BK block gets a router, a Linear(d, 1) on the block's normalized input
    h_t = LN(x_t): the token runs the block when its gate p_t = sigmoid(router(h_t)) exceeds
    1/2 (the logit is > 0), decided from its own state alone. The routed tokens' rows of h are
    gathered (padded with zero rows to a multiple of 16, as ``models/layers/depth.py`` does),
    the MoE feed-forward runs on them only, f = MoE(h); per sequence the routed tokens form, in
    their order, a shorter chain on which the BK mixer runs (potential projection, BK-Core,
    feature projection). A routed token's new state is x_t + p_t * (f_t + BK(f)_t) (the gate
    makes the task loss train the router); an unrouted token keeps x_t (the residual alone): it
    costs the block neither the MoE nor a site of the chain. Sequences of a batch route
    different numbers of tokens; the chains are padded at their END to the longest one
    (rounded up so that the rows of the batch are a multiple of 16, see Causality), and the
    padding sites are never read.

    With ``sparse_bk_scope = mixer`` the router instead sits on the BK mixer and reads the
    token's feed-forward output f_t: every token runs the MoE, and only the chain is routed (an
    unrouted token's block update is f_t alone). The mixer is about 1% of a block's work at the
    default preset (its own record: forward FLOPs with/without 0.99999), so this scope saves
    next to nothing; it stays as the ablation that shows why routing must cover the MoE.

    An auxiliary loss keeps the routed share near ``target_share``::

        sparse_bk = weight * mean over layers of (share_l - target_share)^2

    where share_l is the fraction of routed tokens of layer l in the global batch, made
    differentiable by the straight-through estimator (its value is the hard share, its
    gradient that of the mean gate probability). Under DDP the ranks' routed counts are
    summed (one all-reduce per step), so 2 ranks minimise the loss one process does.

Paper
    Mixture-of-Depths (D. Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in
    transformer-based language models", arXiv:2404.02258, 2024): a router per block, routed
    tokens run the block scaled by their router weight, the others take the residual path, and
    the mixer (their attention, our BK chain) sees the routed tokens only. We threshold each
    token's own logit instead of their top-k over the sequence, which would let a token's
    routing depend on later tokens (their fix is a second, causal predictor); the share loss
    that replaces their fixed capacity follows the capacity losses of conditional computation
    (E. Bengio et al., "Conditional Computation in Neural Networks for faster models", 2015).

Settings (``sparse_bk_<field>``)
    ``scope`` (``block``: route the whole block; ``mixer``: the BK chain only),
    ``target_share`` (wanted fraction of routed tokens), ``weight`` (of the share loss),
    ``record_windows`` (held-out windows for the recorded share), ``timing_repeats``.

Cost
    Scope block: per token and layer a LayerNorm (O(d), on every token: the router reads it)
    and the router (2d FLOPs, counted under the ``other`` component); the MoE gate and experts
    (about 8d^2 + 2dE at top-1) and the mixer (2dK + 10K + 4Kd per site) run on the routed
    share s only, plus padding (the gathered rows and each expert's rows to multiples of 16,
    the chains' ends to the longest chain), so the block's counted feed-forward and mixer
    FLOPs fall to about s of the plain block's (the tests check exactly s where no padding
    arises). The gathers are index copies (not counted); the LM head, most of the
    cost at word vocabularies, is unchanged. Each routed layer reads its per-sequence routed
    counts to the host once (``counts.tolist()``): the gathered row count and chain length
    are tensor shapes, which the host must know to allocate them. That is one device
    synchronization per layer on an accelerator (free on the CPU); every index map is then
    built on the device, with no ``nonzero``. Avoiding it would need a fixed capacity, i.e.
    shapes that no longer follow the routing.

What it records
    The scope; routed share per layer, during training (mean over steps) and on held-out text;
    the chains' mean routed length and padded length per layer; the share loss per epoch; the
    counted forward FLOPs with and without routing on held-out windows (total, mixer and
    feed_forward components; the same weights both ways); eval-forward time with and without.

With other flags
    The router is a float Linear set after use_quantization has fake-quantized the block's
    Linears (d + 1 parameters per layer); the MoE and the mixer are the block's own modules,
    called as modules, so use_analytic_gradient and use_mixed_precision act on them as in the
    plain block (under mixed precision the mixer on the chain runs in float32, its island).
    With per-token depth policies (use_act, use_early_exit) a token runs a block only while
    it both runs (has not halted or exited) and is routed; a stopped token is never routed.
    use_multi_scale's shortened middle blocks route their pooled positions.

Causality
    Routing is a function of each token's own state, so the rows and the chain of routed
    tokens up to t depend only on tokens <= t, and the causal BK recurrence reads the sites
    before a site only: the padding at the end of each chain cannot reach a real site. The
    number of routed tokens of the batch depends on every token (later ones included); what
    must not depend on it are the bits of a token's result. The BK-Core computes each row
    sequentially, whatever its length; the MoE's rows are padded to a multiple of 16 and the
    mixer's projections run on (batch x padded length) rows, kept a multiple of 16, so that
    CPU matrix kernels stay in the regime where a row's result does not depend on the row
    count (as the MoE experts' padding, ``models/resnet_bk.py``). The audit checks it bit for
    bit in train and eval mode. The bidirectional core is refused: there the end padding
    would reach back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..hooks import Flag, RunContext
from ..metrics.with_without import forward_with_and_without
from ..models.layers.sparse_bk import (SCOPES, add_routers, chain_routers, dense_mixers,
                                       layer_stats)
from ..models.resnet_bk import BKMixer
from ..objectives.layer_states import held_out_windows
from .meter import EpochMeter


@dataclass
class SparseBKSettings:
    scope: str = field(default="block", metadata={
        "help": "'block': route the whole block (MoE and BK mixer, Mixture-of-Depths); "
                "'mixer': route the BK chain only (every token runs the MoE)"})
    target_share: float = field(default=0.25, metadata={
        "help": "wanted fraction of tokens routed into the BK chain, in (0, 1]"})
    weight: float = field(default=0.1, metadata={
        "help": "weight of the share loss (share - target_share)^2 (0: no loss)"})
    record_windows: int = field(default=16, metadata={
        "help": "held-out validation windows for the recorded routed share"})
    timing_repeats: int = field(default=3, metadata={
        "help": "eval forwards timed with and without routing for the record"})

    def validate(self, config) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"sparse_bk_scope must be one of {', '.join(SCOPES)}, got "
                             f"{self.scope!r}")
        if not 0 < self.target_share <= 1:
            raise ValueError(f"sparse_bk_target_share must be in (0, 1], got {self.target_share}")
        if not self.weight >= 0:
            raise ValueError(f"sparse_bk_weight must be >= 0, got {self.weight}")
        if self.record_windows < 1 or self.timing_repeats < 1:
            raise ValueError("sparse_bk_record_windows and sparse_bk_timing_repeats must be >= 1")
        if getattr(config, "bk_mode", "causal") != "causal":
            raise ValueError("needs bk_mode='causal' (a bidirectional chain would read its "
                             "end padding)")


def global_shares(routed: list[torch.Tensor]) -> torch.Tensor:
    """(layers,) share of the global batch's positions routed in each layer, from this rank's
    (B, T) routing per layer. Under DDP the value is the global batch's share (the ranks' sums
    and counts all-reduced) and the gradient this rank's part of it, world x its sum / the
    global count, which DDP's average of the ranks' gradients turns into the global share's:
    (share - target)^2 of each rank's own share is not the global batch's loss."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return torch.stack([r.mean() for r in routed])
    sums = torch.stack([r.sum() for r in routed])
    counts = torch.tensor([r.numel() for r in routed], dtype=sums.dtype, device=sums.device)
    totals = torch.stack([sums.detach(), counts])    # a layer's count: multi-scale halves it
    dist.all_reduce(totals)
    part = sums * (dist.get_world_size() / totals[1])
    return part + (totals[0] / totals[1] - part).detach()


class SparseBK(Flag):
    def wrap_model(self, model: nn.Module) -> nn.Module:
        blocks = getattr(model, "blocks", None)
        if blocks is None or not all(isinstance(getattr(b, "bk", None), BKMixer) for b in blocks):
            raise ValueError("use_sparse_bk needs a ResNet-BK model (a BK mixer in every block)")
        add_routers(model, self.settings.scope)
        model.flops_vary_per_step = True     # the routed rows and chains follow the routing
        layers = len(blocks)
        self.meter = EpochMeter(term=0.0, share_per_layer=[0.0] * layers)
        # over the whole run, never closed: the record's training means
        self.total = EpochMeter(share=[0.0] * layers, routed_length=[0.0] * layers,
                                padded_length=[0.0] * layers)
        return model

    def loss_terms(self, model, inputs, targets, step):
        # straight-through: the hard routing's value, the gate probability's gradient
        routed = [r.last_routed.to(r.last_gate.dtype) + r.last_gate - r.last_gate.detach()
                  for r in chain_routers(model)]
        shares = global_shares(routed)
        return {"sparse_bk": self.settings.weight
                * ((shares - self.settings.target_share) ** 2).mean()}

    def after_optimizer_step(self, run: RunContext, terms) -> None:
        stats = layer_stats(chain_routers(run.model))
        share = [s["share"] for s in stats]
        self.meter.add(term=terms["sparse_bk"].item(), share_per_layer=share)
        self.total.add(share=share, routed_length=[s["mean_routed_length"] for s in stats],
                       padded_length=[s["padded_length"] for s in stats])

    def on_epoch_end(self, run: RunContext) -> None:
        self.meter.end_epoch(run.progress.epoch)

    @torch.no_grad()
    def held_out(self, model: nn.Module, split: torch.Tensor, device) -> dict[str, Any]:
        windows = held_out_windows(split, self.config.n_seq, self.settings.record_windows)
        was = model.training
        model.eval()
        try:
            model(windows.to(device), return_features=True)
            stats = layer_stats(chain_routers(model))
        finally:
            model.train(was)
        return {"windows": int(windows.shape[0]),
                "share_per_layer": [s["share"] for s in stats],
                "share": sum(s["share"] for s in stats) / len(stats),
                "mean_routed_length_per_layer": [s["mean_routed_length"] for s in stats],
                "padded_length_per_layer": [s["padded_length"] for s in stats],
                "positions_per_layer": [s["positions"] for s in stats]}

    def record(self, run: RunContext, outcome) -> dict[str, Any]:
        model, cfg = run.model, self.config
        means = self.total.means()
        train = {"steps": self.total.steps, "share_per_layer": means["share"],
                 "mean_routed_length_per_layer": means["routed_length"],
                 "mean_padded_length_per_layer": means["padded_length"]}
        train["share"] = sum(train["share_per_layer"]) / len(train["share_per_layer"])
        batch = max(1, cfg.batch_size // run.world)
        windows = held_out_windows(run.data.valid, cfg.n_seq, batch).to(run.device)
        # the routing follows the text: its FLOPs are counted on held-out windows too
        counted = held_out_windows(run.data.valid, cfg.n_seq + 1, batch).to(run.device)
        measured = forward_with_and_without(model, lambda: dense_mixers(model), windows, batch,
                                            self.settings.timing_repeats, seed=cfg.seed,
                                            flop_windows=counted)
        return {"target_share": self.settings.target_share, "train": train,
                "held_out": self.held_out(model, run.data.valid, run.device),
                "term_per_epoch": self.meter.epochs,
                "router_parameters": sum(p.numel() for r in chain_routers(model)
                                         for p in r.parameters()),
                **measured}

    def state_dict(self) -> dict[str, Any]:
        return {"meter": self.meter.state_dict(), "total": self.total.state_dict()}

    def load_state_dict(self, state, run: RunContext) -> None:
        self.meter.load_state_dict(state["meter"])
        self.total.load_state_dict(state["total"])
