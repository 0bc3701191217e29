"""The benchmark report, rebuilt from the JSON files of a results folder alone.

``build_report(results_dir)`` reads every ``*_results.json`` and ``comparison_*.json`` and
writes ``training_curves.png``, ``flops_breakdown.png``, ``report.md`` and a self-contained
``report.html`` (the images embedded) into the same folder.

The claims audit (:func:`audit_claims`) takes the seed's "Expected Results" and gives each a
verdict from the measured numbers: PASS, FAIL, or UNTESTABLE when this run cannot test the
claim's condition. Conditions, chosen so that nothing the run could not test passes:

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

import base64
import dataclasses
import html
import io
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic, write_json_atomic
from .compare import (PEER_PAIRS, SEED_PAIRS, as_finite, causal_verdict, compare_results,
                      comparison_path, format_comparison, seed_comparisons)
from .config import ARCHITECTURES, OPTIMIZATION_FLAGS, BenchmarkConfig
from .flags import registry as flag_registry
from .metrics.contention import contended_reason
from .results import BenchmarkResults
from .runs import base_name, group_by_setup, grouped_pairs

__all__ = ["Claim", "audit_claims", "build_report", "report_main", "format_claims",
           "LONG_SEQUENCE_N", "load_results_dir"]

LONG_SEQUENCE_N = 2048
BASELINE, CANDIDATE = "transformer_baseline", "resnet_bk_full"
# Fields of a run's config that are not its training recipe: its name and architecture, and
# settings that cannot change its numbers (where the data and files live, durability,
# logging). Flags and architecture-specific model fields are excluded by
# :func:`recipe_differences` too; every other field must match for the claims to be tested.
NOT_RECIPE = frozenset({"model_name", "architecture", "data_dir", "device", "checkpoint_every",
                        "keep_checkpoints", "tensorboard", "allow_noncausal"})
COMPONENT_ORDER = ("embedding", "mixer", "feed_forward", "lm_head", "loss", "other", "optimizer")
COMPONENT_COLORS = {"embedding": "#8c6d31", "mixer": "#1f77b4", "feed_forward": "#2ca02c",
                    "lm_head": "#d62728", "loss": "#9467bd", "other": "#7f7f7f",
                    "optimizer": "#ff7f0e", "unattributed": "#bbbbbb"}
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]


class ReportError(Exception):
    """The results folder cannot be reported on (missing, or no results files)."""


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def load_results_dir(results_dir: str | Path) -> tuple[dict[str, BenchmarkResults], list[str]]:
    """(results by run name, problems) from a results folder's ``*_results.json`` files."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise ReportError(f"results folder {str(folder)!r} does not exist")
    results: dict[str, BenchmarkResults] = {}
    problems: list[str] = []
    for path in sorted(folder.glob("*_results.json")):
        try:
            r = BenchmarkResults.load(path)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            problems.append(f"{path.name} skipped: {exc}")
            continue
        results[r.model_name] = r
    order = {n: i for i, n in enumerate((BASELINE, "resnet_bk_baseline", CANDIDATE))}
    results = dict(sorted(results.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
    if not results:
        raise ReportError(f"no readable *_results.json files in {str(folder)!r}"
                          + (f" ({'; '.join(problems)})" if problems else "")
                          + "; run `bkbench run` first")
    return results, problems


# ------------------------------------------------------------------------------------------
# Claims audit
# ------------------------------------------------------------------------------------------

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


def _claim(name, statement, condition, measured, verdict, reason, value=None) -> Claim:
    return Claim(name=name, statement=statement, measured=measured, verdict=verdict,
                 reason=reason, condition=condition, value=value)


def audit_claims(results: dict[str, BenchmarkResults],
                 scale: dict[str, Any] | None = None) -> list[Claim]:
    """Verdicts on the seed's expected results (see the module docstring for the conditions).

    Runs repeated over seeds (``<run>-seed<s>``) are judged by their means, and the claim says
    so. With a sequence-length sweep (``scale``, from ``bkbench scale``), the time and memory
    claims that the run's own n_seq cannot test are judged from the sweep instead.
    """
    results, seeds_used = _with_seed_means(results)
    claims = _audit_claims(results)
    for c in claims:
        if seeds_used.get(c.name):
            c.measured += f" [mean of {seeds_used[c.name]} seeds]"
    if scale is not None:
        claims = [_judge_from_scale(c, scale) for c in claims]
    return claims


def _with_seed_means(results: dict[str, BenchmarkResults]
                     ) -> tuple[dict[str, BenchmarkResults], dict[str, int]]:
    """Add the seed means of the two audited runs when only their seed repeats exist."""
    from .experiments.seeds import mean_results, seed_groups
    groups = seed_groups(results)
    out, counts = dict(results), {}
    for name in (BASELINE, CANDIDATE):
        if name not in out and name in groups:
            out[name] = mean_results(groups[name])
            counts[name] = len(groups[name])
    n = min(counts.values()) if counts else 0
    return out, ({k: n for k in ("perplexity", "forward_flops", "backward_flops",
                                 "training_time", "peak_memory")} if n else {})


def _judge_from_scale(claim: Claim, scale: dict[str, Any]) -> Claim:
    """Re-judge a time/memory claim that was UNTESTABLE for want of long sequences."""
    from .experiments.scale import scale_claims
    if claim.name not in ("training_time", "peak_memory") or claim.verdict != "UNTESTABLE" \
            or "long sequences" not in claim.reason:
        return claim
    s = scale_claims(scale, BASELINE, CANDIDATE)
    if s is None:
        return claim
    n, source = s["n_seq"], f"scale sweep ({scale.get('values')})"
    if s["same_setup"]:
        return _claim(claim.name, claim.statement, claim.condition, claim.measured, "UNTESTABLE",
                      f"the {source} ran the two models with different settings "
                      f"({', '.join(s['same_setup'])})")
    if n < LONG_SEQUENCE_N:
        return _claim(claim.name, claim.statement, claim.condition, claim.measured, "UNTESTABLE",
                      f"the {source} reaches n_seq = {n} < {LONG_SEQUENCE_N}")
    if claim.name == "training_time" and s.get("contended"):
        return _claim(claim.name, claim.statement, claim.condition, claim.measured, "UNTESTABLE",
                      "; ".join(s["contended"]) + f" (in the {source})")
    if claim.name == "training_time":
        e = s["time_exponents"]
        ratio = s["speedup"]
        measured = (f"{ratio:.2f}x faster per token at n_seq = {n}; time/token exponents "
                    f"{BASELINE} {_f(e[BASELINE])}, {CANDIDATE} {_f(e[CANDIDATE])}")
        ok = ratio >= 5.0
        reason = f"speed-up {ratio:.2f} {'>=' if ok else '<'} 5 at n_seq = {n}, from the {source}"
        if ok and ratio > 10:
            reason += "; beyond the stated 5-10x range"
    else:
        e = s["memory_exponents"]
        ratio = s["memory_saving"]
        if ratio is None:
            return claim
        measured = (f"{100 * ratio:.1f}% lower peak memory at n_seq = {n}; memory exponents "
                    f"{BASELINE} {_f(e[BASELINE])}, {CANDIDATE} {_f(e[CANDIDATE])}")
        ok = ratio >= 0.30
        reason = f"saving {100 * ratio:.1f}% {'>=' if ok else '<'} 30% at n_seq = {n}, from the {source}"
        if ok and ratio > 0.50:
            reason += "; beyond the stated 30-50% range"
    return _claim(claim.name, claim.statement, claim.condition, measured,
                  "PASS" if ok else "FAIL", reason, ratio)


def _audit_claims(results: dict[str, BenchmarkResults]) -> list[Claim]:
    specs = [
        ("perplexity", "ResNet-BK (full) perplexity within 30% of the Transformer's",
         "both models causal (audited), same held-out test tokens"),
        ("forward_flops", "forward FLOPs 10x lower than the Transformer's",
         "forward FLOPs measured for both"),
        ("backward_flops", "backward FLOPs 50-100x lower (analytic gradient)",
         "backward FLOPs measured for both; use_analytic_gradient on in resnet_bk_full"),
        ("training_time", "training time 5-10x lower",
         f"long sequences (n_seq >= {LONG_SEQUENCE_N}), both runs on the same hardware"),
        ("peak_memory", "peak memory 30-50% lower",
         f"long sequences (n_seq >= {LONG_SEQUENCE_N}), same device and measuring method"),
    ]
    tf, bk = results.get(BASELINE), results.get(CANDIDATE)
    if tf is None or bk is None:
        missing = [n for n in (BASELINE, CANDIDATE) if n not in results]
        return [_claim(n, s, c, "n/a", "UNTESTABLE",
                       f"run(s) {', '.join(missing)} not in these results") for n, s, c in specs]
    setup_diff = recipe_differences(tf.config, bk.config)
    if setup_diff:
        reason = "the two runs do not share the training recipe (" + ", ".join(
            f"{k}: {tf.config.get(k)!r} vs {bk.config.get(k)!r}" for k in setup_diff) + ")"
        return [_claim(n, s, c, "n/a", "UNTESTABLE", reason) for n, s, c in specs]
    proxy = "proxy" in (tf.config.get("split_scheme"), bk.config.get("split_scheme"))
    n_seq = int(tf.config.get("n_seq") or 0)
    # the time and memory claims were made for long sequences; shorter runs cannot test them
    short_run = (f"stated for long sequences; this run used n_seq = {n_seq} < {LONG_SEQUENCE_N}"
                 if n_seq < LONG_SEQUENCE_N else None)
    claims = []

    # 1. perplexity within 30%
    name, statement, cond = specs[0]
    p_tf, p_bk = as_finite(tf.test_perplexity), as_finite(bk.test_perplexity)
    c_tf, c_bk = causal_verdict(tf), causal_verdict(bk)
    if p_tf is None or p_bk is None or p_tf <= 0:
        claims.append(_claim(name, statement, cond, "n/a", "UNTESTABLE",
                             "test perplexity missing for a run"))
    else:
        ratio = p_bk / p_tf
        measured = (f"test perplexity {p_bk:.2f} vs {p_tf:.2f}: {100 * (ratio - 1):+.1f}%"
                    + (" (PROXY split scheme)" if proxy else ""))
        if tf.test_tokens != bk.test_tokens:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE",
                                 f"different test token counts ({tf.test_tokens} vs "
                                 f"{bk.test_tokens}): not the same held-out text", ratio))
        elif c_tf is False:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE",
                                 f"{BASELINE} failed the causality audit: no valid reference",
                                 ratio))
        elif c_bk is False:
            claims.append(_claim(name, statement, cond, measured, "FAIL",
                                 f"{CANDIDATE} failed the causality audit: it sees future "
                                 "tokens, so its perplexity is not a language-model perplexity",
                                 ratio))
        elif c_tf is None or c_bk is None:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE",
                                 "a run was not audited for causality, so its perplexity "
                                 "cannot be trusted as a language-model perplexity", ratio))
        else:
            ok = ratio <= 1.30
            claims.append(_claim(name, statement, cond, measured, "PASS" if ok else "FAIL",
                                 f"ratio {ratio:.3f} {'<=' if ok else '>'} 1.30"
                                 + ("; proxy data" if proxy else ""), ratio))

    # 2, 3. FLOPs
    for (name, statement, cond), field, bound, upper in (
            (specs[1], "forward_flops", 10.0, None), (specs[2], "backward_flops", 50.0, 100.0)):
        f_tf, f_bk = as_finite(getattr(tf, field)), as_finite(getattr(bk, field))
        if f_tf is None or f_bk is None or f_bk <= 0:
            claims.append(_claim(name, statement, cond, "n/a", "UNTESTABLE",
                                 f"{field} not measured for both runs"))
            continue
        ratio = f_tf / f_bk
        measured = f"{f_tf:.3e} vs {f_bk:.3e} FLOPs/step: {ratio:.2f}x lower"
        layers = _layer_ratio(tf, bk, "forward" if field == "forward_flops" else "backward")
        if layers is not None:
            measured += f" (excluding embedding, LM head and loss: {layers:.2f}x)"
        if field == "backward_flops" and not bk.config.get("use_analytic_gradient"):
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE",
                                 f"use_analytic_gradient is off in {CANDIDATE}", ratio))
            continue
        ok = ratio >= bound
        reason = f"ratio {ratio:.2f} {'>=' if ok else '<'} {bound:g} (whole model, per step)"
        if ok and upper is not None and ratio > upper:
            reason += f"; beyond the stated {bound:g}-{upper:g}x range"
        claims.append(_claim(name, statement, cond, measured, "PASS" if ok else "FAIL",
                             reason, ratio))

    # 4. training time (throughput, warm-up excluded, so token budgets need not match)
    name, statement, cond = specs[3]
    t_tf, t_bk = as_finite(tf.tokens_per_second), as_finite(bk.tokens_per_second)
    same, why = _same_device(tf, bk)
    if t_tf is None or t_bk is None or t_tf <= 0:
        claims.append(_claim(name, statement, cond, "n/a", "UNTESTABLE",
                             "training throughput missing for a run"))
    else:
        ratio = t_bk / t_tf
        measured = (f"{t_bk:,.0f} vs {t_tf:,.0f} training tokens/s: {ratio:.2f}x faster "
                    f"(n_seq = {n_seq})")
        contended = [w for r in (tf, bk) if (w := contended_reason(r.model_name, r.contention))]
        if contended:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE",
                                 "; ".join(contended + ([short_run] if short_run else [])),
                                 ratio))
        elif short_run:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE", short_run, ratio))
        elif not same:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE", why, ratio))
        else:
            ok = ratio >= 5.0
            reason = f"speed-up {ratio:.2f} {'>=' if ok else '<'} 5"
            if ok and ratio > 10:
                reason += "; beyond the stated 5-10x range"
            claims.append(_claim(name, statement, cond, measured, "PASS" if ok else "FAIL",
                                 reason, ratio))

    # 5. peak memory
    name, statement, cond = specs[4]
    m_tf, m_bk = as_finite(tf.peak_memory_mb), as_finite(bk.peak_memory_mb)
    if m_tf is None or m_bk is None or m_tf <= 0:
        claims.append(_claim(name, statement, cond, "n/a", "UNTESTABLE",
                             "peak memory not measured for both runs"))
    else:
        saving = 1 - m_bk / m_tf
        measured = (f"{m_bk:,.1f} vs {m_tf:,.1f} MiB: {100 * saving:.1f}% lower "
                    f"(n_seq = {n_seq})")
        method_tf = (tf.memory or {}).get("method")
        method_bk = (bk.memory or {}).get("method")
        if short_run:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE", short_run,
                                 saving))
        elif not same:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE", why, saving))
        elif method_tf != method_bk:
            claims.append(_claim(name, statement, cond, measured, "UNTESTABLE",
                                 "peak memory measured by different methods", saving))
        else:
            ok = saving >= 0.30
            reason = f"saving {100 * saving:.1f}% {'>=' if ok else '<'} 30%"
            if ok and saving > 0.50:
                reason += "; beyond the stated 30-50% range"
            claims.append(_claim(name, statement, cond, measured, "PASS" if ok else "FAIL",
                                 reason, saving))
    return claims


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


