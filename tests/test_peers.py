"""The peer baselines (GLA, LSTM): sizes, causality, FLOPs, and how runs select them."""

from __future__ import annotations

import pytest
import torch

from bkbench.audit import audit_causality
from bkbench.config import ConfigError, build_run_configs
from bkbench.metrics import measure_step_flops
from bkbench.metrics.flops import analytic_gla_flops, analytic_lstm_flops
from bkbench.models import build_model

V = 60


def _model(name, **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=2, n_seq=24, dropout=0.2)
    if name == "gla":
        cfg.update(n_heads=4, chunk_size=16)   # 24 = one full chunk and a ragged one
    cfg.update(kw)
    return build_model(name, V, **cfg)


def _default_models(vocab):
    configs = build_run_configs("default", models=["transformer_baseline", "gla_baseline",
                                                   "lstm_baseline"])
    return {c.model_name: build_model(c.architecture, vocab, **c.model_kwargs()) for c in configs}


@pytest.mark.parametrize("vocab,counts", [
    (13777, {"transformer_baseline": 1971712, "gla_baseline": 1977024, "lstm_baseline": 1896576}),
    (33278, {"transformer_baseline": 4467840, "gla_baseline": 4473152, "lstm_baseline": 4392704}),
])
def test_parameters_match_the_transformer_within_5_percent(vocab, counts):
    # the proxy vocabulary (13,777) and WikiText-2's (33,278) at the default preset's sizes
    models = _default_models(vocab)
    assert {name: m.num_parameters() for name, m in models.items()} == counts
    reference = counts["transformer_baseline"]
    for name in ("gla_baseline", "lstm_baseline"):
        assert abs(counts[name] - reference) <= 0.05 * reference
    gla = models["gla_baseline"].parameter_breakdown()
    assert gla["mixer"] == 4 * (17968 + 128)         # GLA layer + its LayerNorm, per block
    assert sum(gla.values()) == counts["gla_baseline"]


@pytest.mark.parametrize("name", ["gla", "lstm"])
def test_peers_are_causal_bit_for_bit(name):
    audit = audit_causality(_model(name), V, num_sequences=2)
    assert audit.causal and audit.max_leak == 0.0
    assert all(m.responsive for m in audit.modes.values())


def test_gla_model_backends_agree():
    model = _model("gla", dropout=0.0).double().eval()
    idx = torch.randint(0, V, (2, 21))
    with torch.no_grad():
        fast = model(idx)
        for block in model.blocks:
            block.attn.backend = "naive"
        torch.testing.assert_close(model(idx), fast, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tie", [False, True])
def test_lstm_ties_weights_as_configured(tie):
    model = _model("lstm", tie_weights=tie)
    assert (model.lm_head.weight is model.tok_emb.weight) == tie
    assert model.num_parameters() == (1 if tie else 2) * V * 32 + 2 * 4 * (32 * 64 + 2 * 32)
    assert model(torch.randint(0, V, (2, 24))).shape == (2, 24, V)


def test_counter_sees_the_mixers_and_equals_their_formulas():
    B, T = 3, 21
    gla = measure_step_flops(_model("gla"), B, T, V)
    want = analytic_gla_flops(B, T, 32, 2, V, n_heads=4, chunk_size=16)
    assert gla.forward_by_component["mixer"] == want["forward_by_component"]["mixer"]
    assert gla.backward_by_component["mixer"] == want["backward_by_component"]["mixer"]
    assert (gla.forward, gla.backward) == (want["forward"], want["backward"])
    lstm = measure_step_flops(_model("lstm"), B, T, V)
    want = analytic_lstm_flops(B, T, 32, 2, V)
    assert lstm.forward_by_component["mixer"] == want["forward_by_component"]["mixer"] > 0
    assert (lstm.forward, lstm.backward) == (want["forward"], want["backward"])


def test_runs_are_selected_by_name_and_the_default_stays_three():
    assert [c.model_name for c in build_run_configs("smoke")] == [
        "transformer_baseline", "resnet_bk_baseline", "resnet_bk_full"]
    everything = build_run_configs("smoke", models=["all"])
    assert [c.model_name for c in everything] == [
        "transformer_baseline", "resnet_bk_baseline", "resnet_bk_full", "gla_baseline",
        "lstm_baseline"]
    peers = build_run_configs("smoke", models=["gla_baseline", "lstm_baseline"],
                              overrides={"gla_chunk_size": 8})
    assert [c.architecture for c in peers] == ["gla", "lstm"]
    assert peers[0].model_kwargs()["chunk_size"] == 8


@pytest.mark.parametrize("overrides,message", [
    ({"gla_backend": "cuda"}, "gla_backend"),
    ({"gla_chunk_size": 0}, "gla_chunk_size"),
    ({"n_heads": 3}, "divisible by n_heads"),
    ({"gla_backend": "fla", "device": "cpu"}, "CUDA only"),
])
def test_bad_gla_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_run_configs("smoke", models=["gla_baseline"], overrides=overrides)
