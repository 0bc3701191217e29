"""Benchmark of the BK-Core op: positions per second, forward and forward+backward.

Usage::

    python benchmarks/bk_core.py            # full table (rows {8, 64} x N {128, 1024, 4096})
    python benchmarks/bk_core.py --quick    # small sizes, fewer repeats
    python benchmarks/bk_core.py --bidir    # also the bidirectional core

A "position" is one site of one row (rows = batch x heads). Input is float32, output
complex64. Forward+backward is one call followed by ``g.backward(w)`` with a fixed random
complex upstream gradient, with v, t, E and eps all requiring grad (t, E, eps per row, as a
model with per-head parameters has them). Times are the best of several repeats.

Paths: every compiled path available on the device ("cpu" = numba on CPU, "triton" on CUDA),
"torch" (the same sweeps vectorised over rows in torch, loop over N, analytic backward), and
"autograd" (analytic_gradient=False: autograd through the torch recurrence, the baseline).
"dense" is diag(inv(H - z)) by ``torch.linalg.inv`` -- the O(N^3) bidirectional computation
the O(N) sweep replaces -- timed only where it fits (its causal form would be O(N^4)).

On a CUDA machine the Triton path is first checked against the float64 CPU kernels (forward
and all gradients) and the check's largest error is printed, then timed with
``torch.cuda.synchronize`` around every call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from bkbench.ops.bk_core import available_backends, resolvent_diag


def machine_info(device: torch.device) -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    lines = [
        f"cpu: {cpu}; logical cores: {os.cpu_count()}; torch threads: {torch.get_num_threads()}",
        f"python {platform.python_version()}; torch {torch.__version__}",
    ]
    try:
        import numba

        from bkbench.ops.bk_core import cpu as bk_cpu

        lines.append(f"numba {numba.__version__}; cpu path threads: {bk_cpu.num_threads()} "
                     f"(rows in chunks of {bk_cpu.CHUNK_POSITIONS} positions, "
                     f"{bk_cpu.ROWS_PER_BLOCK} rows interleaved per scan)")
    except ImportError:
        lines.append("numba: not installed")
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}")
    return lines


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, reps: int, min_time: float, max_time: float) -> list[float]:
    """Run fn once to warm up, then at least ``reps`` times (or until ``min_time`` s)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if len(times) >= reps and spent >= min_time:
            break
        if spent + first > max_time and len(times) >= 1:
            break
    return times


def make_inputs(rows, n, device, gen):
    v = torch.randn(rows, n, generator=gen).to(device)
    t = (0.5 + torch.rand(rows, generator=gen)).to(device)
    e = (0.5 * torch.randn(rows, generator=gen)).to(device)
    s = (0.1 + torch.rand(rows, generator=gen)).to(device)
    w = torch.randn(rows, n, generator=gen, dtype=torch.complex64).to(device)
    return v, t, e, s, w


def path_kwargs(path):
    if path == "autograd":
        return dict(analytic_gradient=False)
    return dict(backend=path)


def bench_path(path, v, t, e, s, w, causal, device, reps, min_time, max_time):
    kw = path_kwargs(path)

    def fwd():
        with torch.no_grad():
            resolvent_diag(v, -2.0, t, energy=e, eps=s, causal=causal, **kw)

    leaves = [x.detach().clone().requires_grad_() for x in (v, t, e, s)]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        g = resolvent_diag(leaves[0], -2.0, leaves[1], energy=leaves[2], eps=leaves[3],
                           causal=causal, **kw)
        g.backward(w)

    return (timeit(fwd, device, reps, min_time, max_time),
            timeit(fwd_bwd, device, reps, min_time, max_time))