def format_claims(claims: list[Claim]) -> str:
    rows = [("claim", "verdict", "measured", "why")] + [
        (c.statement, c.verdict, c.measured, c.reason) for c in claims]
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(3)]
    out = []
    for i, r in enumerate(rows):
        out.append("  ".join(r[j].ljust(widths[j]) for j in range(3)) + "  " + r[3])
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  ---")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _run_colors(names: list[str]) -> dict[str, str]:
    return {n: RUN_COLORS[i % len(RUN_COLORS)] for i, n in enumerate(names)}


def _training_by_component(r: BenchmarkResults) -> dict[str, float] | None:
    flops = r.flops or {}
    training = flops.get("training") or {}
    by = training.get("by_component")
    if isinstance(by, dict) and by:
        return {k: float(v) for k, v in by.items() if as_finite(v)}
    total = as_finite(r.total_flops)
    return {"unattributed": total} if total else None


def _step_by_component(r: BenchmarkResults) -> dict[str, dict[str, float]] | None:
    fwd, bwd = _components(r, "forward"), _components(r, "backward")
    if not fwd or not bwd:
        return None
    opt = (r.flops or {}).get("optimizer_by_component") or {}
    return {"forward": {k: float(v) for k, v in fwd.items()},
            "backward": {k: float(v) for k, v in bwd.items()},
            "optimizer": {k: float(v) for k, v in opt.items()}
            if opt else {"optimizer": float(as_finite(r.optimizer_flops) or 0)}}


