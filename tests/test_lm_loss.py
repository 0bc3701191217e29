"""The fused, chunked LM head + log-softmax + NLL against F.cross_entropy(head(h))."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bkbench.eval import evaluate, target_nll
from bkbench.metrics import measure_forward_flops, measure_step_flops
from bkbench.models import build_model
from bkbench.ops.lm_loss import default_chunk_rows, lm_head_nll, naive


def _inputs(gen, lead, d, V, bias, dtype=torch.float64):
    h = torch.randn(*lead, d, generator=gen, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(V, d, generator=gen, dtype=dtype)).requires_grad_()
    b = torch.randn(V, generator=gen, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, lead, generator=gen)
    return h, w, b, t


@pytest.mark.parametrize("seed", range(3))
def test_with_rows_returns_the_same_sum_and_gradients_and_the_per_target_nll(seed):
    """with_rows (what a training step's data selection reads): the sum and its gradients
    bit for bit those of reduction='sum', the rows those of the reference per target."""
    gen = torch.Generator().manual_seed(seed)
    h, w, b, t = _inputs(gen, (3, 7), 5, 11, bias=seed != 1)
    params = [x for x in (h, w, b) if x is not None]
    plain = lm_head_nll(h, w, b, t, chunk_rows=4)
    grads = torch.autograd.grad(plain, params)
    total, rows = lm_head_nll(h, w, b, t, chunk_rows=4, with_rows=True)
    assert torch.equal(total, plain) and rows.shape == t.shape and not rows.requires_grad
    ref = F.cross_entropy(F.linear(h, w, b).reshape(-1, 11), t.reshape(-1), reduction="none")
    torch.testing.assert_close(rows, ref.view(t.shape).detach(), rtol=1e-12, atol=1e-12)
    for a, g in zip(torch.autograd.grad(total, params), grads):
        assert torch.equal(a, g)
    with torch.no_grad():
        total_ng, rows_ng = lm_head_nll(h, w, b, t, chunk_rows=4, with_rows=True)
    assert torch.equal(rows_ng, rows) and torch.equal(total_ng, rows_ng.sum())
    with pytest.raises(ValueError, match="with_rows"):
        lm_head_nll(h, w, b, t, reduction="none", with_rows=True)


@pytest.mark.parametrize("seed", range(6))
def test_sum_and_gradients_match_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.Generator().manual_seed(1000 + seed)
    lead = tuple(int(x) for x in torch.randint(1, 40, (int(torch.randint(1, 3, (1,), generator=g)),),
                                               generator=g))
    d, V = (int(x) for x in torch.randint(1, 50, (2,), generator=g))
    chunk = int(torch.randint(1, 17, (1,), generator=g))
    h, w, b, t = _inputs(gen, lead, d, V, bias=seed % 2 == 0)
    params = [x for x in (h, w, b) if x is not None]
    ours = lm_head_nll(h, w, b, t, chunk_rows=chunk)
    ref = naive.lm_head_nll(h, w, b, t)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    upstream = 0.37   # the backward scales by the loss's upstream gradient
    for a, r in zip(torch.autograd.grad(upstream * ours, params),
                    torch.autograd.grad(upstream * ref, params)):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-12)


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    h, w, b, t = _inputs(gen, (2, 5), 4, 7, bias=True)
    assert torch.autograd.gradcheck(lambda h, w, b: lm_head_nll(h, w, b, t, chunk_rows=3),
                                    (h, w, b))


def test_per_target_nll_matches_reference():
    gen = torch.Generator().manual_seed(1)
    h, w, b, t = _inputs(gen, (3, 11), 6, 29, bias=False)
    with torch.no_grad():
        ours = lm_head_nll(h, w, b, t, reduction="none", chunk_rows=4)
        ref = naive.lm_head_nll(h, w, b, t, reduction="none").view(3, 11)
    assert ours.shape == (3, 11)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_float32_matches_reference_at_the_default_chunk():
    gen = torch.Generator().manual_seed(2)
    N, V = 1000, 20_000
    assert N > default_chunk_rows(V) and N % default_chunk_rows(V)   # the last chunk partial
    h, w, b, t = _inputs(gen, (N,), 16, V, bias=False, dtype=torch.float32)
    ours, ref = lm_head_nll(h, w, b, t), naive.lm_head_nll(h, w, b, t)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    for a, r in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_bad_arguments():
    h, w, t = torch.randn(4, 3), torch.randn(5, 3), torch.randint(0, 5, (4,))
    with pytest.raises(ValueError, match="reduction"):
        lm_head_nll(h, w, None, t, reduction="mean")
    with pytest.raises(ValueError, match="targets"):
        lm_head_nll(h, w, None, t[:3])
    with pytest.raises(ValueError, match="head weight"):
        lm_head_nll(h, torch.randn(5, 2), None, t)
    with pytest.raises(ValueError, match="no backward"):
        lm_head_nll(h, w.requires_grad_(), None, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows"):
        lm_head_nll(h, w, None, t, chunk_rows=0)


@pytest.mark.parametrize("arch", ["transformer", "resnet_bk"])
def test_model_loss_and_every_gradient_match_with_tied_weights(arch):
    torch.manual_seed(0)
    model = build_model(arch, 97, d_model=16, n_layers=1, n_seq=12, dropout=0.0,
                        tie_weights=True).double()
    assert model.lm_head.weight is model.tok_emb.weight
    idx = torch.randint(0, 97, (3, 13))
    x, y = idx[:, :-1], idx[:, 1:]
    fused = target_nll(model, x, y)
    grads = torch.autograd.grad(fused, list(model.parameters()))
    ref = F.cross_entropy(model(x).reshape(-1, 97), y.reshape(-1), reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=0)
    for (name, _), a, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12, msg=name)


def test_autocast_matches_unfused_autocast():
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(300, 32, requires_grad=True)
    t = torch.randint(0, 300, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = lm_head_nll(h, w, None, t, chunk_rows=10)
        ref = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=0)
    (gw,), (rw,) = torch.autograd.grad(ours, [w]), torch.autograd.grad(ref, [w])
    assert gw.dtype == torch.float32
    torch.testing.assert_close(gw, rw, rtol=0.05, atol=0.05)


class _LogitsOnly(nn.Module):
    """The same model seen only through its logits: evaluation takes the unfused path."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def test_eval_fused_and_unfused_give_the_same_perplexity():
    torch.manual_seed(0)
    model = build_model("resnet_bk", 211, d_model=16, n_layers=2, n_seq=32)
    tokens = torch.randint(0, 211, (1500,))
    fused = evaluate(model, tokens, seq_len=32, batch_size=8, stride=16)
    plain = evaluate(_LogitsOnly(model), tokens, seq_len=32, batch_size=8, stride=16)
    assert fused.num_tokens == plain.num_tokens == 1500
    assert math.isclose(fused.perplexity, plain.perplexity, rel_tol=1e-6)


def test_flop_counter_charges_the_fused_op_as_the_unfused_head():
    N, d, V = 50, 8, 40
    h, w = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (N,))
    counts = []
    for loss_fn in (lambda: lm_head_nll(h, w, None, t, chunk_rows=7),
                    lambda: naive.lm_head_nll(h, w, None, t)):
        with FlopCounterMode(display=False) as counter:
            loss = loss_fn()
            fwd = counter.get_total_flops()
            loss.backward()
        counts.append((fwd, counter.get_total_flops() - fwd))
    assert counts[0] == counts[1] == (2 * N * d * V, 4 * N * d * V)


