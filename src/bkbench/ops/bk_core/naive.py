"""Plain implementations of the BK-Core, used as oracles and as the autograd baseline.

Everything here works on the *row* form of the problem that the public op reduces to
(see :mod:`bkbench.ops.bk_core`): a real potential ``v`` of shape (R, N) and three real
per-row parameters of shape (R,):

* ``shift`` = h0 - E, so that the diagonal of H - z is ``alpha_i = shift + v_i - i*eps``;
* ``eps``   = the imaginary part of z (must be > 0);
* ``tau``   = t**2, the squared coupling.

Contents:

* :func:`dense_resolvent_diag` -- the dense complex128 oracle built on ``torch.linalg.inv``
  (differentiable, so gradcheck can compare gradients too). Works on the *public* arguments
  (v of shape (..., N), h0, t, energy, eps broadcastable to the leading dims).
* :func:`reference_forward` / :func:`reference_backward` -- a readable per-row, per-position
  Python loop: the forward recurrence and the exact adjoint sweep, written to be read.
* :func:`torch_forward` / :func:`torch_backward` -- the same two sweeps vectorised over rows
  with torch (loop over N only). They run on any device.
* :func:`autograd_recurrence` -- the forward recurrence written with differentiable torch ops,
  so that plain autograd produces the gradient (the ``analytic_gradient=False`` path).

Sign conventions of the adjoint (PyTorch's, see docs/bk-core.md): for a real loss L and a
complex tensor g, the incoming gradient is ``gbar = dL/dRe g + i dL/dIm g``; for a
holomorphic w = f(u), ``ubar += conj(f'(u)) * wbar``; for a real x entering through a complex
u(x), ``xbar = Re(conj(du/dx) * ubar)``.

With d_i = alpha_i - tau*g_{i-1} and g_i = 1/d_i the causal adjoint is::

    s_{N-1} = gbar_{N-1},  delta_i = -conj(g_i^2) * s_i,  s_{i-1} = gbar_{i-1} - tau*delta_i
    vbar_i  = Re delta_i,  shiftbar = sum_i Re delta_i,  epsbar = -sum_i Im delta_i,
    taubar  = -sum_i Re(conj(g_{i-1}) * delta_i)

The bidirectional core G_i = 1/(alpha_i - tau*gL_{i-1} - tau*gR_{i+1}) is differentiated by the
same rule through the combination and both sweeps (the left sweep's adjoint runs right to
left, the right sweep's left to right).
"""

from __future__ import annotations

import torch

__all__ = [
    "dense_resolvent_diag",
    "reference_forward",
    "reference_backward",
    "torch_forward",
    "torch_backward",
    "autograd_recurrence",
]


