"""The LM-head protocol: quantized, integer, pruned and early-exit heads stay on the fused loss
(``ops.lm_loss``), and give what running the head module and F.cross_entropy give."""

import pytest
import torch
import torch.nn.functional as F

import bkbench.ops.lm_loss.head as head_module
from bkbench.compression.pruning import fold_mask, magnitude_mask
from bkbench.compression.quantization import IntLinear, QATLinear, integer_model, quantize_linears
from bkbench.config import OPTIMIZATION_FLAGS, BenchmarkConfig
from bkbench.eval import fused_head, target_nll
from bkbench.flags import build_model
from bkbench.models.layers.early_exit import with_exits
from bkbench.train import seed_everything

V, N = 40, 16


def plain_model(seed=0):
    cfg = BenchmarkConfig.from_dict(dict(model_name="resnet_bk_t", d_model=16, n_layers=3,
                                         n_heads=2, n_seq=N, num_experts=4, seed=seed,
                                         dropout=0.0)).validate()
    seed_everything(seed)
    model, _ = build_model(cfg, V)
    return model


def batch(seed):
    idx = torch.randint(0, V, (3, N + 1), generator=torch.Generator().manual_seed(seed))
    return idx[:, :-1], idx[:, 1:]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused op through the head protocol."""
    calls = []
    for name in ("lm_head_nll", "lm_head_nll_int8"):     # float and integer heads
        def counting(*args, real=getattr(head_module, name), **kwargs):
            calls.append(args[1].shape)
            return real(*args, **kwargs)
        monkeypatch.setattr(head_module, name, counting)
    return calls


def quantized(model, bits=8):
    quantize_linears(model, bits)
    return model


def pruned(model):
    # as use_pruning with pruning_include_head does: the mask folded into the weight
    fold_mask(model.lm_head, magnitude_mask(model.lm_head.weight, 0.5))
    return model


def pruned_quantized(model):
    quantize_linears(model, 8)
    return pruned(model)


def reference_nll(model, inputs, targets):
    """The unfused oracle: the model's logits (its head module's own forward), then F.cross_entropy."""
    logits = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="sum")


@pytest.mark.parametrize("make", [quantized, pruned, pruned_quantized,
                                  lambda m: quantized(m, bits=4)],
                         ids=["qat8", "pruned", "pruned+qat8", "qat4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_training_loss_and_head_gradient_through_the_fused_op(make, seed, fused_calls):
    model = make(plain_model(seed))
    model.train()
    inputs, targets = batch(seed)
    assert fused_head(model) is not None
    params = [p for p in model.parameters() if p.requires_grad]
    fused = target_nll(model, inputs, targets)
    assert len(fused_calls) == 1 and fused_calls[0] == (V, 16)
    grads = torch.autograd.grad(fused, params)
    ref = reference_nll(model, inputs, targets)
    ref_grads = torch.autograd.grad(ref, params)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for p, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_a_pruned_head_is_fused_with_its_masked_weight(fused_calls):
    model = pruned(plain_model())
    inputs, targets = batch(3)
    assert (model.lm_head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():
        fused = target_nll(model, inputs, targets)
        unpruned = target_nll(plain_model(), inputs, targets)
        ref = reference_nll(model, inputs, targets)
    assert len(fused_calls) == 2
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused, unpruned)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_integer_head_is_fused_and_equals_its_int_mm_forward(bits, fused_calls):
    model = integer_model(quantized(plain_model(), bits))
    assert isinstance(model.lm_head, IntLinear)
    inputs, targets = batch(5)
    with torch.no_grad():
        fused = target_nll(model, inputs, targets, reduction="none")
        ref = F.cross_entropy(model(inputs).reshape(-1, V), targets.reshape(-1),
                              reduction="none").view(targets.shape)
    assert fused_calls == [(V, 16)]
    assert model.lm_head.effective_head().weight.dtype == torch.int8   # integer products
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_int_linear_hands_int_mm_its_stored_weight_without_a_copy(monkeypatch):
    layer = IntLinear(QATLinear(torch.nn.Linear(24, 40), 8))
    assert layer.weight_int8.shape == (40, 24) and layer.weight_int8.is_contiguous()
    seen = []
    real = torch._int_mm

    def spy(a, b):
        seen.append((b.data_ptr(), b.shape, b.stride()))
        return real(a, b)
    monkeypatch.setattr(torch, "_int_mm", spy)
    layer(torch.randn(32, 24))
    assert seen == [(layer.weight_int8.data_ptr(), (24, 40), (1, 24))]   # a view: no transpose copy


def test_early_exit_evaluation_is_fused_and_equals_the_exit_logits(fused_calls):
    model = plain_model()
    model.eval()
    inputs, targets = batch(7)
    for threshold in (-1.0, 0.5, float("inf")):
        evaluated, policy = with_exits(model, threshold)
        with torch.no_grad():
            fused = target_nll(evaluated, inputs, targets, reduction="none")
            ref = F.cross_entropy(evaluated(inputs).reshape(-1, V), targets.reshape(-1),
                                  reduction="none").view(targets.shape)
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    assert len(fused_calls) == 3


def test_integer_model_right_after_a_training_step_of_every_flag():
    # a training forward leaves graph tensors on modules (router gates, exit states, in
    # lists): converting to the integer model then must not try to deep-copy them
    cfg = BenchmarkConfig.from_dict(dict(
        model_name="resnet_bk_full_t", d_model=16, n_layers=3, n_heads=2, n_seq=N, num_experts=4,
        seed=0, dropout=0.0, **{f: True for f in OPTIMIZATION_FLAGS})).validate()
    seed_everything(0)
    model, _ = build_model(cfg, V)
    model.train()
    x, y = batch(1)
    loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
    loss.backward()
    model.eval()
    integer = integer_model(model)
    assert sum(isinstance(m, IntLinear) for m in integer.modules()) == sum(
        isinstance(m, QATLinear) for m in model.modules())
    with torch.no_grad():
        assert torch.isfinite(integer(x)).all()
