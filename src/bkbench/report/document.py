"""The report as a whole: the summary that opens it, the document in reading order, and
``build_report``/``report_main`` that write it from a results folder."""

from __future__ import annotations

import sys
from pathlib import Path

from ..atomic import write_bytes_atomic, write_json_atomic
from ..compare import (PEER_PAIRS, SEED_PAIRS, as_finite, causal_verdict, compare_results,
                       comparison_path, format_comparison)
from ..metrics.contention import contended_reason
from ..results import BenchmarkResults
from ..runs import base_name, group_by_setup, grouped_pairs
from . import tables
from .claims import Claim, audit_claims, format_claims, with_seed_means
from .common import (BASELINE, LONG_SEQUENCE_N, ReportError, change_text, div, fmt, is_proxy)
from .html import Doc
from ..experiments.data_section import units_section
from .inputs import load_ablation_table, load_results_dir, load_scale_sweep, load_size_scaling
from .plots import plot_flops_breakdown, plot_training_curves

_OF_TF = "the Transformer's"
TITLE = "bkbench WikiText-2 report"


def like_for_like(results: dict[str, BenchmarkResults],
                  pairs=SEED_PAIRS) -> tuple[list[dict], list[str]]:
    """The comparisons of ``pairs`` (by base run name) between runs that share one setup
    (training recipe, data, tokenizer, model size; see :mod:`bkbench.runs`), and the runs
    left out, each with why."""
    pairs, left_out = grouped_pairs(group_by_setup(results), pairs)
    return [compare_results(results[a], results[b]) for a, b in pairs], left_out


def _ratio_text(x: float | None, what: str) -> str:
    return "n/a" if x is None else f"{x:.2f}x {what}"


def _fewer_text(x: float | None) -> str:
    """``x`` = the Transformer's count / this run's: "N x fewer", or "N x more" below one."""
    if x is None or x <= 0:
        return "n/a"
    return f"{x:.2f}x fewer" if x >= 1 else f"{1 / x:.2f}x more"


def _seed_summary(agg: dict | None, metric: str) -> dict | None:
    m = ((agg or {}).get("metrics") or {}).get(metric) or {}
    s = m.get("summary")
    return s if isinstance(s, dict) and as_finite(s.get("mean")) is not None else None


def _perplexity_lines(results: dict[str, BenchmarkResults], aggregates: dict[str, dict]
                      ) -> list[str]:
    """Test perplexity of each run, then the means and intervals of runs repeated over seeds."""
    tf, lines, ppl = results.get(BASELINE), [], []
    for n, r in results.items():
        if n in aggregates:   # a run of repeated seeds: its mean and interval follow below
            continue
        text = f"`{n}` {fmt(r.test_perplexity)}"
        if tf is not None and r is not tf:
            text += f" ({_ratio_text(div(r.test_perplexity, tf.test_perplexity), _OF_TF)})"
        if causal_verdict(r) is False:
            text += " **NOT CAUSAL**"
        ppl.append(text)
    if ppl:  # a folder of seed repeats alone has only the means below
        lines.append("Test perplexity: " + "; ".join(ppl) + ".")
    seeded = {n: s for n, a in aggregates.items() if (s := _seed_summary(a, "test_perplexity"))}
    if seeded:
        ref, parts = seeded.get(BASELINE), []
        for n, s in seeded.items():
            ci = ("" if as_finite(s.get("ci_low")) is None else
                  f", {100 * s.get('confidence', 0.95):.0f}% CI {s['ci_low']:.2f}-{s['ci_high']:.2f}")
            text = f"`{n}` {s['mean']:.2f} (n = {s.get('n')}{ci})"
            if ref is not None and n != BASELINE:
                text += f", {_ratio_text(div(s['mean'], ref['mean']), _OF_TF)}"
            parts.append(text)
        lines.append("Over repeated seeds, mean test perplexity: " + "; ".join(parts) + ".")
    return lines


