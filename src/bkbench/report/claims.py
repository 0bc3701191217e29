"""The claims audit: the seed's "Expected Results", each given a verdict from the measured numbers.

PASS, FAIL, or UNTESTABLE when this run cannot test the claim's condition. Conditions, chosen so
that nothing the run could not test passes:

* every claim compares ``resnet_bk_full`` with ``transformer_baseline``: both must be present
  and share the whole training recipe -- every config field except the optimisation flags,
  the architecture-specific model fields and :data:`NOT_RECIPE` (budget, lr, schedule, seed,
  dropout, batch size, data and evaluation included); else every claim is UNTESTABLE, naming
  the fields that differ;
* perplexity: held-out test perplexities scored on the same tokens; the Transformer must pass
  the causality audit (else UNTESTABLE: no valid reference) and so must ResNet-BK (a model
  that sees the future has no language-model perplexity: FAIL); unaudited: UNTESTABLE;
* FLOPs: both runs measured by the counter; the backward claim is about the analytic gradient,
  so ``resnet_bk_full`` must have ``use_analytic_gradient`` on;
* training time and peak memory: the seed made these claims for long sequences, where O(N)
  against O(N^2) dominates; they are tested only when n_seq >= :data:`LONG_SEQUENCE_N` (2048)
  and both runs ran on the same device (memory: measured by the same method);
* training time is not judged when either run's timings were ``contended`` (the machine was
  busy, see :mod:`bkbench.metrics.contention`): UNTESTABLE with the reasons;
* a range ("50-100x lower") is read as its lower bound: reaching it passes, beyond the range
  is noted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from ..compare import as_finite, causal_verdict
from ..config import ARCHITECTURES, OPTIMIZATION_FLAGS, BenchmarkConfig
from ..metrics.contention import contended_reason
from ..results import BenchmarkResults
from .common import BASELINE, CANDIDATE, LONG_SEQUENCE_N, change_text, fmt

# Fields of a run's config that are not its training recipe: its name and architecture, and
# settings that cannot change its numbers (where the data and files live, durability,
# logging). Flags and architecture-specific model fields are excluded by
# :func:`recipe_differences` too; every other field must match for the claims to be tested.
NOT_RECIPE = frozenset({"model_name", "architecture", "data_dir", "device", "checkpoint_every",
                        "keep_checkpoints", "tensorboard", "allow_noncausal"})

# (name, the seed's claim, when it can be tested)
SPECS = {
    "perplexity": ("ResNet-BK (full) perplexity within 30% of the Transformer's",
                   "both models causal (audited), same held-out test tokens"),
    "forward_flops": ("forward FLOPs 10x lower than the Transformer's",
                      "forward FLOPs measured for both"),
    "backward_flops": ("backward FLOPs 50-100x lower (analytic gradient)",
                       "backward FLOPs measured for both; use_analytic_gradient on in "
                       "resnet_bk_full"),
    "training_time": ("training time 5-10x lower",
                      f"long sequences (n_seq >= {LONG_SEQUENCE_N}), both runs on the same "
                      "hardware"),
    "peak_memory": ("peak memory 30-50% lower",
                    f"long sequences (n_seq >= {LONG_SEQUENCE_N}), same device and measuring "
                    "method"),
}


@dataclass
class Claim:
    name: str
    statement: str          # the seed's claim
    measured: str           # what this run measured (human-readable)
    verdict: str            # "PASS", "FAIL" or "UNTESTABLE"
    reason: str             # why this verdict (the condition, the threshold)
    condition: str = ""     # when the claim can be tested at all
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _claim(name: str, measured: str, verdict: str, reason: str,
           value: float | None = None) -> Claim:
    statement, condition = SPECS[name]
    return Claim(name=name, statement=statement, measured=measured, verdict=verdict,
                 reason=reason, condition=condition, value=value)


def _same_device(a: BenchmarkResults, b: BenchmarkResults) -> tuple[bool, str]:
    keys = ("device", "cpu_model", "cuda_device")
    ea, eb = a.environment or {}, b.environment or {}
    if not ea.get("device") or not eb.get("device"):
        return False, "the device is not recorded for both runs"
    diff = [k for k in keys if ea.get(k) != eb.get(k)]
    if diff:
        return False, "the runs ran on different hardware (" + ", ".join(
            f"{k}: {ea.get(k)} vs {eb.get(k)}" for k in diff) + ")"
    return True, ""


def _architecture_fields() -> set[str]:
    """Config fields that configure one architecture's model only (in the model kwargs of
    one architecture and not of another); the optimisation flags are left to the caller."""
    kwargs = [set(BenchmarkConfig(architecture=a).model_kwargs()) for a in ARCHITECTURES]
    names = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    # the model's size and regularisation are part of every recipe, whichever models take them
    shared = set.intersection(*kwargs) | {"d_model", "n_layers", "n_seq", "dropout",
                                          "tie_weights"}
    return {k for k in set.union(*kwargs) - shared if k in names}


def recipe_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Config fields in which two runs' training recipes differ: every field except the
    flags, the architecture-specific model fields and :data:`NOT_RECIPE`."""
    skip = NOT_RECIPE | set(OPTIMIZATION_FLAGS) | _architecture_fields()
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))


