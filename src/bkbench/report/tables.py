"""The report's sections that are tables of the runs: setup, results, peers, timing
conditions, flags, time to target, FLOPs detail, memory, causality and comparisons.

Each appends to a :class:`~bkbench.report.html.Doc`.
"""

from __future__ import annotations

from typing import Any

from ..compare import PEER_PAIRS, as_finite, seed_comparisons
from ..flags import registry as flag_registry
from ..results import BenchmarkResults
from .common import (COMPONENT_ORDER, causal_text, div, fmt, is_proxy, pct, sci, short,
                     timing)
from .html import Doc
from .targets import time_to_target_rows

PEER_ARCHITECTURES = ("gla", "lstm")
_HIDDEN_DATA = ("checksums", "verification")


def setup_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    """Data, environment and the configurations, differing fields in bold."""
    names = list(results)
    doc.h(2, "Setup")
    doc.h(3, "Data")
    data = next(iter(results.values())).data or {}
    rows = [[k, short(v)] for k, v in data.items()
            if k not in _HIDDEN_DATA and not isinstance(v, dict)]
    rows += [[k, ", ".join(f"{a}: {b}" for a, b in v.items())] for k, v in data.items()
             if isinstance(v, dict) and k not in _HIDDEN_DATA]
    doc.table(["field", "value"], rows or [["(no data description)", ""]])
    checksums = data.get("checksums") or {}
    if checksums:
        doc.p("Checksums of the files read:")
        doc.table(["file", "checksum"], [[k, str(v)] for k, v in checksums.items()])
    if any((r.data or {}) != data for r in results.values()):
        doc.p("**Warning:** the runs did not all use the same data description.")

    doc.h(3, "Environment")
    env_keys = sorted({k for r in results.values() for k in (r.environment or {})})
    doc.table(["", *names], [[k, *[short((r.environment or {}).get(k, ""))
                                   for r in results.values()]] for k in env_keys])

    doc.h(3, "Configurations")
    cfg_rows = []
    for k in dict.fromkeys(k for r in results.values() for k in r.config):
        vals = [short(r.config.get(k)) for r in results.values()]
        differs = len(set(vals)) > 1
        cfg_rows.append([f"**{k}**" if differs else k,
                         *[f"**{v}**" if differs else v for v in vals]])
    doc.p("Fields that differ between runs are in bold.")
    doc.table(["field", *names], cfg_rows)


def results_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    """Quality and cost of every run, as two tables narrow enough for one screen."""
    doc.h(2, "Results" + (" (PROXY split scheme)" if is_proxy(results) else ""))
    doc.p("Perplexities are held-out: validation = best epoch's (model selection), test = "
          "from the best-validation weights, every target token scored once.")
    doc.table(["run", "params", "valid ppl", "test ppl", "test tokens", "causality"],
              [[n, f"{r.num_parameters:,}", fmt(r.valid_perplexity), fmt(r.test_perplexity),
                f"{r.test_tokens:,}", causal_text(r)] for n, r in results.items()])
    doc.p("Cost. FLOPs per step: forward (fwd) and backward (bwd) are counted by torch's "
          "FlopCounterMode (matrix products) plus the BK-Core's registered formula; the "
          "optimizer (opt) is a formula (the FLOPs section splits every figure into counted "
          "and formula); training FLOPs = steps x per-step, plus data-selection passes.")
    doc.table(["run", "fwd FLOPs/step (counted+formula)", "bwd FLOPs/step (counted+formula)",
               "opt FLOPs/step (formula)", "training FLOPs (counted+formula)", "train time (s)",
               "tokens/s", "peak mem (MiB)", "size (MiB)"],
              [[n, sci(r.forward_flops), sci(r.backward_flops), sci(r.optimizer_flops),
                sci(r.total_flops), timing(r, r.training_time, ".1f"),
                timing(r, r.tokens_per_second, ",.0f"), fmt(r.peak_memory_mb, ",.1f"),
                fmt(r.model_size_mb, ".2f")] for n, r in results.items()])


def comparison_table(doc: Doc, d: dict) -> None:
    doc.h(3, f"{d.get('a')} vs {d.get('b')}")
    doc.p("Ratios are a / b.")
    rows = []
    for key, m in (d.get("metrics") or {}).items():
        value = sci if m.get("unit", "") == "FLOP" else (lambda v: fmt(v, ",.2f"))
        rows.append([m.get("label", key), value(m.get("a")), value(m.get("b")),
                     fmt(m.get("ratio"), ".3f")
                     + (" (contended: not judged)" if m.get("untestable") else "")])
    doc.table(["metric", str(d.get("a")), str(d.get("b")), "a / b"], rows)
    doc.bullets([f"Note: {note}" for note in d.get("notes") or []])


