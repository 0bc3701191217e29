"""FLOP counting: the counter against the analytic formulas, attribution, optimizer, state."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bkbench.metrics import (analytic_transformer_flops, flops_result_fields,
                             measure_forward_flops, measure_step_flops, optimizer_flops)
from bkbench.metrics.flops import (GRAD_CLIP_FLOPS_PER_PARAM, OPTIMIZER_FLOPS_PER_PARAM,
                                   analytic_resnet_bk_flops)
from bkbench.models import available_models, build_model

V, B, T = 300, 4, 32


def _transformer(dropout=0.1, **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=2, n_heads=2, n_seq=T, dropout=dropout)
    cfg.update(kw)
    return build_model("transformer", V, **cfg)


def _close(a, b, tol=0.01):
    return abs(a - b) <= tol * abs(b)


@pytest.mark.parametrize("dropout", [0.1, 0.0])   # math SDPA kernel / CPU flash kernel
def test_transformer_matches_analytic(dropout):
    model = _transformer(dropout)
    r = measure_step_flops(model, B, T, V)
    an = analytic_transformer_flops(B, T, 32, 2, V)
    assert _close(r.forward, an["forward"])
    assert _close(r.backward, an["backward"])
    assert _close(r.backward, 2 * r.forward)           # backward of matmuls = 2 x forward
    for comp, expected in an["forward_by_component"].items():
        assert abs(r.forward_by_component[comp] - expected) <= 0.01 * an["forward"]
        assert abs(r.backward_by_component[comp] - 2 * expected) <= 0.01 * an["backward"]
    assert r.analytic is not None and abs(r.analytic["forward_rel_diff"]) < 0.01
    # attention is counted whichever kernel runs
    assert r.forward_by_component["mixer"] > 2 * 2 * T * 32 * B * T


def test_components_add_up_to_global_total():
    model = _transformer()
    r = measure_step_flops(model, B, T, V)
    assert sum(r.forward_by_component.values()) == r.forward
    assert sum(r.backward_by_component.values()) == r.backward
    assert sum(r.forward_by_op.values()) == r.forward
    assert r.total == r.forward + r.backward + r.optimizer
    assert sum(r.optimizer_by_component.values()) == r.optimizer
    # the LM head dominates even at this size; the embedding does no matmul
    assert r.forward_by_component["embedding"] == 0
    assert r.forward_by_component["lm_head"] == 2 * B * T * 32 * V


def test_uncounted_is_reported_not_added():
    r = measure_step_flops(_transformer(), B, T, V)
    unc = r.uncounted
    for kind in ("normalization", "softmax", "activation"):
        assert unc["forward"].get(kind, 0) > 0
    assert unc["total"] == unc["forward_total"] + unc["backward_total"]
    assert 0 < unc["fraction_of_counted"] < 1
    assert "LayerNorm" in unc["explanation"]
    assert r.forward == analytic_transformer_flops(B, T, 32, 2, V)["forward"]


def test_measurement_leaves_model_and_rng_alone():
    model = _transformer()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.ones_like(model.lm_head.weight)
    model.lm_head.weight.grad = marker
    rng = torch.get_rng_state()
    measure_step_flops(model, B, T, V)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.lm_head.weight.grad is marker
    assert all(p.grad is None for n, p in model.named_parameters() if n != "lm_head.weight")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)


def test_optimizer_flops_scale_with_parameter_count():
    assert optimizer_flops(1000) == 1000 * OPTIMIZER_FLOPS_PER_PARAM["adamw"] == 14_000
    assert optimizer_flops(2000) == 2 * optimizer_flops(1000)
    assert optimizer_flops(1000, grad_clip=True) == 1000 * (14 + GRAD_CLIP_FLOPS_PER_PARAM)
    small, big = _transformer(), _transformer(d_model=64)
    rs, rb = measure_step_flops(small, B, T, V), measure_step_flops(big, B, T, V)
    for model, r in ((small, rs), (big, rb)):
        assert r.num_parameters == model.num_parameters()
        assert r.optimizer == r.num_parameters * r.optimizer_flops_per_parameter
    assert rb.optimizer / rs.optimizer == pytest.approx(big.num_parameters() / small.num_parameters())
    with pytest.raises(ValueError):
        optimizer_flops(10, "lion")


def test_optimizer_instance_counts_only_its_parameters():
    model = _transformer()
    opt = torch.optim.AdamW(model.lm_head.parameters())
    r = measure_step_flops(model, B, T, V, optimizer=opt, grad_clip=False)
    assert r.optimizer == model.lm_head.weight.numel() * 14
    assert set(k for k, v in r.optimizer_by_component.items() if v) == {"lm_head"}


def test_result_fields_and_training_totals():
    r = measure_step_flops(_transformer(), B, T, V)
    ev = measure_forward_flops(_transformer(), B, T, V)
    assert ev["forward"] == r.forward            # eval forward: same matmuls, dropout off
    fields = flops_result_fields(r, steps=10, eval_forward=ev, eval_tokens=1000)
    assert fields["forward_flops"] == r.forward
    assert fields["total_flops"] == 10 * r.total
    training = fields["flops"]["training"]
    assert sum(training["by_component"].values()) == training["total"]
    assert fields["flops"]["evaluation"]["total"] == round(ev["per_token"] * 1000)
    import json
    json.dumps(fields)                            # JSON-ready


# --- the BK-Core and the ResNet-BK model -------------------------------------------------

def test_bk_core_count_matches_its_formula():
    bk = pytest.importorskip("bkbench.ops.bk_core")
    for analytic in (True, False):
        v = torch.randn(3, 2, 40, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            g = bk.resolvent_diag(v, analytic_gradient=analytic)
            fwd = counter.get_total_flops()
            (g.real.sum() + g.imag.sum()).backward()
        total = counter.get_total_flops()
        assert fwd == bk.bk_core_flops(3 * 2 * 40) > 0
        assert total - fwd == bk.bk_core_flops(3 * 2 * 40, backward=True) > 0


@pytest.mark.skipif("resnet_bk" not in available_models(), reason="ResNet-BK model not built")
@pytest.mark.parametrize("analytic_gradient", [True, False])
def test_resnet_bk_matches_analytic(analytic_gradient):
    from bkbench.ops.bk_core import bk_core_flops
    torch.manual_seed(0)
    model = build_model("resnet_bk", V, d_model=32, n_layers=2, n_seq=T, num_experts=4,
                        top_k=1, analytic_gradient=analytic_gradient)
    r = measure_step_flops(model, B, T, V)
    an = r.analytic
    assert an["architecture"] == "resnet_bk"
    assert abs(an["forward_rel_diff"]) < 0.01 and abs(an["backward_rel_diff"]) < 0.01
    positions = 2 * B * 1 * T                      # layers x batch x heads x sites
    bk_fwd = sum(n for op, n in r.forward_by_op.items() if "bk_core" in op)
    bk_bwd = sum(n for op, n in r.backward_by_op.items() if "bk_core" in op)
    assert bk_fwd == bk_core_flops(positions) > 0
    assert bk_bwd == bk_core_flops(positions, backward=True) > 0
    assert sum(r.forward_by_component.values()) == r.forward
    assert sum(r.backward_by_component.values()) == r.backward
    assert r.forward_by_component["mixer"] >= bk_fwd
    # routing changes the count only through the experts' padding, within stated bounds
    rng = r.per_step_range
    assert rng["forward_min"] <= r.forward <= rng["forward_max"]
    no_pad = analytic_resnet_bk_flops(B, T, 32, 2, V, num_experts=4, top_k=1)
    assert no_pad["forward"] == rng["forward_min"]