def audit_claims(results: dict[str, BenchmarkResults],
                 scale: dict[str, Any] | None = None) -> list[Claim]:
    """Verdicts on the seed's expected results (see the module docstring for the conditions).

    Runs repeated over seeds (``<run>-seed<s>``) are judged by their means, and the claim says
    so. With a sequence-length sweep (``scale``, from ``bkbench scale``), the time and memory
    claims that the run's own n_seq cannot test are judged from the sweep instead.
    """
    results, seeds_used = with_seed_means(results)
    claims = _audit(results)
    for c in claims:
        if seeds_used.get(c.name):
            c.measured += f" [mean of {seeds_used[c.name]} seeds]"
    if scale is not None:
        claims = [_judge_from_scale(c, scale) for c in claims]
    return claims


def with_seed_means(results: dict[str, BenchmarkResults]
                    ) -> tuple[dict[str, BenchmarkResults], dict[str, int]]:
    """Add the seed means of the two audited runs when only their seed repeats exist."""
    from ..experiments.seeds import mean_results, seed_groups
    groups = seed_groups(results)
    out, counts = dict(results), {}
    for name in (BASELINE, CANDIDATE):
        if name not in out and name in groups:
            out[name] = mean_results(groups[name])
            counts[name] = len(groups[name])
    n = min(counts.values()) if counts else 0
    return out, ({k: n for k in SPECS} if n else {})


def _judge_from_scale(claim: Claim, scale: dict[str, Any]) -> Claim:
    """Re-judge a time/memory claim that was UNTESTABLE for want of long sequences."""
    from ..experiments.scale import scale_claims
    if claim.name not in ("training_time", "peak_memory") or claim.verdict != "UNTESTABLE" \
            or "long sequences" not in claim.reason:
        return claim
    s = scale_claims(scale, BASELINE, CANDIDATE)
    if s is None:
        return claim
    n, source = s["n_seq"], f"scale sweep ({scale.get('values')})"
    if s["same_setup"]:
        return _claim(claim.name, claim.measured, "UNTESTABLE",
                      f"the {source} ran the two models with different settings "
                      f"({', '.join(s['same_setup'])})")
    if n < LONG_SEQUENCE_N:
        return _claim(claim.name, claim.measured, "UNTESTABLE",
                      f"the {source} reaches n_seq = {n} < {LONG_SEQUENCE_N}")
    if claim.name == "training_time" and s.get("contended"):
        return _claim(claim.name, claim.measured, "UNTESTABLE",
                      "; ".join(s["contended"]) + f" (in the {source})")
    if claim.name == "training_time":
        e, ratio = s["time_exponents"], s["speedup"]
        measured = (f"{ratio:.2f}x faster per token at n_seq = {n}; time/token exponents "
                    f"{BASELINE} {fmt(e[BASELINE])}, {CANDIDATE} {fmt(e[CANDIDATE])}")
        verdict, reason = _speedup_verdict(ratio, f" at n_seq = {n}, from the {source}")
    else:
        e, ratio = s["memory_exponents"], s["memory_saving"]
        if ratio is None:
            return claim
        measured = (f"{change_text(ratio)} peak memory at n_seq = {n}; memory exponents "
                    f"{BASELINE} {fmt(e[BASELINE])}, {CANDIDATE} {fmt(e[CANDIDATE])}")
        verdict, reason = _saving_verdict(ratio, f" at n_seq = {n}, from the {source}")
    return _claim(claim.name, measured, verdict, reason, ratio)


