"""The BK-Core op: the diagonal of the resolvent of a tridiagonal Hamiltonian, in O(N).

Public API::

    from bkbench.ops.bk_core import resolvent_diag, bk_core_flops
    g = resolvent_diag(v, h0=-2.0, t=1.0, z=1j, *, energy=None, eps=None,
                       causal=True, analytic_gradient=True, backend="auto")

For each row of ``v`` (shape (..., N); every leading dim is a batch/head dim) the chain
Hamiltonian H has diagonal ``h0 + v_i`` and off-diagonal ``t``; ``z = E + i*eps``, eps > 0.
With ``alpha_i = h0 + v_i - z``:

* ``causal=True`` (default; the only form a language model may use):
  ``g_i = [(H_{1..i} - z)^-1]_{ii}``, i.e. ``g_1 = 1/alpha_1``, ``g_i = 1/(alpha_i - t^2 g_{i-1})``.
  g_i depends on v_1..v_i only.
* ``causal=False``: ``G_ii = [(H - z)^-1]_{ii}`` over the whole chain, from a left sweep gL and a
  right sweep gR: ``G_i = 1/(alpha_i - t^2 gL_{i-1} - t^2 gR_{i+1})``.

Since ``Im(denominator) <= -eps`` at every step, ``|g| <= 1/eps`` always: nothing is clamped.

Gradients reach ``v``, ``t``, ``energy``, ``eps`` and a tensor ``h0``. With
``analytic_gradient=True`` the backward is the exact adjoint sweep (O(N), docs/bk-core.md);
with ``analytic_gradient=False`` it is plain autograd through a vectorised torch recurrence
(the benchmark's baseline; slow, but the same function). Without a gradient to record both
run the same compiled forward.

Layers of this package (flash-linear-attention style):

* :mod:`.naive` -- dense ``torch.linalg.inv`` oracle, readable reference loop, vectorised torch
  sweeps, and the autograd recurrence;
* :mod:`.cpu` -- numba kernels (compiled CPU path);
* :mod:`.triton` -- Triton kernels (CUDA; CPU tensors run them under Triton's interpreter);
* this module -- validation, broadcasting, backend dispatch, the ``torch.library`` custom ops
  that carry autograd, and the FLOP formulas registered with FlopCounterMode.
"""

from __future__ import annotations

import math
import numbers
import threading

import torch
from torch.utils.flop_counter import register_flop_formula

from . import cpu as _cpu
from . import naive as _naive
from . import triton as _triton

__all__ = [
    "resolvent_diag",
    "bk_core_flops",
    "available_backends",
    "BACKENDS",
    "FLOPS_PER_POSITION",
]

BACKENDS = ("auto", "reference", "torch", "cpu", "triton")

# ---------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------
#: Real floating-point operations per position (one site of one row), counted line by line
#: from the kernels in :mod:`.cpu` (the Triton kernels are the same code): every real
#: add, subtract, multiply and divide counts 1; negation and loads/stores count 0; the per-row
#: prologue/epilogue (loading shift, eps, tau; writing three per-row sums) is not counted.
#:
#: * causal forward, 10: ``d = (shift + v_i - tau*Re g) + i(-eps - tau*Im g)`` 5,
#:   ``|d|^2`` 3, ``g = conj(d)/|d|^2`` 2 divisions.
#: * causal backward, 21: ``s = gbar + carry`` 2, ``g^2`` 5, ``delta = -conj(g^2) s`` 6,
#:   shift/eps sums 2, tau sum ``Re(conj(g_{i-1}) delta)`` 4, ``carry = -tau*delta`` 2.
#: * bidirectional forward, 31: right sweep 10, combination
#:   ``1/(alpha - tau(gL + gR))`` 12, left sweep step 9 (alpha shared).
#: * bidirectional backward, 92: left sweep recomputed 10; right-to-left pass 49
#:   (combination adjoint 11, its tau term 6, left-sweep adjoint 4 + 11 + 4, grad/eps
#:   accumulation 3, right sweep recomputed 10); left-to-right pass 33 (right-sweep adjoint
#:   4 + 11 + 4, accumulations 3, combination adjoint recomputed 11).
FLOPS_PER_POSITION = {
    (True, False): 10,
    (True, True): 21,
    (False, False): 31,
    (False, True): 92,
}


