"""Comparisons between two runs: held-out perplexity, FLOPs, time, memory and size, as ratios.

Every ratio is ``a / b`` (run ``a`` over run ``b``): for ``transformer_baseline`` vs
``resnet_bk_full`` a FLOPs ratio of 10 means the ResNet-BK run needs 10x fewer FLOPs, and a
perplexity ratio below 1 means the Transformer is better. A ratio whose inputs are missing
(null) or whose denominator is zero is null, never 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from .atomic import write_json_atomic
from .metrics.contention import TIME_METRICS, contended_reason
from .results import BenchmarkResults

__all__ = ["compare_results", "format_comparison", "write_comparison", "write_seed_comparisons",
           "comparison_path", "seed_comparisons", "SEED_PAIRS", "PEER_PAIRS", "COMPARED_METRICS", "as_finite", "causal_verdict"]

# the three comparisons of the seed benchmark
SEED_PAIRS = (("transformer_baseline", "resnet_bk_baseline"),
              ("transformer_baseline", "resnet_bk_full"),
              ("resnet_bk_baseline", "resnet_bk_full"))

# ResNet-BK (all flags) against each peer baseline, when the peers were run
PEER_PAIRS = (("resnet_bk_full", "gla_baseline"), ("resnet_bk_full", "lstm_baseline"))

# metric -> (label, unit, lower is better?)
COMPARED_METRICS: dict[str, tuple[str, str, bool]] = {
    "valid_perplexity": ("validation perplexity", "", True),
    "test_perplexity": ("test perplexity", "", True),
    "forward_flops": ("forward FLOPs / step", "FLOP", True),
    "backward_flops": ("backward FLOPs / step", "FLOP", True),
    "optimizer_flops": ("optimizer FLOPs / step", "FLOP", True),
    "step_flops": ("total FLOPs / step", "FLOP", True),
    "total_flops": ("training FLOPs (all steps)", "FLOP", True),
    "training_time": ("training time", "s", True),
    "tokens_per_second": ("training tokens / s", "tok/s", False),
    "peak_memory_mb": ("peak memory", "MiB", True),
    "model_size_mb": ("model size", "MiB", True),
    "num_parameters": ("parameters", "", True),
}


def as_finite(x: Any) -> float | None:
    """``x`` as a finite float, or None (missing, boolean, non-numeric, NaN or infinite)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _ratio(a: Any, b: Any) -> float | None:
    a, b = as_finite(a), as_finite(b)
    if a is None or b is None or b == 0:
        return None
    return a / b


def _step_flops(r: BenchmarkResults) -> float | None:
    parts = [r.forward_flops, r.backward_flops, r.optimizer_flops]
    if any(as_finite(p) is None for p in parts):
        return None
    return float(sum(parts))


def _value(r: BenchmarkResults, metric: str) -> Any:
    if metric == "step_flops":
        return _step_flops(r)
    return getattr(r, metric, None)


def causal_verdict(r: BenchmarkResults) -> bool | None:
    """True/False from the run's causality audit; None when it was not audited."""
    if not r.perplexity_valid_for_lm:
        return False
    if r.causality is None:
        return None
    return bool(r.causality.get("causal"))