def _cost_line(n: str, r: BenchmarkResults, tf: BenchmarkResults) -> str:
    """One run's FLOPs, speed and memory against the Transformer's, in words."""
    speed = div(r.tokens_per_second, tf.tokens_per_second)
    busy = [w for x in (tf, r) if (w := contended_reason(x.model_name, x.contention))]
    speed_text = _ratio_text(speed, "the Transformer's training tokens/s")
    if busy:
        speed_text += " (**contended, not judged**: " + "; ".join(busy) + ")"
    mem = div(r.peak_memory_mb, tf.peak_memory_mb)
    mem_text = "n/a" if mem is None else f"{_ratio_text(mem, _OF_TF)}, {change_text(1 - mem)}"
    return (f"`{n}` against the Transformer: forward FLOPs/step "
            f"{_fewer_text(div(tf.forward_flops, r.forward_flops))}, backward "
            f"{_fewer_text(div(tf.backward_flops, r.backward_flops))}; measured "
            f"speed {speed_text}; peak memory {fmt(r.peak_memory_mb, ',.1f')} vs "
            f"{fmt(tf.peak_memory_mb, ',.1f')} MiB ({mem_text}).")


def summary_section(doc: Doc, results: dict[str, BenchmarkResults], claims: list[Claim],
                    aggregates: dict[str, dict]) -> None:
    """What the run found, from the numbers, before any setup table."""
    doc.h(2, "Summary")
    # seed repeats (<run>-seed<s>) are summarized by their means and intervals, not one by one
    from ..experiments.seeds import seed_groups
    repeats = {r.model_name for g in seed_groups(results).values() for r in g}
    results = {n: r for n, r in with_seed_means(results)[0].items() if n not in repeats}
    lines = _perplexity_lines(results, aggregates)
    tf = results.get(BASELINE)
    if tf is None:
        lines.append(f"No `{BASELINE}` run in these results: no ratios to the Transformer.")
    else:
        lines += [_cost_line(n, r, tf) for n, r in results.items() if r is not tf]
    doc.bullets(lines)
    doc.p("Verdicts on the seed's claims (details in the claims audit below):")
    doc.bullets([f"**{c.verdict}** {c.statement}: {c.measured} ({c.reason})" for c in claims])


def _claims_and_plots(doc: Doc, claims: list[Claim]) -> None:
    doc.h(2, "Claims audit")
    doc.p("The seed's expected results, each checked against this run. UNTESTABLE means the "
          "run cannot test the claim's condition; it is neither a pass nor a fail. Ranges are "
          f"read as their lower bound. Time and memory claims need n_seq >= {LONG_SEQUENCE_N}.")
    doc.table(["claim", "condition", "measured", "verdict", "reason"],
              [[c.statement, c.condition, c.measured, f"**{c.verdict}**", c.reason]
               for c in claims])
    doc.h(2, "Plots")
    doc.image("training_curves.png", "Training loss, validation perplexity (log axis), time "
              "per epoch, and total training FLOPs stacked by component")
    doc.image("flops_breakdown.png", "FLOPs per training step by phase and component, and "
              "each component's share")


def build_doc(results: dict[str, BenchmarkResults], comparisons: list[dict],
              claims: list[Claim], problems: list[str], left_out: list[str] = (),
              aggregates: dict[str, dict] | None = None) -> Doc:
    """``comparisons``: the seed's pairs within one setup, from ``results`` (see build_report);
    ``left_out``: the runs in no comparison and why; ``aggregates``: seed means, if any."""
    doc = Doc()
    doc.h(1, "bkbench WikiText-2 benchmark report")
    if is_proxy(results):
        doc.banner("PROXY split scheme: these models were trained on the official validation "
                   "split and evaluated on halves of the official test split. The numbers are "
                   "NOT comparable to official WikiText-2 results.")
    doc.p("Runs: " + ", ".join(f"`{n}`" for n in results) + ". Rebuilt from the JSON files of "
          "this folder by `bkbench report`.")
    if problems:
        doc.p("**Files skipped:**")
        doc.bullets(problems)
    summary_section(doc, results, claims, aggregates or {})
    tables.setup_section(doc, results)
    tables.results_section(doc, results)
    units_section(doc, results.values())
    tables.peers_section(doc, results)
    tables.contention_section(doc, results)
    tables.flags_section(doc, results)
    _claims_and_plots(doc, claims)
    tables.flops_section(doc, results)
    tables.memory_section(doc, results)
    tables.causality_section(doc, results)
    tables.comparisons_section(doc, comparisons, left_out)
    return doc


