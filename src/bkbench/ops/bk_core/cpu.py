"""Compiled CPU path of the BK-Core: numba scans (``nogil``), rows in parallel on a few
threads, one sequential O(N) sweep per row.

Why numba: the recurrence is a serial dependency chain per row, so the only parallelism is
across rows, and the work per position is a dozen flops. What matters is a tight scalar loop
with no per-position interpreter or dispatch cost, plus threads over rows. numba gives exactly
that from Python source, with an on-disk cache (``cache=True``) so the JIT cost is paid once per
machine, and no C++ toolchain at install time. Measured on the 2-core dev machine
(64 x 4096, float32): this scan runs the causal forward at ~250 M positions/s, far beyond what
the torch wrapper around it costs, so a C++ extension would buy nothing measurable. (How the
rows are spread over threads is explained above ``_run_rows``.)

Complex numbers are handled as (re, im) pairs of real arrays (shape (..., 2), the layout of
``torch.view_as_real``) and the arithmetic is written out by hand: numba's complex division
uses a scaled algorithm that is slower, and it is not needed because with eps > 0 the
denominator never comes near zero (|d| >= eps).

Row form (see :mod:`bkbench.ops.bk_core.naive`): v (R, N); shift, eps, tau (R,);
alpha_i = shift + v_i - i*eps. Per-row sums in the backward are accumulated in float64.
Each row is computed by one thread in a fixed order, so results are bit-for-bit reproducible.
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

try:  # numba is a hard dependency of the package, but keep the import failure readable.
    import numba
    from numba import njit

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only on broken installs
    numba = None
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "forward", "backward", "num_threads"]

if HAVE_NUMBA:
    # Every kernel takes a block size G: a thread owns G consecutive rows and advances them
    # together, one site at a time (``for i: for k in block``). The G recurrences are
    # independent, so the core overlaps their dependency chains (each step is latency-bound:
    # a division waits for the previous site) -- about 1.6x the throughput of one row at a
    # time. The arithmetic of each row is the same whatever G is.

    @njit(cache=True, nogil=True)
    def _causal_fwd(v, shift, eps, tau, out, lo, hi, G):
        n = v.shape[1]
        for r0 in range(lo, hi, G):
            m = min(hi, r0 + G) - r0
            gr = np.zeros(G, v.dtype)
            gi = np.zeros(G, v.dtype)
            for i in range(n):
                for k in range(m):
                    r = r0 + k
                    dr = shift[r] + v[r, i] - tau[r] * gr[k]
                    di = -eps[r] - tau[r] * gi[k]
                    q = dr * dr + di * di
                    xr = dr / q
                    xi = -di / q
                    gr[k] = xr
                    gi[k] = xi
                    out[r, i, 0] = xr
                    out[r, i, 1] = xi

    @njit(cache=True, nogil=True)
    def _bidir_fwd(v, shift, eps, tau, out, lo, hi, G):
        n = v.shape[1]
        for r0 in range(lo, hi, G):
            m = min(hi, r0 + G) - r0
            # Right sweep gR, stored in out; read back as gR_{i+1} below before it is
            # overwritten by G_i (the left pass moves left to right).
            gr = np.zeros(G, v.dtype)
            gi = np.zeros(G, v.dtype)
            for i in range(n - 1, -1, -1):
                for k in range(m):
                    r = r0 + k
                    dr = shift[r] + v[r, i] - tau[r] * gr[k]
                    di = -eps[r] - tau[r] * gi[k]
                    q = dr * dr + di * di
                    xr = dr / q
                    xi = -di / q
                    gr[k] = xr
                    gi[k] = xi
                    out[r, i, 0] = xr
                    out[r, i, 1] = xi
            # Left sweep gL, combined on the fly: G_i = 1/(alpha_i - tau*(gL_{i-1} + gR_{i+1})).
            lr = np.zeros(G, v.dtype)
            li = np.zeros(G, v.dtype)
            for i in range(n):
                for k in range(m):
                    r = r0 + k
                    tr = tau[r]
                    ar = shift[r] + v[r, i]
                    ai = -eps[r]
                    if i + 1 < n:
                        sr = lr[k] + out[r, i + 1, 0]
                        si = li[k] + out[r, i + 1, 1]
                    else:
                        sr = lr[k]
                        si = li[k]
                    dr = ar - tr * sr
                    di = ai - tr * si
                    q = dr * dr + di * di
                    out[r, i, 0] = dr / q
                    out[r, i, 1] = -di / q
                    dr = ar - tr * lr[k]
                    di = ai - tr * li[k]
                    q = dr * dr + di * di
                    lr[k] = dr / q
                    li[k] = -di / q

    @njit(cache=True, nogil=True)
    def _causal_bwd(g, gbar, tau, grad_v, grad_shift, grad_eps, grad_tau, lo, hi, G):
        n = grad_v.shape[1]
        for r0 in range(lo, hi, G):
            m = min(hi, r0 + G) - r0
            cr = np.zeros(G, grad_v.dtype)  # carry = -tau * delta_{i+1}
            ci = np.zeros(G, grad_v.dtype)
            acc_s = np.zeros(G)
            acc_e = np.zeros(G)
            acc_t = np.zeros(G)
            for i in range(n - 1, -1, -1):
                for k in range(m):
                    r = r0 + k
                    sr = gbar[r, i, 0] + cr[k]
                    si = gbar[r, i, 1] + ci[k]
                    xr = g[r, i, 0]
                    xi = g[r, i, 1]
                    # delta = -conj(g^2) * s,  g^2 = (xr^2 - xi^2) + i(2 xr xi)
                    pr = xr * xr - xi * xi
                    pi = xr * xi + xr * xi
                    dr = -(pr * sr + pi * si)
                    di = -(pr * si - pi * sr)
                    grad_v[r, i] = dr
                    acc_s[k] += dr
                    acc_e[k] -= di
                    if i > 0:
                        acc_t[k] -= g[r, i - 1, 0] * dr + g[r, i - 1, 1] * di
                    cr[k] = -tau[r] * dr
                    ci[k] = -tau[r] * di
            for k in range(m):
                grad_shift[r0 + k] = acc_s[k]
                grad_eps[r0 + k] = acc_e[k]
                grad_tau[r0 + k] = acc_t[k]

    @njit(cache=True, nogil=True)
    def _bidir_bwd(v, shift, eps, tau, g, gbar, buf, grad_v, grad_shift, grad_eps, grad_tau, lo, hi, G):
        n = grad_v.shape[1]
        for r0 in range(lo, hi, G):
            m = min(hi, r0 + G) - r0
            acc_s = np.zeros(G)
            acc_e = np.zeros(G)
            acc_t = np.zeros(G)
            # Pass 1 (left to right): left sweep gL into buf.
            lr = np.zeros(G, v.dtype)
            li = np.zeros(G, v.dtype)
            for i in range(n):
                for k in range(m):
                    r = r0 + k
                    dr = shift[r] + v[r, i] - tau[r] * lr[k]
                    di = -eps[r] - tau[r] * li[k]
                    q = dr * dr + di * di
                    lr[k] = dr / q
                    li[k] = -di / q
                    buf[r, i, 0] = lr[k]
                    buf[r, i, 1] = li[k]
            nothing = np.zeros(1, v.dtype)  # gL_{-1} = 0, typed like the data
            # Pass 2 (right to left): the combination's adjoint deltaD_i, the left sweep's
            # adjoint deltaL_i, and the right sweep gR recomputed into buf[i] as soon as gL_i
            # is no longer needed.
            qr = np.zeros(G, v.dtype)  # gR_{i+1}
            qi = np.zeros(G, v.dtype)
            ddr = np.zeros(G, v.dtype)  # deltaD_{i+1}
            ddi = np.zeros(G, v.dtype)
            dlr = np.zeros(G, v.dtype)  # deltaL_{i+1}
            dli = np.zeros(G, v.dtype)
            for i in range(n - 1, -1, -1):
                for k in range(m):
                    r = r0 + k
                    tr = tau[r]
                    if i > 0:
                        pr = buf[r, i - 1, 0]
                        pi = buf[r, i - 1, 1]
                    else:
                        pr = nothing[0]
                        pi = nothing[0]
                    # deltaD_i = -conj(G_i^2) * Gbar_i
                    xr = g[r, i, 0]
                    xi = g[r, i, 1]
                    sr = gbar[r, i, 0]
                    si = gbar[r, i, 1]
                    wr = xr * xr - xi * xi
                    wi = xr * xi + xr * xi
                    er = -(wr * sr + wi * si)
                    ei = -(wr * si - wi * sr)
                    acc_t[k] -= (pr + qr[k]) * er + (pi + qi[k]) * ei
                    # left-sweep adjoint: s_i = -tau * (deltaD_{i+1} + deltaL_{i+1})
                    sr = -tr * (ddr[k] + dlr[k])
                    si = -tr * (ddi[k] + dli[k])
                    xr = buf[r, i, 0]
                    xi = buf[r, i, 1]
                    wr = xr * xr - xi * xi
                    wi = xr * xi + xr * xi
                    fr = -(wr * sr + wi * si)
                    fi = -(wr * si - wi * sr)
                    acc_t[k] -= pr * fr + pi * fi
                    grad_v[r, i] = er + fr
                    acc_e[k] -= ei + fi
                    ddr[k] = er
                    ddi[k] = ei
                    dlr[k] = fr
                    dli[k] = fi
                    # right sweep: gR_i = 1/(alpha_i - tau*gR_{i+1})
                    dr = shift[r] + v[r, i] - tr * qr[k]
                    di = -eps[r] - tr * qi[k]
                    q = dr * dr + di * di
                    qr[k] = dr / q
                    qi[k] = -di / q
                    buf[r, i, 0] = qr[k]
                    buf[r, i, 1] = qi[k]
            # Pass 3 (left to right): the right sweep's adjoint,
            # s_i = -tau * (deltaD_{i-1} + deltaR_{i-1}).
            ddr[:] = 0  # deltaD_{i-1}
            ddi[:] = 0
            dlr[:] = 0  # deltaR_{i-1}
            dli[:] = 0
            for i in range(n):
                for k in range(m):
                    r = r0 + k
                    tr = tau[r]
                    sr = -tr * (ddr[k] + dlr[k])
                    si = -tr * (ddi[k] + dli[k])
                    xr = buf[r, i, 0]
                    xi = buf[r, i, 1]
                    wr = xr * xr - xi * xi
                    wi = xr * xi + xr * xi
                    fr = -(wr * sr + wi * si)
                    fi = -(wr * si - wi * sr)
                    if i + 1 < n:
                        acc_t[k] -= buf[r, i + 1, 0] * fr + buf[r, i + 1, 1] * fi
                    gv = grad_v[r, i] + fr
                    grad_v[r, i] = gv
                    acc_s[k] += gv
                    acc_e[k] -= fi
                    dlr[k] = fr
                    dli[k] = fi
                    # deltaD_i again (cheaper than storing it), for the next site
                    xr = g[r, i, 0]
                    xi = g[r, i, 1]
                    sr = gbar[r, i, 0]
                    si = gbar[r, i, 1]
                    wr = xr * xr - xi * xi
                    wi = xr * xi + xr * xi
                    ddr[k] = -(wr * sr + wi * si)
                    ddi[k] = -(wr * si - wi * sr)
            for k in range(m):
                grad_shift[r0 + k] = acc_s[k]
                grad_eps[r0 + k] = acc_e[k]
                grad_tau[r0 + k] = acc_t[k]


# ---------------------------------------------------------------------------------------------
# Scheduling: rows split into chunks, handed out dynamically to the calling thread and a small
# pool of helper threads (the kernels release the GIL).
#
# Why not numba's own ``parallel=True``: its OpenMP/TBB thread teams finish every call with a
# barrier that waits for *all* team threads, and on a machine whose cores are shared with
# other work (two cores here, other test runs beside us) a descheduled team thread stalls the
# whole call: measured 12-16 ms instead of 3 ms for 64 x 4096 forward+backward, i.e. slower
# than one thread. Here the caller works through the chunks itself and waits only for chunks
# that a helper has actually started, so a busy machine degrades to one-thread speed at worst.
# It also keeps the op independent of numba's threading layers (fork safety, nesting).
# ---------------------------------------------------------------------------------------------

#: Rows advanced together inside one kernel call (see the kernels' comment).
ROWS_PER_BLOCK = 4
#: Target size of a chunk of work handed to one thread, in positions (rows x N).
CHUNK_POSITIONS = 32768

_POOL = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bk_core")
            _POOL_SIZE = workers
        return _POOL


def num_threads() -> int:
    """Threads the CPU path uses: torch's intra-op setting (``torch.set_num_threads``)."""
    return max(1, torch.get_num_threads())