def bk_core_flops(num_positions: int, causal: bool = True, backward: bool = False) -> int:
    """FLOPs of the BK-Core for ``num_positions`` = rows x N sites (see FLOPS_PER_POSITION).

    ``backward=False`` gives the forward count; ``backward=True`` the backward (adjoint) count
    alone. The same numbers are what FlopCounterMode reports for the op.
    """
    return int(num_positions) * FLOPS_PER_POSITION[(bool(causal), bool(backward))]


# ---------------------------------------------------------------------------------------------
# Backend table (row form: v (R, N), shift/eps/tau (R,))
# ---------------------------------------------------------------------------------------------
_FORWARD = {
    "reference": _naive.reference_forward,
    "torch": _naive.torch_forward,
    "cpu": _cpu.forward,
    "triton": _triton.forward,
}
_BACKWARD = {
    "reference": _naive.reference_backward,
    "torch": _naive.torch_backward,
    "cpu": _cpu.backward,
    "triton": _triton.backward,
}

# The CPU kernels are re-entrant, but two concurrent calls would each spread over all cores;
# one call at a time keeps the thread count at what the caller asked for.
_CPU_LOCK = threading.Lock()


def _run_forward(backend, v, shift, eps, tau, causal):
    if backend == "cpu":
        with _CPU_LOCK:
            return _cpu.forward(v, shift, eps, tau, causal)
    return _FORWARD[backend](v, shift, eps, tau, causal)


def _run_backward(backend, v, shift, eps, tau, g, grad_g, causal):
    if backend == "cpu":
        with _CPU_LOCK:
            return _cpu.backward(v, shift, eps, tau, g, grad_g, causal)
    return _BACKWARD[backend](v, shift, eps, tau, g, grad_g, causal)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (the interpreted Triton path counts on CPU)."""
    device = torch.device(device)
    out = ["reference", "torch"]
    if device.type == "cpu" and _cpu.HAVE_NUMBA:
        out.append("cpu")
    if _triton.available(device):
        out.append("triton")
    return out


def auto_backend(device: torch.device) -> str:
    """The compiled backend ``resolvent_diag`` runs on ``device`` when none is named."""
    if device.type == "cpu":
        return "cpu" if _cpu.HAVE_NUMBA else "torch"
    if device.type == "cuda" and _triton.available(device):
        return "triton"
    return "torch"


# ---------------------------------------------------------------------------------------------
# Custom ops: forward, backward, and a FLOP marker for the autograd path
# ---------------------------------------------------------------------------------------------
def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@torch.library.custom_op("bkbench::bk_core_fwd", mutates_args=())
def _bk_core_fwd(v: torch.Tensor, shift: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor,
                 causal: bool, backend: str) -> torch.Tensor:
    return _run_forward(backend, v, shift, eps, tau, causal).contiguous()


@_bk_core_fwd.register_fake
def _(v, shift, eps, tau, causal, backend):
    return v.new_empty(v.shape, dtype=_complex_of(v.dtype))


@torch.library.custom_op("bkbench::bk_core_bwd", mutates_args=())
def _bk_core_bwd(v: torch.Tensor, shift: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor,
                 g: torch.Tensor, grad_g: torch.Tensor, causal: bool, backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gv, gs, ge, gt = _run_backward(backend, v, shift, eps, tau, g, grad_g, causal)
    return gv.contiguous(), gs.contiguous(), ge.contiguous(), gt.contiguous()


@_bk_core_bwd.register_fake
def _(v, shift, eps, tau, g, grad_g, causal, backend):
    return (torch.empty_like(v), torch.empty_like(shift), torch.empty_like(eps),
            torch.empty_like(tau))


def _fwd_setup_context(ctx, inputs, output):
    v, shift, eps, tau, causal, backend = inputs
    ctx.save_for_backward(v, shift, eps, tau, output)
    ctx.causal = causal
    ctx.backend = backend


def _fwd_backward(ctx, grad_g):
    v, shift, eps, tau, g = ctx.saved_tensors
    gv, gs, ge, gt = _bk_core_bwd(v, shift, eps, tau, g, grad_g.contiguous(), ctx.causal,
                                  ctx.backend)
    return gv, gs, ge, gt, None, None


_bk_core_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


@torch.library.custom_op("bkbench::bk_core_flop_marker", mutates_args=())
def _flop_marker(g: torch.Tensor, causal: bool, backward: bool) -> torch.Tensor:
    """Identity (a copy) that carries the BK-Core FLOP formula for the autograd path.

    ``analytic_gradient=False`` runs aten element-wise ops, which FlopCounterMode does not
    count; this marker makes the counter report the same forward/backward counts as for the
    analytic path, so a FLOP comparison between the two flags compares like with like.
    """
    return g.clone()


@_flop_marker.register_fake
def _(g, causal, backward):
    return torch.empty_like(g)


def _marker_setup_context(ctx, inputs, output):
    ctx.causal = inputs[1]


def _marker_backward(ctx, grad):
    return _flop_marker(grad, ctx.causal, True), None, None


_flop_marker.register_autograd(_marker_backward, setup_context=_marker_setup_context)


def _positions(shape) -> int:
    return math.prod(shape)


def _arg(args, kwargs, index, name):
    return args[index] if len(args) > index else kwargs[name]


@register_flop_formula(torch.ops.bkbench.bk_core_fwd)
def _bk_core_fwd_flops(v_shape, *args, out_shape=None, **kwargs) -> int:
    causal = _arg(args, kwargs, 3, "causal")
    return bk_core_flops(_positions(v_shape), causal, backward=False)


@register_flop_formula(torch.ops.bkbench.bk_core_bwd)
def _bk_core_bwd_flops(v_shape, *args, out_shape=None, **kwargs) -> int:
    causal = _arg(args, kwargs, 5, "causal")
    return bk_core_flops(_positions(v_shape), causal, backward=True)


@register_flop_formula(torch.ops.bkbench.bk_core_flop_marker)
def _bk_core_marker_flops(g_shape, *args, out_shape=None, **kwargs) -> int:
    causal = _arg(args, kwargs, 0, "causal")
    backward = _arg(args, kwargs, 1, "backward")
    return bk_core_flops(_positions(g_shape), causal, backward=backward)


# ---------------------------------------------------------------------------------------------
# Validation and the public function
# ---------------------------------------------------------------------------------------------
def _is_real_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _row_param(name, x, lead, rows, dtype, device) -> torch.Tensor:
    """A float or real tensor broadcastable to ``lead`` -> a (rows,) tensor (autograd kept)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex() or not x.is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor or a float, "
                            f"got a tensor of dtype {x.dtype}")
        if x.device != device:
            if x.dim() == 0 and x.device.type == "cpu":
                x = x.to(device)
            else:
                raise ValueError(f"{name} is on {x.device} but v is on {device}")
        shape = tuple(x.shape)
        ok = len(shape) <= len(lead) and all(
            a == 1 or a == b for a, b in zip(reversed(shape), reversed(lead)))
        if not ok:
            raise ValueError(f"{name} of shape {tuple(x.shape)} does not broadcast to the "
                             f"leading dims of v {tuple(lead)} (v has shape (*lead, N))")
        return x.to(dtype).expand(lead).reshape(rows)
    if _is_real_number(x):
        return torch.full((rows,), float(x), dtype=dtype, device=device)
    raise TypeError(f"{name} must be a real float or a real tensor, got {type(x).__name__}")


