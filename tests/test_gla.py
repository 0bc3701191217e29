"""Gated linear attention ops: chunkwise form against the recurrent oracle, fla, FLOP formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bkbench.ops.gla import (chunk_gla, fla_available, gated_linear_attention, gla_flops,
                             naive_recurrent_gla)


def _inputs(B=2, T=37, H=3, K=5, V=4, dtype=torch.float64, decay=1.0, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, gate = (torch.randn(B, T, H, K, generator=gen, dtype=dtype) for _ in range(3))
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = decay * F.logsigmoid(gate)   # log-decays <= 0; decay scales how fast the state forgets
    return [x.to(device).requires_grad_() for x in (q, k, v, g)]


def _grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w.to(out.device)).sum(), inputs)


# T = 37 is a multiple of none of the chunk sizes but 1 and 37; 64 > T is one padded chunk
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 37, 64])
@pytest.mark.parametrize("decay", [1.0, 30.0])   # 30: alpha down to e^-30 per step
def test_chunkwise_equals_recurrence_forward_and_gradients(chunk_size, decay):
    inputs = _inputs(decay=decay, seed=chunk_size)
    ref = naive_recurrent_gla(*inputs)
    out = chunk_gla(*inputs, chunk_size=chunk_size)
    assert out.shape == ref.shape == (2, 37, 3, 4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(_grads(out, inputs), _grads(ref, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_strong_decay_does_not_overflow_in_float32():
    # cumulative log-decays of -60 per step: exp(-b) would overflow float32 after 2 steps
    q, k, v, g = (x.detach().float() for x in _inputs(T=40, decay=1.0))
    g = torch.full_like(g, -60.0)
    out = chunk_gla(q, k, v, g, chunk_size=16)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive_recurrent_gla(q, k, v, g), rtol=1e-5, atol=1e-6)


def test_scale_and_dispatch():
    inputs = _inputs(T=9)
    ref = naive_recurrent_gla(*inputs, scale=0.3)
    torch.testing.assert_close(gated_linear_attention(*inputs, scale=0.3, chunk_size=4,
                                                      backend="torch"), ref)
    torch.testing.assert_close(gated_linear_attention(*inputs, scale=0.3, backend="naive"), ref)
    # default scale is K**-0.5, as in fla
    torch.testing.assert_close(chunk_gla(*inputs, chunk_size=4),
                               naive_recurrent_gla(*inputs, scale=5 ** -0.5))


def test_bad_input_is_refused():
    q, k, v, g = _inputs(T=8)
    with pytest.raises(ValueError, match="q, k and g"):
        gated_linear_attention(q, k[:, :, :, :2], v, g)
    with pytest.raises(ValueError, match="v must be"):
        gated_linear_attention(q, k, v[:, :4], g)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_linear_attention(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        gated_linear_attention(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="CUDA"):
        gated_linear_attention(q, k, v, g, backend="fla")


@pytest.mark.parametrize("T,chunk_size", [(37, 16), (16, 16), (10, 16), (64, 8)])
def test_counter_equals_formula(T, chunk_size):
    B, H, K, V = 2, 3, 5, 4
    inputs = _inputs(B=B, T=T, H=H, K=K, V=V, dtype=torch.float32)
    counter = FlopCounterMode(display=False)
    with counter:
        out = chunk_gla(*inputs, chunk_size=chunk_size)
    forward = counter.get_total_flops()
    with counter:
        _grads(out, inputs)
    backward = counter.get_total_flops()
    assert forward == gla_flops(B, T, H, K, V, chunk_size) > 0
    assert backward == gla_flops(B, T, H, K, V, chunk_size, backward=True) == 2 * forward
    # one chunk: scores and their values only, no state is passed on
    assert gla_flops(1, 10, 1, K, V, 16) == 16 * 16 * 2 * (K + V)


@pytest.mark.skipif(not (torch.cuda.is_available() and fla_available()),
                    reason="needs CUDA and flash-linear-attention (pip install 'bkbench[fla]')")
@pytest.mark.parametrize("T", [64, 100])
def test_fla_kernels_match_chunkwise_form(T):
    inputs = _inputs(B=2, T=T, H=4, K=16, V=32, dtype=torch.float32, device="cuda")
    want = chunk_gla(*inputs, chunk_size=16)
    got = gated_linear_attention(*inputs, backend="fla")
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for a, b in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    counter = FlopCounterMode(display=False)
    with counter:
        gated_linear_attention(*inputs, backend="fla")
    assert counter.get_total_flops() == gla_flops(2, T, 4, 16, 32, 64)
