"""Triton path of the BK-Core: sequential over N, rows in parallel, forward and exact adjoint.

Each program owns ``BLOCK_R`` rows and walks along N; the lanes of the program are rows (with
``BLOCK_R = 1`` this is literally one program per row). Grouping a few rows per program keeps
the lanes of a warp busy instead of having 31 of 32 threads repeat the same scalar work; the
sweep itself is the same serial recurrence as the CPU kernels in :mod:`.cpu` and follows them
line for line (same passes, same buffer reuse).

The kernels are defined as plain Python functions and wrapped twice: with ``triton.jit`` for
CUDA tensors, and with Triton's interpreter (``InterpretedFunction``) for CPU tensors, so the
very same kernel source is tested on a machine without a GPU (slowly: every step is a numpy
call, so keep N small there). If triton is not installed, :data:`HAVE_TRITON` is False and
calling the path raises a clear error; importing this module never fails.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton missing or broken
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = ["HAVE_TRITON", "available", "forward", "backward"]


def available(device: torch.device | None = None) -> bool:
    """True when the Triton path can run on ``device`` (CUDA compiled, CPU interpreted)."""
    if not HAVE_TRITON:
        return False
    if device is None or device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and _interpreter_works()


_KERNELS: dict = {}
_INTERP_OK: bool | None = None


if HAVE_TRITON:

    def _causal_fwd_kernel(v_ptr, shift_ptr, eps_ptr, tau_ptr, out_ptr, R, N,
                           BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        a = tl.load(shift_ptr + rows, mask=rmask, other=0.0)
        ne = -tl.load(eps_ptr + rows, mask=rmask, other=1.0)
        tr = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
        gr = a * 0.0
        gi = a * 0.0
        base = rows.to(tl.int64) * N
        for i in range(N):
            x = tl.load(v_ptr + base + i, mask=rmask, other=0.0)
            dr = a + x - tr * gr
            di = ne - tr * gi
            m = dr * dr + di * di
            gr = dr / m
            gi = -di / m
            tl.store(out_ptr + 2 * (base + i), gr, mask=rmask)
            tl.store(out_ptr + 2 * (base + i) + 1, gi, mask=rmask)

    def _bidir_fwd_kernel(v_ptr, shift_ptr, eps_ptr, tau_ptr, out_ptr, R, N,
                          BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        a = tl.load(shift_ptr + rows, mask=rmask, other=0.0)
        ne = -tl.load(eps_ptr + rows, mask=rmask, other=1.0)
        tr = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
        base = rows.to(tl.int64) * N
        gr = a * 0.0
        gi = a * 0.0
        for k in range(N):  # right sweep into out
            i = N - 1 - k
            x = tl.load(v_ptr + base + i, mask=rmask, other=0.0)
            dr = a + x - tr * gr
            di = ne - tr * gi
            m = dr * dr + di * di
            gr = dr / m
            gi = -di / m
            tl.store(out_ptr + 2 * (base + i), gr, mask=rmask)
            tl.store(out_ptr + 2 * (base + i) + 1, gi, mask=rmask)
        lr = a * 0.0
        li = a * 0.0
        for i in range(N):  # left sweep, combined on the fly
            ar = a + tl.load(v_ptr + base + i, mask=rmask, other=0.0)
            nmask = rmask & ((rows * 0 + i + 1) < N)
            rr = tl.load(out_ptr + 2 * (base + i + 1), mask=nmask, other=0.0)
            ri = tl.load(out_ptr + 2 * (base + i + 1) + 1, mask=nmask, other=0.0)
            dr = ar - tr * (lr + rr)
            di = ne - tr * (li + ri)
            m = dr * dr + di * di
            tl.store(out_ptr + 2 * (base + i), dr / m, mask=rmask)
            tl.store(out_ptr + 2 * (base + i) + 1, -di / m, mask=rmask)
            dr = ar - tr * lr
            di = ne - tr * li
            m = dr * dr + di * di
            lr = dr / m
            li = -di / m

    def _causal_bwd_kernel(g_ptr, gbar_ptr, tau_ptr, gv_ptr, gs_ptr, ge_ptr, gt_ptr, R, N,
                           BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        tr = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
        base = rows.to(tl.int64) * N
        cr = tr * 0.0
        ci = tr * 0.0
        acc_s = tr * 0.0
        acc_e = tr * 0.0
        acc_t = tr * 0.0
        for k in range(N):
            i = N - 1 - k
            sr = tl.load(gbar_ptr + 2 * (base + i), mask=rmask, other=0.0) + cr
            si = tl.load(gbar_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0) + ci
            xr = tl.load(g_ptr + 2 * (base + i), mask=rmask, other=0.0)
            xi = tl.load(g_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            pr = xr * xr - xi * xi
            pi = xr * xi + xr * xi
            dr = -(pr * sr + pi * si)
            di = -(pr * si - pi * sr)
            tl.store(gv_ptr + base + i, dr, mask=rmask)
            acc_s += dr
            acc_e -= di
            pmask = rmask & ((rows * 0 + i) > 0)
            yr = tl.load(g_ptr + 2 * (base + i - 1), mask=pmask, other=0.0)
            yi = tl.load(g_ptr + 2 * (base + i - 1) + 1, mask=pmask, other=0.0)
            acc_t -= yr * dr + yi * di
            cr = -tr * dr
            ci = -tr * di
        tl.store(gs_ptr + rows, acc_s, mask=rmask)
        tl.store(ge_ptr + rows, acc_e, mask=rmask)
        tl.store(gt_ptr + rows, acc_t, mask=rmask)

    def _bidir_bwd_kernel(v_ptr, shift_ptr, eps_ptr, tau_ptr, g_ptr, gbar_ptr, buf_ptr,
                          gv_ptr, gs_ptr, ge_ptr, gt_ptr, R, N, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        a = tl.load(shift_ptr + rows, mask=rmask, other=0.0)
        ne = -tl.load(eps_ptr + rows, mask=rmask, other=1.0)
        tr = tl.load(tau_ptr + rows, mask=rmask, other=0.0)
        base = rows.to(tl.int64) * N
        acc_s = a * 0.0
        acc_e = a * 0.0
        acc_t = a * 0.0
        # Pass 1: left sweep into buf.
        lr = a * 0.0
        li = a * 0.0
        for i in range(N):
            dr = a + tl.load(v_ptr + base + i, mask=rmask, other=0.0) - tr * lr
            di = ne - tr * li
            m = dr * dr + di * di
            lr = dr / m
            li = -di / m
            tl.store(buf_ptr + 2 * (base + i), lr, mask=rmask)
            tl.store(buf_ptr + 2 * (base + i) + 1, li, mask=rmask)
        # Pass 2 (right to left): deltaD, left adjoint, right sweep recomputed into buf.
        qr = a * 0.0
        qi = a * 0.0
        ddr = a * 0.0
        ddi = a * 0.0
        dlr = a * 0.0
        dli = a * 0.0
        for k in range(N):
            i = N - 1 - k
            pmask = rmask & ((rows * 0 + i) > 0)
            pr = tl.load(buf_ptr + 2 * (base + i - 1), mask=pmask, other=0.0)
            pi = tl.load(buf_ptr + 2 * (base + i - 1) + 1, mask=pmask, other=0.0)
            xr = tl.load(g_ptr + 2 * (base + i), mask=rmask, other=0.0)
            xi = tl.load(g_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            sr = tl.load(gbar_ptr + 2 * (base + i), mask=rmask, other=0.0)
            si = tl.load(gbar_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            wr = xr * xr - xi * xi
            wi = xr * xi + xr * xi
            er = -(wr * sr + wi * si)
            ei = -(wr * si - wi * sr)
            acc_t -= (pr + qr) * er + (pi + qi) * ei
            sr = -tr * (ddr + dlr)
            si = -tr * (ddi + dli)
            xr = tl.load(buf_ptr + 2 * (base + i), mask=rmask, other=0.0)
            xi = tl.load(buf_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            wr = xr * xr - xi * xi
            wi = xr * xi + xr * xi
            fr = -(wr * sr + wi * si)
            fi = -(wr * si - wi * sr)
            acc_t -= pr * fr + pi * fi
            tl.store(gv_ptr + base + i, er + fr, mask=rmask)
            acc_e -= ei + fi
            ddr = er
            ddi = ei
            dlr = fr
            dli = fi
            dr = a + tl.load(v_ptr + base + i, mask=rmask, other=0.0) - tr * qr
            di = ne - tr * qi
            m = dr * dr + di * di
            qr = dr / m
            qi = -di / m
            tl.store(buf_ptr + 2 * (base + i), qr, mask=rmask)
            tl.store(buf_ptr + 2 * (base + i) + 1, qi, mask=rmask)
        # Pass 3 (left to right): right-sweep adjoint.
        ddr = a * 0.0
        ddi = a * 0.0
        dlr = a * 0.0
        dli = a * 0.0
        for i in range(N):
            sr = -tr * (ddr + dlr)
            si = -tr * (ddi + dli)
            xr = tl.load(buf_ptr + 2 * (base + i), mask=rmask, other=0.0)
            xi = tl.load(buf_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            wr = xr * xr - xi * xi
            wi = xr * xi + xr * xi
            fr = -(wr * sr + wi * si)
            fi = -(wr * si - wi * sr)
            nmask = rmask & ((rows * 0 + i + 1) < N)
            yr = tl.load(buf_ptr + 2 * (base + i + 1), mask=nmask, other=0.0)
            yi = tl.load(buf_ptr + 2 * (base + i + 1) + 1, mask=nmask, other=0.0)
            acc_t -= yr * fr + yi * fi
            gv = tl.load(gv_ptr + base + i, mask=rmask, other=0.0) + fr
            tl.store(gv_ptr + base + i, gv, mask=rmask)
            acc_s += gv
            acc_e -= fi
            dlr = fr
            dli = fi
            xr = tl.load(g_ptr + 2 * (base + i), mask=rmask, other=0.0)
            xi = tl.load(g_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            sr = tl.load(gbar_ptr + 2 * (base + i), mask=rmask, other=0.0)
            si = tl.load(gbar_ptr + 2 * (base + i) + 1, mask=rmask, other=0.0)
            wr = xr * xr - xi * xi
            wi = xr * xi + xr * xi
            ddr = -(wr * sr + wi * si)
            ddi = -(wr * si - wi * sr)
        tl.store(gs_ptr + rows, acc_s, mask=rmask)
        tl.store(ge_ptr + rows, acc_e, mask=rmask)
        tl.store(gt_ptr + rows, acc_t, mask=rmask)

    _SOURCES = {
        "causal_fwd": _causal_fwd_kernel,
        "bidir_fwd": _bidir_fwd_kernel,
        "causal_bwd": _causal_bwd_kernel,
        "bidir_bwd": _bidir_bwd_kernel,
    }


def _kernel(name: str, interpreted: bool):
    key = (name, interpreted)
    if key not in _KERNELS:
        fn = _SOURCES[name]
        if interpreted:
            from triton.runtime.interpreter import InterpretedFunction

            _KERNELS[key] = InterpretedFunction(fn)
        else:
            _KERNELS[key] = triton.jit(fn)
    return _KERNELS[key]


def _interpreter_works() -> bool:
    """Run a tiny causal forward under the interpreter once and remember whether it worked."""
    global _INTERP_OK
    if _INTERP_OK is None:
        try:
            v = torch.tensor([[0.5, -0.25]], dtype=torch.float32)
            one = torch.ones(1, dtype=torch.float32)
            out = torch.empty((1, 2, 2), dtype=torch.float32)
            _kernel("causal_fwd", True)[(1,)](v, -one, one, one, out, 1, 2, BLOCK_R=1)
            _INTERP_OK = bool(torch.isfinite(out).all())
        except Exception:
            _INTERP_OK = False
    return _INTERP_OK


def _block_rows(rows: int) -> int:
    # A warp's worth of rows per program at most; small row counts get smaller programs.
    b = 1
    while b < rows and b < 32:
        b *= 2
    return b


def _check(x: torch.Tensor):
    if not HAVE_TRITON:
        raise RuntimeError("the 'triton' backend of the BK-Core needs the triton package")
    if x.device.type == "cpu":
        if not _interpreter_works():
            raise RuntimeError("the 'triton' backend on CPU tensors needs Triton's interpreter, "
                               "which does not work in this environment")
        return True
    if x.device.type != "cuda":
        raise RuntimeError(f"the 'triton' backend runs on CUDA (or CPU via the interpreter), "
                           f"got device {x.device}")
    return False


def forward(v, shift, eps, tau, causal, block_rows: int | None = None):
    """Row form forward; CUDA tensors compiled, CPU tensors interpreted."""
    interp = _check(v)
    rows, n = v.shape
    out = torch.empty((rows, n, 2), dtype=v.dtype, device=v.device)
    if rows and n:
        b = block_rows or _block_rows(rows)
        k = _kernel("causal_fwd" if causal else "bidir_fwd", interp)
        k[(triton.cdiv(rows, b),)](v.contiguous(), shift.contiguous(), eps.contiguous(),
                                   tau.contiguous(), out, rows, n, BLOCK_R=b)
    return torch.view_as_complex(out)


def backward(v, shift, eps, tau, g, grad_g, causal, block_rows: int | None = None):
    """Row form exact adjoint: (grad_v, grad_shift, grad_eps, grad_tau)."""
    interp = _check(v)
    rows, n = v.shape
    dev, dt = v.device, v.dtype
    gv = torch.empty((rows, n), dtype=dt, device=dev)
    gs = torch.zeros(rows, dtype=dt, device=dev)
    ge = torch.zeros(rows, dtype=dt, device=dev)
    gt = torch.zeros(rows, dtype=dt, device=dev)
    if rows and n:
        b = block_rows or _block_rows(rows)
        grid = (triton.cdiv(rows, b),)
        g_r = torch.view_as_real(g.resolve_conj()).contiguous()
        gb_r = torch.view_as_real(grad_g.resolve_conj()).contiguous()
        if causal:
            _kernel("causal_bwd", interp)[grid](g_r, gb_r, tau.contiguous(), gv, gs, ge, gt,
                                                rows, n, BLOCK_R=b)
        else:
            buf = torch.empty((rows, n, 2), dtype=dt, device=dev)
            _kernel("bidir_bwd", interp)[grid](v.contiguous(), shift.contiguous(),
                                               eps.contiguous(), tau.contiguous(), g_r, gb_r,
                                               buf, gv, gs, ge, gt, rows, n, BLOCK_R=b)
    return gv, gs, ge, gt