def peers_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
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
        rows.append([n, r.config.get("architecture", ""), fmt(r.test_perplexity),
                     sci(sum(step)) if None not in step else "n/a", sci(r.total_flops),
                     timing(r, r.tokens_per_second, ",.0f"), fmt(r.peak_memory_mb, ",.1f"),
                     f"{r.num_parameters:,}{rel}", causal_text(r)])
    doc.table(["run (by test ppl)", "architecture", "test ppl", "FLOPs/step", "training FLOPs",
               "tokens/s", "peak mem (MiB)", "params", "causality"], rows)
    for d in seed_comparisons(results, PEER_PAIRS):
        comparison_table(doc, d)


def _gpu_text(gpu: dict | None) -> str:
    if not gpu:
        return "n/a"
    if gpu.get("source") is None:
        return str(gpu.get("reason", "unknown"))
    others = gpu.get("other_processes") or []
    return f"{fmt(gpu.get('utilization_percent'), '.0f')}% busy, {len(others)} other process(es)"


def _contention_row(n: str, c: dict | None) -> list[str]:
    if not c:
        return [n, "not recorded", "", "", "", "", "", ""]
    load = lambda x: "n/a" if not x else fmt(x[0])  # noqa: E731
    return [n, "**contended**: " + "; ".join(c.get("reasons") or []) if c.get("contended")
            else "not contended",
            f"{load(c.get('load_start'))} / {fmt(c.get('load_mean'))} / "
            f"{fmt(c.get('load_max'))} / {load(c.get('load_end'))}",
            f"{c.get('cpus_available')} of {c.get('machine_cpus')}",
            str(c.get("torch_threads")), fmt(c.get("cpu_per_wall")),
            fmt(c.get("runqueue_wait_per_wall")), _gpu_text(c.get("gpu_end"))]


def contention_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    """Whether the machine was busy while each run's steps were timed."""
    doc.h(3, "Timing conditions")
    doc.p("Load average (1 min) sampled during training, CPU time and run-queue wait (time "
          "the process's threads were ready but had no CPU) over the timed steps. A run is "
          "contended when the mean load exceeds 1.25 x the machine's CPUs, when its threads "
          "waited for a CPU more than 0.25 x the timed wall time (where Linux reports it; "
          "else CPU/wall below 0.7 x threads), or when other processes used its GPU. "
          "Time claims from contended runs are not judged.")
    doc.table(["run", "timings", "load start / mean / max / end", "CPUs available",
               "torch threads", "CPU / wall", "run-queue wait / wall", "GPU"],
              [_contention_row(n, r.contention) for n, r in results.items()])


def readable(value: Any, indent: str = "") -> str:
    """A measured value as ``key: value`` lines, nested dicts indented, nothing cut."""
    if isinstance(value, dict):
        lines = []
        for k, v in value.items():
            if isinstance(v, dict) and v:
                lines.append(f"{indent}{k}:\n{readable(v, indent + '  ')}")
            else:
                lines.append(f"{indent}{k}: {readable(v)}")
        return "\n".join(lines) if lines else f"{indent}(none)"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(readable(v) for v in value) if value else "(none)"
    return str(value)


def flags_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    """Per run: its flags, each with what it does, its settings and what it measured; then the
    time to a target validation perplexity of the runs with data-side flags."""
    flagged = {n: r for n, r in results.items() if r.flags}
    if not flagged:
        return
    doc.h(2, "Optimisation flags")
    doc.p("What each flag that was on did, as measured in its run (results' `flags`; the "
          "per-epoch validation curve of the data-side flags is in the time-to-target table).")
    for n, r in flagged.items():
        doc.h(3, n)
        rows = []
        for flag, rec in r.flags.items():
            spec = flag_registry.REGISTRY.get(flag)
            measured = {k: v for k, v in (rec.get("measured") or {}).items()
                        if k != "validation_curve"}
            rows.append([f"`{flag}`", spec.summary if spec else "(not in this version)",
                         readable(rec.get("settings") or {}), readable(measured)])
        doc.table(["flag", "what it does", "settings", "measured"], rows)
        sel = (r.flops or {}).get("selection")
        if sel:
            doc.p(f"Selection passes: {sci(sel.get('total'))} FLOPs, "
                  f"{pct(div(sel.get('total'), r.total_flops), signed=False)} of this run's "
                  "training FLOPs (in total_flops).")
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


