"""One with/without timing: every flag record that compares a run with and without the flag.

The same work runs once with the flag's structure and once without it (the caller's two
functions, on the same held-out windows), interleaved A, B, A, B after one warm-up call of
each (compilation and first-call costs), and the median of each is reported. Interleaving
spreads slow drifts of the machine (other work, clocks) over both; the median ignores the odd
disturbed call. One statistic everywhere, so the records' numbers can be compared.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from .flops import measure_forward_flops


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a clock read after it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(fn: Callable[[], Any], device: torch.device) -> Callable[[], float]:
    """``fn`` as a timed call: it returns the wall seconds of one call of ``fn``."""
    def call() -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start
    return call


def interleaved_medians(timed_with: Callable[[], float | Sequence[float]],
                        timed_without: Callable[[], float | Sequence[float]],
                        repeats: int) -> dict[str, Any]:
    """Median seconds of two timed calls (each returns its seconds, or a tuple of phases'
    seconds), called interleaved ``repeats`` times after a warm-up call of each.

    Returns ``{"with": s, "without": s, "ratio": with / without, "how": ...}``; for calls
    that return phases, ``with`` and ``without`` are tuples of per-phase medians and
    ``ratio`` that of their sums.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    timed_with()
    timed_without()
    runs: dict[str, list] = {"with": [], "without": []}
    for _ in range(repeats):
        runs["with"].append(timed_with())
        runs["without"].append(timed_without())
    out: dict[str, Any] = {}
    for label, values in runs.items():
        if isinstance(values[0], (tuple, list)):
            out[label] = tuple(statistics.median(phase) for phase in zip(*values))
        else:
            out[label] = statistics.median(values)
    total = {k: sum(v) if isinstance(v, tuple) else v for k, v in out.items()}
    out["ratio"] = total["with"] / total["without"] if total["without"] > 0 else None
    out["how"] = f"median of {repeats} interleaved calls each (with, without, ...), after a warm-up"
    return out


def forward_with_and_without(model: nn.Module, switched_off: Callable[[], AbstractContextManager],
                             windows: torch.Tensor, batch_size: int, repeats: int,
                             seed: int = 0,
                             flop_windows: torch.Tensor | None = None) -> dict[str, Any]:
    """A structural flag's record: counted forward FLOPs and eval-forward time of ``model``
    with its flag's structure and inside ``switched_off()`` (the plain structure, same weights).

    FLOPs: ``measure_forward_flops`` (one eval forward with the loss, its component split) on
    ``batch_size`` x ``windows.shape[1]`` seeded tokens, or on ``flop_windows`` (n,
    windows.shape[1] + 1) of held-out text when the work depends on the input (routing);
    time: no-grad feature forwards of the held-out ``windows`` (the LM head, which no
    structural flag changes, left out).
    """
    device = windows.device
    vocab, seq_len = model.lm_head.out_features, windows.shape[1]
    if flop_windows is not None:
        batch_size = flop_windows.shape[0]
    counted = dict(device=device, seed=seed, windows=flop_windows)
    flops = {"with": measure_forward_flops(model, batch_size, seq_len, vocab, **counted)}
    with switched_off():
        flops["without"] = measure_forward_flops(model, batch_size, seq_len, vocab, **counted)

    def plain() -> None:
        with switched_off():
            model(windows, return_features=True)

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            seconds = interleaved_medians(
                clocked(lambda: model(windows, return_features=True), device),
                clocked(plain, device), repeats)
    finally:
        model.train(was)
    w, wo = flops["with"]["forward"], flops["without"]["forward"]
    component = lambda label, name: flops[label]["by_component"].get(name)  # noqa: E731
    return {
        "forward_flops": {"with": w, "without": wo, "ratio": w / wo if wo else None,
                          "mixer_with": component("with", "mixer"),
                          "mixer_without": component("without", "mixer"),
                          "feed_forward_with": component("with", "feed_forward"),
                          "feed_forward_without": component("without", "feed_forward"),
                          "how": f"FlopCounterMode, one eval forward with the loss, batch "
                                 f"{batch_size} x {seq_len} of "
                                 f"{'random' if flop_windows is None else 'held-out'} tokens, "
                                 f"the same weights both ways"},
        "eval_forward_ms": {"with": seconds["with"] * 1e3, "without": seconds["without"] * 1e3,
                            "ratio": seconds["ratio"],
                            "how": f"no-grad feature forwards (no LM head) of {len(windows)} "
                                   f"held-out windows on {device.type}; {seconds['how']}"},
    }


__all__ = ["synchronize", "clocked", "interleaved_medians", "forward_with_and_without"]