def compare_results(a: BenchmarkResults, b: BenchmarkResults) -> dict[str, Any]:
    """Ratios ``a / b`` of the held-out perplexities and of every cost, with both values."""
    metrics = {}
    for key, (label, unit, lower_better) in COMPARED_METRICS.items():
        va, vb = _value(a, key), _value(b, key)
        metrics[key] = {"label": label, "unit": unit, "lower_is_better": lower_better,
                        "a": va, "b": vb, "ratio": _ratio(va, vb)}
    contended = [why for r in (a, b) if (why := contended_reason(r.model_name, r.contention))]
    for key in TIME_METRICS if contended else ():
        metrics[key]["untestable"] = "; ".join(contended)
    scheme_a, scheme_b = a.config.get("split_scheme"), b.config.get("split_scheme")
    notes = []
    if scheme_a != scheme_b:
        notes.append(f"different split schemes ({scheme_a} vs {scheme_b}): perplexities are "
                     "not comparable")
    if a.test_tokens != b.test_tokens or a.valid_tokens != b.valid_tokens:
        notes.append("the runs scored different numbers of held-out tokens (different data or "
                     "tokenizer): perplexities are not comparable")
    for r in (a, b):
        if not r.perplexity_valid_for_lm or causal_verdict(r) is False:
            notes.append(f"{r.model_name} failed the causality audit: its perplexity is not a "
                         "valid language-model perplexity")
        elif causal_verdict(r) is None:
            notes.append(f"{r.model_name} was not audited for causality")
    dev_a, dev_b = a.environment.get("device"), b.environment.get("device")
    if dev_a != dev_b:
        notes.append(f"different devices ({dev_a} vs {dev_b}): time and memory not comparable")
    for why in contended:
        notes.append(f"{why}: the time ratios are not judged")
    mem_a = (a.memory or {}).get("method")
    mem_b = (b.memory or {}).get("method")
    if mem_a != mem_b:
        notes.append("peak memory measured by different methods")
    return {
        "a": a.model_name, "b": b.model_name, "ratio": "a / b",
        "split_scheme": scheme_a if scheme_a == scheme_b else [scheme_a, scheme_b],
        "proxy": "proxy" in (scheme_a, scheme_b),
        "causal": {a.model_name: causal_verdict(a), b.model_name: causal_verdict(b)},
        "contended": {r.model_name: bool((r.contention or {}).get("contended"))
                      for r in (a, b)},
        "parameters": {a.model_name: a.num_parameters, b.model_name: b.num_parameters},
        "metrics": metrics,
        "notes": notes,
    }


def _fmt(x: Any, unit: str = "") -> str:
    x = as_finite(x)
    if x is None:
        return "n/a"
    if unit == "FLOP":
        return f"{x:.3e}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.2f}"


def format_comparison(d: dict[str, Any]) -> str:
    """A plain-text table of :func:`compare_results`' output."""
    a, b = d["a"], d["b"]
    rows = [("metric", a, b, "a / b")]
    for key, m in d["metrics"].items():
        label = m["label"] + (f" ({m['unit']})" if m["unit"] and m["unit"] != "FLOP" else "")
        ratio = "n/a" if m["ratio"] is None else f"{m['ratio']:.3f}"
        if m.get("untestable"):
            ratio += " (contended)"
        rows.append((label, _fmt(m["a"], m["unit"]), _fmt(m["b"], m["unit"]), ratio))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    title = f"{a} vs {b}"
    if d.get("proxy"):
        title += "  [PROXY split scheme: not comparable to official WikiText-2 numbers]"
    lines.append(title)
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) if j == 0 else c.rjust(widths[j])
                               for j, c in enumerate(row)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    for note in d.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def comparison_path(output_dir: str | Path, a: str, b: str) -> Path:
    return Path(output_dir) / f"comparison_{a}_vs_{b}.json"


def write_comparison(output_dir: str | Path, a: BenchmarkResults, b: BenchmarkResults) -> Path:
    """Write ``comparison_<a>_vs_<b>.json`` atomically; return its path."""
    return write_json_atomic(comparison_path(output_dir, a.model_name, b.model_name),
                             compare_results(a, b))


def seed_comparisons(results: dict[str, BenchmarkResults],
                     pairs: Iterable[tuple[str, str]] = SEED_PAIRS) -> list[dict[str, Any]]:
    """:func:`compare_results` of each pair of ``pairs`` whose two runs are in ``results``."""
    return [compare_results(results[a], results[b]) for a, b in pairs
            if a in results and b in results]


def write_seed_comparisons(output_dir: str | Path,
                           results: dict[str, BenchmarkResults] | Iterable[BenchmarkResults],
                           pairs: Iterable[tuple[str, str]] = SEED_PAIRS) -> list[Path]:
    """Write the comparisons of ``pairs`` whose two runs are both in ``results``."""
    if not isinstance(results, dict):
        results = {r.model_name: r for r in results}
    return [write_comparison(output_dir, results[a], results[b]) for a, b in pairs
            if a in results and b in results]