def bench_dense(v, t, e, s, w, device, reps, min_time, max_time, backward):
    rows, n = v.shape
    off = torch.diag(torch.ones(n - 1, device=device), 1)
    off = (off + off.T).to(torch.complex64)
    eye = torch.eye(n, device=device, dtype=torch.complex64)

    def run(vv, tt, ee, ss):
        z = torch.complex(ee, ss)
        diag = (-2.0 + vv).to(torch.complex64) - z[:, None]
        a = torch.diag_embed(diag) + tt[:, None, None].to(torch.complex64) * off
        return torch.diagonal(torch.linalg.inv(a), dim1=-2, dim2=-1)

    if not backward:
        def fn():
            with torch.no_grad():
                run(v, t, e, s)
    else:
        leaves = [x.detach().clone().requires_grad_() for x in (v, t, e, s)]

        def fn():
            run(*leaves).backward(w)
    del eye
    return timeit(fn, device, max(1, reps // 2), 0.0, max_time)


def check_triton(device) -> str:
    """Triton on the GPU vs the float64 CPU kernels: forward and all four gradients."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for causal in (True, False):
        v = torch.randn(6, 257, generator=gen, dtype=torch.float64)
        t = 0.5 + torch.rand(6, generator=gen, dtype=torch.float64)
        e = torch.randn(6, generator=gen, dtype=torch.float64)
        s = 0.2 + torch.rand(6, generator=gen, dtype=torch.float64)
        w = torch.randn(6, 257, generator=gen, dtype=torch.complex128)
        results = []
        for dev, backend in (("cpu", "cpu"), (device, "triton")):
            leaves = [x.to(dev).requires_grad_() for x in (v, t, e, s)]
            g = resolvent_diag(leaves[0], -2.0, leaves[1], energy=leaves[2], eps=leaves[3],
                               causal=causal, backend=backend)
            g.backward(w.to(dev))
            results.append([g.detach().cpu()] + [x.grad.cpu() for x in leaves])
        for a, b in zip(*results):
            worst = max(worst, (a - b).abs().max().item() / (1 + b.abs().max().item()))
    return f"triton vs cpu kernels (float64, causal+bidir, forward and 4 gradients): " \
           f"max rel error {worst:.2e} ({'OK' if worst < 1e-9 else 'MISMATCH'})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    ap.add_argument("--bidir", action="store_true", help="also benchmark causal=False")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, nargs="*", default=None)
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (the CPU path follows it); default: torch's")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    rows_list = args.rows or ([8, 64] if not args.quick else [8])
    n_list = args.n or ([128, 1024, 4096] if not args.quick else [128, 1024])
    reps = args.reps or (3 if args.quick else 7)
    min_time = 0.05 if args.quick else 0.3
    max_time = 3.0 if args.quick else 10.0

    if device.type == "cpu":  # load the compiled kernels (numba cache) before any timing
        resolvent_diag(torch.zeros(4, 64), backend="cpu")
    print("BK-Core benchmark (float32 in, complex64 out)")
    for line in machine_info(device):
        print("  " + line)
    fast = [b for b in available_backends(device) if b in ("cpu", "triton")]
    if device.type == "cpu":
        fast = [b for b in fast if b != "triton"]  # interpreted Triton is a test aid only
    if device.type == "cuda" and "triton" in fast:
        print("  " + check_triton(device))
    paths = fast + ["torch", "autograd"]
    print(f"  paths: {', '.join(paths)} (+ dense linalg.inv where feasible)")
    print()

    header = (f"{'core':<6} {'rows':>4} {'N':>5} {'path':<9} {'fwd Mpos/s':>11} "
              f"{'fwd+bwd Mpos/s':>15} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs autograd':>11}")
    print(header)
    print("-" * len(header))
    gen = torch.Generator().manual_seed(0)
    for causal in ([True, False] if args.bidir else [True]):
        core = "causal" if causal else "bidir"
        for rows in rows_list:
            for n in n_list:
                v, t, e, s, w = make_inputs(rows, n, device, gen)
                pos = rows * n
                res = {}
                for path in paths:
                    f, fb = bench_path(path, v, t, e, s, w, causal, device, reps, min_time,
                                       max_time)
                    res[path] = (min(f), min(fb), statistics.median(fb))
                base = res["autograd"][1]
                for path in paths:
                    f, fb, _ = res[path]
                    print(f"{core:<6} {rows:>4} {n:>5} {path:<9} {pos / f / 1e6:>11.3f} "
                          f"{pos / fb / 1e6:>15.3f} {f * 1e3:>9.2f} {fb * 1e3:>11.2f} "
                          f"{base / fb:>10.1f}x")
                # Dense O(N^3): forward where rows*N^3 <= 1.1e10, backward where <= 2e9.
                if not args.no_dense:
                    work = rows * n ** 3
                    if work <= 1.1e10:
                        f = min(bench_dense(v, t, e, s, w, device, reps, min_time, max_time,
                                            False))
                        fb_txt, fbms = "-", "-"
                        if work <= 2.2e9:
                            fb = min(bench_dense(v, t, e, s, w, device, reps, min_time,
                                                 max_time, True))
                            fb_txt, fbms = f"{pos / fb / 1e6:.3f}", f"{fb * 1e3:.2f}"
                            ratio = f"{base / fb:.1f}x"
                        else:
                            ratio = "-"
                        print(f"{core:<6} {rows:>4} {n:>5} {'dense':<9} {pos / f / 1e6:>11.3f} "
                              f"{fb_txt:>15} {f * 1e3:>9.2f} {fbms:>11} {ratio:>11}")
                    else:
                        print(f"{core:<6} {rows:>4} {n:>5} {'dense':<9} {'(skipped: O(N^3) too large)':>27}")
                sys.stdout.flush()
    print()
    print("Mpos/s = rows*N / best time / 1e6; 'vs autograd' = autograd fwd+bwd time / "
          "this path's fwd+bwd time. dense = diag(torch.linalg.inv(H - z)), the full "
          "(bidirectional) resolvent, shown for scale.")


if __name__ == "__main__":
    main()