def _run_rows(kernel, args, rows: int, n: int):
    """Call ``kernel(*args, lo, hi, G)`` over row chunks covering [0, rows)."""
    chunk = max(ROWS_PER_BLOCK, -(-CHUNK_POSITIONS // max(n, 1)))
    chunk = -(-chunk // ROWS_PER_BLOCK) * ROWS_PER_BLOCK
    nchunks = -(-rows // chunk)
    helpers = min(num_threads(), nchunks) - 1
    if helpers <= 0:
        kernel(*args, 0, rows, ROWS_PER_BLOCK)
        return
    claim = itertools.count()  # next() is atomic under the GIL
    state = {"done": 0, "error": None}
    lock = threading.Lock()
    finished = threading.Event()

    def work():
        while True:
            c = next(claim)
            if c >= nchunks:
                return
            try:
                kernel(*args, c * chunk, min(rows, (c + 1) * chunk), ROWS_PER_BLOCK)
            except BaseException as exc:  # pragma: no cover - reported to the caller
                state["error"] = exc
            with lock:
                state["done"] += 1
                if state["done"] == nchunks:
                    finished.set()

    pool = _pool(helpers)
    for _ in range(helpers):
        pool.submit(work)
    work()
    finished.wait()
    if state["error"] is not None:  # pragma: no cover
        raise state["error"]


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().numpy()


def forward(v, shift, eps, tau, causal):
    """Row form forward on CPU tensors; returns complex (R, N) in v's precision."""
    if not HAVE_NUMBA:  # pragma: no cover
        raise RuntimeError("the 'cpu' backend of the BK-Core needs numba")
    rows, n = v.shape
    out = torch.empty((rows, n, 2), dtype=v.dtype)
    if rows and n:
        kernel = _causal_fwd if causal else _bidir_fwd
        _run_rows(kernel, (_np(v), _np(shift), _np(eps), _np(tau), out.numpy()), rows, n)
    return torch.view_as_complex(out)


def backward(v, shift, eps, tau, g, grad_g, causal):
    """Row form exact adjoint on CPU tensors: (grad_v, grad_shift, grad_eps, grad_tau)."""
    if not HAVE_NUMBA:  # pragma: no cover
        raise RuntimeError("the 'cpu' backend of the BK-Core needs numba")
    rows, n = v.shape
    dt = v.dtype
    grad_v = torch.empty((rows, n), dtype=dt)
    gs = torch.zeros(rows, dtype=dt)
    ge = torch.zeros(rows, dtype=dt)
    gt = torch.zeros(rows, dtype=dt)
    if rows and n:
        g_r = _np(torch.view_as_real(g.resolve_conj()))
        gb_r = _np(torch.view_as_real(grad_g.resolve_conj()))
        outs = (grad_v.numpy(), gs.numpy(), ge.numpy(), gt.numpy())
        if causal:
            _run_rows(_causal_bwd, (g_r, gb_r, _np(tau)) + outs, rows, n)
        else:
            buf = np.empty((rows, n, 2), dtype=g_r.dtype)
            _run_rows(_bidir_bwd, (_np(v), _np(shift), _np(eps), _np(tau), g_r, gb_r, buf)
                      + outs, rows, n)
    return grad_v, gs, ge, gt
