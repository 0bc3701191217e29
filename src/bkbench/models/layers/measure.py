"""With-and-without measurements shared by the structural flags' records.

A structural flag that promises less work must show it measured: the same weights run once
with the flag's structure and once without it (a context manager switches it off), and the
FLOP counter (``bkbench.metrics.flops.measure_forward_flops``, an evaluation forward with the
loss) and the clock compare the two.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AbstractContextManager
from typing import Any, Callable

import torch
import torch.nn as nn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward_seconds(model: nn.Module, idx: torch.Tensor) -> float:
    _sync(idx.device)
    start = time.perf_counter()
    model(idx, return_features=True)
    _sync(idx.device)
    return time.perf_counter() - start


def with_and_without(model: nn.Module, switched_off: Callable[[], AbstractContextManager],
                     batch_size: int, seq_len: int, device: torch.device, repeats: int,
                     seed: int = 0) -> dict[str, Any]:
    """Counted forward FLOPs and eval-forward time of ``model`` with its flag's structure and
    inside ``switched_off()`` (the plain structure, same weights)."""
    from ...metrics.flops import measure_forward_flops
    device = torch.device(device)
    vocab = model.lm_head.out_features
    flops = {}
    for label, ctx in (("with", None), ("without", switched_off)):
        if ctx is None:
            flops[label] = measure_forward_flops(model, batch_size, seq_len, vocab,
                                                 device=device, seed=seed)
        else:
            with ctx():
                flops[label] = measure_forward_flops(model, batch_size, seq_len, vocab,
                                                     device=device, seed=seed)
    idx = torch.randint(0, vocab, (batch_size, seq_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)
    was = model.training
    model.eval()
    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        _forward_seconds(model, idx)            # warm-up (compilation, first-call costs)
        with switched_off():
            _forward_seconds(model, idx)
        for _ in range(repeats):                # interleaved A/B
            times["with"].append(_forward_seconds(model, idx))
            with switched_off():
                times["without"].append(_forward_seconds(model, idx))
    finally:
        model.train(was)
    w, wo = flops["with"]["forward"], flops["without"]["forward"]
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {
        "forward_flops": {"with": w, "without": wo, "ratio": w / wo if wo else None,
                          "mixer_with": flops["with"]["by_component"].get("mixer"),
                          "mixer_without": flops["without"]["by_component"].get("mixer"),
                          "feed_forward_with": flops["with"]["by_component"].get("feed_forward"),
                          "feed_forward_without": flops["without"]["by_component"].get("feed_forward"),
                          "how": f"FlopCounterMode, one eval forward with the loss, batch "
                                 f"{batch_size} x {seq_len}, the same weights both ways"},
        "eval_forward_ms": {**ms, "ratio": ms["with"] / ms["without"] if ms["without"] else None,
                            "how": f"median of {repeats} interleaved no-grad forwards "
                                   f"(features, no LM head) on {device.type}"},
    }
