"""Time to a target validation perplexity, for runs with data-side flags (curriculum, active
learning) beside the baseline run of the same architecture."""

from __future__ import annotations

from ..results import BenchmarkResults
from .common import fmt, sci

DATA_FLAGS = ("use_curriculum", "use_active_learning")


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
    from ..data_selection.target import time_to_target, validation_curve
    rows: list[list[str]] = []

    def row(name, flags, tt, source):
        if tt is None:
            return [name, flags, "n/a", source, "no target", "", "", ""]
        if not tt["reached"]:
            return [name, flags, fmt(tt["target"]), source, "not reached", "", "", ""]
        return [name, flags, fmt(tt["target"]), source, str(tt["epoch"]),
                "n/a" if tt["steps"] is None else str(tt["steps"]),
                "n/a" if tt["tokens"] is None else sci(tt["tokens"]), fmt(tt["seconds"])]

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
