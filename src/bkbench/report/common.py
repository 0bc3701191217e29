"""What every part of the report shares: the audited pair, colours, and number formatting."""

from __future__ import annotations

import json
from typing import Any

from ..compare import as_finite, causal_verdict
from ..results import BenchmarkResults

LONG_SEQUENCE_N = 2048
BASELINE, CANDIDATE = "transformer_baseline", "resnet_bk_full"
COMPONENT_ORDER = ("embedding", "mixer", "feed_forward", "lm_head", "loss", "other", "optimizer")
COMPONENT_COLORS = {"embedding": "#8c6d31", "mixer": "#1f77b4", "feed_forward": "#2ca02c",
                    "lm_head": "#d62728", "loss": "#9467bd", "other": "#7f7f7f",
                    "optimizer": "#ff7f0e", "selection": "#e377c2", "unattributed": "#bbbbbb"}
RUN_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b"]


class ReportError(Exception):
    """The results folder cannot be reported on (missing, or no results files)."""


def fmt(x: Any, spec: str = ".2f") -> str:
    """``x`` formatted with ``spec``, or "n/a" when it is not a finite number."""
    v = as_finite(x)
    return "n/a" if v is None else format(v, spec)


def sci(x: Any) -> str:
    return fmt(x, ".3e")


def short(x: Any, limit: int = 90) -> str:
    """A value as one line of at most ``limit`` characters (JSON for non-strings)."""
    s = x if isinstance(x, str) else json.dumps(x, default=str)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def pct(x: Any, signed: bool = True) -> str:
    v = as_finite(x)
    if v is None:
        return "n/a"
    return f"{100 * v:+.3f}%" if signed else f"{100 * v:.1f}%"


def div(a: Any, b: Any) -> float | None:
    a, b = as_finite(a), as_finite(b)
    return None if a is None or b is None or b == 0 else a / b


def change_text(saving: float) -> str:
    """A relative saving (1 - new / old) in words whose direction follows its sign:
    0.3 -> "30.0% lower", -0.706 -> "70.6% higher"."""
    return f"{100 * abs(saving):.1f}% {'lower' if saving >= 0 else 'higher'}"


def causal_text(r: BenchmarkResults) -> str:
    c = causal_verdict(r)
    return "not audited" if c is None else ("causal" if c else "**NOT CAUSAL**")


def timing(r: BenchmarkResults, value: Any, spec: str) -> str:
    """A timing, marked where the machine was busy while it was taken."""
    text = fmt(value, spec)
    return text + " (contended)" if (r.contention or {}).get("contended") else text


def is_proxy(results: dict[str, BenchmarkResults]) -> bool:
    return any(r.config.get("split_scheme") == "proxy" or (r.data or {}).get("scheme") == "proxy"
               for r in results.values())