def build_report(results_dir: str | Path) -> dict[str, Path]:
    """From the results files of ``results_dir`` alone, write the seed's comparisons
    (``comparison_<a>_vs_<b>.json``), the plots, report.md and report.html; return their paths.
    """
    from ..experiments.report_sections import (ablation_section, budget_section, scale_section,
                                               seeds_section)
    from ..experiments.size_scaling import size_scaling_section
    from ..experiments.seeds import write_aggregates

    folder = Path(results_dir)
    results, problems = load_results_dir(folder)
    scale, ablation = load_scale_sweep(folder, problems), load_ablation_table(folder, problems)
    size_scaling = load_size_scaling(folder, problems)
    comparisons, left_out = like_for_like(results, SEED_PAIRS + PEER_PAIRS)
    for d in comparisons:
        write_json_atomic(comparison_path(folder, d["a"], d["b"]), d)
    comparisons = [d for d in comparisons  # the peers have a section of their own
                   if (base_name(d["a"]), base_name(d["b"])) in SEED_PAIRS]
    seed_info = write_aggregates(folder, results, SEED_PAIRS)
    claims = audit_claims(results, scale=scale)
    paths = {
        "training_curves": plot_training_curves(results, folder / "training_curves.png"),
        "flops_breakdown": plot_flops_breakdown(results, folder / "flops_breakdown.png"),
    }
    doc = build_doc(results, comparisons, claims, problems, left_out,
                    aggregates=seed_info.get("aggregates"))
    seeds_section(doc, seed_info)
    budget_section(doc, results)
    section_images = [folder / n for n in (*scale_section(doc, scale),
                                           *ablation_section(doc, ablation))]
    if size_scaling is not None:
        size_scaling_section(doc, size_scaling)
        section_images.append(folder / "size_scaling.png")
    md_path, html_path = folder / "report.md", folder / "report.html"
    write_bytes_atomic(md_path, doc.markdown().encode("utf-8"))
    images = {p.name: p.read_bytes() for p in [*paths.values(), *section_images] if p.is_file()}
    write_bytes_atomic(html_path, doc.html(images, TITLE).encode("utf-8"))
    paths["report_md"] = md_path
    paths["report_html"] = html_path
    return paths


def report_main(results_dir: str) -> int:
    """``bkbench report RESULTS_DIR``: rebuild the report, print its paths and the claims."""
    try:
        paths = build_report(results_dir)
        results, problems = load_results_dir(results_dir)
        scale = load_scale_sweep(results_dir, problems)
        load_ablation_table(results_dir, problems)
        load_size_scaling(results_dir, problems)
    except ReportError as exc:
        print(f"bkbench report: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a read-only results folder
        print(f"bkbench report: cannot write the report into {str(results_dir)[:200]!r}: "
              f"{exc.strerror or exc}; make it writable or copy the JSON files elsewhere",
              file=sys.stderr)
        return 2
    for problem in problems:
        print(f"bkbench report: {problem}", file=sys.stderr)
    for path in paths.values():
        print(path)
    if is_proxy(results):
        print("\nPROXY split scheme: numbers are not comparable to official WikiText-2 results.")
    print("\nClaims audit\n" + format_claims(audit_claims(results, scale=scale)))
    comparisons, left_out = like_for_like(results, SEED_PAIRS + PEER_PAIRS)
    for d in comparisons:
        print("\n" + format_comparison(d))
    if left_out:
        print("\nLeft out of the comparisons (only runs of one setup are compared):")
        for line in left_out:
            print(f"  {line}")
    return 0