def memory_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    doc.h(2, "Memory")
    doc.table(["run", "peak memory (MiB)", "model size (MiB)", "what the peak includes"],
              [[n, fmt(r.peak_memory_mb, ",.1f"), fmt(r.model_size_mb, ".2f"),
                (r.memory or {}).get("method", "not measured")] for n, r in results.items()])


def causality_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    doc.h(2, "Causality audit")
    for n, r in results.items():
        doc.p(f"**{n}**: {causal_text(r)}."
              + ("" if r.perplexity_valid_for_lm else
                 " Its perplexity is NOT a valid language-model perplexity."))
        if r.causality:
            doc.table(["field", "value"], [[k, short(v)] for k, v in r.causality.items()])


def comparisons_section(doc: Doc, comparisons: list[dict], left_out: list[str]) -> None:
    doc.h(2, "Comparisons")
    doc.p("Only runs that share one setup (training recipe, data, tokenizer and model size) "
          "are compared.")
    if left_out:
        doc.p("**Left out of the comparisons:**")
        doc.bullets(list(left_out))
    if not comparisons:
        doc.p("No pairs of the seed's comparisons are present in these results.")
    for d in comparisons:
        comparison_table(doc, d)


def _component_table(doc: Doc, fl: dict) -> None:
    fwd, bwd = fl.get("forward_by_component") or {}, fl.get("backward_by_component") or {}
    opt = fl.get("optimizer_by_component") or {}
    total_step = sum((as_finite(v) or 0) for d in (fwd, bwd, opt) for v in d.values()) or 1
    rows = []
    for k in (k for k in COMPONENT_ORDER if k in fwd or k in bwd or k in opt):
        s = sum(as_finite(d.get(k)) or 0 for d in (fwd, bwd, opt))
        rows.append([k, sci(fwd.get(k, 0)), sci(bwd.get(k, 0)), sci(opt.get(k, 0)),
                     f"{100 * s / total_step:.1f}%"])
    doc.table(["component", "forward / step", "backward / step", "optimizer / step", "share"],
              rows)
    src = fl.get("sources") or {}
    if src:
        labels = [("forward / step", "forward"), ("backward / step", "backward"),
                  ("optimizer / step", "optimizer"), ("not counted, estimate / step", "uncounted"),
                  ("evaluation, whole run", "evaluation")]
        doc.table(["figure", "counted", "formula"],
                  [[label, sci((src[key] or {}).get("counted")), sci((src[key] or {}).get("formula"))]
                   for label, key in labels if key in src])
        if src.get("explanation"):
            doc.p(src["explanation"] + ".")


def _uncounted_and_optimizer(doc: Doc, fl: dict) -> None:
    unc = fl.get("uncounted") or {}
    if unc:
        cats = {**{f"forward {k}": v for k, v in (unc.get("forward") or {}).items()},
                **{f"backward {k}": v for k, v in (unc.get("backward") or {}).items()}}
        doc.p(f"**Not counted** (estimate by formula): {sci(unc.get('total'))} FLOPs/step, "
              f"{pct(unc.get('fraction_of_counted'), signed=False)} of the counted "
              "FLOPs. " + (unc.get("explanation") or ""))
        if cats:
            doc.table(["uncounted kind", "FLOPs / step (estimate)"],
                      [[k, sci(v)] for k, v in cats.items()])
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


def flops_section(doc: Doc, results: dict[str, BenchmarkResults]) -> None:
    """Per run: FLOPs per step by component and source, the analytic cross-check, the
    uncounted estimate and the optimizer's formula."""
    doc.h(2, "FLOPs")
    for n, r in results.items():
        fl = r.flops or {}
        doc.h(3, n)
        if not fl:
            doc.p("FLOPs not measured for this run.")
            continue
        _component_table(doc, fl)
        an = fl.get("analytic")
        if an:
            doc.p(f"Analytic cross-check ({an.get('architecture')}): forward "
                  f"{sci(an.get('forward'))} by formula vs {sci(r.forward_flops)} counted "
                  f"({pct(an.get('forward_rel_diff'))}); backward {sci(an.get('backward'))} vs "
                  f"{sci(r.backward_flops)} ({pct(an.get('backward_rel_diff'))}). "
                  f"{an.get('notes', '')}")
        _uncounted_and_optimizer(doc, fl)
        rng = fl.get("per_step_range")
        if rng:
            doc.p("Per-step variation: " + str(rng.get("explanation", "")))
        for note in fl.get("notes") or []:
            doc.p(f"Note: {note}")
