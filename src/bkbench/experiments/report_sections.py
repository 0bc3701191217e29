"""Report sections for repeated seeds, the scale sweep and the ablation (see bkbench.report).

Each function appends to the report's document object (headings, paragraphs, tables, images),
so the Markdown and the self-contained HTML get the same content.
"""

from __future__ import annotations

from typing import Any

from .ablate import ABLATION_HEADERS, table_notes, table_rows
from .scale import METRICS
from .seeds import SIGNIFICANCE


def _num(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def mean_ci(summary: dict[str, Any] | None, spec: str = ".2f") -> str:
    """``mean ± half-width`` of a stats.Summary dict (just the mean for one seed)."""
    if not summary:
        return "n/a"
    if summary.get("ci_high") is None:
        return f"{format(summary['mean'], spec)} (1 seed)"
    half = summary["ci_high"] - summary["mean"]
    return f"{format(summary['mean'], spec)} ± {format(half, spec)}"


def seeds_section(doc, seed_info: dict[str, Any]) -> None:
    aggregates, comparisons = seed_info.get("aggregates") or {}, seed_info.get("comparisons") or []
    if not aggregates:
        return
    doc.h(2, "Repeated seeds")
    doc.p("Each run was repeated once per seed. Mean ± half-width of the 95% Student-t "
          "interval of the mean over the seeds; `<run>_aggregate.json` holds every value.")
    rows = []
    for base, agg in aggregates.items():
        m = agg["metrics"]
        rows.append([base, ", ".join(map(str, agg["seeds"])),
                     mean_ci((m.get("test_perplexity") or {}).get("summary")),
                     mean_ci((m.get("valid_perplexity") or {}).get("summary")),
                     mean_ci((m.get("tokens_per_second") or {}).get("summary"), ",.0f"),
                     mean_ci((m.get("peak_memory_mb") or {}).get("summary"), ",.1f")])
    doc.table(["run", "seeds", "test ppl", "valid ppl", "tokens/s", "peak mem (MiB)"], rows)
    if comparisons:
        doc.p(f"Welch's t-test (two-sided) between runs; a difference with p >= {SIGNIFICANCE} "
              "is marked *not significant*.")
        rows = []
        for d in comparisons:
            for metric, t in d["metrics"].items():
                if t is None:
                    continue
                verdict = ("n/a (" + t.get("why_none", "") + ")" if t["p_value"] is None else
                           ("significant" if t["significant"] else "*not significant*"))
                rows.append([f"{d['a']} vs {d['b']}", t["label"], _num(t["ratio"], ".3f"),
                             _num(t["p_value"], ".3g"), verdict])
        doc.table(["pair", "metric", "mean a / mean b", "p-value", "verdict"], rows)


def scale_section(doc, scale: dict[str, Any] | None) -> list[str]:
    """Append the sweep's table and fits; return the plot file names it references."""
    if not scale:
        return []
    axis = scale["axis"]
    doc.h(2, f"Scaling with {axis}")
    doc.p(f"`bkbench scale` over {axis} = {scale['values']}"
          + (f", {scale['tokens_per_batch']} tokens per batch" if scale.get("tokens_per_batch")
             else "") + f"; {scale['steps']} timed steps per point (median) after "
          f"{scale['warmup']} warm-up steps, each point in its own process; random tokens of a "
          f"{scale['vocab_size']:,}-word vocabulary.")
    rows = [[p["model_name"], p["value"], f"{p['tokens_per_second']:,.0f}",
             f"{p['peak_memory_mb']:,.1f}", f"{p['flops_per_token']:.3e}",
             f"{p['mixer_flops_per_token']:.3e}"] for p in scale["points"]]
    doc.table(["run", axis, "tokens/s", "peak mem (MiB)", "FLOPs/token", "mixer FLOPs/token"], rows)
    rows = []
    for name, fits in scale["fits"].items():
        rows.append([name] + [("n/a" if fits.get(m) is None else
                               f"{fits[m]['exponent']:.2f} (R² {fits[m]['r_squared']:.3f})")
                              for m in METRICS])
    doc.p(f"Fitted exponents p of cost ∝ {axis}^p (least squares in log-log space):")
    doc.table(["run", *[METRICS[m][0] for m in METRICS]], rows)
    names = [f"scale_{m}.png" for m in METRICS]
    for name, m in zip(names, METRICS):
        doc.image(name, f"{METRICS[m][0]} vs {axis}, log-log, with fitted power laws")
    return names


def budget_section(doc, results: dict[str, Any]) -> None:
    """Runs trained to an equal-compute budget, side by side (``budget_flops``/``_seconds``)."""
    budgeted = {n: r for n, r in results.items()
                if r.config.get("budget_flops") is not None
                or r.config.get("budget_seconds") is not None}
    if not budgeted:
        return
    doc.h(2, "Equal compute")
    doc.p("Runs trained until a compute budget was spent (counted training FLOPs, or training "
          "seconds), then evaluated: at equal compute, a cheaper model trains more steps. "
          "Compare runs with the same budget; the Results table above compares equal steps.")
    rows = []
    for n, r in budgeted.items():
        c = r.config
        budget = (f"{c['budget_flops']:.3g} FLOPs" if c.get("budget_flops") is not None
                  else f"{c['budget_seconds']:g} s")
        rows.append([n, budget, f"{r.steps:,}", _num(r.total_flops, ".3e"),
                     _num(r.training_time, ".1f"), _num(r.test_perplexity, ".2f")])
    doc.table(["run", "budget", "steps", "training FLOPs", "training time (s)", "test ppl"], rows)


def ablation_section(doc, table: dict[str, Any] | None) -> list[str]:
    """Append the ablation table (``bkbench ablate``); return the plot file names it references."""
    if not table:
        return []
    doc.h(2, "Ablation")
    doc.p("The ResNet-BK baseline, each flag alone and all flags together, with the same setup "
          "and seeds (`bkbench ablate`; `ablation.json` holds every value).")
    for note in table_notes(table):
        doc.p(note)
    doc.table(ABLATION_HEADERS, table_rows(table))
    doc.image("ablation.png", "test perplexity difference from the baseline per row")
    return ["ablation.png"]