def _checked_potential(v, causal, analytic_gradient, backend) -> torch.Tensor:
    """``v`` as a float32/float64 tensor of at least one dim, the flags checked."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    if v.is_complex() or not v.is_floating_point():
        raise TypeError(f"v must be a real floating-point tensor (float32/float64), "
                        f"got dtype {v.dtype}")
    if v.dim() < 1:
        raise ValueError("v must have at least one dim (..., N)")
    if v.dtype not in (torch.float32, torch.float64):
        v = v.to(torch.float32)  # half/bfloat16 (e.g. under autocast): computed in float32
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(analytic_gradient, bool):
        raise TypeError(f"analytic_gradient must be a bool, got {type(analytic_gradient).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return v


def _energy_and_eps(z, energy, eps):
    """(energy, eps) from ``z`` = E + i*eps, or as given; eps > 0 checked."""
    if (energy is None) != (eps is None):
        raise ValueError("energy and eps must be given together (they replace z)")
    if energy is None:
        if isinstance(z, torch.Tensor) or not isinstance(z, numbers.Number) or isinstance(z, bool):
            raise TypeError("z must be a Python number E + i*eps; pass tensors as "
                            "energy=..., eps=...")
        zc = complex(z)
        if not math.isfinite(zc.real) or not math.isfinite(zc.imag):
            raise ValueError(f"z must be finite, got {z!r}")
        energy, eps = zc.real, zc.imag
    if isinstance(eps, torch.Tensor):
        if eps.is_floating_point() and not bool((eps.detach() > 0).all()):
            raise ValueError("eps (the imaginary part of z) must be > 0 everywhere; "
                             f"got min {eps.detach().min().item()}")
    elif _is_real_number(eps) and not eps > 0:
        raise ValueError(f"eps (the imaginary part of z) must be > 0, got {eps}")
    return energy, eps


def _usable_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device`` ("auto" resolved), or an error saying why not."""
    if backend == "auto":
        return auto_backend(device)
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, v is on {device}")
    if backend == "cpu" and not _cpu.HAVE_NUMBA:
        raise RuntimeError("backend 'cpu' needs numba, which is not importable")
    if backend == "triton" and not _triton.available(device):
        raise RuntimeError(f"backend 'triton' is not available on {device} "
                           f"(triton installed: {_triton.HAVE_TRITON})")
    return backend


