"""Statistics for repeated runs and sweeps: mean with a Student-t interval, Welch's t-test,
and log-log power-law fits.

Repeated seeds answer "is this difference more than noise?": with n runs per model the 95%
interval of the mean is mean +/- t_{0.975, n-1} * s / sqrt(n), and two models are compared with
Welch's t-test (unequal variances), which is what a reader can redo with ``scipy.stats``.
A sweep over sequence lengths answers "how does cost grow with N?": cost = c * N^p is a straight
line in log-log space, fitted by least squares, with R^2 saying how straight it is.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Summary", "summarize", "welch_test", "welch_difference_ci", "holm_adjust",
           "PowerLawFit", "fit_power_law"]


@dataclass
class Summary:
    """Mean, sample standard deviation and Student-t confidence interval of n values."""
    n: int
    mean: float
    std: float | None          # sample standard deviation (ddof=1); None for n == 1
    ci_low: float | None       # confidence interval of the mean; None for n == 1
    ci_high: float | None
    confidence: float
    values: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """:class:`Summary` of ``values``; a single value has no spread and no interval."""
    from scipy import stats

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("summarize needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"summarize got a non-finite value: {xs}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(xs)
    mean = float(np.mean(xs))
    if n == 1:
        return Summary(1, mean, None, None, None, confidence, xs)
    std = float(np.std(xs, ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half, confidence, xs)


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's two-sided t-test of mean(a) == mean(b); p is None when it cannot be computed
    (fewer than two values on a side, or both sides without spread)."""
    from scipy import stats

    a, b = [float(x) for x in a], [float(x) for x in b]
    out: dict[str, Any] = {"test": "Welch's t-test (two-sided)", "n_a": len(a), "n_b": len(b),
                           "mean_a": float(np.mean(a)) if a else None,
                           "mean_b": float(np.mean(b)) if b else None,
                           "t": None, "p_value": None}
    if len(a) < 2 or len(b) < 2:
        out["why_none"] = "needs at least two seeds per run"
        return out
    if np.std(a, ddof=1) == 0 and np.std(b, ddof=1) == 0:
        out["why_none"] = "no spread on either side"
        return out
    result = stats.ttest_ind(a, b, equal_var=False)
    out["t"], out["p_value"] = float(result.statistic), float(result.pvalue)
    return out


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of m p-values tested together (None: no test, left out of
    m): the i-th smallest becomes max over j <= i of min(1, (m - j + 1) * p_(j)). A family of
    tests then wrongly rejects any true null with probability at most the threshold, which
    an ablation's dozen rows against one baseline would otherwise exceed."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, running = len(order), 0.0
    out: list[float | None] = [None] * len(p_values)
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


@dataclass
class PowerLawFit:
    """cost ~= coefficient * x ** exponent, fitted by least squares on log(x), log(cost)."""
    exponent: float
    coefficient: float
    r_squared: float
    points: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def predict(self, x: float) -> float:
        return self.coefficient * x ** self.exponent


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> PowerLawFit:
    """Fit y = c * x^p; needs two or more points with positive x and y."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"a power-law fit needs >= 2 (x, y) pairs, got {x.size} and {y.size}")
    if not (np.all(x > 0) and np.all(y > 0) and np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("a power-law fit needs positive, finite x and y")
    lx, ly = np.log(x), np.log(y)
    p, logc = np.polyfit(lx, ly, 1)
    residual = ly - (p * lx + logc)
    total = ly - ly.mean()
    ss_tot = float(total @ total)
    # y constant to rounding (a FLOP count per token that does not change with N): there is no
    # spread to explain, and the ratio of two rounding residues would be a meaningless R^2
    flat = float(np.ptp(ly)) <= 1e-9
    r2 = 1.0 if flat or ss_tot == 0 else 1.0 - float(residual @ residual) / ss_tot
    return PowerLawFit(float(p), float(math.exp(logc)), r2, int(x.size))


def welch_difference_ci(a: Sequence[float], b: Sequence[float],
                        confidence: float = 0.95) -> tuple[float, float, float] | None:
    """(mean(a) - mean(b), low, high): the Welch-Satterthwaite interval of the difference of
    means; None with fewer than two values on a side or no spread at all."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return None
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = float(a.mean() - b.mean())
    if va + vb == 0:
        return None
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(va + vb)
    return diff, diff - half, diff + half
