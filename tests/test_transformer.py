"""The causal Transformer baseline: shapes, causality, parameter accounting, input errors."""

import pytest
import torch

from bkbench.models import build_model


def test_logits_shape_and_parameter_count():
    model = build_model("transformer", 100, d_model=32, n_layers=2, n_heads=4, n_seq=16)
    logits = model(torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 100)
    d, V, L, T = 32, 100, 2, 16
    per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    expected = V * d + T * d + L * per_layer + 2 * d + d * V
    assert model.num_parameters() == expected
    breakdown = model.parameter_breakdown()
    assert sum(breakdown.values()) == expected
    assert breakdown["embedding"] == V * d + T * d
    assert breakdown["lm_head"] == d * V + 2 * d
    assert "other" not in breakdown


def test_weight_tying_shares_the_matrix_and_counts_it_once():
    model = build_model("transformer", 100, d_model=32, n_layers=1, n_heads=4, n_seq=16,
                        tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = build_model("transformer", 100, d_model=32, n_layers=1, n_heads=4, n_seq=16)
    assert untied.num_parameters() - model.num_parameters() == 100 * 32


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_changing_a_later_token_changes_no_earlier_logit(mode):
    torch.manual_seed(0)
    model = build_model("transformer", 50, d_model=32, n_layers=2, n_heads=4, n_seq=24, dropout=0.2)
    model.train(mode == "train")
    idx = torch.randint(0, 50, (2, 24))
    for k in (0, 5, 23):
        changed = idx.clone()
        changed[:, k] = (changed[:, k] + 7) % 50
        torch.manual_seed(1)
        a = model(idx)
        torch.manual_seed(1)
        b = model(changed)
        assert torch.equal(a[:, :k], b[:, :k]), f"logits before position {k} moved"
        assert not torch.equal(a[:, k:], b[:, k:])


def test_input_errors():
    model = build_model("transformer", 10, d_model=8, n_layers=1, n_heads=2, n_seq=8)
    with pytest.raises(ValueError, match="n_seq"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 4))


def test_build_model_rejects_unknown_names_and_fields():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("mamba", 10)
    with pytest.raises(ValueError, match="n_head"):
        build_model("transformer", 10, n_head=2)
    with pytest.raises(ValueError, match="divisible"):
        build_model("transformer", 10, d_model=10, n_heads=4)
