"""Repeated seeds: each run once per seed, then means, intervals and significance.

``--seeds 1,2,3`` turns run ``resnet_bk_full`` into ``resnet_bk_full-seed1``,
``resnet_bk_full-seed2``, ``resnet_bk_full-seed3`` (identical configs but the seed), each with
its own results file. :func:`write_aggregates` then writes, per run:

* ``<run>_aggregate.json``: per metric, mean, sample standard deviation and the 95% Student-t
  interval of the mean over the seeds (:func:`bkbench.experiments.stats.summarize`);
* ``comparison_<a>_vs_<b>_seeds.json`` for the seed benchmark's pairs: the ratio of the means
  and Welch's t-test p-value for test perplexity and training throughput.

A difference whose p-value is >= :data:`SIGNIFICANCE` is reported as not significant.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..atomic import write_json_atomic
from ..config import BenchmarkConfig, ConfigError
from ..results import BenchmarkResults
from .stats import summarize, welch_test

__all__ = ["expand_seeds", "seed_groups", "aggregate", "compare_aggregates", "write_aggregates",
           "mean_results", "parse_seeds", "AGGREGATED_METRICS", "SIGNIFICANCE"]

SIGNIFICANCE = 0.05
_SEED_NAME = re.compile(r"^(?P<base>.+)-seed(?P<seed>\d+)$")

# metric -> label; the step's FLOPs are the sum of forward, backward and optimizer
AGGREGATED_METRICS: dict[str, str] = {
    "test_perplexity": "test perplexity",
    "valid_perplexity": "validation perplexity",
    "test_loss": "test loss (nats)",
    "tokens_per_second": "training tokens / s",
    "training_time": "training time (s)",
    "peak_memory_mb": "peak memory (MiB)",
    "step_flops": "FLOPs / step",
    "model_size_mb": "model size (MiB)",
}
# fields that may differ between the seeds of one run
_PER_SEED_FIELDS = {"seed", "model_name"}


def parse_seeds(value: Any) -> list[int]:
    """``"1,2,3"`` or ``[1, 2, 3]`` -> [1, 2, 3]; a ConfigError for anything else."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if any(parts) and not all(parts):   # "1,,2" or "1,2,": a seed left out by mistake?
            raise ConfigError(f"seeds {value!r} has an empty entry; give comma-separated "
                              "integers, e.g. --seeds 1,2,3")
        parts = [p for p in parts if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        raise ConfigError(f"seeds must be a comma-separated list of integers, got {value!r}")
    seeds = []
    for p in parts:
        try:
            s = int(p) if not isinstance(p, bool) else None
        except (TypeError, ValueError):
            s = None
        if s is None or (isinstance(p, float) and p != s) or s < 0 or s >= 2**63:
            raise ConfigError(f"seeds must be non-negative integers, got {p!r} in {value!r}")
        seeds.append(s)
    if not seeds:
        raise ConfigError("seeds is empty; give at least one seed, e.g. --seeds 1,2,3")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds repeat a value: {seeds}")
    return seeds


def expand_seeds(configs: Sequence[BenchmarkConfig], seeds: Sequence[int]) -> list[BenchmarkConfig]:
    """Each config once per seed, named ``<run>-seed<s>``."""
    return [c.replace(model_name=f"{c.model_name}-seed{s}", seed=s).validate()
            for c in configs for s in seeds]


def _step_flops(r: BenchmarkResults) -> float | None:
    parts = [r.forward_flops, r.backward_flops, r.optimizer_flops]
    return float(sum(parts)) if all(isinstance(p, (int, float)) for p in parts) else None


def _metric(r: BenchmarkResults, metric: str) -> float | None:
    value = _step_flops(r) if metric == "step_flops" else getattr(r, metric, None)
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def seed_groups(results: dict[str, BenchmarkResults]) -> dict[str, list[BenchmarkResults]]:
    """Runs named ``<base>-seed<s>`` grouped by base name, ordered by seed."""
    groups: dict[str, list[tuple[int, BenchmarkResults]]] = {}
    for name, r in results.items():
        m = _SEED_NAME.match(name)
        if m:
            groups.setdefault(m["base"], []).append((int(m["seed"]), r))
    return {base: [r for _, r in sorted(rs, key=lambda t: t[0])] for base, rs in groups.items()}


def _recipe(r: BenchmarkResults) -> dict[str, Any]:
    return {k: v for k, v in r.config.items() if k not in _PER_SEED_FIELDS}


def aggregate(base: str, group: Sequence[BenchmarkResults]) -> dict[str, Any]:
    """Mean, std and 95% CI per metric over the seeds of one run (they must share a config)."""
    first = _recipe(group[0])
    for r in group[1:]:
        diff = sorted(k for k in set(first) | set(_recipe(r)) if first.get(k) != _recipe(r).get(k))
        if diff:
            raise ConfigError(f"{r.model_name} differs from {group[0].model_name} in more than "
                              f"the seed ({', '.join(diff)}): not repeats of one run")
    metrics = {}
    for metric, label in AGGREGATED_METRICS.items():
        values = [_metric(r, metric) for r in group]
        if any(v is None for v in values):
            metrics[metric] = {"label": label, "summary": None,
                               "why_none": "missing or non-finite in a seed's results"}
            continue
        metrics[metric] = {"label": label, "summary": summarize(values).to_dict()}
    return {"run": base, "seeds": [r.seed for r in group],
            "runs": [r.model_name for r in group], "config": first,
            "split_scheme": first.get("split_scheme"), "metrics": metrics}


def compare_aggregates(a: dict[str, Any], b: dict[str, Any],
                       group_a: Sequence[BenchmarkResults],
                       group_b: Sequence[BenchmarkResults]) -> dict[str, Any]:
    """Ratio of means a / b and Welch's t-test for perplexity and throughput."""
    out: dict[str, Any] = {"a": a["run"], "b": b["run"], "ratio": "mean(a) / mean(b)",
                           "seeds": {a["run"]: a["seeds"], b["run"]: b["seeds"]},
                           "significance_level": SIGNIFICANCE, "metrics": {}}
    for metric in ("test_perplexity", "valid_perplexity", "tokens_per_second"):
        va = [_metric(r, metric) for r in group_a]
        vb = [_metric(r, metric) for r in group_b]
        if any(v is None for v in va + vb):
            out["metrics"][metric] = None
            continue
        test = welch_test(va, vb)
        ratio = test["mean_a"] / test["mean_b"] if test["mean_b"] else None
        p = test["p_value"]
        test.update(label=AGGREGATED_METRICS[metric], ratio=ratio,
                    significant=None if p is None else p < SIGNIFICANCE)
        out["metrics"][metric] = test
    return out


def write_aggregates(folder: str | Path, results: dict[str, BenchmarkResults],
                     pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """Write every run's aggregate and the seed comparisons of ``pairs``; return both."""
    folder = Path(folder)
    groups = seed_groups(results)
    aggregates = {base: aggregate(base, g) for base, g in groups.items()}
    for base, agg in aggregates.items():
        write_json_atomic(folder / f"{base}_aggregate.json", agg)
    comparisons = []
    for a, b in pairs:
        if a in aggregates and b in aggregates:
            d = compare_aggregates(aggregates[a], aggregates[b], groups[a], groups[b])
            write_json_atomic(folder / f"comparison_{a}_vs_{b}_seeds.json", d)
            comparisons.append(d)
    return {"aggregates": aggregates, "comparisons": comparisons}


def mean_results(group: Sequence[BenchmarkResults]) -> BenchmarkResults:
    """A results record whose measured numbers are the means over the seeds (for the claims
    audit); everything else is the first seed's. Its name is the base run's."""
    import dataclasses
    first = group[0]
    m = _SEED_NAME.match(first.model_name)
    values = first.to_dict()
    values["model_name"] = m["base"] if m else first.model_name
    for metric in ("test_perplexity", "valid_perplexity", "test_loss", "valid_loss",
                   "tokens_per_second", "training_time", "peak_memory_mb", "model_size_mb",
                   "forward_flops", "backward_flops", "optimizer_flops", "total_flops"):
        xs = [_metric(r, metric) for r in group]
        values[metric] = sum(xs) / len(xs) if all(x is not None for x in xs) else None
    values["perplexity_valid_for_lm"] = all(r.perplexity_valid_for_lm for r in group)
    causal = [(r.causality or {}).get("causal") for r in group]
    if first.causality is not None:
        values["causality"] = dict(first.causality, causal=all(bool(c) for c in causal))
    # a mean timing is only as good as its worst seed's conditions
    busy = [r for r in group if (r.contention or {}).get("contended")]
    if busy:
        values["contention"] = {"contended": True, "reasons": [
            f"{r.model_name}: " + "; ".join((r.contention or {}).get("reasons") or [])
            for r in busy]}
    known = {f.name for f in dataclasses.fields(BenchmarkResults)}
    return BenchmarkResults(**{k: v for k, v in values.items() if k in known})