def _proxy(results: dict[str, BenchmarkResults]) -> bool:
    return any(r.config.get("split_scheme") == "proxy" or (r.data or {}).get("scheme") == "proxy"
               for r in results.values())


def _finish_figure(fig, path: Path, title: str, proxy_note: str | None, fontsize: int) -> Path:
    """Title (with the PROXY label when it applies), layout, atomic PNG write, close."""
    fig.suptitle(title + (f"  --  {proxy_note}" if proxy_note else ""), fontsize=fontsize,
                 fontweight="bold")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return path


def plot_training_curves(results: dict[str, BenchmarkResults], path: Path) -> Path:
    plt = _plt()
    names = list(results)
    colors = _run_colors(names)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_loss, ax_ppl), (ax_time, ax_flops) = axes
    for n, r in results.items():
        kw = dict(color=colors[n], marker="o", label=n, linewidth=2)
        if r.epoch_losses:
            ax_loss.plot(range(1, len(r.epoch_losses) + 1), r.epoch_losses, **kw)
        if r.epoch_perplexities:
            ax_ppl.plot(range(1, len(r.epoch_perplexities) + 1), r.epoch_perplexities, **kw)
        if r.epoch_times:
            ax_time.plot(range(1, len(r.epoch_times) + 1), r.epoch_times, **kw)
    ax_loss.set(title="Training loss per epoch (cross-entropy, dropout on)", xlabel="epoch",
                ylabel="loss (nats / token)")
    ax_ppl.set(title="Validation perplexity per epoch (held-out, eval mode)", xlabel="epoch",
               ylabel="perplexity (log scale)")
    ax_ppl.set_yscale("log")
    ax_time.set(title="Training time per epoch", xlabel="epoch", ylabel="seconds")
    ax_time.set_ylim(bottom=0)  # a time axis that starts at 0 shows differences at their size
    for ax in (ax_loss, ax_ppl, ax_time):
        ax.grid(True, alpha=0.3, which="both")
        if ax.get_lines():
            ax.legend(fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)

    comps = {n: _training_by_component(r) for n, r in results.items()}
    comps = {n: c for n, c in comps.items() if c}
    if comps:
        keys = [k for k in (*COMPONENT_ORDER, "unattributed")
                if any(k in c for c in comps.values())]
        keys += sorted({k for c in comps.values() for k in c} - set(keys))
        x = list(range(len(comps)))
        bottom = [0.0] * len(comps)
        for k in keys:
            vals = [comps[n].get(k, 0.0) for n in comps]
            if not any(vals):
                continue
            ax_flops.bar(x, vals, bottom=bottom, label=k.replace("_", " "),
                         color=COMPONENT_COLORS.get(k, None), edgecolor="white")
            bottom = [b + v for b, v in zip(bottom, vals)]
        for xi, total in zip(x, bottom):
            ax_flops.annotate(f"{total:.2e}", (xi, total), ha="center", va="bottom", fontsize=9)
        ax_flops.set_xticks(x, list(comps), rotation=10)
        ax_flops.legend(fontsize=8, title="component", title_fontsize=8)
        ax_flops.set_ylim(0, max(bottom) * 1.12)
    else:
        ax_flops.text(0.5, 0.5, "FLOPs not measured", ha="center", va="center",
                      transform=ax_flops.transAxes)
    ax_flops.set(title="Total training FLOPs (counted + formula; steps x per-step)",
                 ylabel="FLOPs")
    ax_flops.grid(True, axis="y", alpha=0.3)
    return _finish_figure(fig, path, "WikiText-2 training curves",
                          "PROXY split scheme (not official WikiText-2 numbers)"
                          if _proxy(results) else None, fontsize=14)


