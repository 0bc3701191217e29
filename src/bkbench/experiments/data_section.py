"""Report section: each run's held-out numbers in the units that compare across tokenizers.

A perplexity per token depends on what a token is: per word, per BPE piece and per byte are
different quantities.  Bits per byte of the split's UTF-8 text, and a perplexity per word of the
published convention (words + one ``<eos>`` per line), are the same quantity for every tokenizer
of the same text, so word, BPE and byte runs can be put side by side (bkbench.eval).
"""

from __future__ import annotations

from typing import Any, Iterable


def _num(x: Any, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def units_rows(results: Iterable[Any]) -> list[list[str]]:
    """One row per run: run, dataset, tokenizer, vocabulary, test perplexity per token, per
    word, bits per token and bits per byte."""
    rows = []
    for r in results:
        data = r.data or {}
        rows.append([r.model_name, str(data.get("dataset", "wikitext-2")),
                     str(r.config.get("tokenizer")), _num(data.get("vocab_size"), ","),
                     _num(r.test_perplexity, ".2f"), _num(r.test_word_perplexity, ".2f"),
                     _num(r.test_bits_per_token, ".3f"), _num(r.test_bits_per_byte, ".3f")])
    return rows


def units_section(doc, results: Iterable[Any]) -> None:
    """Append the section to the report document ``doc`` (its h/p/table methods)."""
    rows = units_rows(results)
    if not rows:
        return
    doc.h(2, "Data and tokenizer units")
    doc.p("Perplexity per token is per word, per BPE piece or per byte depending on the "
          "tokenizer, and is comparable only between runs of the same tokenizer. Bits per byte "
          "(the test NLL over the UTF-8 bytes of the test text) and the perplexity per word (the "
          "test NLL over the words of the published convention, words plus one <eos> per line) "
          "are the same quantities for every tokenizer, so they compare word, BPE and byte runs "
          "of the same data.")
    doc.table(["run", "dataset", "tokenizer", "vocabulary", "test ppl / token",
               "test ppl / word", "test bits / token", "test bits / byte"], rows)
