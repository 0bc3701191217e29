"""Tests of the BK-Core op (bkbench.ops.bk_core): every path against a dense oracle.

Paths: "reference" (Python loop), "torch" (vectorised sweeps), "cpu" (numba), "triton"
(Triton's interpreter on CPU tensors, skipped if it does not work here) and the autograd
recurrence (analytic_gradient=False).
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bkbench.ops import bk_core_flops
from bkbench.ops import resolvent_diag as exported
from bkbench.ops.bk_core import FLOPS_PER_POSITION, available_backends, resolvent_diag
from bkbench.ops.bk_core import triton as bk_triton
from bkbench.ops.bk_core.naive import dense_resolvent_diag

HAVE_TRITON_CPU = bk_triton.available(torch.device("cpu"))
TRITON_SKIP = pytest.mark.skipif(
    not HAVE_TRITON_CPU,
    reason="Triton's interpreter does not run here (triton missing or interpreter broken)",
)

# (name, kwargs) of every path; the triton one runs under the interpreter on CPU tensors.
PATHS = [
    pytest.param("reference", dict(backend="reference"), id="reference"),
    pytest.param("torch", dict(backend="torch"), id="torch"),
    pytest.param("cpu", dict(backend="cpu"), id="cpu"),
    pytest.param("triton", dict(backend="triton"), id="triton", marks=TRITON_SKIP),
    pytest.param("autograd", dict(analytic_gradient=False), id="autograd"),
]

def _forward(v, *args, **kw):
    """The forward of the path ``kw`` names. The autograd path is taken only where a graph is
    recorded (without one the compiled forward runs), so here v requires grad for it."""
    if kw.get("analytic_gradient") is False:
        return resolvent_diag(v.detach().requires_grad_(), *args, **kw).detach()
    return resolvent_diag(v, *args, **kw)


SHAPES = [(1,), (2,), (3, 1), (2, 2), (2, 3, 5), (4, 7)]


def _random_params(shape, gen, dtype=torch.float64):
    """Per-head (last leading dim) t, E, eps; h0 as a tensor over all leading dims."""
    lead = shape[:-1]
    k = lead[-1] if lead else 1
    pshape = (k,) if lead else ()
    t = (0.3 + 1.2 * torch.rand(pshape, generator=gen, dtype=dtype)) * \
        torch.where(torch.rand(pshape, generator=gen) < 0.5, -1.0, 1.0).to(dtype)
    energy = torch.randn(pshape, generator=gen, dtype=dtype)
    eps = 0.2 + torch.rand(pshape, generator=gen, dtype=dtype)
    h0 = -2.0 + 0.5 * torch.randn(lead, generator=gen, dtype=dtype)
    return h0, t, energy, eps


# ------------------------------------------------------------------------------------------
# Forward against the dense oracle
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", PATHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_forward_matches_dense_oracle_float64(name, kw, causal):
    gen = torch.Generator().manual_seed(1234 + causal)
    for shape in SHAPES:
        v = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
        h0, t, energy, eps = _random_params(shape, gen)
        got = _forward(v, h0, t, energy=energy, eps=eps, causal=causal, **kw)
        want = dense_resolvent_diag(v, h0, t, energy, eps, causal=causal)
        assert got.dtype == torch.complex128 and got.shape == v.shape
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,kw", PATHS)
def test_forward_with_scalar_z_and_defaults(name, kw):
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    for causal in (True, False):
        got = _forward(v, causal=causal, **kw)  # h0=-2, t=1, z=i
        want = dense_resolvent_diag(v, -2.0, 1.0, 0.0, 1.0, causal=causal)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        got = _forward(v, 0.5, 0.8, 0.3 + 0.25j, causal=causal, **kw)
        want = dense_resolvent_diag(v, 0.5, 0.8, 0.3, 0.25, causal=causal)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,kw", PATHS)
def test_float32_gives_complex64(name, kw):
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(2, 3, 9, generator=gen)
    for causal in (True, False):
        g = _forward(v, -2.0, 1.0, 0.5j, causal=causal, **kw)
        assert g.dtype == torch.complex64
        want = dense_resolvent_diag(v, -2.0, 1.0, 0.0, 0.5, causal=causal)
        torch.testing.assert_close(g.to(torch.complex128), want, rtol=1e-5, atol=1e-5)


def test_public_exports():
    assert exported is resolvent_diag
    import bkbench.ops.bk_core as mod

    assert mod.resolvent_diag is resolvent_diag
    assert "cpu" in available_backends("cpu")


# ------------------------------------------------------------------------------------------
# Gradients: gradcheck (finite differences) and the dense oracle's autograd gradient
# ------------------------------------------------------------------------------------------
GRAD_SHAPES = [(1,), (2,), (2, 3, 4)]


@pytest.mark.parametrize("name,kw", PATHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gradcheck_v_t_energy_eps(name, kw, causal):
    gen = torch.Generator().manual_seed(99 + causal)
    # The interpreted Triton path costs ~1 ms per launch: use gradcheck's fast mode there.
    fast = name == "triton"
    for shape in GRAD_SHAPES:
        v = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
        h0, t, energy, eps = _random_params(shape, gen)
        h0 = h0.requires_grad_()
        t, energy, eps = (x.requires_grad_() for x in (t, energy, eps))

        def fn(v_, h0_, t_, e_, s_):
            return resolvent_diag(v_, h0_, t_, energy=e_, eps=s_, causal=causal, **kw)

        assert torch.autograd.gradcheck(fn, (v, h0, t, energy, eps), eps=1e-6, atol=1e-7,
                                        rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("name,kw", PATHS)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_gradients_match_dense_oracle(name, kw, causal):
    gen = torch.Generator().manual_seed(5 + causal)
    for shape in [(2,), (3, 6), (2, 2, 5)]:
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        h0, t, energy, eps = _random_params(shape, gen)
        weight = torch.randn(shape, generator=gen, dtype=torch.complex128)

        def grads(fn):
            leaves = [x.detach().clone().requires_grad_() for x in (v, h0, t, energy, eps)]
            g = fn(*leaves)
            loss = (g * weight).real.sum() + (g.abs() ** 2).sum()
            return torch.autograd.grad(loss, leaves)

        got = grads(lambda *a: resolvent_diag(a[0], a[1], a[2], energy=a[3], eps=a[4],
                                              causal=causal, **kw))
        want = grads(lambda *a: dense_resolvent_diag(*a, causal=causal))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_float32_gradients_close_to_float64(causal):
    gen = torch.Generator().manual_seed(11)
    v64 = torch.randn(4, 3, 64, generator=gen, dtype=torch.float64)
    w = torch.randn(v64.shape, generator=gen, dtype=torch.complex128)
    t64 = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)

    def run(dtype, **kw):
        v = v64.detach().to(dtype).clone().requires_grad_()
        t = t64.detach().to(dtype).clone().requires_grad_()
        g = resolvent_diag(v, -2.0, t, 0.1 + 0.5j, causal=causal, **kw)
        (g * w.to(g.dtype)).real.sum().backward()
        return v.grad.double(), t.grad.double()

    ref = run(torch.float64, backend="cpu")
    for kw in (dict(backend="cpu"), dict(backend="torch"), dict(analytic_gradient=False)):
        for a, b in zip(run(torch.float32, **kw), ref):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------
# Causality
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_output_ignores_later_positions_bit_for_bit(name, kw, dtype):
    gen = torch.Generator().manual_seed(21)
    n = 12 if name in ("reference", "triton") else 257
    v = torch.randn(3, n, generator=gen).to(dtype)
    t = torch.tensor(0.9, dtype=dtype)
    base = _forward(v, -2.0, t, 0.2 + 0.3j, causal=True, **kw)
    for k in (0, 1, n // 2, n - 1):
        w = v.clone()
        w[:, k] += 3.0
        w[:, k + 1:] = torch.randn(w[:, k + 1:].shape, generator=gen).to(dtype)
        out = _forward(w, -2.0, t, 0.2 + 0.3j, causal=True, **kw)
        assert torch.equal(out[:, :k], base[:, :k]), f"position < {k} moved"
        assert not torch.equal(out[:, k], base[:, k])


def test_bidirectional_sees_later_positions():
    v = torch.zeros(1, 6, dtype=torch.float64)
    w = v.clone()
    w[0, 5] = 1.0
    a = resolvent_diag(v, causal=False)
    b = resolvent_diag(w, causal=False)
    assert not torch.equal(a[0, 0], b[0, 0])


# ------------------------------------------------------------------------------------------
# The bound |g| <= 1/eps, no NaN/Inf, on adversarial inputs
# ------------------------------------------------------------------------------------------
def _adversarial_cases(n, gen):
    h0, energy = -2.0, 0.0
    yield "huge random v", 1e3 * torch.randn(2, n, generator=gen, dtype=torch.float64), 1.0
    yield "alternating +-1e3", 1e3 * (-1.0) ** torch.arange(n, dtype=torch.float64)[None], 1.0
    # Re(alpha) = 0 at every site: the chain sits on resonance, |g| is as large as it gets.
    yield "resonant, t=1", torch.full((1, n), energy - h0, dtype=torch.float64), 1.0
    yield "resonant, t=0", torch.full((1, n), energy - h0, dtype=torch.float64), 0.0
    band = energy - h0 + 2.0 * torch.cos(torch.linspace(0, 3.14159, n, dtype=torch.float64))
    yield "band edge sweep, t=1", band[None], 1.0
    yield "random, strong coupling", torch.randn(1, n, generator=gen, dtype=torch.float64), 30.0


def _check_bound(n, dtype, kw, eps_values=(1e-3, 1e-1)):
    gen = torch.Generator().manual_seed(n)
    rel = 4 * torch.finfo(dtype).eps  # the bound holds exactly; allow a few roundings
    for label, v, t in _adversarial_cases(n, gen):
        for eps in eps_values:
            for causal in (True, False):
                vv = v.to(dtype).requires_grad_()
                g = resolvent_diag(vv, -2.0, t, complex(0.0, eps), causal=causal, **kw)
                assert torch.isfinite(torch.view_as_real(g)).all(), (label, eps, causal)
                worst = (g.abs() * eps).max().item()
                assert worst <= 1 + rel, (label, eps, causal, worst)
                assert (g.imag > 0).all(), (label, eps, causal)
                g.backward(torch.ones_like(g))
                assert torch.isfinite(vv.grad).all(), (label, eps, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bound_on_adversarial_inputs_long_chains(dtype):
    # The production CPU path on chains of 8192 sites.
    _check_bound(8192, dtype, dict(backend="cpu"))


@pytest.mark.parametrize("name,kw", PATHS)
def test_bound_on_adversarial_inputs_every_path(name, kw):
    # The same arithmetic on every path; shorter chains where a path is a Python-level loop.
    n = {"reference": 64, "triton": 8}.get(name, 512)
    for dtype in (torch.float32, torch.float64):
        _check_bound(n, dtype, kw, eps_values=(1e-3,))


def test_bound_is_attained_at_resonance():
    # tau = 0, Re(alpha) = 0: g = 1/(-i eps) exactly, |g| = 1/eps -- the bound is tight.
    v = torch.full((1, 5), 2.0, dtype=torch.float64)
    g = resolvent_diag(v, -2.0, 0.0, 1e-3j)
    torch.testing.assert_close(g.abs(), torch.full_like(g.abs(), 1e3), rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def test_errors():
    v = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="eps"):
        resolvent_diag(v, z=0.5 + 0j)
    with pytest.raises(ValueError, match="eps"):
        resolvent_diag(v, z=1.0 - 1e-3j)
    with pytest.raises(ValueError, match="eps"):
        resolvent_diag(v, energy=torch.zeros(3), eps=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="eps"):
        resolvent_diag(v, energy=0.0, eps=-1.0)
    with pytest.raises(ValueError, match="together"):
        resolvent_diag(v, energy=torch.zeros(3))
    with pytest.raises(ValueError, match="broadcast"):
        resolvent_diag(v, t=torch.ones(5))  # 5 is N, not a leading dim
    with pytest.raises(ValueError, match="broadcast"):
        resolvent_diag(v, energy=torch.zeros(2), eps=torch.ones(2))
    with pytest.raises(ValueError, match="broadcast"):
        resolvent_diag(v, h0=torch.zeros(4, 2, 3))
    with pytest.raises(TypeError, match="real floating"):
        resolvent_diag(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="real floating"):
        resolvent_diag(torch.ones(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError):
        resolvent_diag([1.0, 2.0])
    with pytest.raises(TypeError):
        resolvent_diag(v, t=torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError):
        resolvent_diag(v, t=1j)
    with pytest.raises(TypeError):
        resolvent_diag(v, z=torch.tensor(1j))
    with pytest.raises(ValueError, match="backend"):
        resolvent_diag(v, backend="cuda")
    with pytest.raises(ValueError):
        resolvent_diag(torch.tensor(1.0))


def test_empty_rows_and_sequences():
    for shape in [(0, 4), (3, 0)]:
        v = torch.zeros(shape, requires_grad=True)
        for kw in (dict(backend="cpu"), dict(backend="torch"), dict(analytic_gradient=False)):
            g = resolvent_diag(v, causal=False, **kw)
            assert g.shape == shape
            g.real.sum().backward()


# ------------------------------------------------------------------------------------------
# FLOP counting
# ------------------------------------------------------------------------------------------
class _Mixer(torch.nn.Module):
    def __init__(self, causal, **kw):
        super().__init__()
        self.t = torch.nn.Parameter(torch.tensor([0.5, 1.0, 1.5]))
        self.causal, self.kw = causal, kw

    def forward(self, v):
        return resolvent_diag(v, -2.0, self.t, 1j, causal=self.causal, **self.kw)


@pytest.mark.parametrize("kw", [dict(), dict(analytic_gradient=False)], ids=["analytic", "autograd"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_flop_counter_sees_forward_and_backward(kw, causal):
    v = torch.randn(2, 3, 16, requires_grad=True)
    mixer = _Mixer(causal, **kw)
    positions = v.numel()
    with FlopCounterMode(display=False) as fc:
        g = mixer(v)
    assert fc.get_total_flops() == bk_core_flops(positions, causal)
    with FlopCounterMode(display=False) as fc:
        g = mixer(v)
        torch.view_as_real(g).sum().backward()
    fwd = bk_core_flops(positions, causal)
    bwd = bk_core_flops(positions, causal, backward=True)
    assert fc.get_total_flops() == fwd + bwd
    per_module = fc.get_flop_counts()
    assert sum(per_module["_Mixer"].values()) == fwd + bwd
    assert bwd > fwd > 0


def test_flop_helper_numbers():
    assert bk_core_flops(100, True) == 100 * FLOPS_PER_POSITION[(True, False)]
    assert bk_core_flops(100, False, backward=True) == 100 * FLOPS_PER_POSITION[(False, True)]


# ------------------------------------------------------------------------------------------
# Autocast, determinism, broadcasting, threads
# ------------------------------------------------------------------------------------------
def test_autocast_bfloat16_computes_in_float32():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = lin(x).transpose(1, 2)  # (batch 2, heads 8, N 4)
        assert v.dtype == torch.bfloat16
        g = resolvent_diag(v, -2.0, torch.ones(8), energy=torch.zeros(8), eps=torch.ones(8))
    assert g.dtype == torch.complex64
    want = resolvent_diag(v.detach().float())
    torch.testing.assert_close(g.detach(), want)
    torch.view_as_real(g).sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_cpu_path_is_deterministic(causal):
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(16, 4, 3000, generator=gen)  # several chunks, so several threads
    w = torch.randn(v.shape, generator=gen, dtype=torch.complex64)

    def run():
        vv = v.clone().requires_grad_()
        t = torch.tensor([0.5, 0.9, 1.1, 2.0], requires_grad=True)
        e = torch.zeros(4, requires_grad=True)
        s = torch.full((4,), 0.3, requires_grad=True)
        g = resolvent_diag(vv, -2.0, t, energy=e, eps=s, causal=causal, backend="cpu")
        g.backward(w)
        return g, vv.grad, t.grad, e.grad, s.grad

    first = run()
    for a, b in zip(first, run()):
        assert torch.equal(a, b)
    # The split of rows over threads does not touch any row's arithmetic.
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for a, b in zip(first, run()):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(old)


def test_per_head_broadcast_matches_row_by_row():
    gen = torch.Generator().manual_seed(4)
    v = torch.randn(3, 2, 10, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.7, 1.3], dtype=torch.float64)
    e = torch.tensor([0.1, -0.2], dtype=torch.float64)
    s = torch.tensor([0.5, 0.9], dtype=torch.float64)
    g = resolvent_diag(v, -2.0, t, energy=e, eps=s)
    for b in range(3):
        for k in range(2):
            one = resolvent_diag(v[b, k], -2.0, float(t[k]), complex(float(e[k]), float(s[k])))
            torch.testing.assert_close(g[b, k], one, rtol=0, atol=0)


def test_concurrent_calls_from_threads():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(32, 2048, generator=gen)
    want = resolvent_diag(v, causal=False)
    errors = []

    def worker():
        try:
            for _ in range(20):
                if not torch.equal(resolvent_diag(v, causal=False), want):
                    errors.append("mismatch")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


# ------------------------------------------------------------------------------------------
# analytic_gradient=False changes the backward only: no gradient to record, compiled forward
# ------------------------------------------------------------------------------------------
def test_without_a_gradient_to_record_the_autograd_setting_runs_the_compiled_forward(monkeypatch):
    import bkbench.ops.bk_core as core

    calls = {"compiled": 0, "recurrence": 0}
    compiled, recurrence = core._cpu.forward, core._naive.autograd_recurrence

    def counted_compiled(*a):
        calls["compiled"] += 1
        return compiled(*a)

    def counted_recurrence(*a):
        calls["recurrence"] += 1
        return recurrence(*a)

    monkeypatch.setattr(core._cpu, "forward", counted_compiled)
    monkeypatch.setattr(core._naive, "autograd_recurrence", counted_recurrence)
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(4, 2, 33, generator=gen)
    t = torch.tensor([0.7, 1.2], requires_grad=True)
    want = dense_resolvent_diag(v, -2.0, t.detach(), 0.1, 0.6)
    with torch.no_grad():
        g = resolvent_diag(v, -2.0, t, 0.1 + 0.6j, analytic_gradient=False)
    assert calls == {"compiled": 1, "recurrence": 0}
    torch.testing.assert_close(g.to(torch.complex128), want, rtol=1e-5, atol=1e-6)
    g = resolvent_diag(v, -2.0, 1.0, 0.1 + 0.6j, analytic_gradient=False)   # nothing requires grad
    assert calls == {"compiled": 2, "recurrence": 0}
    g = resolvent_diag(v, -2.0, t, 0.1 + 0.6j, analytic_gradient=False)     # t requires grad
    assert calls == {"compiled": 2, "recurrence": 1} and g.requires_grad
    torch.testing.assert_close(g.detach().to(torch.complex128), want, rtol=1e-5, atol=1e-6)
