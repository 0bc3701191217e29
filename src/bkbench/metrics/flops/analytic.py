"""FLOPs of one training step by formula, per architecture (matrix products, 2 FLOPs per
multiply-add), to cross-check the counter; and the spread of a routed model's count."""

from __future__ import annotations

import sys
from typing import Any

import torch.nn as nn


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
    from ...ops.bk_core import bk_core_flops

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
    from ...ops.gla import gla_flops

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
            expert_rows=padded_expert_rows(model))
    if name == "GLALM":
        from ...ops.gla import FLA_CHUNK_SIZE, resolve_backend
        device = next(model.parameters()).device
        fla = resolve_backend(cfg.backend, device) == "fla"
        return analytic_gla_flops(batch_size, seq_len, cfg.d_model, cfg.n_layers, vocab_size,
                                  n_heads=cfg.n_heads,
                                  chunk_size=FLA_CHUNK_SIZE if fla else cfg.chunk_size,
                                  expand_k=cfg.expand_k, gate_rank=cfg.gate_rank)
    if name == "LSTMLM":
        return analytic_lstm_flops(batch_size, seq_len, cfg.d_model, cfg.n_layers, vocab_size)
    return None


def padded_expert_rows(model: nn.Module) -> int | None:
    """Rows the ResNet-BK experts processed in the model's last forward, padding included."""
    try:
        counts = model.last_routing_counts()
    except Exception:
        return None
    multiple = getattr(sys.modules.get(type(model).__module__), "EXPERT_ROW_MULTIPLE", 1)
    rows = 0
    for n in counts.flatten().tolist():
        if n > 0:
            rows += -(-int(n) // multiple) * multiple
    return rows


def routing_variation(model: nn.Module, batch_size: int, seq_len: int, forward: int,
                       backward: int) -> dict[str, Any] | None:
    """Bounds of the forward/backward count over all routings (ResNet-BK's padded experts).

    Each token costs top_k expert rows whatever the routing; only the zero-row padding of each
    expert's batch (to a multiple of EXPERT_ROW_MULTIPLE) depends on the routing.
    """
    rows = padded_expert_rows(model)
    cfg = getattr(model, "config", None)
    if rows is None or cfg is None or not hasattr(cfg, "num_experts"):
        return None
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


def rel_diff(measured: float, expected: float) -> float | None:
    if not expected:
        return None if measured else 0.0
    return (measured - expected) / expected