def resolvent_diag(v: torch.Tensor, h0=-2.0, t=1.0, z=1j, *, energy=None, eps=None,
                   causal: bool = True, analytic_gradient: bool = True,
                   backend: str = "auto") -> torch.Tensor:
    """Diagonal of the (causal or full) resolvent of the BK tridiagonal chain, O(N) per row.

    Args:
        v: real potential, shape (..., N), float32 or float64 (float16/bfloat16 are computed
            in float32, e.g. inside autocast). Every leading dim is a batch/head dim.
        h0: free diagonal; float or real tensor broadcastable to ``v.shape[:-1]``.
        t: coupling; float or real tensor broadcastable to ``v.shape[:-1]`` (per head: shape
            (K,) for v of shape (B, K, N)). Only t**2 enters, so the sign of t is free.
        z: spectral shift E + i*eps as a Python number; needs Im z > 0.
        energy, eps: real tensors (or floats) broadcastable to ``v.shape[:-1]``; if given
            (both, together) they replace ``z``. Every eps must be > 0.
        causal: True for g_i of the chain cut at i (depends on v_1..v_i only);
            False for the bidirectional diag((H - z)^-1) over the whole chain.
        analytic_gradient: True: backward by the exact O(N) adjoint sweep of the chosen
            backend. False: autograd through a vectorised torch recurrence (slow baseline;
            ``backend`` is then ignored) whenever a gradient is to be recorded; where none is
            (under ``torch.no_grad()``, or no input requires grad) the forward is the
            chosen backend's, as with True: the flag changes the backward and the forward
            that must record it, nothing else.
        backend: "auto" (CPU -> "cpu", CUDA -> "triton" when available, else "torch"),
            "reference" (Python loop, oracle only), "torch" (vectorised torch sweeps, any
            device), "cpu" (numba), "triton" (CUDA; CPU tensors run under Triton's
            interpreter, for testing).

    Returns:
        complex64 (complex128 for float64 ``v``) tensor of shape ``v.shape``, with
        ``|g| <= 1/eps`` elementwise.

    Raises:
        TypeError: ``v`` not a real floating tensor, or a parameter of the wrong kind.
        ValueError: eps <= 0, shapes that do not broadcast, bad backend, ``energy`` without
            ``eps`` (or vice versa), a 0-dim ``v``.
    """
    v = _checked_potential(v, causal, analytic_gradient, backend)
    dtype, device = v.dtype, v.device
    lead = tuple(v.shape[:-1])
    n = v.shape[-1]
    rows = _positions(lead)
    energy, eps = _energy_and_eps(z, energy, eps)

    shift = _row_param("h0", h0, lead, rows, dtype, device) - \
        _row_param("energy", energy, lead, rows, dtype, device)
    eps_r = _row_param("eps", eps, lead, rows, dtype, device)
    t_r = _row_param("t", t, lead, rows, dtype, device)
    tau = t_r * t_r
    v_rows = v.reshape(rows, n)

    # The autograd recurrence exists to record the forward for autograd; where no gradient
    # will be taken (no_grad, evaluation, constant inputs) both settings run the compiled forward.
    needs_graph = torch.is_grad_enabled() and any(
        x.requires_grad for x in (v_rows, shift, eps_r, tau))
    if not analytic_gradient and needs_graph:
        g = _naive.autograd_recurrence(v_rows, shift, eps_r, tau, causal)
        g = _flop_marker(g, causal, False)
        return g.reshape(v.shape)

    backend = _usable_backend(backend, device)
    g = _bk_core_fwd(v_rows.contiguous(), shift.contiguous(), eps_r.contiguous(),
                     tau.contiguous(), causal, backend)
    return g.reshape(v.shape)