def plot_flops_breakdown(results: dict[str, BenchmarkResults], path: Path) -> Path:
    plt = _plt()
    steps = {n: _step_by_component(r) for n, r in results.items()}
    steps = {n: s for n, s in steps.items() if s}
    fig, (ax_abs, ax_share) = plt.subplots(1, 2, figsize=(14, 5.5),
                                           gridspec_kw={"width_ratios": [3, 2]})
    if not steps:
        for ax in (ax_abs, ax_share):
            ax.text(0.5, 0.5, "FLOPs not measured", ha="center", va="center",
                    transform=ax.transAxes)
    else:
        keys = [k for k in COMPONENT_ORDER
                if any(k in p for s in steps.values() for p in s.values())]
        labels, stacks, x = [], [], []
        for i, (n, s) in enumerate(steps.items()):
            for j, phase in enumerate(("forward", "backward", "optimizer")):
                labels.append(phase)
                stacks.append(s[phase])
                x.append(4 * i + j)
        bottom = [0.0] * len(labels)
        for k in keys:
            vals = [st.get(k, 0.0) for st in stacks]
            if not any(vals):
                continue
            ax_abs.bar(x, vals, bottom=bottom, color=COMPONENT_COLORS.get(k),
                       label=k.replace("_", " "), edgecolor="white")
            bottom = [b + v for b, v in zip(bottom, vals)]
        for xi, total in zip(x, bottom):
            ax_abs.annotate(f"{total:.2e}", (xi, total), ha="center", va="bottom", fontsize=7)
        ax_abs.set_xticks(x, labels, fontsize=8, rotation=30)
        from matplotlib.transforms import blended_transform_factory
        trans = blended_transform_factory(ax_abs.transData, ax_abs.transAxes)
        for i, n in enumerate(steps):
            ax_abs.text(4 * i + 1, -0.2, n, transform=trans, ha="center", va="top",
                        fontsize=9, fontweight="bold")
        ax_abs.set(title="FLOPs per training step, by phase and component (counted)",
                   ylabel="FLOPs / step")
        ax_abs.set_ylim(0, max(bottom) * 1.12 if max(bottom) else 1)
        ax_abs.legend(fontsize=8)
        ax_abs.grid(True, axis="y", alpha=0.3)

        names = list(steps)
        totals = {n: {k: sum(p.get(k, 0.0) for p in steps[n].values()) for k in keys}
                  for n in names}
        left = [0.0] * len(names)
        for k in keys:
            shares = [100 * totals[n][k] / (sum(totals[n].values()) or 1) for n in names]
            if not any(shares):
                continue
            ax_share.barh(names, shares, left=left, color=COMPONENT_COLORS.get(k),
                          label=k.replace("_", " "), edgecolor="white")
            for yi, (l, s) in enumerate(zip(left, shares)):
                if s >= 6:
                    ax_share.text(l + s / 2, yi, f"{s:.0f}%", ha="center", va="center",
                                  fontsize=8, color="white", fontweight="bold")
            left = [l + s for l, s in zip(left, shares)]
        ax_share.set(title="Share of each step's counted FLOPs", xlabel="% of FLOPs / step",
                     xlim=(0, 100))
        ax_share.invert_yaxis()
        notes = []
        for n in names:
            unc = ((results[n].flops or {}).get("uncounted") or {}).get("fraction_of_counted")
            if as_finite(unc) is not None:
                notes.append(f"{n}: ~{100 * unc:.1f}%")
        if notes:
            ax_share.text(0, -0.2, "Not counted (elementwise, softmax, norms; estimate,\n"
                          "% of counted): " + "\n".join(notes), transform=ax_share.transAxes,
                          fontsize=8, va="top")
    return _finish_figure(fig, path, "FLOPs breakdown",
                          "PROXY split scheme" if _proxy(results) else None, fontsize=13)


# ------------------------------------------------------------------------------------------
# A tiny document model rendered to Markdown and to HTML
# ------------------------------------------------------------------------------------------

