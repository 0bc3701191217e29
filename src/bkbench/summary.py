"""The console summary of a benchmark invocation: one table, one row per run."""

from __future__ import annotations

from typing import Iterable

from .results import BenchmarkResults


def summary_rows(results: Iterable[BenchmarkResults]) -> list[dict[str, str]]:
    rows = []
    for r in results:
        flag = "" if r.perplexity_valid_for_lm else " (invalid: not causal)"
        rows.append({
            "run": r.model_name,
            "params": f"{r.num_parameters:,}",
            "valid ppl": f"{r.valid_perplexity:.2f}{flag}",
            "test ppl": f"{r.test_perplexity:.2f}{flag}",
            "test bits/byte": "n/a" if r.test_bits_per_byte is None else f"{r.test_bits_per_byte:.3f}",
            "test word ppl": "n/a" if r.test_word_perplexity is None else f"{r.test_word_perplexity:.2f}",
            "test tokens": f"{r.test_tokens:,}",
            "train time (s)": f"{r.training_time:.1f}",
            "tokens/s": f"{r.tokens_per_second:,.0f}",
            "causal": "-" if r.causality is None else ("yes" if r.causality.get("causal") else "NO"),
        })
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)"
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(row[h]) for row in rows)) for h in headers}
    line = "  ".join(h.ljust(widths[h]) for h in headers)
    rule = "  ".join("-" * widths[h] for h in headers)
    body = ["  ".join(row[h].rjust(widths[h]) if i else row[h].ljust(widths[h])
                      for i, h in enumerate(headers)) for row in rows]
    return "\n".join([line, rule, *body])


def print_summary(results: Iterable[BenchmarkResults]) -> None:
    results = list(results)
    if results:
        cfg = results[0].config
        scheme, tokenizer = cfg.get("split_scheme"), cfg.get("tokenizer", "word")
        unit = {"word": "word", "byte": "byte"}.get(tokenizer, f"token ({tokenizer})")
        print(f"\n{cfg.get('dataset', 'wikitext-2')}, {cfg.get('variant')} form, perplexity per "
              f"{unit} ({scheme} split scheme"
              + (": PROXY data, not comparable to official numbers" if scheme == "proxy" else "")
              + ")")
    print(format_table(summary_rows(results)))