# ---------------------------------------------------------------------------------------------
# Dense oracle
# ---------------------------------------------------------------------------------------------
def _as_real_tensor(x, like: torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(like.dtype)
    return torch.tensor(float(x), dtype=like.dtype, device=like.device)


def dense_resolvent_diag(v, h0=-2.0, t=1.0, energy=0.0, eps=1.0, causal=True):
    """diag((H - z)^-1) by dense inversion, in complex128 (O(N^4) causal, O(N^3) otherwise).

    ``v`` is (..., N) real; ``h0``, ``t``, ``energy``, ``eps`` are floats or real tensors
    broadcastable to ``v.shape[:-1]``. H is tridiagonal with diagonal h0 + v_i and
    off-diagonal t; z = energy + i*eps. For ``causal=True`` entry i is read from the inverse
    of the leading (i+1)x(i+1) block (the chain cut after site i). Differentiable in every
    tensor argument (it is built from torch ops only), so it serves as the gradcheck oracle.
    """
    v64 = v.to(torch.float64)
    lead = v64.shape[:-1]
    n = v64.shape[-1]
    h0 = torch.broadcast_to(_as_real_tensor(h0, v64), lead)
    t = torch.broadcast_to(_as_real_tensor(t, v64), lead)
    energy = torch.broadcast_to(_as_real_tensor(energy, v64), lead)
    eps = torch.broadcast_to(_as_real_tensor(eps, v64), lead)
    z = torch.complex(energy, eps)

    eye = torch.eye(n, dtype=torch.float64, device=v64.device)
    off = torch.diag(torch.ones(max(n - 1, 0), dtype=torch.float64, device=v64.device), 1)
    off = off + off.T
    h = (h0[..., None] + v64)[..., None] * eye + t[..., None, None] * off
    a = h.to(torch.complex128) - z[..., None, None] * eye.to(torch.complex128)
    if not causal:
        return torch.diagonal(torch.linalg.inv(a), dim1=-2, dim2=-1)
    cols = []
    for i in range(n):
        block = a[..., : i + 1, : i + 1]
        cols.append(torch.linalg.inv(block)[..., i, i])
    if not cols:
        return torch.zeros(v64.shape, dtype=torch.complex128, device=v64.device)
    return torch.stack(cols, dim=-1)


# ---------------------------------------------------------------------------------------------
# Readable reference loop (Python complex arithmetic, float64)
# ---------------------------------------------------------------------------------------------
def _complex_dtype(real_dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if real_dtype == torch.float64 else torch.complex64


def _sweep(alpha, tau):
    """g_0 = 1/alpha_0, g_i = 1/(alpha_i - tau*g_{i-1}), as a list of Python complex."""
    g = []
    prev = 0j
    for a in alpha:
        prev = 1.0 / (a - tau * prev)
        g.append(prev)
    return g


def _sweep_adjoint(g, gbar, tau):
    """Adjoint of :func:`_sweep`: returns (alphabar list, taubar) for incoming gbar."""
    n = len(g)
    alphabar = [0j] * n
    taubar = 0.0
    carry = 0j
    for i in range(n - 1, -1, -1):
        s = gbar[i] + carry
        delta = -(g[i] * g[i]).conjugate() * s
        alphabar[i] = delta
        if i > 0:
            taubar -= (g[i - 1].conjugate() * delta).real
        carry = -tau * delta
    return alphabar, taubar


def reference_forward(v, shift, eps, tau, causal):
    """Row-form forward by a plain Python loop. Returns complex (R, N)."""
    rows, n = v.shape
    out = torch.empty((rows, n), dtype=torch.complex128)
    vv = v.detach().cpu().to(torch.float64).tolist()
    for r in range(rows):
        s, e, tr = float(shift[r]), float(eps[r]), float(tau[r])
        alpha = [complex(s + x, -e) for x in vv[r]]
        left = _sweep(alpha, tr)
        if causal:
            row = left
        else:
            right = _sweep(alpha[::-1], tr)[::-1]
            row = []
            for i in range(n):
                gl = left[i - 1] if i > 0 else 0j
                gr = right[i + 1] if i + 1 < n else 0j
                row.append(1.0 / (alpha[i] - tr * gl - tr * gr))
        out[r] = torch.tensor(row, dtype=torch.complex128)
    return out.to(device=v.device, dtype=_complex_dtype(v.dtype))


def reference_backward(v, shift, eps, tau, g, grad_g, causal):
    """Row-form exact adjoint by a plain Python loop.

    Returns (grad_v (R, N), grad_shift (R,), grad_eps (R,), grad_tau (R,)), real, in v's dtype.
    ``g`` is the forward output (used directly in the causal case).
    """
    rows, n = v.shape
    gv = torch.zeros((rows, n), dtype=torch.float64)
    gs = torch.zeros(rows, dtype=torch.float64)
    ge = torch.zeros(rows, dtype=torch.float64)
    gt = torch.zeros(rows, dtype=torch.float64)
    vv = v.detach().cpu().to(torch.float64).tolist()
    gbar_all = grad_g.detach().cpu().to(torch.complex128).tolist()
    for r in range(rows):
        s, e, tr = float(shift[r]), float(eps[r]), float(tau[r])
        alpha = [complex(s + x, -e) for x in vv[r]]
        gbar = gbar_all[r]
        left = _sweep(alpha, tr)
        if causal:
            alphabar, taubar = _sweep_adjoint(left, gbar, tr)
        else:
            right = _sweep(alpha[::-1], tr)[::-1]
            alphabar = [0j] * n
            left_bar = [0j] * n
            right_bar = [0j] * n
            taubar = 0.0
            for i in range(n):
                gl = left[i - 1] if i > 0 else 0j
                gr = right[i + 1] if i + 1 < n else 0j
                big = 1.0 / (alpha[i] - tr * gl - tr * gr)
                delta = -(big * big).conjugate() * gbar[i]
                alphabar[i] += delta
                taubar -= ((gl + gr).conjugate() * delta).real
                if i > 0:
                    left_bar[i - 1] += -tr * delta
                if i + 1 < n:
                    right_bar[i + 1] += -tr * delta
            a_left, t_left = _sweep_adjoint(left, left_bar, tr)
            a_right, t_right = _sweep_adjoint(right[::-1], right_bar[::-1], tr)
            a_right = a_right[::-1]
            for i in range(n):
                alphabar[i] += a_left[i] + a_right[i]
            taubar += t_left + t_right
        gv[r] = torch.tensor([a.real for a in alphabar], dtype=torch.float64)
        gs[r] = sum(a.real for a in alphabar)
        ge[r] = -sum(a.imag for a in alphabar)
        gt[r] = taubar
    dev, dt = v.device, v.dtype
    return gv.to(dev, dt), gs.to(dev, dt), ge.to(dev, dt), gt.to(dev, dt)


# ---------------------------------------------------------------------------------------------
# Vectorised torch sweeps (loop over N, vectorised over rows)
# ---------------------------------------------------------------------------------------------
def _alpha(v, shift, eps):
    return torch.complex(shift[:, None] + v, (-eps)[:, None].expand_as(v))


def _torch_sweep(alpha, tau, reverse):
    rows, n = alpha.shape
    out = torch.empty_like(alpha)
    prev = torch.zeros(rows, dtype=alpha.dtype, device=alpha.device)
    order = range(n - 1, -1, -1) if reverse else range(n)
    for i in order:
        prev = torch.reciprocal(alpha[:, i] - tau * prev)
        out[:, i] = prev
    return out


def _torch_sweep_adjoint(g, gbar, tau, reverse):
    """Adjoint of :func:`_torch_sweep` (``reverse`` as in the forward sweep)."""
    rows, n = g.shape
    alphabar = torch.empty_like(g)
    taubar = torch.zeros(rows, dtype=g.real.dtype, device=g.device)
    carry = torch.zeros(rows, dtype=g.dtype, device=g.device)
    # The adjoint runs against the forward sweep; j is the site the forward step at i read.
    order = range(n) if reverse else range(n - 1, -1, -1)
    for i in order:
        s = gbar[:, i] + carry
        delta = -(g[:, i] * g[:, i]).conj() * s
        alphabar[:, i] = delta
        j = i + 1 if reverse else i - 1
        if 0 <= j < n:
            taubar = taubar - (g[:, j].conj() * delta).real
        carry = -tau * delta
    return alphabar, taubar


def _shifted(x, direction):
    """x shifted by one site along the last dim with zero fill: direction=+1 gives x_{i-1}."""
    z = torch.zeros_like(x[:, :1])
    if direction > 0:
        return torch.cat([z, x[:, :-1]], dim=1)
    return torch.cat([x[:, 1:], z], dim=1)


def _sweeps(alpha, tau, causal, sweep):
    """The causal left sweep, or the bidirectional combination of a left and a right sweep."""
    left = sweep(alpha, tau, reverse=False)
    if causal:
        return left
    right = sweep(alpha, tau, reverse=True)
    t = tau[:, None]
    return torch.reciprocal(alpha - t * _shifted(left, +1) - t * _shifted(right, -1))


def torch_forward(v, shift, eps, tau, causal):
    """Row-form forward, vectorised over rows (loop over N). Any device."""
    return _sweeps(_alpha(v, shift, eps), tau, causal, _torch_sweep)


def torch_backward(v, shift, eps, tau, g, grad_g, causal):
    """Row-form exact adjoint, vectorised over rows (loop over N). Any device."""
    alpha = _alpha(v, shift, eps)
    gbar = grad_g.to(alpha.dtype)
    if causal:
        alphabar, taubar = _torch_sweep_adjoint(g, gbar, tau, reverse=False)
    else:
        t = tau[:, None]
        left = _torch_sweep(alpha, tau, reverse=False)
        right = _torch_sweep(alpha, tau, reverse=True)
        gl, gr = _shifted(left, +1), _shifted(right, -1)
        delta = -(g * g).conj() * gbar
        taubar = -((gl + gr).conj() * delta).real.sum(dim=1)
        # delta_i flows to gL_{i-1} and to gR_{i+1}, each with factor -tau.
        left_bar = _shifted(-t * delta, -1)
        right_bar = _shifted(-t * delta, +1)
        a_l, t_l = _torch_sweep_adjoint(left, left_bar, tau, reverse=False)
        a_r, t_r = _torch_sweep_adjoint(right, right_bar, tau, reverse=True)
        alphabar = delta + a_l + a_r
        taubar = taubar + t_l + t_r
    grad_v = alphabar.real.contiguous()
    return grad_v, grad_v.sum(dim=1), -alphabar.imag.sum(dim=1), taubar


# ---------------------------------------------------------------------------------------------
# Autograd through the recurrence (the analytic_gradient=False baseline)
# ---------------------------------------------------------------------------------------------
def _autograd_sweep(alpha, tau, reverse):
    # unbind, not alpha[:, i]: the backward of N column selections would build N full-size
    # zero tensors (O(N^2) memory traffic), that of one unbind is a single stack.
    columns = alpha.unbind(dim=1)
    n = len(columns)
    cols = []
    prev = None
    order = range(n - 1, -1, -1) if reverse else range(n)
    for i in order:
        d = columns[i] if prev is None else columns[i] - tau * prev
        prev = torch.reciprocal(d)
        cols.append(prev)
    if reverse:
        cols.reverse()
    return torch.stack(cols, dim=1)


def autograd_recurrence(v, shift, eps, tau, causal):
    """Row-form forward from differentiable torch ops only; autograd gives its gradient.

    Every input may require grad (v (R, N), shift/eps/tau (R,)). Nothing is clamped.
    """
    n = v.shape[1]
    alpha = _alpha(v, shift, eps)
    if n == 0:
        return alpha.clone()
    return _sweeps(alpha, tau, causal, _autograd_sweep)