class _Doc:
    def __init__(self) -> None:
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def banner(self, text: str) -> None:
        self.blocks.append(("banner", text))

    def bullets(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", [str(h) for h in headers],
                            [[str(c) for c in r] for r in rows]))

    def image(self, filename: str, alt: str) -> None:
        self.blocks.append(("img", filename, alt))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    # -- Markdown
    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append("#" * b[1] + " " + b[2])
            elif kind == "p":
                out.append(b[1])
            elif kind == "banner":
                out.append("> **" + b[1] + "**")
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in b[1]))
            elif kind == "table":
                esc = (lambda s: s.replace("|", "\\|").replace("\n", " "))
                lines = ["| " + " | ".join(esc(h) for h in b[1]) + " |",
                         "|" + "|".join("---" for _ in b[1]) + "|"]
                lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in b[2]]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[2]}]({b[1]})")
            elif kind == "pre":
                out.append("```\n" + b[1] + "\n```")
        return "\n\n".join(out) + "\n"

    # -- HTML
    @staticmethod
    def _inline(text: str) -> str:
        s = html.escape(text)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"`(.+?)`", r"<code>\1</code>", s)
        return s

    def html(self, images: dict[str, bytes], title: str) -> str:
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{self._inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{self._inline(b[1])}</p>")
            elif kind == "banner":
                body.append(f'<div class="banner">{self._inline(b[1])}</div>')
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{self._inline(i)}</li>" for i in b[1])
                            + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{self._inline(h)}</th>" for h in b[1])
                rows = []
                for r in b[2]:
                    cells = []
                    for c in r:
                        cls = {"PASS": "pass", "FAIL": "fail",
                               "UNTESTABLE": "untestable"}.get(c.strip("*"), "")
                        attr = f' class="{cls}"' if cls else ""
                        cells.append(f"<td{attr}>{self._inline(c)}</td>")
                    rows.append("<tr>" + "".join(cells) + "</tr>")
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>"
                            + "".join(rows) + "</tbody></table>")
            elif kind == "img":
                data = images.get(b[1])
                if data is None:
                    body.append(f"<p><em>{html.escape(b[1])} missing</em></p>")
                else:
                    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
                    body.append(f'<figure><img src="{src}" alt="{html.escape(b[2])}">'
                                f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            elif kind == "pre":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        style = (
            "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;"
            "margin:2em auto;padding:0 1em;color:#222;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
            "th{background:#f0f0f0}img{max-width:100%}"
            ".banner{background:#fff3cd;border:2px solid #d39e00;padding:0.8em 1em;"
            "font-size:1.1em;margin:1em 0}"
            "td.pass{background:#d4edda;font-weight:bold}td.fail{background:#f8d7da;"
            "font-weight:bold}td.untestable{background:#e2e3e5;font-weight:bold}"
            "pre{background:#f6f8fa;padding:0.8em;overflow-x:auto}code{background:#f6f8fa}")
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------

def _f(x: Any, spec: str = ".2f") -> str:
    v = as_finite(x)
    return "n/a" if v is None else format(v, spec)


def _e(x: Any) -> str:
    return _f(x, ".3e")


def _short(x: Any, limit: int = 90) -> str:
    s = x if isinstance(x, str) else json.dumps(x, default=str)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _causal_text(r: BenchmarkResults) -> str:
    c = causal_verdict(r)
    return "not audited" if c is None else ("causal" if c else "**NOT CAUSAL**")


def like_for_like(results: dict[str, BenchmarkResults],
                  pairs=SEED_PAIRS) -> tuple[list[dict], list[str]]:
    """The comparisons of ``pairs`` (by base run name) between runs that share one setup
    (training recipe, data, tokenizer, model size; see :mod:`bkbench.runs`), and the runs
    left out, each with why."""
    pairs, left_out = grouped_pairs(group_by_setup(results), pairs)
    return [compare_results(results[a], results[b]) for a, b in pairs], left_out


def _build_doc(results: dict[str, BenchmarkResults], comparisons: list[dict],
               claims: list[Claim], problems: list[str], left_out: list[str] = (),
               aggregates: dict[str, dict] | None = None) -> _Doc:
    """``comparisons``: the seed's pairs within one setup, from ``results`` (see build_report);
    ``left_out``: the runs in no comparison and why; ``aggregates``: seed means, if any."""
    doc = _Doc()
    names = list(results)
    proxy = _proxy(results)
    doc.h(1, "bkbench WikiText-2 benchmark report")
    if proxy:
        doc.banner("PROXY split scheme: these models were trained on the official validation "
                   "split and evaluated on halves of the official test split. The numbers are "
                   "NOT comparable to official WikiText-2 results.")
    doc.p("Runs: " + ", ".join(f"`{n}`" for n in names) + ". Rebuilt from the JSON files of "
          "this folder by `bkbench report`.")
    if problems:
        doc.p("**Files skipped:**")
        doc.bullets(problems)
    _summary_section(doc, results, claims, aggregates or {})

    # --- setup
    doc.h(2, "Setup")
    doc.h(3, "Data")
    first = next(iter(results.values()))
    data = first.data or {}
    rows = [[k, _short(v)] for k, v in data.items()
            if k not in ("checksums", "verification") and not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict) and k not in ("checksums", "verification"):
            rows.append([k, ", ".join(f"{a}: {b}" for a, b in v.items())])
    doc.table(["field", "value"], rows or [["(no data description)", ""]])
    checksums = data.get("checksums") or {}
    if checksums:
        doc.p("Checksums of the files read:")
        doc.table(["file", "checksum"], [[k, str(v)] for k, v in checksums.items()])
    if any((r.data or {}) != data for r in results.values()):
        doc.p("**Warning:** the runs did not all use the same data description.")

    doc.h(3, "Environment")
    env_keys = sorted({k for r in results.values() for k in (r.environment or {})})
    doc.table(["", *names], [[k, *[_short((r.environment or {}).get(k, "")) for r in
                                   results.values()]] for k in env_keys])

    doc.h(3, "Configurations")
    cfg_keys = list(dict.fromkeys(k for r in results.values() for k in r.config))
    cfg_rows = []
    for k in cfg_keys:
        vals = [_short(r.config.get(k)) for r in results.values()]
        differs = len(set(vals)) > 1
        cfg_rows.append([f"**{k}**" if differs else k,
                         *[f"**{v}**" if differs else v for v in vals]])
    doc.p("Fields that differ between runs are in bold.")
    doc.table(["field", *names], cfg_rows)

    # --- results
    doc.h(2, "Results" + (" (PROXY split scheme)" if proxy else ""))
    doc.p("Perplexities are held-out: validation = best epoch's (model selection), test = "
          "from the best-validation weights, every target token scored once. FLOPs per step: "
          "forward and backward are counted by torch's FlopCounterMode (matrix products) plus "
          "the BK-Core's registered formula; the optimizer is a formula (the FLOPs section "
          "splits every figure into counted and formula); training FLOPs = steps x per-step.")
    head = ["run", "params", "valid ppl", "test ppl", "test tokens", "causality",
            "fwd FLOPs/step (counted+formula)", "bwd FLOPs/step (counted+formula)",
            "opt FLOPs/step (formula)", "training FLOPs (counted+formula)",
            "train time (s)", "tokens/s", "peak mem (MiB)", "size (MiB)"]
    rows = []
    for n, r in results.items():
        rows.append([n, f"{r.num_parameters:,}", _f(r.valid_perplexity), _f(r.test_perplexity),
                     f"{r.test_tokens:,}", _causal_text(r), _e(r.forward_flops),
                     _e(r.backward_flops), _e(r.optimizer_flops), _e(r.total_flops),
                     _timing(r, r.training_time, ".1f"), _timing(r, r.tokens_per_second, ",.0f"),
                     _f(r.peak_memory_mb, ",.1f"), _f(r.model_size_mb, ".2f")])
    doc.table(head, rows)
    _peers_section(doc, results)
    _contention_section(doc, results)

    # --- flags: per run, what each flag that was on did (results' "flags", registry)
    _flags_section(doc, results)

    # --- claims
    doc.h(2, "Claims audit")
    doc.p("The seed's expected results, each checked against this run. UNTESTABLE means the "
          "run cannot test the claim's condition; it is neither a pass nor a fail. Ranges are "
          f"read as their lower bound. Time and memory claims need n_seq >= {LONG_SEQUENCE_N}.")
    doc.table(["claim", "condition", "measured", "verdict", "reason"],
              [[c.statement, c.condition, c.measured, f"**{c.verdict}**", c.reason]
               for c in claims])

    # --- plots
    doc.h(2, "Plots")
    doc.image("training_curves.png", "Training loss, validation perplexity (log axis), time "
              "per epoch, and total training FLOPs stacked by component")
    doc.image("flops_breakdown.png", "FLOPs per training step by phase and component, and "
              "each component's share")

    # --- FLOPs detail
    doc.h(2, "FLOPs")
    for n, r in results.items():
        fl = r.flops or {}
        doc.h(3, n)
        if not fl:
            doc.p("FLOPs not measured for this run.")
            continue
        fwd, bwd = fl.get("forward_by_component") or {}, fl.get("backward_by_component") or {}
        opt = fl.get("optimizer_by_component") or {}
        comps = [k for k in COMPONENT_ORDER if k in fwd or k in bwd or k in opt]
        total_step = sum((as_finite(v) or 0) for d in (fwd, bwd, opt) for v in d.values()) or 1
        rows = []
        for k in comps:
            s = sum(as_finite(d.get(k)) or 0 for d in (fwd, bwd, opt))
            rows.append([k, _e(fwd.get(k, 0)), _e(bwd.get(k, 0)), _e(opt.get(k, 0)),
                         f"{100 * s / total_step:.1f}%"])
        doc.table(["component", "forward / step", "backward / step", "optimizer / step",
                   "share"], rows)
        src = fl.get("sources") or {}
        if src:
            labels = [("forward / step", "forward"), ("backward / step", "backward"),
                      ("optimizer / step", "optimizer"),
                      ("not counted, estimate / step", "uncounted"),
                      ("evaluation, whole run", "evaluation")]
            doc.table(["figure", "counted", "formula"],
                      [[label, _e((src[key] or {}).get("counted")),
                        _e((src[key] or {}).get("formula"))]
                       for label, key in labels if key in src])
            if src.get("explanation"):
                doc.p(src["explanation"] + ".")
        an = fl.get("analytic")
        if an:
            doc.p(f"Analytic cross-check ({an.get('architecture')}): forward "
                  f"{_e(an.get('forward'))} by formula vs {_e(r.forward_flops)} counted "
                  f"({_pct(an.get('forward_rel_diff'))}); backward {_e(an.get('backward'))} vs "
                  f"{_e(r.backward_flops)} ({_pct(an.get('backward_rel_diff'))}). "
                  f"{an.get('notes', '')}")
        unc = fl.get("uncounted") or {}
        if unc:
            cats = {**{f"forward {k}": v for k, v in (unc.get("forward") or {}).items()},
                    **{f"backward {k}": v for k, v in (unc.get("backward") or {}).items()}}
            doc.p(f"**Not counted** (estimate by formula): {_e(unc.get('total'))} FLOPs/step, "
                  f"{_pct(unc.get('fraction_of_counted'), signed=False)} of the counted "
                  "FLOPs. " + (unc.get("explanation") or ""))
            if cats:
                doc.table(["uncounted kind", "FLOPs / step (estimate)"],
                          [[k, _e(v)] for k, v in cats.items()])
        if fl.get("optimizer_explanation"):
            decayed = fl.get("decayed_parameters")
            if decayed is None:    # results from before the split by weight decay
                per = (f"{fl.get('optimizer_flops_per_parameter')} FLOPs per parameter per step "
                       f"over {fl.get('num_parameters', 0):,} parameters")
            else:
                per = (f"{fl.get('optimizer_flops_per_parameter')} FLOPs per step for each of "
                       f"{decayed:,} parameters with weight decay, "
                       f"{fl.get('optimizer_flops_per_parameter_without_decay')} for each of "
                       f"{fl.get('num_parameters', 0) - decayed:,} without")
            doc.p(f"Optimizer (formula): {fl.get('optimizer_name')}, {per}. "
                  f"{fl['optimizer_explanation']}.")
        rng = fl.get("per_step_range")
        if rng:
            doc.p("Per-step variation: " + str(rng.get("explanation", "")))
        for note in fl.get("notes") or []:
            doc.p(f"Note: {note}")

    # --- memory
    doc.h(2, "Memory")
    rows = []
    for n, r in results.items():
        m = r.memory or {}
        rows.append([n, _f(r.peak_memory_mb, ",.1f"), _f(r.model_size_mb, ".2f"),
                     m.get("method", "not measured")])
    doc.table(["run", "peak memory (MiB)", "model size (MiB)", "what the peak includes"], rows)

    # --- causality
    doc.h(2, "Causality audit")
    for n, r in results.items():
        verdict = _causal_text(r)
        doc.p(f"**{n}**: {verdict}."
              + ("" if r.perplexity_valid_for_lm else
                 " Its perplexity is NOT a valid language-model perplexity."))
        if r.causality:
            doc.table(["field", "value"], [[k, _short(v)] for k, v in r.causality.items()])

    # --- comparisons
    doc.h(2, "Comparisons")
    comps = comparisons
    doc.p("Only runs that share one setup (training recipe, data, tokenizer and model size) "
          "are compared.")
    if left_out:
        doc.p("**Left out of the comparisons:**")
        doc.bullets(list(left_out))
    if not comps:
        doc.p("No pairs of the seed's comparisons are present in these results.")
    for d in comps:
        _comparison_table(doc, d)
    return doc



DATA_FLAGS = ("use_curriculum", "use_active_learning")


def _flags_section(doc: _Doc, results: dict[str, BenchmarkResults]) -> None:
    """Per run: its flags, each with what it does, its settings and what it measured; then the
    time to a target validation perplexity of the runs with data-side flags."""
    flagged = {n: r for n, r in results.items() if r.flags}
    if not flagged:
        return
    doc.h(2, "Optimisation flags")
    doc.p("What each flag that was on did, as measured in its run (results' `flags`).")
    for n, r in flagged.items():
        doc.h(3, n)
        rows = []
        for flag, rec in r.flags.items():
            spec = flag_registry.REGISTRY.get(flag)
            measured = "; ".join(f"{k}: {_short(v, 60)}" for k, v in
                                 (rec.get("measured") or {}).items()
                                 if k != "validation_curve")
            rows.append([f"`{flag}`", spec.summary if spec else "(not in this version)",
                         _short(rec.get("settings"), 80), measured])
        doc.table(["flag", "what it does", "settings", "measured"], rows)
        sel = (r.flops or {}).get("selection")
        if sel:
            share = _div(sel.get("total"), r.total_flops)
            doc.p(f"Selection passes: {_e(sel.get('total'))} FLOPs, "
                  f"{_pct(share, signed=False)} of this run's training FLOPs (in total_flops).")
    rows = time_to_target_rows(results)
    if rows:
        doc.h(3, "Time to target (data-side flags)")
        doc.p("The first epoch whose validation perplexity is at or below the target, and the "
              "steps, target tokens and training seconds (selection passes included, evaluation "
              "excluded) spent by its end; validation runs once per epoch, so this is known to "
              "an epoch. Target: the best validation perplexity of the baseline run of the same "
              "architecture (no flags) in this folder; without one, the flag's "
              "`target_perplexity` setting; the baseline's own row is shown for comparison.")
        doc.table(["run", "data flags", "target", "target from", "reached at epoch", "steps",
                   "tokens", "training s"], rows)


def _baseline_of(results: dict[str, BenchmarkResults], r: BenchmarkResults) -> str | None:
    arch = (r.config or {}).get("architecture")
    for n, other in results.items():
        c = other.config or {}
        if c.get("architecture") == arch and not other.flags and \
                not any(v is True for k, v in c.items() if k.startswith("use_")):
            return n
    return None


def time_to_target_rows(results: dict[str, BenchmarkResults]) -> list[list[str]]:
    """Rows of the time-to-target table: each run with a data-side flag, then its baseline."""
    from .data_selection.target import time_to_target, validation_curve
    rows: list[list[str]] = []

    def row(name, flags, tt, source):
        if tt is None:
            return [name, flags, "n/a", source, "no target", "", "", ""]
        if not tt["reached"]:
            return [name, flags, _f(tt["target"]), source, "not reached", "", "", ""]
        return [name, flags, _f(tt["target"]), source, str(tt["epoch"]),
                "n/a" if tt["steps"] is None else str(tt["steps"]),
                "n/a" if tt["tokens"] is None else _e(tt["tokens"]), _f(tt["seconds"])]

    for n, r in results.items():
        data_flags = [f for f in (r.flags or {}) if f in DATA_FLAGS]
        if not data_flags:
            continue
        curve = (r.flags[data_flags[0]].get("measured") or {}).get("validation_curve") or []
        base = _baseline_of(results, r)
        if base is not None:
            target, source = results[base].valid_perplexity, f"baseline `{base}`"
        else:
            configured = [(r.flags[f].get("settings") or {}).get("target_perplexity") or 0
                          for f in data_flags]
            target = min((t for t in configured if t > 0), default=None)
            source = "setting target_perplexity" if target else "none"
        flags = ", ".join(f"`{f}`" for f in data_flags)
        rows.append(row(n, flags, time_to_target(curve, target), source))
        if base is not None:
            b = results[base]
            # the baseline's steps per epoch are the flagged run's when their schedules match
            same = len(curve) == len(b.epoch_perplexities or []) and curve and \
                curve[-1]["steps"] == b.steps
            if same:
                b_curve = [{**pt, "valid_perplexity": ppl, "seconds": sec}
                           for pt, ppl, sec in zip(curve, b.epoch_perplexities,
                                                   _cumulative(b.epoch_times or []))]
            else:
                b_curve = [{**pt, "steps": None, "tokens": None}
                           for pt in validation_curve(b.epoch_perplexities or [],
                                                      b.epoch_times or [], 1, 0, 0)]
            rows.append(row(f"{base} (baseline)", "none", time_to_target(b_curve, target),
                            "its own best epoch"))
    return rows


def _cumulative(xs: list[float]) -> list[float]:
    out, total = [], 0.0
    for x in xs:
        total += x
        out.append(total)
    return out

def _comparison_table(doc: _Doc, d: dict) -> None:
    doc.h(3, f"{d.get('a')} vs {d.get('b')}")
    doc.p("Ratios are a / b.")
    rows = []
    for key, m in (d.get("metrics") or {}).items():
        unit = m.get("unit", "")
        fmt = _e if unit == "FLOP" else (lambda v: _f(v, ",.2f"))
        rows.append([m.get("label", key), fmt(m.get("a")), fmt(m.get("b")),
                     _f(m.get("ratio"), ".3f")
                     + (" (contended: not judged)" if m.get("untestable") else "")])
    doc.table(["metric", str(d.get("a")), str(d.get("b")), "a / b"], rows)
    doc.bullets([f"Note: {note}" for note in d.get("notes") or []])


PEER_ARCHITECTURES = ("gla", "lstm")


def _peers_section(doc: _Doc, results: dict[str, BenchmarkResults]) -> None:
    """Every run beside the peer baselines (GLA, LSTM), and resnet_bk_full against each peer;
    nothing when no peer was run."""
    if not any(r.config.get("architecture") in PEER_ARCHITECTURES for r in results.values()):
        return
    doc.h(3, "Among the peer baselines")
    reference = results.get("transformer_baseline")
    ref_params = reference.num_parameters if reference else None
    doc.p("Every run of this folder with the O(N) peers: gated linear attention (`gla`, "
          "Yang et al. 2023) and an LSTM, trained and measured like the others. Parameters "
          "relative to `transformer_baseline`" + ("" if ref_params else " (not in this folder)")
          + "; FLOPs counted per training step and over the whole training.")
    rows = []
    for n, r in sorted(results.items(), key=lambda kv: as_finite(kv[1].test_perplexity) or 1e300):
        rel = (f" ({100 * (r.num_parameters - ref_params) / ref_params:+.1f}%)"
               if ref_params else "")
        step = [as_finite(x) for x in (r.forward_flops, r.backward_flops, r.optimizer_flops)]
        rows.append([n, r.config.get("architecture", ""), _f(r.test_perplexity),
                     _e(sum(step)) if None not in step else "n/a", _e(r.total_flops),
                     _timing(r, r.tokens_per_second, ",.0f"), _f(r.peak_memory_mb, ",.1f"),
                     f"{r.num_parameters:,}{rel}", _causal_text(r)])
    doc.table(["run (by test ppl)", "architecture", "test ppl", "FLOPs/step", "training FLOPs",
               "tokens/s", "peak mem (MiB)", "params", "causality"], rows)
    for d in seed_comparisons(results, PEER_PAIRS):
        _comparison_table(doc, d)


def _seed_summary(agg: dict | None, metric: str) -> dict | None:
    m = ((agg or {}).get("metrics") or {}).get(metric) or {}
    s = m.get("summary")
    return s if isinstance(s, dict) and as_finite(s.get("mean")) is not None else None


def _timing(r: BenchmarkResults, value: Any, spec: str) -> str:
    """A timing, marked where the machine was busy while it was taken."""
    text = _f(value, spec)
    return text + " (contended)" if (r.contention or {}).get("contended") else text


_OF_TF = "the Transformer's"


def _ratio_text(x: float | None, what: str) -> str:
    return "n/a" if x is None else f"{x:.2f}x {what}"


def _fewer_text(x: float | None) -> str:
    """``x`` = the Transformer's count / this run's: "N x fewer", or "N x more" below one."""
    if x is None or x <= 0:
        return "n/a"
    return f"{x:.2f}x fewer" if x >= 1 else f"{1 / x:.2f}x more"


def _summary_section(doc: _Doc, results: dict[str, BenchmarkResults], claims: list[Claim],
                     aggregates: dict[str, dict]) -> None:
    """What the run found, from the numbers, before any setup table."""
    doc.h(2, "Summary")
    # seed repeats (<run>-seed<s>) are summarized by their means and intervals, not one by one
    from .experiments.seeds import seed_groups
    repeats = {r.model_name for g in seed_groups(results).values() for r in g}
    results = {n: r for n, r in _with_seed_means(results)[0].items() if n not in repeats}
    tf = results.get(BASELINE)
    lines = []
    # perplexity, with the interval over seeds where repeated seeds were aggregated
    ppl = []
    for n, r in results.items():
        if n in aggregates:   # a run of repeated seeds: its mean and interval follow below
            continue
        text = f"`{n}` {_f(r.test_perplexity)}"
        if tf is not None and r is not tf:
            ratio = _div(r.test_perplexity, tf.test_perplexity)
            text += f" ({_ratio_text(ratio, _OF_TF)})"
        if causal_verdict(r) is False:
            text += " **NOT CAUSAL**"
        ppl.append(text)
    if ppl:  # a folder of seed repeats alone has only the means below
        lines.append("Test perplexity: " + "; ".join(ppl) + ".")
    seeded = {n: s for n, a in aggregates.items() if (s := _seed_summary(a, "test_perplexity"))}
    if seeded:
        ref = seeded.get(BASELINE)
        parts = []
        for n, s in seeded.items():
            ci = ("" if as_finite(s.get("ci_low")) is None else
                  f", {100 * s.get('confidence', 0.95):.0f}% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}")
            text = f"`{n}` {s['mean']:.2f} (n = {s.get('n')}{ci})"
            if ref is not None and n != BASELINE:
                text += f", {_ratio_text(_div(s['mean'], ref['mean']), _OF_TF)}"
            parts.append(text)
        lines.append("Over repeated seeds, mean test perplexity: " + "; ".join(parts) + ".")
    if tf is None:
        lines.append(f"No `{BASELINE}` run in these results: no ratios to the Transformer.")
    else:
        for n, r in results.items():
            if r is tf:
                continue
            fwd = _div(tf.forward_flops, r.forward_flops)
            bwd = _div(tf.backward_flops, r.backward_flops)
            speed = _div(r.tokens_per_second, tf.tokens_per_second)
            mem = _div(r.peak_memory_mb, tf.peak_memory_mb)
            busy = [w for x in (tf, r) if (w := contended_reason(x.model_name, x.contention))]
            speed_text = _ratio_text(speed, "the Transformer's training tokens/s")
            if busy:
                speed_text += " (**contended, not judged**: " + "; ".join(busy) + ")"
            lines.append(
                f"`{n}` against the Transformer: forward FLOPs/step "
                f"{_fewer_text(fwd)}, backward {_fewer_text(bwd)}; measured "
                f"speed {speed_text}; peak memory {_f(r.peak_memory_mb, ',.1f')} vs "
                f"{_f(tf.peak_memory_mb, ',.1f')} MiB ({_ratio_text(mem, _OF_TF)}).")
    doc.bullets(lines)
    doc.p("Verdicts on the seed's claims (details in the claims audit below):")
    doc.bullets([f"**{c.verdict}** {c.statement}: {c.measured} ({c.reason})" for c in claims])


def _div(a: Any, b: Any) -> float | None:
    a, b = as_finite(a), as_finite(b)
    return None if a is None or b is None or b == 0 else a / b


def _contention_section(doc: _Doc, results: dict[str, BenchmarkResults]) -> None:
    """Whether the machine was busy while each run's steps were timed."""
    doc.h(3, "Timing conditions")
    doc.p("Load average (1 min) sampled during training, CPU time and run-queue wait (time "
          "the process's threads were ready but had no CPU) over the timed steps. A run is "
          "contended when the mean load exceeds 1.25 x the machine's CPUs, when its threads "
          "waited for a CPU more than 0.25 x the timed wall time (where Linux reports it; "
          "else CPU/wall below 0.7 x threads), or when other processes used its GPU. "
          "Time claims from contended runs are not judged.")
    rows = []
    for n, r in results.items():
        c = r.contention
        if not c:
            rows.append([n, "not recorded", "", "", "", "", "", ""])
            continue
        load = lambda x: "n/a" if not x else _f(x[0])  # noqa: E731
        rows.append([
            n, "**contended**: " + "; ".join(c.get("reasons") or []) if c.get("contended")
            else "not contended",
            f"{load(c.get('load_start'))} / {_f(c.get('load_mean'))} / "
            f"{_f(c.get('load_max'))} / {load(c.get('load_end'))}",
            f"{c.get('cpus_available')} of {c.get('machine_cpus')}",
            str(c.get("torch_threads")), _f(c.get("cpu_per_wall")),
            _f(c.get("runqueue_wait_per_wall")), _gpu_text(c.get("gpu_end"))])
    doc.table(["run", "timings", "load start / mean / max / end", "CPUs available",
               "torch threads", "CPU / wall", "run-queue wait / wall", "GPU"], rows)


def _gpu_text(gpu: dict | None) -> str:
    if not gpu:
        return "n/a"
    if gpu.get("source") is None:
        return str(gpu.get("reason", "unknown"))
    others = gpu.get("other_processes") or []
    return f"{_f(gpu.get('utilization_percent'), '.0f')}% busy, {len(others)} other process(es)"


def _pct(x: Any, signed: bool = True) -> str:
    v = as_finite(x)
    if v is None:
        return "n/a"
    return f"{100 * v:+.3f}%" if signed else f"{100 * v:.1f}%"


def build_report(results_dir: str | Path) -> dict[str, Path]:
    """From the results files of ``results_dir`` alone, write the seed's comparisons
    (``comparison_<a>_vs_<b>.json``), the plots, report.md and report.html; return their paths.
    """
    from .experiments.ablate import load_ablation
    from .experiments.report_sections import (ablation_section, budget_section, scale_section,
                                              seeds_section)
    from .experiments.scale import load_scale
    from .experiments.seeds import write_aggregates

    folder = Path(results_dir)
    results, problems = load_results_dir(folder)
    comparisons, left_out = like_for_like(results, SEED_PAIRS + PEER_PAIRS)
    for d in comparisons:
        write_json_atomic(comparison_path(folder, d["a"], d["b"]), d)
    comparisons = [d for d in comparisons  # the peers have a section of their own
                   if (base_name(d["a"]), base_name(d["b"])) in SEED_PAIRS]
    seed_info = write_aggregates(folder, results, SEED_PAIRS)
    scale = load_scale(folder)
    claims = audit_claims(results, scale=scale)
    paths = {
        "training_curves": plot_training_curves(results, folder / "training_curves.png"),
        "flops_breakdown": plot_flops_breakdown(results, folder / "flops_breakdown.png"),
    }
    doc = _build_doc(results, comparisons, claims, problems, left_out,
                     aggregates=seed_info.get("aggregates"))
    seeds_section(doc, seed_info)
    budget_section(doc, results)
    section_images = [folder / n for n in (*scale_section(doc, scale),
                                           *ablation_section(doc, load_ablation(folder)))]
    md_path, html_path = folder / "report.md", folder / "report.html"
    write_bytes_atomic(md_path, doc.markdown().encode("utf-8"))
    images = {p.name: p.read_bytes() for p in [*paths.values(), *section_images] if p.is_file()}
    write_bytes_atomic(html_path, doc.html(images, "bkbench WikiText-2 report").encode("utf-8"))
    paths["report_md"] = md_path
    paths["report_html"] = html_path
    return paths


def report_main(results_dir: str) -> int:
    """``bkbench report RESULTS_DIR``: rebuild the report, print its paths and the claims."""
    try:
        paths = build_report(results_dir)
        results, _ = load_results_dir(results_dir)
    except ReportError as exc:
        print(f"bkbench report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a read-only results folder
        print(f"bkbench report: cannot write the report into {str(results_dir)[:200]!r}: "
              f"{exc.strerror or exc}; make it writable or copy the JSON files elsewhere",
              file=sys.stderr)
        return 2
    for path in paths.values():
        print(path)
    if _proxy(results):
        print("\nPROXY split scheme: numbers are not comparable to official WikiText-2 results.")
    from .experiments.scale import load_scale
    print("\nClaims audit\n" + format_claims(audit_claims(results, scale=load_scale(results_dir))))
    comparisons, left_out = like_for_like(results, SEED_PAIRS + PEER_PAIRS)
    for d in comparisons:
        print("\n" + format_comparison(d))
    if left_out:
        print("\nLeft out of the comparisons (only runs of one setup are compared):")
        for line in left_out:
            print(f"  {line}")
    return 0