def _speedup_verdict(ratio: float, where: str = "") -> tuple[str, str]:
    ok = ratio >= 5.0
    reason = f"speed-up {ratio:.2f} {'>=' if ok else '<'} 5{where}"
    if ok and ratio > 10:
        reason += "; beyond the stated 5-10x range"
    return ("PASS" if ok else "FAIL"), reason


def _saving_verdict(saving: float, where: str = "") -> tuple[str, str]:
    ok = saving >= 0.30
    reason = f"saving {100 * saving:.1f}% {'>=' if ok else '<'} 30%{where}"
    if ok and saving > 0.50:
        reason += "; beyond the stated 30-50% range"
    return ("PASS" if ok else "FAIL"), reason


def _audit(results: dict[str, BenchmarkResults]) -> list[Claim]:
    tf, bk = results.get(BASELINE), results.get(CANDIDATE)
    if tf is None or bk is None:
        missing = [n for n in (BASELINE, CANDIDATE) if n not in results]
        return [_claim(n, "n/a", "UNTESTABLE", f"run(s) {', '.join(missing)} not in these results")
                for n in SPECS]
    setup_diff = recipe_differences(tf.config, bk.config)
    if setup_diff:
        reason = "the two runs do not share the training recipe (" + ", ".join(
            f"{k}: {tf.config.get(k)!r} vs {bk.config.get(k)!r}" for k in setup_diff) + ")"
        return [_claim(n, "n/a", "UNTESTABLE", reason) for n in SPECS]
    n_seq = int(tf.config.get("n_seq") or 0)
    # the time and memory claims were made for long sequences; shorter runs cannot test them
    short_run = (f"stated for long sequences; this run used n_seq = {n_seq} < {LONG_SEQUENCE_N}"
                 if n_seq < LONG_SEQUENCE_N else None)
    return [_perplexity_claim(tf, bk),
            _flops_claim(tf, bk, "forward_flops", 10.0, None),
            _flops_claim(tf, bk, "backward_flops", 50.0, 100.0),
            _time_claim(tf, bk, n_seq, short_run),
            _memory_claim(tf, bk, n_seq, short_run)]


def _perplexity_claim(tf: BenchmarkResults, bk: BenchmarkResults) -> Claim:
    name = "perplexity"
    proxy = "proxy" in (tf.config.get("split_scheme"), bk.config.get("split_scheme"))
    p_tf, p_bk = as_finite(tf.test_perplexity), as_finite(bk.test_perplexity)
    c_tf, c_bk = causal_verdict(tf), causal_verdict(bk)
    if p_tf is None or p_bk is None or p_tf <= 0:
        return _claim(name, "n/a", "UNTESTABLE", "test perplexity missing for a run")
    ratio = p_bk / p_tf
    measured = (f"test perplexity {p_bk:.2f} vs {p_tf:.2f}: {100 * (ratio - 1):+.1f}%"
                + (" (PROXY split scheme)" if proxy else ""))
    if tf.test_tokens != bk.test_tokens:
        return _claim(name, measured, "UNTESTABLE",
                      f"different test token counts ({tf.test_tokens} vs {bk.test_tokens}): "
                      "not the same held-out text", ratio)
    if c_tf is False:
        return _claim(name, measured, "UNTESTABLE",
                      f"{BASELINE} failed the causality audit: no valid reference", ratio)
    if c_bk is False:
        return _claim(name, measured, "FAIL",
                      f"{CANDIDATE} failed the causality audit: it sees future tokens, so its "
                      "perplexity is not a language-model perplexity", ratio)
    if c_tf is None or c_bk is None:
        return _claim(name, measured, "UNTESTABLE",
                      "a run was not audited for causality, so its perplexity cannot be "
                      "trusted as a language-model perplexity", ratio)
    ok = ratio <= 1.30
    return _claim(name, measured, "PASS" if ok else "FAIL",
                  f"ratio {ratio:.3f} {'<=' if ok else '>'} 1.30" + ("; proxy data" if proxy
                                                                     else ""), ratio)


def _components(r: BenchmarkResults, phase: str) -> dict[str, float] | None:
    comp = (r.flops or {}).get(f"{phase}_by_component")
    return comp if isinstance(comp, dict) else None