@pytest.mark.parametrize("arch", ["transformer", "resnet_bk"])
def test_step_flops_of_the_fused_loss_equal_the_unfused_ones(arch):
    torch.manual_seed(0)
    extra = {"n_heads": 2} if arch == "transformer" else {}
    model = build_model(arch, 300, d_model=16, n_layers=1, n_seq=16, **extra)
    def unfused(inputs, targets):   # the logits in full, then the cross-entropy
        logits = model(inputs)
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                             reduction="sum")
        return ce / targets.numel(), {}

    fused = measure_step_flops(model, 4, 16, 300)
    plain = measure_step_flops(model, 4, 16, 300, compute_loss=unfused)
    assert (fused.forward, fused.backward) == (plain.forward, plain.backward)
    assert fused.forward_by_component == plain.forward_by_component
    assert fused.backward_by_component == plain.backward_by_component
    assert fused.forward_by_component["lm_head"] == 2 * 4 * 16 * 16 * 300
    # the softmax/NLL inside the fused op is estimated as the unfused ops are
    for phase in ("forward", "backward"):
        for cat in ("softmax", "loss"):
            assert fused.uncounted[phase][cat] == pytest.approx(plain.uncounted[phase][cat])
    ev = measure_forward_flops(model, 4, 16, 300)
    assert ev["by_component"]["lm_head"] == 2 * 4 * 16 * 16 * 300


def test_no_rows_give_zero_loss_and_zero_gradients():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    loss = lm_head_nll(h, w, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("seed", range(4))
def test_integer_head_matches_an_int64_oracle(seed):
    from bkbench.ops.lm_loss import lm_head_nll_int8
    g = torch.Generator().manual_seed(seed)
    rows, d, V = (int(x) for x in torch.randint(1, 60, (3,), generator=g))
    h = torch.randn(rows, d, generator=g)
    w = torch.randint(-127, 128, (V, d), generator=g, dtype=torch.int8)
    w_scale = torch.rand(V, generator=g) / 100
    bias = torch.randn(V, generator=g) if seed % 2 else None
    t = torch.randint(0, V, (rows,), generator=g)
    chunk = int(torch.randint(1, 9, (1,), generator=g))
    ours = lm_head_nll_int8(h, w, w_scale, bias, t, reduction="none", chunk_rows=chunk)
    # oracle: per-row symmetric int8 rounding, exact integer products in int64, float64 after
    s = h.abs().amax(-1, keepdim=True) / 127
    q = torch.clamp(torch.round(h / s), -127, 127).long()
    logits = (q @ w.long().t()).double() * s.double() * w_scale.double()
    if bias is not None:
        logits = logits + bias.double()
    ref = F.cross_entropy(logits, t, reduction="none")
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isclose(lm_head_nll_int8(h, w, w_scale, bias, t), ours.sum())
    with FlopCounterMode(display=False) as counter:
        lm_head_nll_int8(h, w, w_scale, bias, t)
    assert counter.get_total_flops() == 2 * rows * d * V
    with pytest.raises(ValueError, match="int8"):
        lm_head_nll_int8(h, w.float(), w_scale, bias, t)
