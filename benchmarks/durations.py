"""How long each run of a results folder took, phase by phase, from its own results.

Usage::

    python benchmarks/durations.py benchmark_results/wikitext2/default
    python benchmarks/durations.py benchmark_results/wikitext2/smoke --markdown

Every result written by ``bkbench run`` holds ``phase_seconds``: the wall time of its warm-up,
build and causality audit, training with its evaluations, FLOPs count, each flag's record,
and the whole run (:class:`bkbench.progress.Phases`). This prints them per run, with the
command's total, and the load the timings were taken under (``contention``): the figures for
the README's durations, when taken on a quiet machine (no run marked contended).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MAIN = ("warm-up", "build and causality audit", "training and evaluation", "FLOPs count",
        "evaluation FLOPs count")


def _seconds(result: dict) -> dict[str, float]:
    phases = result.get("phase_seconds") or {}
    records = sum(v for k, v in phases.items() if k.endswith(" record"))
    row = {k: phases.get(k) for k in MAIN}
    row["flag records"] = records if records else None
    row["run"] = phases.get("run")
    return row


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = parser.parse_args()
    results = []
    for path in sorted(args.results_dir.glob("*_results.json")):
        result = json.loads(path.read_text())
        if result.get("phase_seconds"):
            results.append(result)
    if not results:
        print(f"no results with phase_seconds in {args.results_dir}", file=sys.stderr)
        return 2
    columns = list(MAIN) + ["flag records", "run"]
    rows = []
    for r in results:
        busy = (r.get("contention") or {}).get("contended")
        threads = (r.get("environment") or {}).get("thread_policy", {}).get("threads")
        rows.append([r["model_name"]] + [_fmt(v) for v in _seconds(r).values()]
                    + [str(threads), "yes" if busy else "no"])
    header = ["run"] + columns[:-1] + ["whole run", "threads", "contended"]
    total = sum(_seconds(r)["run"] or 0 for r in results)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    cpu = (results[0].get("environment") or {}).get("cpu_model")
    print(f"\ncommand total (sum of the runs; start-up, data loading and the report not "
          f"included): {total / 60:.1f} min; {cpu}; "
          f"{sum(1 for row in rows if row[-1] == 'yes')} of {len(rows)} runs contended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