def _layer_ratio(tf: BenchmarkResults, bk: BenchmarkResults, phase: str) -> float | None:
    a, b = _components(tf, phase), _components(bk, phase)
    if not a or not b:
        return None
    la = sum(as_finite(a.get(k)) or 0 for k in ("mixer", "feed_forward"))
    lb = sum(as_finite(b.get(k)) or 0 for k in ("mixer", "feed_forward"))
    return la / lb if lb > 0 else None


def _flops_claim(tf: BenchmarkResults, bk: BenchmarkResults, name: str, bound: float,
                 upper: float | None) -> Claim:
    f_tf, f_bk = as_finite(getattr(tf, name)), as_finite(getattr(bk, name))
    if f_tf is None or f_bk is None or f_bk <= 0:
        return _claim(name, "n/a", "UNTESTABLE", f"{name} not measured for both runs")
    ratio = f_tf / f_bk
    measured = f"{f_tf:.3e} vs {f_bk:.3e} FLOPs/step: {ratio:.2f}x lower"
    layers = _layer_ratio(tf, bk, name.removesuffix("_flops"))
    if layers is not None:
        measured += f" (excluding embedding, LM head and loss: {layers:.2f}x)"
    if name == "backward_flops" and not bk.config.get("use_analytic_gradient"):
        return _claim(name, measured, "UNTESTABLE",
                      f"use_analytic_gradient is off in {CANDIDATE}", ratio)
    ok = ratio >= bound
    reason = f"ratio {ratio:.2f} {'>=' if ok else '<'} {bound:g} (whole model, per step)"
    if ok and upper is not None and ratio > upper:
        reason += f"; beyond the stated {bound:g}-{upper:g}x range"
    return _claim(name, measured, "PASS" if ok else "FAIL", reason, ratio)


def _time_claim(tf: BenchmarkResults, bk: BenchmarkResults, n_seq: int,
                short_run: str | None) -> Claim:
    """Throughput, warm-up excluded, so token budgets need not match."""
    name = "training_time"
    t_tf, t_bk = as_finite(tf.tokens_per_second), as_finite(bk.tokens_per_second)
    if t_tf is None or t_bk is None or t_tf <= 0:
        return _claim(name, "n/a", "UNTESTABLE", "training throughput missing for a run")
    ratio = t_bk / t_tf
    measured = (f"{t_bk:,.0f} vs {t_tf:,.0f} training tokens/s: {ratio:.2f}x faster "
                f"(n_seq = {n_seq})")
    contended = [w for r in (tf, bk) if (w := contended_reason(r.model_name, r.contention))]
    same, why = _same_device(tf, bk)
    if contended:
        return _claim(name, measured, "UNTESTABLE",
                      "; ".join(contended + ([short_run] if short_run else [])), ratio)
    if short_run or not same:
        return _claim(name, measured, "UNTESTABLE", short_run or why, ratio)
    return _claim(name, measured, *_speedup_verdict(ratio), ratio)


def _memory_claim(tf: BenchmarkResults, bk: BenchmarkResults, n_seq: int,
                  short_run: str | None) -> Claim:
    name = "peak_memory"
    m_tf, m_bk = as_finite(tf.peak_memory_mb), as_finite(bk.peak_memory_mb)
    if m_tf is None or m_bk is None or m_tf <= 0:
        return _claim(name, "n/a", "UNTESTABLE", "peak memory not measured for both runs")
    saving = 1 - m_bk / m_tf
    measured = f"{m_bk:,.1f} vs {m_tf:,.1f} MiB: {change_text(saving)} (n_seq = {n_seq})"
    same, why = _same_device(tf, bk)
    if short_run or not same:
        return _claim(name, measured, "UNTESTABLE", short_run or why, saving)
    if (tf.memory or {}).get("method") != (bk.memory or {}).get("method"):
        return _claim(name, measured, "UNTESTABLE", "peak memory measured by different methods",
                      saving)
    return _claim(name, measured, *_saving_verdict(saving), saving)


def format_claims(claims: list[Claim]) -> str:
    """The claims as a plain-text table (for the terminal)."""
    rows = [("claim", "verdict", "measured", "why")] + [
        (c.statement, c.verdict, c.measured, c.reason) for c in claims]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(3)]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  ---")
    return "\n".join(out)
